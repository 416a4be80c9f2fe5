"""Argument checks shared across the package, with "expected X; got Y" messages."""

from __future__ import annotations

from typing import Any

import torch


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is a positive ``int`` (not a bool); else raise a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer; got {value!r}")
    return value


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` >= 0 (not a bool); else raise a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer; got {value!r}")
    return value


def broadcast_batch(
    x: torch.Tensor, context: torch.Tensor, name: str, event_dim: int = 1
) -> torch.Size:
    """The batch shape of ``x`` and ``context`` together (broadcast).

    ``x`` has shape ``(*batch, *event)`` with ``event_dim`` event dimensions (1 for vectors, 3
    for images); ``context`` has shape ``(*batch', c)``.

    Raises:
        ValueError: when the two batch shapes do not broadcast.
    """
    try:
        return torch.broadcast_shapes(x.shape[: x.dim() - event_dim], context.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"{name}: expected a context whose batch shape broadcasts with the input's; "
            f"got input {tuple(x.shape)} and context {tuple(context.shape)}"
        ) from None
