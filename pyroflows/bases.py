"""Base distributions of flows, as modules so that ``.to(device)`` and ``.double()`` move them.

A base is an ``nn.Module`` whose ``forward(context)`` returns a Pyro distribution with event
shape ``(dim,)`` and batch shape ``context.shape[:-1]`` (``()`` without a context). Keeping its
tensors in buffers or parameters avoids the device mismatch that Pyro and nflows users met when a
flow moved to CUDA and its base did not (pyro-ppl/pyro#2761, bayesiains/nflows#15). The bases
here also say their shapes without being called (``shapes(context)``), so that a flow's
distribution builds its base only when it samples or scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from ._checks import check_positive_int
from .nn import MLP
from .transforms.elementwise import soft_clamp

__all__ = [
    "ConditionalDiagNormal",
    "DiagNormal",
    "StandardNormal",
    "check_temperature",
    "make_base",
    "tempered",
]

# Per-feature log-scales of the learnable bases are soft-clamped to (-10, 10): wide enough for
# any standardised problem, narrow enough that exp() cannot overflow float32.
LOG_SCALE_BOUND = 10.0


def _expand(d: dist.Distribution, context: torch.Tensor | None) -> dist.Distribution:
    if context is None:
        return d
    return d.expand(torch.broadcast_shapes(d.batch_shape, context.shape[:-1]))


def _batch_shape(context: torch.Tensor | None) -> torch.Size:
    return torch.Size() if context is None else context.shape[:-1]


def _event_shape(dim: int | Sequence[int]) -> tuple[int, ...]:
    """``(dim,)`` for an integer, the shape itself for a shape such as ``(C, H, W)``."""
    if isinstance(dim, int) and not isinstance(dim, bool):
        return (check_positive_int("dim", dim),)
    try:
        shape = tuple(dim)
    except TypeError:
        raise ValueError(f"dim: expected a positive integer or a shape; got {dim!r}") from None
    if not shape:
        raise ValueError("dim: expected a positive integer or a non-empty shape; got ()")
    for size in shape:
        check_positive_int("dim", size)
    return shape


def check_temperature(temperature: float) -> float:
    """``temperature`` if it is a positive finite number (the factor :func:`tempered` takes).

    Raises:
        ValueError: otherwise.

    Example:
        >>> from pyroflows.bases import check_temperature
        >>> check_temperature(0.7)
        0.7
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature: expected a positive number; got {temperature!r}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature: expected a positive finite number; got {temperature!r}")
    return temperature


def tempered(base: dist.Distribution, temperature: float) -> dist.Distribution:
    """A Normal base with its scale multiplied by ``temperature`` (its mean kept).

    Sampling a flow at temperature ``T < 1`` (Glow's "temperature", Kingma and Dhariwal, 2018)
    draws the base noise from ``N(loc, (T * scale)^2)`` and pushes it through the unchanged
    transforms: samples concentrate on the flow's typical, high-density images. The result is a
    proper distribution, so ``log_prob`` of the tempered flow stays exact.

    Args:
        base: a ``Normal``, or an ``Independent`` of one (as the bases here return).
        temperature: a positive, finite factor on the base's scale.

    Returns:
        The same kind of distribution with its scale multiplied by ``temperature``.

    Raises:
        ValueError: for a temperature that is not a positive finite number, or a base that is
            not Normal.

    Example:
        >>> from pyroflows.bases import StandardNormal, tempered
        >>> tempered(StandardNormal(2)(), 0.5).base_dist.scale
        tensor([0.5000, 0.5000])
    """
    if check_temperature(temperature) == 1:
        return base
    inner, ndims = base, 0
    if isinstance(base, torch.distributions.Independent):
        inner, ndims = base.base_dist, base.reinterpreted_batch_ndims
    if not isinstance(inner, torch.distributions.Normal):
        raise ValueError(
            f"temperature: needs a Normal base distribution; got {type(inner).__name__}"
        )
    d = dist.Normal(inner.loc, inner.scale * temperature, validate_args=False)
    return d.to_event(ndims) if ndims else d


class StandardNormal(nn.Module):
    """The standard Normal ``N(0, I)`` on ``R^dim`` (or on tensors of a shape), held in buffers.

    Args:
        dim: number of features, or the event shape (e.g. ``(C, H, W)`` for images).

    Example:
        >>> from pyroflows.bases import StandardNormal
        >>> StandardNormal(3)().event_shape, StandardNormal((1, 4, 4))().event_shape
        (torch.Size([3]), torch.Size([1, 4, 4]))
    """

    #: its distributions are Normal, reparameterised (a flow's distribution reads this and
    #: :meth:`shapes` instead of building the base when it is made)
    has_rsample = True

    def __init__(self, dim: int | Sequence[int]) -> None:
        super().__init__()
        shape = _event_shape(dim)
        self.register_buffer("loc", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    def forward(self, context: torch.Tensor | None = None) -> dist.Distribution:
        # Valid by construction: skipping the argument check saves its cost on every call.
        d = dist.Normal(self.loc, self.scale, validate_args=False).to_event(self.loc.dim())
        return _expand(d, context)

    def shapes(self, context: torch.Tensor | None = None) -> tuple[torch.Size, torch.Size]:
        """The batch and event shapes of ``self(context)``, without building it."""
        return _batch_shape(context), self.loc.shape


class DiagNormal(nn.Module):
    """A learnable diagonal Normal ``N(loc, diag(scale²))``, starting at ``N(0, I)``.

    ``scale = exp(soft_clamp(log_scale, 10))``.

    Args:
        dim: number of features, or the event shape.
    """

    #: its distributions are Normal, reparameterised (a flow's distribution reads this and
    #: :meth:`shapes` instead of building the base when it is made)
    has_rsample = True

    def __init__(self, dim: int | Sequence[int]) -> None:
        super().__init__()
        shape = _event_shape(dim)
        self.loc = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))

    def forward(self, context: torch.Tensor | None = None) -> dist.Distribution:
        scale = soft_clamp(self.log_scale, LOG_SCALE_BOUND).exp()
        d = dist.Normal(self.loc, scale, validate_args=False).to_event(self.loc.dim())
        return _expand(d, context)

    def shapes(self, context: torch.Tensor | None = None) -> tuple[torch.Size, torch.Size]:
        """The batch and event shapes of ``self(context)``, without building it."""
        return _batch_shape(context), self.loc.shape


class ConditionalDiagNormal(nn.Module):
    """A diagonal Normal whose mean and scale a network reads from the context.

    ``(loc, raw) = MLP(context)``, ``scale = exp(soft_clamp(raw, 10))``; the network's last layer
    starts at zero, so the base starts at ``N(0, I)`` for every context. This is the base of the
    IAF paper's VAE posterior: the encoder's features are the context, from which the base's
    mean and scale and the flow's conditioners all read.

    Args:
        dim: number of features.
        context_dim: size of the context.
        hidden: hidden widths of the network (``()`` for a linear map).

    Shapes:
        context ``(*batch, context_dim)`` -> distribution with batch shape ``batch``, event
        shape ``(dim,)``.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016).
    """

    #: its distributions are Normal, reparameterised (a flow's distribution reads this and
    #: :meth:`shapes` instead of building the base when it is made)
    has_rsample = True

    def __init__(self, dim: int, context_dim: int, hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("context_dim", context_dim)
        self.dim = dim
        self.net = MLP(context_dim, 2 * dim, hidden=hidden)

    def forward(self, context: torch.Tensor | None = None) -> dist.Distribution:
        self._check(context)
        loc, raw = self.net(context).chunk(2, dim=-1)
        scale = soft_clamp(raw, LOG_SCALE_BOUND).exp()
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def shapes(self, context: torch.Tensor | None = None) -> tuple[torch.Size, torch.Size]:
        """The batch and event shapes of ``self(context)``, without building it."""
        self._check(context)
        return _batch_shape(context), torch.Size((self.dim,))

    def _check(self, context: torch.Tensor | None) -> None:
        if context is None:
            raise ValueError(
                "ConditionalDiagNormal needs a context of shape (*batch, "
                f"{self.net.in_features}); got None"
            )


BASES = ("normal", "diag_normal", "conditional_normal")


def make_base(
    base: str | nn.Module,
    dim: int | Sequence[int],
    context_dim: int = 0,
    hidden: Sequence[int] = (64,),
) -> nn.Module:
    """Build a base from its name (``"normal"``, ``"diag_normal"``, ``"conditional_normal"``).

    ``dim`` is the number of features or an event shape (``"conditional_normal"``: vectors
    only). A module is returned as it is (it must map a context, or ``None``, to a
    distribution).
    """
    if isinstance(base, nn.Module):
        return base
    if base == "normal":
        return StandardNormal(dim)
    if base == "diag_normal":
        return DiagNormal(dim)
    if base == "conditional_normal":
        if not context_dim:
            raise ValueError("base='conditional_normal' needs context_dim > 0; got context_dim=0")
        if not isinstance(dim, int):
            raise ValueError(
                f"base='conditional_normal' is for vector events; got the event shape {dim}"
            )
        return ConditionalDiagNormal(dim, context_dim, hidden)
    raise ValueError(f"base: expected one of {BASES} or an nn.Module; got {base!r}")
