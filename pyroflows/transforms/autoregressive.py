"""Autoregressive transforms: each feature is mapped given the features before it in an order.

A :class:`~pyroflows.nn.MADE` conditioner reads a vector ``v`` and returns, in one pass, the
parameters ``h_i(v_<i, c)`` of an elementwise monotone map for every feature ``i``. The
Jacobian is triangular in the autoregressive order, so log|det J| is the log|det| of the
elementwise map alone. Which direction costs one conditioner pass depends on whether the
conditioner reads the transform's input or its output (the *orientation*):

* ``"maf"`` (masked autoregressive flow): ``h`` reads the output ``y`` (the data side). The
  inverse ``y -> x`` (density evaluation) is one pass; the forward ``x -> y`` (sampling) is
  ``dim`` sequential passes.
* ``"iaf"`` (inverse autoregressive flow): ``h`` reads the input ``x`` (the base side). The
  forward ``x -> y`` (sampling, and scoring one's own samples through Pyro's cache) is one pass;
  the inverse ``y -> x`` (scoring arbitrary points) is ``dim`` sequential passes.

:class:`MaskedAutoregressive` takes the elementwise map as an argument, any
:class:`~pyroflows.transforms.ElementwiseMap`; :class:`MaskedAffineAutoregressive` (MAF / IAF)
is ``MaskedAutoregressive`` with the :class:`~pyroflows.transforms.Affine` map, as
:class:`~pyroflows.transforms.SplineAutoregressive` is with the rational-quadratic spline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import broadcast_batch, check_positive_int
from ..nn import MADE, OrderLike, _check_hidden
from .base import FlowTransform
from .maps import CONDITIONER_BOUND, Affine, ElementwiseMap, check_conditioner_bound, check_map

__all__ = ["MaskedAffineAutoregressive", "MaskedAutoregressive"]

_ORIENTATIONS = ("maf", "iaf")


class MaskedAutoregressive(FlowTransform):
    """Masked autoregressive transform with any elementwise map: MAF or IAF, by ``orientation``.

    With parameters ``h_i`` from a :class:`~pyroflows.nn.MADE` conditioner that reads ``u``
    (``u = y`` for ``"maf"``, ``u = x`` for ``"iaf"``) and depends only on the features before
    ``i`` in the order (and on the context ``c``), and ``g`` the elementwise monotone ``map``:

    * map: ``y_i = g(x_i; h_i(u_<i, c))``
    * inverse: ``x_i = g⁻¹(y_i; h_i(u_<i, c))``
    * log|det J|: ``sum_i log g'(x_i; h_i(u_<i, c))`` (the Jacobian is triangular in the order)

    **Which direction is fast.** ``orientation="maf"`` (the default): the inverse ``y -> x``,
    i.e. density evaluation of data, is one conditioner pass; the forward ``x -> y``
    (sampling) costs ``dim`` sequential passes. ``orientation="iaf"``: the forward (sampling)
    is one pass, and ``log_prob`` of the distribution's own samples costs no extra pass (the
    transforms returned by :meth:`condition` cache ``x``, ``y`` and log|det J|); the inverse
    (scoring arbitrary points) costs ``dim`` sequential passes. Use ``"maf"`` for maximum
    likelihood, ``"iaf"`` for variational inference. log|det J| from a known pair ``(x, y)`` is
    one pass in either orientation.

    The conditioner emits ``map.params_per_feature`` numbers per feature (laid out as the map's
    ``param_major`` asks) and its output layer starts at zero, so the transform starts at the
    identity.

    **Far from the data.** The conditioner reads ``u`` clamped to ``[-b, b]``
    (``b = conditioner_bound``; the context is never clamped). Inside that box nothing
    changes; beyond it the map's parameters stop changing, so the layer is one fixed
    elementwise map there (Gaussian tails for the affine map) and the log-density keeps
    decreasing, as a density's should. Unclamped, the MADE's ReLU units grow linearly along a
    ray and a soft-clamped log-scale sweeps across its whole range at a radius set by the
    weights, however far out; while it sweeps, ``|x|`` can shrink as ``|y|`` grows, and a
    trained MAF's log-density rose again far in the tails (higher at ``-1e6`` than at
    ``-1e4``). The price is a kink of the log-density (a jump of its gradient) where a read
    feature crosses ``±b``. ``conditioner_bound=None`` reads ``u`` unclamped.

    Args:
        dim: number of features.
        map: the elementwise map ``g`` (an :class:`~pyroflows.transforms.ElementwiseMap`).
        hidden: hidden widths of the MADE conditioner, each at least ``dim - 1`` (``dim`` with
            a context).
        context_dim: size of the context, 0 for an unconditional transform; with a context the
            conditioner also sees ``c`` (unmasked) and the transform is used through
            ``condition(c)``; contexts of shape ``(*batch', context_dim)`` broadcast with inputs
            of shape ``(*batch, dim)``.
        order: ``"natural"``, ``"reversed"``, ``"random"`` (torch's global generator; saved in
            the ``state_dict``) or a permutation where ``order[i]`` is the position of feature
            ``i``; see :class:`~pyroflows.nn.MADE`.
        orientation: ``"maf"`` (fast density) or ``"iaf"`` (fast sampling).
        activation: activation class of the conditioner.
        conditioner_bound: the bound ``b`` of the features the conditioner reads, or ``None``
            (keyword only).

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios, Pavlakou and Murray,
        2017).
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma, Salimans,
        Jozefowicz, Chen, Sutskever and Welling, 2016).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import MaskedAutoregressive, RationalLinearSpline
        >>> _ = torch.manual_seed(0)
        >>> t = MaskedAutoregressive(3, RationalLinearSpline(bins=4), hidden=(16, 16))
        >>> y = torch.randn(10, 3)
        >>> x, ladj = t.inverse_and_log_det(y)   # "maf": one conditioner pass
        >>> x.shape, ladj.shape
        (torch.Size([10, 3]), torch.Size([10]))
    """

    def __init__(
        self,
        dim: int,
        map: ElementwiseMap,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        order: OrderLike = "natural",
        orientation: str = "maf",
        activation: type[nn.Module] = nn.ReLU,
        *,
        conditioner_bound: float | None = CONDITIONER_BOUND,
    ) -> None:
        map = check_map(map)
        check_positive_int("dim", dim)
        if orientation not in _ORIENTATIONS:
            raise ValueError(f"orientation: expected 'maf' or 'iaf'; got {orientation!r}")
        super().__init__(event_shape=(dim,), context_dim=context_dim)
        self.hidden = _check_hidden(hidden)
        self.orientation = orientation
        self.conditioner_bound = check_conditioner_bound(conditioner_bound)
        self.map = map
        self.conditioner = MADE(
            dim,
            self.hidden,
            map.params_per_feature,
            context_dim,
            order,
            activation,
            param_major=map.param_major,
        )

    @property
    def order(self) -> torch.Tensor:
        """``order[i]``: the position of feature ``i`` in the autoregressive order."""
        return self.conditioner.order

    @property
    def params_per_feature(self) -> int:
        """Conditioner outputs per feature (the map's ``params_per_feature``)."""
        return self.map.params_per_feature

    def _params(self, v: torch.Tensor, context) -> torch.Tensor:
        bound = self.conditioner_bound
        if bound is not None:
            # A clamp; hardtanh's backward is one fused kernel where clamp's is several.
            v = F.hardtanh(v, -bound, bound)
        return self.conditioner(v, context)

    @staticmethod
    def _map(fn, v: torch.Tensor, h: torch.Tensor):
        return fn(v.expand(*h.shape[:-2], v.shape[-1]), h)

    def _one_pass(self, fn, v: torch.Tensor, read: torch.Tensor, context):
        return self._map(fn, v, self._params(read, context))

    def _sequential(self, fn, v: torch.Tensor, context):
        # Pass k reads an output whose first k features (in the order) are already exact, so
        # after dim passes every feature is, and the last pass's log-det is the right one.
        w = torch.zeros_like(v)
        for _ in range(self.event_shape[0]):
            w, ladj = self._map(fn, v, self._params(w, context))
        return w, ladj

    def _check_context_batch(self, v: torch.Tensor, context) -> None:
        if context is not None:
            broadcast_batch(v, context, type(self).__name__)

    def _forward_and_log_det(self, x, context):
        self._check_context_batch(x, context)
        if self.orientation == "iaf":
            return self._one_pass(self.map.forward, x, x, context)
        return self._sequential(self.map.forward, x, context)

    def _inverse_and_log_det(self, y, context):
        self._check_context_batch(y, context)
        if self.orientation == "maf":
            return self._one_pass(self.map.inverse, y, y, context)
        return self._sequential(self.map.inverse, y, context)

    def _log_abs_det(self, x, y, context):
        if self.map.volume_preserving:
            batch = x.shape[:-1] if context is None else broadcast_batch(x, context, "")
            return x.new_zeros(batch)
        # One pass in either orientation, given both ends.
        if self.orientation == "iaf":
            return self._one_pass(self.map.forward, x, x, context)[1]
        return -self._one_pass(self.map.inverse, y, y, context)[1]

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"orientation={self.orientation!r}"]
        if self.conditioner_bound != CONDITIONER_BOUND:
            parts.append(f"conditioner_bound={self.conditioner_bound}")
        return ", ".join(parts)


class MaskedAffineAutoregressive(MaskedAutoregressive):
    """Masked affine autoregressive transform: MAF or IAF, by ``orientation``.

    With shift ``t_i`` and log-scale ``s_i`` from a :class:`~pyroflows.nn.MADE` conditioner that
    reads ``u`` (``u = y`` for ``"maf"``, ``u = x`` for ``"iaf"``) and depends only on the
    features before ``i`` in the order (and on the context ``c``):

    * map: ``y_i = x_i * exp(s_i(u_<i, c)) + t_i(u_<i, c)``
    * inverse: ``x_i = (y_i - t_i(u_<i, c)) * exp(-s_i(u_<i, c))``
    * log|det J|: ``sum_i s_i(u_<i, c)`` (the Jacobian is triangular in the order)

    **Which direction is fast.** ``orientation="maf"`` (the default): the inverse
    ``y -> x``, i.e. density evaluation of data, is one conditioner pass; the forward
    ``x -> y`` (sampling) costs ``dim`` sequential conditioner passes. ``orientation="iaf"``: the
    forward (sampling) is one pass, and ``log_prob`` of the distribution's own samples costs no
    extra pass (the transforms returned by :meth:`condition` cache ``x``, ``y`` and
    log|det J|); the inverse (scoring arbitrary points) costs ``dim`` sequential passes. Use
    ``"maf"`` for maximum likelihood, ``"iaf"`` for variational inference. log|det J| from a
    known pair ``(x, y)`` is one pass in either orientation.

    The log-scale is soft-clamped, ``s = B * tanh(raw / B)`` with ``B = log_scale_bound``, as in
    :class:`~pyroflows.transforms.AffineCoupling`. Starts at the identity (the conditioner's
    output layer is zero). This is :class:`MaskedAutoregressive` with the
    :class:`~pyroflows.transforms.Affine` map; its conditioner reads ``u`` clamped to
    ``[-10, 10]``, so that the log-density keeps decreasing far in the tails (see
    :class:`MaskedAutoregressive`).

    Args:
        dim: number of features.
        hidden: hidden widths of the MADE conditioner, each at least ``dim - 1`` (``dim`` with
            a context).
        context_dim: size of the context, 0 for an unconditional transform; with a context the
            conditioner also sees ``c`` (unmasked) and the transform is used through
            ``condition(c)``; contexts of shape ``(*batch', context_dim)`` broadcast with inputs
            of shape ``(*batch, dim)``.
        order: ``"natural"``, ``"reversed"``, ``"random"`` (torch's global generator; saved in
            the ``state_dict``) or a permutation where ``order[i]`` is the position of feature
            ``i``; see :class:`~pyroflows.nn.MADE`.
        orientation: ``"maf"`` (fast density) or ``"iaf"`` (fast sampling).
        log_scale_bound: the soft bound ``B`` on ``|s|``.
        activation: activation class of the conditioner.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios, Pavlakou and Murray,
        2017).
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma, Salimans,
        Jozefowicz, Chen, Sutskever and Welling, 2016).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import MaskedAffineAutoregressive
        >>> _ = torch.manual_seed(0)
        >>> t = MaskedAffineAutoregressive(3, hidden=(16, 16), orientation="iaf", context_dim=2)
        >>> tc = t.condition(torch.randn(10, 2))
        >>> x = torch.randn(10, 3)
        >>> y = tc(x)                            # one conditioner pass
        >>> y.shape, tc.log_abs_det_jacobian(x, y).shape
        (torch.Size([10, 3]), torch.Size([10]))
        >>> torch.allclose(tc.inv(y.detach()), x)  # dim sequential passes
        True
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        order: OrderLike = "natural",
        orientation: str = "maf",
        log_scale_bound: float = 3.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            dim, Affine(log_scale_bound), hidden, context_dim, order, orientation, activation
        )

    @property
    def log_scale_bound(self) -> float:
        """The soft bound ``B`` on ``|s|`` (the map's)."""
        return self.map.log_scale_bound
