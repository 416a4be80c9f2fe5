"""Elementwise transforms: each feature is mapped on its own, so log|det J| is a sum.

All act on vectors (event_dim 1) and own their parameters (the identity at initialisation), or
have none: the fixed nonlinearities ``LeakyReLU``, ``Sigmoid`` and ``Logit``, which take no
context either. The elementwise maps whose parameters come from a conditioner (inside coupling
and autoregressive transforms) are in :mod:`pyroflows.transforms.maps`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from .._checks import check_positive_int
from .base import FlowTransform

__all__ = [
    "ActNorm",
    "ElementwiseAffine",
    "LeakyReLU",
    "Logit",
    "Sigmoid",
    "SinhArcsinh",
    "soft_clamp",
]


def _batch(x: torch.Tensor, event_dim: int = 1) -> torch.Size:
    return x.shape[: x.dim() - event_dim]


class ElementwiseAffine(FlowTransform):
    """Learnable per-feature scale and shift.

    * map: ``y = exp(s) * x + t``
    * inverse: ``x = (y - t) * exp(-s)``
    * log|det J|: ``sum(s)`` (independent of ``x``)

    Both directions cost one elementwise pass. Starts at the identity (``s = t = 0``); ``s`` is
    unbounded because it does not depend on the input.

    Args:
        dim: number of features.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ElementwiseAffine
        >>> t = ElementwiseAffine(3)
        >>> x = torch.randn(5, 3)
        >>> torch.equal(t(x), x), t.log_abs_det_jacobian(x, t(x)).shape
        (True, torch.Size([5]))
    """

    def __init__(self, dim: int) -> None:
        super().__init__(event_shape=(check_positive_int("dim", dim),))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def _forward_and_log_det(self, x, context):
        y = x * self.log_scale.exp() + self.shift
        return y, self.log_scale.sum().expand(_batch(x))

    def _inverse_and_log_det(self, y, context):
        x = (y - self.shift) * torch.exp(-self.log_scale)
        return x, -self.log_scale.sum().expand(_batch(y))

    def _log_abs_det(self, x, y, context):
        return self.log_scale.sum().expand(_batch(x))


def _standardise(module: FlowTransform, mean: torch.Tensor, std: torch.Tensor, inverse: bool):
    """Set an ActNorm's ``shift``/``log_scale`` so that the batch with these per-feature (or
    per-channel) statistics comes out standardised, and mark the module initialised (its
    ``initialized`` buffer and the Python mirror)."""
    if torch.jit.is_tracing():
        # A trace would record this batch's statistics as constants and fail on the flag.
        raise RuntimeError(
            f"{type(module).__name__} is not initialised yet: its first batch sets its "
            "parameters from data, which torch.jit.trace cannot record. Run the flow once on "
            "data before tracing (e.g. flow().log_prob(x) under torch.no_grad(), or pf.fit)"
        )
    with torch.no_grad():
        if inverse:  # x = (y - t) exp(-s) standardised
            module.shift.copy_(mean)
            module.log_scale.copy_(std.log())
        else:  # y = exp(s) x + t standardised
            module.log_scale.copy_(-std.log())
            module.shift.copy_(-mean / std)
        module.initialized.fill_(True)
    module._initialized = True


class ActNorm(ElementwiseAffine):
    """Activation normalisation (Glow): an elementwise affine map initialised from data.

    The map, inverse and log|det J| are those of :class:`ElementwiseAffine`. The first batch of at
    least two points that passes through the transform sets ``s`` and ``t`` so that the batch
    comes out with zero mean and unit variance per feature, in whichever direction it travels:
    data scored through the inverse (density estimation) is standardised on the base side;
    base samples pushed forward (sampling, variational inference) are standardised on the data
    side. Afterwards ``s`` and ``t`` are ordinary learnable parameters. Per-feature standard
    deviations are floored at ``min_std`` so that a constant feature gives a finite scale.

    Whether initialisation has happened is kept in the ``initialized`` buffer, so a flow restored
    with ``load_state_dict`` is not re-initialised.

    Args:
        dim: number of features.
        min_std: floor on the standard deviations used for initialisation.

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal, 2018).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ActNorm
        >>> t = ActNorm(2)
        >>> data = 3.0 + 5.0 * torch.randn(1000, 2)
        >>> z = t.inv(data)            # the first batch initialises s and t
        >>> z.mean(0).abs().max() < 1e-4, (z.std(0, unbiased=False) - 1).abs().max() < 1e-4
        (tensor(True), tensor(True))
    """

    def __init__(self, dim: int, min_std: float = 1e-3) -> None:
        super().__init__(dim)
        if not min_std > 0:
            raise ValueError(f"min_std: expected a positive number; got {min_std!r}")
        self.min_std = float(min_std)
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # a Python mirror, so the hot path never syncs with a GPU

    def _initialize(self, v: torch.Tensor, inverse: bool) -> None:
        flat = v.detach().reshape(-1, v.shape[-1])
        if flat.shape[0] < 2:
            return
        std = flat.std(0, unbiased=False).clamp_min(self.min_std)
        _standardise(self, flat.mean(0), std, inverse)

    def _forward_and_log_det(self, x, context):
        if not self._initialized:
            self._initialize(x, inverse=False)
        return super()._forward_and_log_det(x, context)

    def _inverse_and_log_det(self, y, context):
        if not self._initialized:
            self._initialize(y, inverse=True)
        return super()._inverse_and_log_det(y, context)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, initialized={self._initialized}"


class LeakyReLU(FlowTransform):
    """Leaky rectifier, a piecewise-linear bijection of the real line.

    * map: ``y = x`` for ``x >= 0``, ``y = a * x`` otherwise
    * inverse: ``x = y`` for ``y >= 0``, ``x = y / a`` otherwise
    * log|det J|: ``log(a) * #{i: x_i < 0}``

    Both directions cost one elementwise pass. Parameter-free; accepts vectors of any size.

    Args:
        negative_slope: the slope ``a > 0`` for negative inputs.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import LeakyReLU
        >>> LeakyReLU(0.5)(torch.tensor([[-2.0, 3.0]]))
        tensor([[-1.,  3.]])
    """

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        if not (isinstance(negative_slope, (int, float)) and negative_slope > 0):
            raise ValueError(f"negative_slope: expected a positive number; got {negative_slope!r}")
        self.negative_slope = float(negative_slope)
        self._log_slope = math.log(self.negative_slope)

    def _forward_and_log_det(self, x, context):
        neg = x < 0
        y = torch.where(neg, x * self.negative_slope, x)
        return y, neg.to(x.dtype).sum(-1) * self._log_slope

    def _inverse_and_log_det(self, y, context):
        neg = y < 0
        x = torch.where(neg, y / self.negative_slope, y)
        return x, -neg.to(y.dtype).sum(-1) * self._log_slope

    def _log_abs_det(self, x, y, context):
        return (x < 0).to(x.dtype).sum(-1) * self._log_slope

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


def soft_clamp(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(raw / bound)``: the identity near 0, smoothly kept in ``(-bound, bound)``."""
    return bound * torch.tanh(raw / bound)


def _clamp_open_unit(y: torch.Tensor) -> torch.Tensor:
    # Keeps the logit finite where float rounding reaches 0 or 1.
    finfo = torch.finfo(y.dtype)
    return y.clamp(finfo.tiny, 1.0 - finfo.eps)


def _sigmoid_and_log_det(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = _clamp_open_unit(torch.sigmoid(x))
    ladj = -(F.softplus(-x) + F.softplus(x)).sum(-1)
    return y, ladj


def _logit_and_log_det(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = _clamp_open_unit(y)
    log_y, log_1my = y.log(), torch.log1p(-y)
    return log_y - log_1my, -(log_y + log_1my).sum(-1)


_OPEN_UNIT_VECTOR = constraints.independent(constraints.unit_interval, 1)


class _ParameterFree(FlowTransform):
    """A fixed elementwise map of vectors of any size: no parameters, hence nothing to condition.

    Such a transform sits in a conditional flow as it is (an unconditional transform ignores
    the context), so a ``context_dim`` is refused rather than accepted and then demanded.
    """

    def __init__(self, **kwargs: Any) -> None:
        name = type(self).__name__
        context_dim = kwargs.pop("context_dim", 0)
        if kwargs:
            raise TypeError(f"{name}: expected no arguments; got {', '.join(kwargs)}")
        if context_dim != 0:
            raise ValueError(
                f"{name}: expected no context_dim (it has no parameters to condition; in a "
                "conditional flow it passes the context by, as every unconditional transform "
                f"does); got context_dim={context_dim!r}"
            )
        super().__init__()


class Sigmoid(_ParameterFree):
    """Logistic sigmoid, a bijection from the real line onto the open unit interval.

    * map: ``y = 1 / (1 + exp(-x))``
    * inverse: ``x = log(y) - log(1 - y)``
    * log|det J|: ``-sum(softplus(-x) + softplus(x))``

    Both directions cost one elementwise pass. Outputs are clamped to
    ``[tiny, 1 - eps]`` of their dtype, so the inverse stays finite where the sigmoid rounds to 0
    or 1. Parameter-free, and so takes no ``context_dim``; accepts vectors of any size.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Sigmoid
        >>> Sigmoid()(torch.zeros(1, 2))
        tensor([[0.5000, 0.5000]])
    """

    codomain = _OPEN_UNIT_VECTOR

    def _forward_and_log_det(self, x, context):
        return _sigmoid_and_log_det(x)

    def _inverse_and_log_det(self, y, context):
        return _logit_and_log_det(y)


class Logit(_ParameterFree):
    """Logit, a bijection from the open unit interval onto the real line (inverse of Sigmoid).

    * map: ``y = log(x) - log(1 - x)``
    * inverse: ``x = 1 / (1 + exp(-y))``
    * log|det J|: ``-sum(log(x) + log(1 - x))``

    Both directions cost one elementwise pass. Inputs are clamped to ``[tiny, 1 - eps]`` of
    their dtype so that the map is finite at the rounding edges. Use it to send data on
    ``(0, 1)`` (e.g. dequantised pixels) to an unbounded space. Parameter-free, and so takes no
    ``context_dim``.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Logit
        >>> Logit()(torch.tensor([[0.5, 0.75]]))
        tensor([[0.0000, 1.0986]])
    """

    domain = _OPEN_UNIT_VECTOR

    def _forward_and_log_det(self, x, context):
        return _logit_and_log_det(x)

    def _inverse_and_log_det(self, y, context):
        return _sigmoid_and_log_det(y)


def _log_cosh(u: torch.Tensor) -> torch.Tensor:
    a = u.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)


class SinhArcsinh(FlowTransform):
    """Learnable sinh-arcsinh map: smooth, unbounded, with learnable skew and tail weight.

    * map: ``y = sinh(b * asinh(x) - a)``
    * inverse: ``x = sinh((asinh(y) + a) / b)``
    * log|det J|: ``sum(log b + log cosh(b * asinh(x) - a) - ½ log(1 + x²))``

    Both directions cost one elementwise pass. ``a`` (skew) shifts mass left or right; ``b``
    (tail weight) makes tails heavier (``b < 1``) or lighter (``b > 1``) than the input's. It is
    the identity at initialisation (``a = 0``, ``b = 1``). ``log b`` is soft-clamped,
    ``log b = c * tanh(raw / c)`` with ``c = tail_bound``, so that ``b`` stays in
    ``[exp(-c), exp(c)]`` and ``sinh`` cannot overflow float32 for ``|x|`` up to about 1e6.

    Args:
        dim: number of features.
        tail_bound: the soft bound ``c`` on ``|log b|``.

    References:
        Sinh-arcsinh distributions (Jones and Pewsey, Biometrika 2009).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import SinhArcsinh
        >>> t = SinhArcsinh(2)
        >>> x = torch.randn(4, 2)
        >>> torch.allclose(t(x), x)
        True
    """

    def __init__(self, dim: int, tail_bound: float = 1.5) -> None:
        super().__init__(event_shape=(check_positive_int("dim", dim),))
        if not tail_bound > 0:
            raise ValueError(f"tail_bound: expected a positive number; got {tail_bound!r}")
        self.tail_bound = float(tail_bound)
        self.skew = nn.Parameter(torch.zeros(dim))
        self.raw_tail = nn.Parameter(torch.zeros(dim))

    def _log_tail(self) -> torch.Tensor:
        return soft_clamp(self.raw_tail, self.tail_bound)

    def _forward_and_log_det(self, x, context):
        log_b = self._log_tail()
        u = log_b.exp() * torch.asinh(x) - self.skew
        ladj = log_b + _log_cosh(u) - 0.5 * torch.log1p(x * x)
        return torch.sinh(u), ladj.sum(-1)

    def _inverse_and_log_det(self, y, context):
        log_b = self._log_tail()
        v = (torch.asinh(y) + self.skew) * torch.exp(-log_b)
        x = torch.sinh(v)
        # log|dx/dy| = -log b + log cosh(v) - ½ log(1 + y²)
        ladj = -log_b + _log_cosh(v) - 0.5 * torch.log1p(y * y)
        return x, ladj.sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tail_bound={self.tail_bound}"


def __getattr__(name: str):
    # Names that changed, with the warning that says what replaced them (PEP 562).
    if name == "AffineParams":
        from .maps import Affine

        warnings.warn(
            "pyroflows.transforms.elementwise.AffineParams is deprecated: the affine map is now "
            "the ElementwiseMap pyroflows.transforms.Affine, which Coupling, "
            "MaskedAutoregressive and ImageCoupling take as an argument; AffineParams now names "
            "Affine",
            DeprecationWarning,
            stacklevel=2,
        )
        return Affine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
