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


def expand_to_context(v: torch.Tensor, context: torch.Tensor | None, name: str) -> torch.Tensor:
    """Vectors ``v`` (``(*batch, dim)``) expanded to the batch shape they share with ``context``
    (unchanged without one), for transforms whose every row needs its own context row.

    Raises:
        ValueError: when the two batch shapes do not broadcast (:func:`broadcast_batch`).
    """
    if context is None:
        return v
    return v.expand(*broadcast_batch(v, context, name), v.shape[-1])


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` if it is a positive finite number (not a bool); else a ``ValueError``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < float("inf")
    ):
        raise ValueError(f"{name}: expected a positive number; got {value!r}")
    return value


def check_length(steps: Any, epochs: Any, batch_size: Any = None) -> None:
    """A run's length: ``steps`` or ``epochs`` (not both), each a positive integer if given."""
    if steps is not None and epochs is not None:
        raise ValueError("steps, epochs: give one of them, not both")
    for name, value in (("batch_size", batch_size), ("steps", steps), ("epochs", epochs)):
        if value is not None:
            check_positive_int(name, value)


def check_run(
    eval_every: Any, patience: Any, valid_rows: Any, checkpoint: Any, resume: bool
) -> None:
    """The arguments the training front-ends share: counts that are positive integers when
    given, and a checkpoint folder to resume from."""
    for name, value in (
        ("eval_every", eval_every),
        ("patience", patience),
        ("valid_rows", valid_rows),
    ):
        if value is not None:
            check_positive_int(name, value)
    if resume and checkpoint is None:
        raise ValueError("resume: needs the checkpoint folder to resume from")
