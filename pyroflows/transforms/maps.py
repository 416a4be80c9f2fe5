"""Elementwise monotone maps whose parameters come from a conditioner network.

A coupling, autoregressive or image-coupling transform is two parts: a *conditioner* network
that reads some features (and the context) and a monotone *elementwise map* of the other
features that takes the conditioner's output as its parameters. The transforms
(:class:`~pyroflows.transforms.Coupling`, :class:`~pyroflows.transforms.MaskedAutoregressive`,
:class:`~pyroflows.transforms.ImageCoupling`) own the conditioner; the map is passed in as an
argument and only has to keep the contract of :class:`ElementwiseMap`, so a new map is one class
that works in all of them.

This module holds the contract and the simple maps, :class:`Affine` and :class:`Additive`; the
spline maps (:class:`~pyroflows.transforms.RationalQuadraticSpline`,
:class:`~pyroflows.transforms.RationalLinearSpline`) live beside their maths in
:mod:`pyroflows.transforms.splines`.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from .._checks import check_positive

__all__ = [
    "CONDITIONER_BOUND",
    "Additive",
    "Affine",
    "ElementwiseMap",
    "check_conditioner_bound",
    "check_map",
]

#: The default ``conditioner_bound`` of :class:`~pyroflows.transforms.Coupling` and
#: :class:`~pyroflows.transforms.MaskedAutoregressive`: their conditioners read the features
#: clamped to ``[-10, 10]``, ten standard deviations of a standardised feature.
CONDITIONER_BOUND = 10.0


class ElementwiseMap(nn.Module, metaclass=ABCMeta):
    """The contract of an elementwise monotone map parametrised by a conditioner's output.

    The map acts on ``n`` features at once, each with its own parameters: feature ``i`` of
    ``x`` goes to ``y_i = g(x_i; θ_i)`` with ``g`` strictly increasing in ``x_i``, where
    ``θ_i`` are the ``params_per_feature`` numbers the conditioner emitted for feature ``i``.
    A map is a small ``nn.Module`` so that it appears in the transform's ``repr``, moves with
    ``.to()`` and could own parameters of its own; the maps of this package own none, so they
    add nothing to a ``state_dict``.

    **What a subclass sets and implements**

    * ``params_per_feature``: how many conditioner outputs each feature takes;
    * ``param_major``: how the transforms lay the conditioner's output out. ``False``:
      ``h`` has shape ``(*batch, n, params_per_feature)`` (the parameters of one feature side
      by side, what splines want); ``True``: ``(*batch, params_per_feature, n)`` (one parameter
      of every feature in a contiguous row, what the affine map wants; see
      :class:`~pyroflows.nn.MADE`'s ``param_major``). Part of how a saved model's conditioner
      weights are read, so a map must not change it once released;
    * :meth:`forward` ``(x, h) -> (y, ladj)`` and :meth:`inverse` ``(y, h) -> (x, ladj_inv)``,
      where ``x``, ``y`` have shape ``(*batch, n)`` (their batch shape broadcasts with ``h``'s;
      the results have the broadcast batch shape) and ``ladj = sum_i log g'(x_i; θ_i)``, the
      log|det| of the map summed over the ``n`` features (shape ``batch``); ``ladj_inv`` is the
      log|det| of the inverse, ``-ladj`` at the corresponding point;
    * optionally ``volume_preserving = True`` when ``ladj`` is 0 whatever ``x`` and ``h``, so
      that a transform can skip its conditioner when only log|det J| is asked for;
    * ``inverse_kind = "numerical"`` when :meth:`inverse` solves iteratively (the neural
      autoregressive maps), so that what scores detached draws (STL, DReG) can avoid it;
    * an ``extra_repr`` naming its settings.

    **Promises a map keeps**

    * *Identity at zero*: ``h = 0`` gives the identity map with ``ladj = 0`` (exactly, or up to
      rounding). Conditioners end in a zero-initialised layer, so a freshly built transform is
      the identity and an untrained flow equals its base distribution.
    * *A bounded parametrisation*: whatever the (finite) conditioner output, the map stays
      away from degenerate ones (the affine slope within ``exp(±B)`` by a soft-clamped
      log-scale; splines with minimum bin widths, heights and knot derivatives), so deep stacks
      and points far from the data give finite values, inverses and log-determinants.
    * Both directions are analytic (or documented with their tolerance), differentiable in
      ``x`` and ``h``, and work in float32 and float64.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Affine
        >>> g = Affine()
        >>> x, h = torch.randn(5, 3), torch.zeros(5, 2, 3)   # param-major: (batch, 2, n)
        >>> y, ladj = g(x, h)                                 # zero parameters: the identity
        >>> torch.equal(y, x), ladj.shape
        (True, torch.Size([5]))
    """

    #: ``"exact"`` (closed-form inverse) or ``"numerical"`` (an iterative solve)
    inverse_kind: ClassVar[str] = "exact"

    params_per_feature: int
    param_major: bool = False
    volume_preserving: bool = False

    @abstractmethod
    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = g(x; h)`` and ``log|det ∂y/∂x|`` summed over the features (shape ``batch``)."""

    @abstractmethod
    def inverse(self, y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = g⁻¹(y; h)`` and ``log|det ∂x/∂y|`` summed over the features (shape ``batch``)."""


class Affine(ElementwiseMap):
    """Affine map with a soft-clamped log-scale: ``y = x * exp(s) + t``.

    With ``h`` of shape ``(*batch, 2, n)`` (parameter-major), ``t = h[..., 0, :]`` and
    ``s = B * tanh(h[..., 1, :] / B)``, ``B = log_scale_bound``:

    * map: ``y = x * exp(s) + t``
    * inverse: ``x = (y - t) * exp(-s)``
    * log|det J|: ``sum(s)``

    The soft clamp keeps every feature's scale within ``exp(±B)`` (so that deep stacks do not
    overflow far from the data) and leaves ``s ≈ raw`` near zero, where training starts; zero
    parameters are exactly the identity. ``tanh`` is evaluated as ``2 * sigmoid(2u) - 1``: the
    same number, at a third of the cost on CPUs.

    Args:
        log_scale_bound: the soft bound ``B`` on ``|s|``.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Affine
        >>> g = Affine(log_scale_bound=2.0)
        >>> h = torch.tensor([[1.0], [100.0]])   # t = 1, raw log-scale 100: s ≈ 2
        >>> y, ladj = g(torch.tensor([1.0]), h)
        >>> [round(v, 3) for v in (y.item(), ladj.item())]
        [8.389, 2.0]
        >>> torch.allclose(g.inverse(y, h)[0], torch.tensor([1.0]))
        True
    """

    params_per_feature = 2
    # Shift and log-scale each read across all features: laid out parameter-major, both are
    # contiguous rows.
    param_major = True

    def __init__(self, log_scale_bound: float = 3.0) -> None:
        super().__init__()
        self.log_scale_bound = float(check_positive("log_scale_bound", log_scale_bound))

    def log_scale(self, raw: torch.Tensor) -> torch.Tensor:
        """``s = B * tanh(raw / B)``, computed as ``B * (2 * sigmoid(2 * raw / B) - 1)``."""
        bound = self.log_scale_bound
        return (torch.sigmoid(raw * (2.0 / bound)) - 0.5).mul_(2.0 * bound)

    def forward(self, x, h):
        shift, raw = h.unbind(-2)
        log_scale = self.log_scale(raw)
        return torch.addcmul(shift, x, log_scale.exp()), log_scale.sum(-1)

    def inverse(self, y, h):
        shift, raw = h.unbind(-2)
        bound = self.log_scale_bound
        negative = (0.5 - torch.sigmoid(raw * (2.0 / bound))).mul_(2.0 * bound)  # -s, directly
        return (y - shift) * negative.exp(), negative.sum(-1)

    def extra_repr(self) -> str:
        return f"log_scale_bound={self.log_scale_bound}"


class Additive(ElementwiseMap):
    """Additive map, a shift: ``y = x + t`` (volume preserving).

    With ``h`` of shape ``(*batch, n, 1)``, ``t = h[..., 0]``:

    * map: ``y = x + t``
    * inverse: ``x = y - t``
    * log|det J|: ``0``

    Zero parameters are exactly the identity.

    References:
        NICE: Non-linear Independent Components Estimation (Dinh, Krueger and Bengio, 2014).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Additive
        >>> y, ladj = Additive()(torch.zeros(2, 3), torch.ones(2, 3, 1))
        >>> y.tolist(), ladj.tolist()
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [0.0, 0.0])
    """

    params_per_feature = 1
    volume_preserving = True

    @staticmethod
    def _zeros(v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return v.new_zeros(()).expand(torch.broadcast_shapes(v.shape[:-1], h.shape[:-2]))

    def forward(self, x, h):
        return x + h[..., 0], self._zeros(x, h)

    def inverse(self, y, h):
        return y - h[..., 0], self._zeros(y, h)


def check_map(map: object) -> ElementwiseMap:
    """Return ``map`` if it is an :class:`ElementwiseMap` instance that says how many parameters
    it takes; else raise a ``TypeError``."""
    if isinstance(map, ElementwiseMap):
        per = getattr(map, "params_per_feature", None)
        if isinstance(per, bool) or not isinstance(per, int) or per < 1:
            raise TypeError(
                f"map: expected {type(map).__name__}.params_per_feature to be a positive "
                f"integer; got {per!r}"
            )
        return map
    if isinstance(map, type) and issubclass(map, ElementwiseMap):
        raise TypeError(
            f"map: expected an ElementwiseMap instance; got the class {map.__name__} "
            f"(write {map.__name__}(...))"
        )
    raise TypeError(
        "map: expected an ElementwiseMap instance (e.g. Affine(), Additive(), "
        f"RationalQuadraticSpline()); got {type(map).__name__}"
    )


def check_conditioner_bound(bound: float | None) -> float | None:
    """Return ``bound`` as a float if it is a positive finite number, ``None`` if ``None``."""
    if bound is None:
        return None
    return float(check_positive("conditioner_bound", bound))
