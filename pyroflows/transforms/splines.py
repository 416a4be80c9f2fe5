"""Monotone rational-quadratic splines (neural spline flows) and the transforms built on them.

:func:`rational_quadratic_spline` is the elementwise maths; :class:`SplineParams` turns a
conditioner's output into spline parameters and is shared by the coupling and autoregressive
families, exactly as :class:`~pyroflows.transforms.elementwise.AffineParams` is for the affine map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import OrderLike
from .autoregressive import _Autoregressive
from .coupling import MaskLike, _Coupling

__all__ = ["SplineAutoregressive", "SplineCoupling", "SplineParams", "rational_quadratic_spline"]

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def _check_minimum(name: str, value: float, bins: int, per_bin: bool) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: expected a non-negative number; got {value!r}")
    if per_bin and value * bins >= 1:
        raise ValueError(f"{name}: expected {name} * bins < 1; got {value!r} with {bins} bins")
    if not per_bin and value >= 1:
        raise ValueError(f"{name}: expected a number in [0, 1); got {value!r}")
    return float(value)


def _knot_table(
    widths_heights: torch.Tensor,
    derivatives: torch.Tensor,
    bound: float,
    min_width: float,
    min_height: float,
    min_derivative: float,
) -> torch.Tensor:
    """The knots ``(..., 3, bins + 1)``: rows x positions, y positions and derivatives.

    ``widths_heights`` ``(..., 2, bins)`` holds the unnormalised bin widths and heights, which
    are normalised together (one softmax, one cumulative sum); ``derivatives``
    ``(..., bins - 1)`` the unnormalised inner derivatives.
    """
    bins = widths_heights.shape[-1]
    if min_width == min_height:
        minimum: float | torch.Tensor = min_width
    else:
        minimum = widths_heights.new_tensor([[min_width], [min_height]])
    sizes = minimum + (1.0 - minimum * bins) * torch.softmax(widths_heights, dim=-1)
    # The end knots are padded in exactly (0 and 1 of the cumulative sizes), so that ±bound
    # map to ±bound whatever the rounding.
    cumulative = F.pad(F.pad(torch.cumsum(sizes[..., :-1], dim=-1), (1, 0)), (0, 1), value=1.0)
    shift = math.log(math.expm1(1.0 - min_derivative))
    inner = min_derivative + F.softplus(derivatives + shift)
    knot_derivatives = F.pad(inner, (1, 1), value=1.0).unsqueeze(-2)
    batch = torch.broadcast_shapes(cumulative.shape[:-2], knot_derivatives.shape[:-2])
    return torch.cat(
        [
            (cumulative * (2.0 * bound) - bound).expand(*batch, 2, bins + 1),
            knot_derivatives.expand(*batch, 1, bins + 1),
        ],
        dim=-2,
    )


def _spline(
    x: torch.Tensor, table: torch.Tensor, bound: float, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spline of :func:`rational_quadratic_spline` given the knot table of
    :func:`_knot_table` (no argument checks: the hot path of the spline transforms)."""
    batch = torch.broadcast_shapes(x.shape, table.shape[:-2])
    x = x.expand(batch)
    table = table.expand(*batch, *table.shape[-2:])
    inside = x.abs() <= bound
    # A safe input for the spline branch where the tail branch is used: torch.where passes a
    # zero gradient to the unused branch, but 0 * NaN would still be NaN.
    x_in = torch.where(inside, x, 0.0)
    # The bin index is the number of inner knots <= x (x = bound falls in the last bin): a
    # comparison with the few inner knots vectorises better than a binary search.
    search = table[..., 1 if inverse else 0, 1:-1]
    k = (x_in.unsqueeze(-1) >= search).sum(-1, keepdim=True)
    # Both ends of the bin, all three rows, in one gather.
    index = torch.cat([k, k + 1], dim=-1).unsqueeze(-2).expand(*batch, 3, 2)
    (x_k, x_k1), (y_k, y_k1), (d_k, d_k1) = (
        row.unbind(-1) for row in table.gather(-1, index).unbind(-2)
    )
    w, h = x_k1 - x_k, y_k1 - y_k
    s = h / w
    curvature = d_k + d_k1 - 2.0 * s

    if inverse:
        dy = x_in - y_k
        a = h * (s - d_k) + dy * curvature
        b = h * d_k - dy * curvature
        c = -s * dy
        discriminant = (b * b - 4.0 * a * c).clamp_min(0.0)
        theta = (2.0 * c) / (-b - torch.sqrt(discriminant))
        out = x_k + theta * w
        # θ leaves [0, 1] only by rounding; clamping keeps the log-det's logarithms finite.
        theta = theta.clamp(0.0, 1.0)
    else:
        theta = (x_in - x_k) / w

    one_minus = 1.0 - theta
    tt = theta * one_minus
    # s + (d_k + d_{k+1} - 2s) θ(1-θ), and the derivative's numerator, written as sums of
    # non-negative terms so that rounding cannot make them negative.
    denominator = s * (theta * theta + one_minus * one_minus) + (d_k + d_k1) * tt
    numerator = s * s * (d_k1 * theta * theta + 2.0 * s * tt + d_k * one_minus * one_minus)
    if not inverse:
        out = y_k + h * (s * theta * theta + d_k * tt) / denominator
    ladj = torch.log(numerator) - 2.0 * torch.log(denominator)
    if inverse:
        ladj = -ladj

    y = torch.where(inside, out, x)
    ladj = torch.where(inside, ladj, 0.0)
    return y, ladj


def rational_quadratic_spline(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    bound: float,
    inverse: bool = False,
    min_bin_width: float = MIN_BIN_WIDTH,
    min_bin_height: float = MIN_BIN_HEIGHT,
    min_derivative: float = MIN_DERIVATIVE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotone rational-quadratic spline on ``[-bound, bound]``, the identity outside.

    The spline has ``K = bins`` bins with knots ``(x_k, y_k)``, ``k = 0..K``, from
    ``(-bound, -bound)`` to ``(bound, bound)``, and derivatives ``d_k > 0`` at the knots. In bin
    ``k``, with ``w = x_{k+1} - x_k``, ``h = y_{k+1} - y_k``, ``s = h / w`` and
    ``θ = (x - x_k) / w``:

    * map: ``y = y_k + h (s θ² + d_k θ(1-θ)) / (s + (d_k + d_{k+1} - 2s) θ(1-θ))``
    * inverse: ``θ = 2c / (-b - sqrt(b² - 4ac))``, the root of a quadratic whose coefficients
      ``a, b, c`` depend on ``y - y_k``; this form of the root avoids cancellation, and the
      discriminant is clamped at 0 against rounding
    * log|dy/dx|: ``log(s² (d_{k+1} θ² + 2s θ(1-θ) + d_k (1-θ)²)) - 2 log(s + (d_k + d_{k+1}
      - 2s) θ(1-θ))``, and 0 outside ``[-bound, bound]``.

    **Parametrisation** (deliberately bounded, and the identity at zero):

    * bin widths: ``min_bin_width + (1 - min_bin_width * K) * softmax(widths)``, times
      ``2 * bound``; bin heights likewise with ``min_bin_height``. Zero ``widths`` and
      ``heights`` give ``K`` equal bins with ``h = w``.
    * inner derivatives: ``d = min_derivative + softplus(derivatives + c)`` with
      ``c = log(expm1(1 - min_derivative))``, so that ``d = 1`` exactly at ``derivatives = 0``;
      the two boundary derivatives are 1, so the spline joins its identity tails with a
      continuous first derivative.

    Hence all-zero parameters give the identity map. The minima keep every bin at least
    ``2 * bound * min_bin_width`` wide (likewise high) and every slope at least
    ``min_derivative``, so the inverse and the log-det stay finite.

    Cost: one bin search (a comparison with the ``K - 1`` inner knots, which for the usual
    handful of bins is cheaper than a binary search), one gather of both ends of the bin and a
    few elementwise operations, the same in both directions. Inputs in the tails are replaced by
    a safe value before the spline branch is evaluated, so that neither its values nor its
    gradients can be NaN there.

    Args:
        x: inputs of shape ``batch`` (``y`` when ``inverse=True``).
        widths: unnormalised bin widths ``(*batch, K)``; the leading dimensions broadcast with
            ``x``.
        heights: unnormalised bin heights ``(*batch, K)``.
        derivatives: unnormalised derivatives at the ``K - 1`` inner knots ``(*batch, K - 1)``.
        bound: the half-width ``B > 0`` of the spline's interval ``[-B, B]``.
        inverse: compute the inverse map.
        min_bin_width: the smallest bin width, as a fraction of ``2B``.
        min_bin_height: the smallest bin height, as a fraction of ``2B``.
        min_derivative: the smallest inner derivative.

    Returns:
        ``(y, ladj)``, both of the broadcast shape: the image and the ELEMENTWISE
        ``log|dy/dx|`` (for ``inverse=True``: ``x`` and ``log|dx/dy|``).

    References:
        Neural Spline Flows (Durkan, Bekasov, Murray and Papamakarios, 2019).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import rational_quadratic_spline
        >>> x = torch.tensor([-10.0, -1.0, 0.5, 10.0])
        >>> w, h, d = torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(4, 4)
        >>> y, ladj = rational_quadratic_spline(x, w, h, d, bound=3.0)  # identity at zero
        >>> torch.allclose(y, x), torch.allclose(ladj, torch.zeros(4), atol=1e-6)
        (True, True)
    """
    bins = widths.shape[-1]
    if heights.shape[-1] != bins or derivatives.shape[-1] != bins - 1:
        raise ValueError(
            "expected widths and heights of size bins and derivatives of size bins - 1 in "
            f"the last dimension; got {widths.shape[-1]}, {heights.shape[-1]} and "
            f"{derivatives.shape[-1]}"
        )
    if bins < 1:
        raise ValueError(f"expected at least one bin; got {bins}")
    if not (isinstance(bound, (int, float)) and bound > 0):
        raise ValueError(f"bound: expected a positive number; got {bound!r}")
    min_bin_width = _check_minimum("min_bin_width", min_bin_width, bins, True)
    min_bin_height = _check_minimum("min_bin_height", min_bin_height, bins, True)
    min_derivative = _check_minimum("min_derivative", min_derivative, bins, False)
    bound = float(bound)
    sizes_shape = torch.broadcast_shapes(widths.shape, heights.shape)
    widths_heights = torch.stack([widths.expand(sizes_shape), heights.expand(sizes_shape)], -2)
    table = _knot_table(
        widths_heights, derivatives, bound, min_bin_width, min_bin_height, min_derivative
    )
    return _spline(x, table, bound, inverse)


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins: expected an integer >= 2; got {bins!r}")
    if bins * max(MIN_BIN_WIDTH, MIN_BIN_HEIGHT) >= 1:
        raise ValueError(
            f"bins: expected fewer than {round(1 / max(MIN_BIN_WIDTH, MIN_BIN_HEIGHT))} bins "
            f"(each bin is at least {MIN_BIN_WIDTH} of the interval); got {bins}"
        )
    return bins


class SplineParams:
    """Mixin: the elementwise rational-quadratic spline of spline coupling/autoregressive maps.

    The conditioner output ``h`` of shape ``(*batch, n, 3 * bins - 1)`` holds, per transformed
    feature, the unnormalised widths ``h[..., :bins]``, heights ``h[..., bins:2 * bins]`` and
    inner derivatives ``h[..., 2 * bins:]`` of :func:`rational_quadratic_spline` on
    ``[-bound, bound]`` (identity tails). A zero ``h`` (a zero-initialised conditioner) is the
    identity map. The class using it calls ``_set_spline(bins, bound)`` before
    ``FlowTransform.__init__`` runs, which sets ``params_per_feature`` on the instance.
    """

    bins: int
    bound: float
    params_per_feature: int

    def _set_spline(self, bins: int, bound: float) -> None:
        bins = _check_bins(bins)
        if isinstance(bound, bool) or not (isinstance(bound, (int, float)) and bound > 0):
            raise ValueError(f"bound: expected a positive number; got {bound!r}")
        if not math.isfinite(bound):
            raise ValueError(f"bound: expected a finite number; got {bound!r}")
        object.__setattr__(self, "bins", bins)
        object.__setattr__(self, "bound", float(bound))
        object.__setattr__(self, "params_per_feature", 3 * bins - 1)

    def _spline(self, v: torch.Tensor, h: torch.Tensor, inverse: bool):
        k = self.bins
        table = _knot_table(
            h[..., : 2 * k].unflatten(-1, (2, k)),
            h[..., 2 * k :],
            self.bound,
            MIN_BIN_WIDTH,
            MIN_BIN_HEIGHT,
            MIN_DERIVATIVE,
        )
        w, ladj = _spline(v, table, self.bound, inverse)
        return w, ladj.sum(-1)

    def _elementwise(self, x, h):
        return self._spline(x, h, inverse=False)

    def _elementwise_inverse(self, y, h):
        return self._spline(y, h, inverse=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, bound={self.bound}"


class SplineCoupling(SplineParams, _Coupling):
    """Rational-quadratic spline coupling (neural spline flow, coupling form).

    * map: ``y_a = x_a``, ``y_b = g(x_b; θ(x_a, c))`` with ``g`` the monotone
      rational-quadratic spline of :func:`rational_quadratic_spline` on ``[-B, B]`` (one spline
      per transformed feature, identity outside)
    * inverse: ``x_a = y_a``, ``x_b = g⁻¹(y_b; θ(y_a, c))``, analytic (a quadratic root per
      feature)
    * log|det J|: ``sum_b log g'(x_b; θ(x_a, c))`` (0 for features in the tails)

    Both directions cost one conditioner pass plus an elementwise spline evaluation with a bin
    search. The conditioner emits ``3 * bins - 1`` numbers per transformed feature and starts at
    zero, which is the identity map (equal bins, unit derivatives); the minimum bin size and
    slope are those of :func:`rational_quadratic_spline` (``1e-3``).

    Defaults: ``bins=8`` as in Durkan et al. (and Pyro's and zuko's spline flows); ``bound=5``
    as in zuko: with a standard-normal base, only about 6e-7 of the base mass lies beyond
    ``|x| = 5`` and meets the linear tails, where the paper's ``B = 3`` leaves 0.3%.

    Args:
        dim: number of features (at least 2).
        hidden: hidden widths of the :class:`~pyroflows.nn.MLP` conditioner.
        mask: ``"half"``, ``"alternate"`` or a boolean tensor (``True`` = passes through), see
            :func:`~pyroflows.transforms.coupling_mask`.
        context_dim: size of the context, 0 for an unconditional transform; with a context the
            conditioner sees ``[x_a, c]`` and the transform is used through ``condition(c)``.
        bins: number of spline bins ``K`` (at least 2).
        bound: the half-width ``B`` of the interval the spline acts on.
        activation: activation class of the conditioner.

    References:
        Neural Spline Flows (Durkan, Bekasov, Murray and Papamakarios, 2019).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import SplineCoupling
        >>> t = SplineCoupling(4, hidden=(16, 16), bins=5)
        >>> x = torch.randn(10, 4)
        >>> y, ladj = t.forward_and_log_det(x)
        >>> y.shape, ladj.shape, torch.allclose(y, x, atol=1e-5)
        (torch.Size([10, 4]), torch.Size([10]), True)
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        mask: MaskLike = "half",
        context_dim: int = 0,
        bins: int = 8,
        bound: float = 5.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        self._set_spline(bins, bound)
        super().__init__(dim, hidden, mask, context_dim, activation)


class SplineAutoregressive(SplineParams, _Autoregressive):
    """Masked rational-quadratic spline autoregressive transform (autoregressive NSF).

    With spline parameters ``θ_i`` from a :class:`~pyroflows.nn.MADE` conditioner that reads
    ``u`` (``u = y`` for ``"maf"``, ``u = x`` for ``"iaf"``) and depends only on the features
    before ``i`` in the order (and on the context ``c``):

    * map: ``y_i = g(x_i; θ_i(u_<i, c))`` with ``g`` the monotone rational-quadratic spline of
      :func:`rational_quadratic_spline` on ``[-B, B]`` (identity outside)
    * inverse: ``x_i = g⁻¹(y_i; θ_i(u_<i, c))``, analytic (a quadratic root per feature)
    * log|det J|: ``sum_i log g'(x_i; θ_i(u_<i, c))`` (the Jacobian is triangular in the order)

    **Which direction is fast.** ``orientation="maf"`` (the default): the inverse ``y -> x``
    (density evaluation) is one conditioner pass, the forward ``x -> y`` (sampling) costs ``dim``
    sequential passes. ``orientation="iaf"``: the forward (sampling, and scoring the
    distribution's own samples through the cache of :meth:`condition`) is one pass, the inverse
    costs ``dim`` sequential passes. log|det J| from a known pair ``(x, y)`` is one pass in either
    orientation. Each pass also evaluates the splines (a bin search and a few elementwise
    operations per feature).

    The conditioner emits ``3 * bins - 1`` numbers per feature and starts at zero, which is the
    identity map; the defaults (``bins=8``, ``bound=5``) and the bounded parametrisation are
    those of :class:`SplineCoupling`.

    Args:
        dim: number of features.
        hidden: hidden widths of the MADE conditioner, each at least ``dim - 1``.
        context_dim: size of the context, 0 for an unconditional transform; with a context the
            transform is used through ``condition(c)``.
        order: ``"natural"``, ``"reversed"``, ``"random"`` or a permutation, see
            :class:`~pyroflows.nn.MADE`.
        orientation: ``"maf"`` (fast density) or ``"iaf"`` (fast sampling).
        bins: number of spline bins ``K`` (at least 2).
        bound: the half-width ``B`` of the interval the splines act on.
        activation: activation class of the conditioner.

    References:
        Neural Spline Flows (Durkan, Bekasov, Murray and Papamakarios, 2019).
        Masked Autoregressive Flow for Density Estimation (Papamakarios, Pavlakou and Murray,
        2017).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import SplineAutoregressive
        >>> _ = torch.manual_seed(0)
        >>> t = SplineAutoregressive(3, hidden=(16, 16), bins=5)
        >>> y = torch.randn(10, 3)
        >>> x, ladj = t.inverse_and_log_det(y)   # "maf": one conditioner pass
        >>> x.shape, ladj.shape
        (torch.Size([10, 3]), torch.Size([10]))
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        order: OrderLike = "natural",
        orientation: str = "maf",
        bins: int = 8,
        bound: float = 5.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        self._set_spline(bins, bound)
        super().__init__(dim, hidden, context_dim, order, orientation, activation)
