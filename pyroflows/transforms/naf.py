"""Neural autoregressive flows: sigmoidal elementwise maps and block neural autoregressive flow.

* :class:`DSF` (deep sigmoidal flow) and :class:`DDSF` (deep dense sigmoidal flow) are the
  transformers of Huang et al. (2018) as :class:`~pyroflows.transforms.ElementwiseMap`\\ s: a
  conditioner emits their pseudo-parameters, so ``MaskedAutoregressive(dim, DSF())`` is a
  neural autoregressive flow, and ``Coupling(dim, DDSF())`` or
  ``ImageCoupling(shape, DSF())`` the same map in a coupling layer. Their forward map is
  analytic; their inverse is a bracketed Newton solve (:func:`~.solvers.monotone_inverse`).
* :class:`BNAF` (block neural autoregressive flow, De Cao et al. 2019) is a transform of its
  own: one masked network whose weights are the flow's parameters, made onto ``R^dim`` by a
  positive skip connection. Its forward map is one network pass; its inverse is solved one
  coordinate after the other.

Every numerical inverse here solves to :data:`~.solvers.TOLERANCE` (``1e-10`` in float64,
``1e-5`` in float32, relative above 1), raises :class:`~.solvers.InverseNotConverged` when it
cannot, and has gradients by the implicit function theorem, never through the iterations.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    check_nonnegative_int,
    check_positive,
    check_positive_int,
    expand_to_context,
)
from .base import FlowTransform
from .maps import ElementwiseMap
from .solvers import monotone_inverse

__all__ = ["BNAF", "DDSF", "DSF", "MIN_DERIVATIVE"]


def _soft_clamp(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(raw / bound)``: ``≈ raw`` near zero, within ``±bound`` everywhere."""
    return bound * torch.tanh(raw / bound)


def _log_sigmoids(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log σ(u)`` and ``log σ(-u) = log σ(u) - u`` (exactly so in floating point for
    ``u > 0``, where both come from the same ``log1p``), finite for every finite ``u``."""
    log_p = F.logsigmoid(u)
    return log_p, log_p - u


def _check_finite(name: str, y: torch.Tensor) -> None:
    """A numerical inverse of a non-finite value would return a finite, meaningless one."""
    if not bool(torch.isfinite(y).all()):
        bad = int((~torch.isfinite(y)).sum())
        raise ValueError(
            f"{name}: expected finite values to invert; got {bad} infinite or NaN value(s)"
        )


def _broadcast_inverse_input(y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``y`` expanded to the batch shape it has with ``h`` (the solver's output shape)."""
    batch = torch.broadcast_shapes(y.shape[:-1], h.shape[:-2])
    return y.expand(*batch, y.shape[-1])


#: The default floor ``ε`` on the slope of :class:`DSF` and :class:`DDSF`, as the splines'
#: minimum derivative.
MIN_DERIVATIVE = 1e-3


def _check_min_derivative(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"min_derivative: expected a number in [0, 1); got {value!r}")
    return float(value)


class _SigmoidalMap(ElementwiseMap):
    """What :class:`DSF` and :class:`DDSF` share: the slope floor, the numerical inverse and
    the contract's methods around a subclass's ``_transformer(x, h) -> (g, log g')``
    (elementwise, of the broadcast shape)."""

    param_major = False
    inverse_kind = "numerical"

    def __init__(self, log_slope_bound: float, shift_bound: float, min_derivative: float):
        super().__init__()
        self.log_slope_bound = float(check_positive("log_slope_bound", log_slope_bound))
        self.shift_bound = float(check_positive("shift_bound", shift_bound))
        self.min_derivative = _check_min_derivative(min_derivative)

    def _transformer(self, x: torch.Tensor, h: torch.Tensor):
        raise NotImplementedError

    def _evaluate(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = (1 - ε) g(x) + ε x`` and ``log y'`` elementwise (``ε = min_derivative``)."""
        g, log_dg = self._transformer(x, h)
        eps = self.min_derivative
        if not eps:
            return g, log_dg
        # g + ε (x - g) rather than (1 - ε) g + ε x: where g = x (h = 0), exactly x.
        y = torch.lerp(g, x.expand_as(g), eps)
        return y, torch.logaddexp(log_dg + math.log1p(-eps), log_dg.new_tensor(math.log(eps)))

    def _map(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self._evaluate(x, h)[0]

    def forward(self, x, h):
        y, log_dy = self._evaluate(x, h)
        return y, log_dy.sum(-1)

    def inverse(self, y, h):
        _check_finite(type(self).__name__, y)
        y = _broadcast_inverse_input(y, h)
        x = monotone_inverse(self._map, y, (h,), what=type(self).__name__)
        return x, -self._evaluate(x, h)[1].sum(-1)

    def extra_repr(self) -> str:
        parts = [f"log_slope_bound={self.log_slope_bound}", f"shift_bound={self.shift_bound}"]
        if self.min_derivative != MIN_DERIVATIVE:
            parts.append(f"min_derivative={self.min_derivative}")
        return ", ".join(parts)


class DSF(_SigmoidalMap):
    """Deep sigmoidal flow: the logit of a convex combination of sigmoids, as an elementwise map.

    With ``h`` of shape ``(*batch, n, 3 * components)`` holding, per feature, raw slopes
    ``h[..., :K]``, raw shifts ``h[..., K:2K]`` and raw weights ``h[..., 2K:]`` (``K =
    components``), ``a_j = exp(B_a tanh(raw_a / B_a))`` (within ``exp(±B_a)``, ``B_a =
    log_slope_bound``), ``b_j = B_b tanh(raw_b / B_b)`` (within ``±B_b``, ``B_b =
    shift_bound``), ``w = softmax(raw_w)`` and ``u_j = a_j x + b_j``, the transformer is

    * ``g(x) = logit(sum_j w_j σ(u_j)) = log sum_j w_j σ(u_j) - log sum_j w_j σ(-u_j)``
    * ``log g'(x) = log sum_j w_j a_j σ(u_j) σ(-u_j) - log sum_j w_j σ(u_j)
      - log sum_j w_j σ(-u_j)``

    and the map ``y = (1 - ε) g(x) + ε x`` (below); its inverse is numerical (below).

    Everything is computed in log space (log-sum-exps of ``log w_j + log σ(±u_j)``), so the
    map is finite and onto ``R`` for any finite ``x``: as ``x -> ±∞``, ``g`` grows linearly
    with slope between ``min_j a_j`` and ``max_j a_j``. The bounds keep the map away from
    degenerate ones: no slope leaves ``exp(±B_a)``, and the shifts bound how deep the plateaus
    between two sigmoids go. ``h = 0`` gives ``a = 1``, ``b = 0`` and equal weights: ``g(x) =
    logit(σ(x)) = x`` with log-derivative 0, the identity up to rounding.

    **A floor on the slope.** The map applied is ``y = (1 - ε) g(x) + ε x`` with ``ε =
    min_derivative`` (``1e-3``, the splines' minimum derivative), so ``log y' = log((1 - ε)
    g'(x) + ε)`` and ``y' >= ε`` everywhere. Between two sigmoids saturated on opposite sides
    ``g`` has a plateau whose slope can fall far below any rounding; there ``y`` would stop
    resolving ``x`` and the inverse lose all accuracy. With the floor, rounding ``y`` moves
    ``x`` by at most ``ulp(y) / ε``. ``h = 0`` is still the identity (``g = x``), and ``y``
    stays onto ``R`` and strictly increasing.

    **Which direction is fast.** The forward map ``x -> y`` is analytic (a few elementwise
    operations over ``K`` components). The inverse solves ``y(x; h) = y`` elementwise with
    :func:`~pyroflows.transforms.solvers.monotone_inverse` (a bracket expanded from
    ``[-1, 1]``, then safeguarded Newton steps; 10 to 50 evaluations of the map for a
    batch of a few hundred points, each with its derivative) to
    :data:`~pyroflows.transforms.solvers.TOLERANCE` (``1e-10`` in float64, ``1e-5`` in
    float32, relative for ``|x| > 1``); its gradients in ``y`` and ``h`` come from the implicit
    function theorem. A non-finite value to invert is a ``ValueError`` (a solve would return a
    finite, meaningless number); a solve that fails raises
    :class:`~pyroflows.transforms.InverseNotConverged`. In
    :class:`~pyroflows.transforms.MaskedAutoregressive`, ``orientation="iaf"`` makes the
    forward (sampling) analytic and ``"maf"`` makes density evaluation one conditioner pass
    and one solve; ``Inverted(MaskedAutoregressive(dim, DSF(), orientation="iaf"))`` scores
    data analytically in one pass (the NAF of the paper).

    Args:
        components: number of sigmoids ``K``.
        log_slope_bound: the soft bound ``B_a`` on ``|log a_j|``.
        shift_bound: the soft bound ``B_b`` on ``|b_j|``.
        min_derivative: the floor ``ε`` on the slope, in ``[0, 1)``.

    Shapes:
        ``x``, ``y``: ``(*batch, n)``; ``h``: ``(*batch', n, 3 * components)`` with ``batch'``
        broadcastable with ``batch``; log-derivatives summed over the ``n`` features.

    References:
        Neural Autoregressive Flows (Huang, Krueger, Lacoste and Courville, 2018).

    Example:
        >>> import torch
        >>> from pyroflows.transforms.naf import DSF
        >>> g = DSF(components=4)
        >>> g.params_per_feature
        12
        >>> _ = torch.manual_seed(0)
        >>> x, h = torch.randn(5, 3), torch.randn(5, 3, 12)
        >>> y, ladj = g(x, h)
        >>> x_back, ladj_inv = g.inverse(y, h)           # numerical, to 1e-5 in float32
        >>> torch.allclose(x_back, x, atol=1e-4), torch.allclose(ladj_inv, -ladj, atol=1e-4)
        (True, True)
        >>> y0, ladj0 = g(x, torch.zeros(5, 3, 12))      # zero parameters: the identity
        >>> torch.allclose(y0, x, atol=1e-6), float(ladj0.abs().max()) < 1e-6
        (True, True)
    """

    def __init__(
        self,
        components: int = 8,
        log_slope_bound: float = 3.0,
        shift_bound: float = 5.0,
        min_derivative: float = MIN_DERIVATIVE,
    ) -> None:
        super().__init__(log_slope_bound, shift_bound, min_derivative)
        self.components = check_positive_int("components", components)
        self.params_per_feature = 3 * self.components

    def _transformer(self, x, h):
        raw_a, raw_b, raw_w = h.unflatten(-1, (3, self.components)).unbind(-2)
        log_a = _soft_clamp(raw_a, self.log_slope_bound)
        log_w = torch.log_softmax(raw_w, -1)
        u = log_a.exp() * x.unsqueeze(-1) + _soft_clamp(raw_b, self.shift_bound)
        log_p, log_q = _log_sigmoids(u)
        log_s = torch.logsumexp(log_w + log_p, -1)  # log of the mixture s
        log_1ms = torch.logsumexp(log_w + log_q, -1)  # log(1 - s), without cancellation
        log_ds = torch.logsumexp(log_w + log_a + log_p + log_q, -1)  # log ds/dx
        return log_s - log_1ms, log_ds - log_s - log_1ms

    def extra_repr(self) -> str:
        return f"components={self.components}, {super().extra_repr()}"


class DDSF(_SigmoidalMap):
    """Deep dense sigmoidal flow: stacked dense sigmoidal layers, as an elementwise map.

    Each feature goes through ``layers`` dense sigmoidal layers ``R^{d_{l-1}} -> R^{d_l}`` with
    ``d_0 = d_L = 1`` and ``d_l = units`` in between. Layer ``l`` with ``U = units`` sigmoids,
    slopes ``a ∈ R^U`` (within ``exp(±B_a)``), shifts ``b ∈ R^U`` (within ``±B_b``), input
    weights ``u ∈ R^{U×d_{l-1}}`` and output weights ``w ∈ R^{d_l×U}`` whose rows are softmaxes
    (positive, summing to 1), all read from the conditioner's output ``h``, maps ``v`` to

    * ``v'_m = logit(sum_k w_mk σ(a_k (u v)_k + b_k))``,

    computed in log space as :class:`DSF` is (a layer with ``d_{l-1} = d_l = 1`` *is* DSF's
    transformer). Every path from ``x`` to the output ``g(x)`` has positive weights, so ``g``
    is strictly increasing, and onto ``R`` (each layer is; its output grows linearly in its
    inputs far out). The map is ``y = (1 - ε) g(x) + ε x`` (below).

    * log-derivative: by the chain rule through the layers in log space (the method of the
      paper): with ``G_j = log ∂v_j/∂x``, layer ``l`` gives ``G'_m = log sum_k w_mk a_k
      σ(z_k) σ(-z_k) exp(log sum_j u_kj exp(G_j)) - log s_m - log(1 - s_m)`` (log-sum-exps
      throughout), finite for every finite ``x``.
    * inverse: numerical, as :class:`DSF`'s (below).

    ``h = 0`` gives unit slopes, zero shifts and uniform weights: every layer maps ``(x, ..,
    x)`` to ``(x, .., x)``, the identity up to rounding.

    **A floor on the slope**, as in :class:`DSF`: ``y = (1 - ε) g(x) + ε x`` with ``ε =
    min_derivative``, so ``y' >= ε``. It matters most here: sigmoids of one layer read
    different hidden units, so some saturate high while others saturate low, and ``g`` then
    has plateaus with slopes far below rounding (``e^-60`` seen with saturated parameters).

    **Which direction is fast.** The forward map is analytic: ``layers`` small dense layers per
    feature (``O(layers * units²)`` operations). The inverse solves ``y(x; h) = y``
    elementwise with :func:`~pyroflows.transforms.solvers.monotone_inverse` (bracket, then
    safeguarded Newton; each iteration one forward evaluation and its derivative) to
    :data:`~pyroflows.transforms.solvers.TOLERANCE` (``1e-10`` in float64, ``1e-5`` in
    float32, relative for ``|x| > 1``), with gradients by the implicit function theorem;
    non-finite values to invert are a ``ValueError``, as for :class:`DSF`.

    The conditioner emits ``units * (2 + d_{l-1} + d_l)`` numbers per layer and feature, less
    ``units`` for the first layer (its input weights over one input are constant), e.g. 168
    per feature for ``units=8, layers=2``; per feature they are laid out layer by layer, each
    as ``[raw a (U), raw b (U), raw u (U·d_{l-1}, absent when d_{l-1} = 1), raw w (d_l·U)]``.

    Args:
        units: the width ``U`` of the layers (sigmoids per layer, and the size of the hidden
            representation between layers).
        layers: number of dense sigmoidal layers ``L`` (``layers=1`` is a :class:`DSF` with
            ``units`` components).
        log_slope_bound: the soft bound ``B_a`` on ``|log a_k|`` in every layer.
        shift_bound: the soft bound ``B_b`` on ``|b_k|`` in every layer.
        min_derivative: the floor ``ε`` on the slope, in ``[0, 1)``.

    Shapes:
        ``x``, ``y``: ``(*batch, n)``; ``h``: ``(*batch', n, params_per_feature)`` with
        ``batch'`` broadcastable with ``batch``; log-derivatives summed over the ``n`` features.

    References:
        Neural Autoregressive Flows (Huang, Krueger, Lacoste and Courville, 2018).

    Example:
        >>> import torch
        >>> from pyroflows.transforms.naf import DDSF
        >>> g = DDSF(units=4, layers=2)
        >>> g.params_per_feature
        52
        >>> _ = torch.manual_seed(0)
        >>> x, h = torch.randn(5, 3), torch.randn(5, 3, 52)
        >>> y, ladj = g(x, h)
        >>> torch.allclose(g.inverse(y, h)[0], x, atol=1e-4)
        True
    """

    def __init__(
        self,
        units: int = 8,
        layers: int = 2,
        log_slope_bound: float = 3.0,
        shift_bound: float = 5.0,
        min_derivative: float = MIN_DERIVATIVE,
    ) -> None:
        super().__init__(log_slope_bound, shift_bound, min_derivative)
        self.units = check_positive_int("units", units)
        self.layers = check_positive_int("layers", layers)
        widths = [1] + [self.units] * (self.layers - 1) + [1]
        # (inputs, outputs, offset) of every layer's block of the conditioner output
        self._shapes: list[tuple[int, int, int]] = []
        offset = 0
        for d_in, d_out in itertools.pairwise(widths):
            self._shapes.append((d_in, d_out, offset))
            offset += self._layer_size(d_in, d_out)
        self.params_per_feature = offset

    def _layer_size(self, d_in: int, d_out: int) -> int:
        return self.units * (2 + (d_in if d_in > 1 else 0) + d_out)

    def _transformer(self, x, h):
        U = self.units
        v = x.unsqueeze(-1)  # (..., n, d_0 = 1): the values of the current layer's inputs
        grad = None  # log ∂v/∂x, (..., n, d); zero (None) for the input itself
        for d_in, d_out, offset in self._shapes:
            p = h[..., offset : offset + self._layer_size(d_in, d_out)]
            log_a = _soft_clamp(p[..., :U], self.log_slope_bound)
            shift = _soft_clamp(p[..., U : 2 * U], self.shift_bound)
            log_w = torch.log_softmax(p[..., -d_out * U :].unflatten(-1, (d_out, U)), -1)
            if d_in > 1:
                raw_u = p[..., 2 * U : 2 * U + U * d_in].unflatten(-1, (U, d_in))
                log_u = torch.log_softmax(raw_u, -1)
                mixed = (log_u.exp() @ v.unsqueeze(-1)).squeeze(-1)  # (u v)_k
                grad_in = torch.logsumexp(log_u + grad.unsqueeze(-2), -1)  # log ∂(u v)_k/∂x
            else:  # one input: u = 1
                mixed = v
                grad_in = grad
            z = log_a.exp() * mixed + shift
            log_p, log_q = _log_sigmoids(z)
            log_s = torch.logsumexp(log_w + log_p.unsqueeze(-2), -1)
            log_1ms = torch.logsumexp(log_w + log_q.unsqueeze(-2), -1)
            slope = log_a + log_p + log_q  # log ∂σ(z_k)/∂(u v)_k
            if grad_in is not None:
                slope = slope + grad_in
            grad = torch.logsumexp(log_w + slope.unsqueeze(-2), -1) - log_s - log_1ms
            v = log_s - log_1ms
        return v.squeeze(-1), grad.squeeze(-1)

    def extra_repr(self) -> str:
        return f"units={self.units}, layers={self.layers}, {super().extra_repr()}"


class _MaskedBlockLinear(nn.Module):
    """One weight-normalised block-lower-triangular layer of a :class:`BNAF`.

    The weight is ``dim × dim`` blocks of ``out_block × in_block``: diagonal blocks
    ``exp(V)`` (positive), blocks below the diagonal ``V``, blocks above zero; every row is
    then rescaled to the norm ``exp(g)`` (weight normalisation). It owns ``V`` (``weight``),
    ``g`` (``log_scale``) and the bias, but computes from tensors handed to :meth:`evaluate`, so
    that a numerical inverse can pass them to its solver.
    """

    def __init__(
        self, dim: int, in_block: int, out_block: int, log_scale: float | None = None
    ) -> None:
        super().__init__()
        self.dim, self.in_block, self.out_block = dim, in_block, out_block
        n_in, n_out = dim * in_block, dim * out_block
        blocks = torch.arange(dim)
        row, col = blocks.repeat_interleave(out_block), blocks.repeat_interleave(in_block)
        diagonal = row[:, None] == col[None, :]
        below = row[:, None] > col[None, :]
        weight = torch.zeros(n_out, n_in)
        for i in range(dim):  # Xavier on the active part of each block row, as in the paper
            rows = slice(i * out_block, (i + 1) * out_block)
            nn.init.xavier_uniform_(weight[rows, : (i + 1) * in_block])
        self.weight = nn.Parameter(weight)
        if log_scale is None:  # the paper's g = log U(0, 1)
            self.log_scale = nn.Parameter(torch.rand(n_out).log())
        else:
            self.log_scale = nn.Parameter(torch.full((n_out,), log_scale))
        bound = 1 / math.sqrt(n_out)
        self.bias = nn.Parameter(torch.empty(n_out).uniform_(-bound, bound))
        self.register_buffer("diagonal", diagonal, persistent=False)
        self.register_buffer("below", below, persistent=False)

    def evaluate(
        self,
        v: torch.Tensor,
        grad: torch.Tensor | None,
        weight,
        log_scale,
        bias,
        values_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W v + bias`` and ``log ∂(W v)_i-block/∂x_i`` from ``grad = log ∂v_i-block/∂x_i``.

        ``v``: ``(..., dim * in_block)``; ``grad``: ``(..., dim, in_block)`` or ``None`` for the
        input itself (``in_block = 1``, derivative 1); returns ``(..., dim * out_block)`` and
        ``(..., dim, out_block)``.
        """
        # Dividing each row by its largest entry (log: ``top``) changes nothing after the
        # normalisation and keeps exp() from overflowing; no exp() is taken of an unused entry,
        # whose infinite value would turn the masked gradient into NaN.
        diagonal, below = self.diagonal, self.below
        off = torch.where(below, weight, 0.0)
        top = torch.maximum(
            torch.where(diagonal, weight, -math.inf).amax(-1, keepdim=True),
            off.abs().amax(-1, keepdim=True).log(),
        ).detach()
        raw = torch.where(
            diagonal, (torch.where(diagonal, weight, top) - top).exp(), off * (-top).exp()
        )
        log_norm = 0.5 * raw.square().sum(-1, keepdim=True).log()
        w = raw * (log_scale.unsqueeze(-1) - log_norm).exp()
        out = v @ w.transpose(-1, -2) + bias
        if values_only:  # (a numerical inverse needs the values only: 30x cheaper)
            return out, None
        # log of the positive diagonal blocks, (dim, out_block, in_block)
        log_diag = (log_scale.unsqueeze(-1) + weight - top - log_norm)[self.diagonal]
        log_diag = log_diag.view(self.dim, self.out_block, self.in_block)
        if grad is None:
            new = log_diag.squeeze(-1).expand(*v.shape[:-1], self.dim, self.out_block)
        else:  # log (D_i exp(grad_i)) for each block i: a log-sum-exp matrix-vector product
            new = torch.logsumexp(log_diag + grad.unsqueeze(-2), -1)
        return out, new


def _log_tanh_derivative(z: torch.Tensor) -> torch.Tensor:
    """``log(1 - tanh(z)²) = 2 (log 2 - z - softplus(-2z))``, finite for every finite ``z``."""
    return 2.0 * (math.log(2.0) - z - F.softplus(-2.0 * z))


class BNAF(FlowTransform):
    """Block neural autoregressive flow with a positive skip connection, onto ``R^dim``.

    A network ``N: R^dim -> R^dim`` of ``layers + 1`` masked linear layers with ``tanh``
    between them, hidden layers of ``dim * hidden_factor`` units (``hidden_factor`` per
    dimension). Each weight matrix is ``dim × dim`` blocks: the diagonal blocks are positive
    (``exp`` of free parameters), the blocks below the diagonal free, those above zero, and
    each row is weight-normalised (rescaled to the norm ``exp(g)`` with a free ``g``), as in
    the paper. So ``N_i`` depends only on ``x_1..x_i`` and increases strictly in ``x_i``.
    With a skip log-scale ``s = B tanh(raw_s / B)`` (``B = log_scale_bound``):

    * map: ``y = exp(s) ⊙ x + N(x)``
    * log|det J|: ``sum_i log(exp(s_i) + ∂N_i/∂x_i)`` (the Jacobian is lower triangular),
      with ``log ∂N_i/∂x_i`` carried exactly through the layers as log-sum-exp products of the
      log diagonal blocks and ``log tanh'`` (the paper's method)
    * inverse: numerical, one coordinate after the other (below).

    **Why the skip connection.** The paper's network ends in a linear layer after a ``tanh``,
    so its range is bounded and points outside it have no inverse. ``exp(s_i) x_i`` makes each
    ``y_i`` onto ``R`` in ``x_i`` (``N_i`` is bounded), keeps the Jacobian triangular with a
    positive diagonal, and bounds that diagonal below by ``exp(-B)``, which keeps the inverse
    well conditioned. (It is the paper's ``"normal"`` residual connection with a learnt,
    bounded scale on ``x``.) ``sign`` is ``+1``.

    **At construction** ``s = 0`` and the last layer's rows have norm ``0.1`` and zero
    biases, so the transform starts *near* the identity, not exactly at it: ``|y_i - x_i| <=
    0.1 sqrt(i * hidden_factor)`` (on average below 0.1 for standard-normal inputs). A zero
    last layer would have no direction to grow from (weight normalisation needs a non-zero
    row); on a 2-D toy, a scale of 0.1 trained as fast as the paper's random one, from a far
    better starting likelihood. The inner layers are initialised as in the paper (Xavier
    blocks, ``g = log U(0, 1)``, uniform biases).

    **Which direction is fast.** The forward map ``x -> y`` is one network pass
    (``O(layers * (dim * hidden_factor)²)`` per point), log|det J| included. The inverse
    solves the coordinates in order: coordinate ``i`` by
    :func:`~pyroflows.transforms.solvers.monotone_inverse` given the ones already solved,
    ``dim`` solves of (typically) 10 to 20 network passes each, to
    :data:`~pyroflows.transforms.solvers.TOLERANCE` per coordinate (``1e-10`` in float64,
    ``1e-5`` in float32, relative above 1); gradients in ``y``, the parameters and the context
    come from the implicit function theorem (the solved coordinates are parameters of the
    later solves). Non-finite values to invert are a ``ValueError``; a failed solve raises
    :class:`~pyroflows.transforms.InverseNotConverged`. So put the fast direction where the
    flow is used most: sampling and scoring its own samples (variational inference) as is,
    maximum likelihood on data through :class:`~pyroflows.transforms.Inverted` (data -> base
    is then the network pass).

    Args:
        dim: number of features.
        hidden_factor: hidden units per dimension in each hidden layer.
        layers: number of hidden layers (``tanh`` layers; the network has ``layers + 1``
            weight matrices).
        context_dim: size of the context, 0 for an unconditional transform; with a context
            ``c`` the first layer computes ``W x + C c + bias`` (``C`` unmasked) and the
            transform is used through ``condition(c)``.
        log_scale_bound: the soft bound ``B`` on the skip log-scale ``|s|``.

    Shapes:
        ``(*batch, dim)`` -> ``(*batch, dim)``, log|det J| of shape ``batch``; context
        ``(*batch', context_dim)`` broadcastable with ``batch``.

    References:
        Block Neural Autoregressive Flow (De Cao, Aziz and Titov, 2019).
        Weight Normalization: A Simple Reparameterization to Accelerate Training of Deep
        Neural Networks (Salimans and Kingma, 2016).

    Example:
        >>> import torch
        >>> from pyroflows.transforms.naf import BNAF
        >>> _ = torch.manual_seed(0)
        >>> t = BNAF(3, hidden_factor=4, layers=2)
        >>> x = torch.randn(10, 3)
        >>> y, ladj = t.forward_and_log_det(x)          # one network pass
        >>> y.shape, ladj.shape
        (torch.Size([10, 3]), torch.Size([10]))
        >>> x_back, ladj_inv = t.inverse_and_log_det(y)  # 3 sequential solves
        >>> torch.allclose(x_back, x, atol=1e-4), torch.allclose(ladj_inv, -ladj, atol=1e-4)
        (True, True)
    """

    inverse_kind = "numerical"
    sign = 1

    def __init__(
        self,
        dim: int,
        hidden_factor: int = 8,
        layers: int = 2,
        context_dim: int = 0,
        *,
        log_scale_bound: float = 3.0,
    ) -> None:
        check_positive_int("dim", dim)
        check_nonnegative_int("context_dim", context_dim)
        super().__init__(event_shape=(dim,), context_dim=context_dim)
        self.hidden_factor = check_positive_int("hidden_factor", hidden_factor)
        self.layers = check_positive_int("layers", layers)
        self.log_scale_bound = float(check_positive("log_scale_bound", log_scale_bound))
        blocks = [1] + [self.hidden_factor] * self.layers + [1]
        last = len(blocks) - 2
        self.linears = nn.ModuleList(
            _MaskedBlockLinear(dim, b_in, b_out, math.log(0.1) if i == last else None)
            for i, (b_in, b_out) in enumerate(itertools.pairwise(blocks))
        )
        with torch.no_grad():
            self.linears[-1].bias.zero_()
        self.skip = nn.Parameter(torch.zeros(dim))
        if context_dim:
            bound = 1 / math.sqrt(context_dim)
            weight = torch.empty(dim * self.hidden_factor, context_dim).uniform_(-bound, bound)
            self.context_weight = nn.Parameter(weight)
        else:
            self.context_weight = None

    def _tensors(self) -> list[torch.Tensor]:
        """The parameters, in the order :meth:`_network` reads them."""
        tensors = [self.skip]
        for linear in self.linears:
            tensors += [linear.weight, linear.log_scale, linear.bias]
        if self.context_weight is not None:
            tensors.append(self.context_weight)
        return tensors

    def _network(
        self, x: torch.Tensor, context: torch.Tensor | None, tensors, values_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``y`` and ``log ∂y_i/∂x_i`` (shape ``(..., dim)``) from the parameters ``tensors``
        (``y`` and ``None`` with ``values_only``)."""
        skip, *rest = tensors
        v, grad = x, None
        for k, linear in enumerate(self.linears):
            weight, log_scale, bias = rest[3 * k : 3 * k + 3]
            v, grad = linear.evaluate(v, grad, weight, log_scale, bias, values_only)
            if k == 0 and context is not None:
                v = v + context @ rest[-1].transpose(-1, -2)
            if k < len(self.linears) - 1:
                if not values_only:
                    grad = grad + _log_tanh_derivative(v).unflatten(-1, grad.shape[-2:])
                v = torch.tanh(v)
        log_skip = _soft_clamp(skip, self.log_scale_bound)
        y = log_skip.exp() * x + v
        if values_only:
            return y, None
        return y, torch.logaddexp(log_skip, grad.squeeze(-1))

    def _forward_and_log_det(self, x, context):
        expand_to_context(x, context, type(self).__name__)
        y, log_diag = self._network(x, context, self._tensors())
        return y, log_diag.sum(-1)

    def _inverse_and_log_det(self, y, context):
        _check_finite(type(self).__name__, y)
        y = expand_to_context(y, context, type(self).__name__)
        tensors = self._tensors()
        extra = [] if context is None else [context]
        dim = self.event_shape[0]
        solved: list[torch.Tensor] = []
        for i in range(dim):
            # Coordinate i given x_<i (parameters of the solve, so that their gradients flow
            # through it); the coordinates after i do not reach y_i, zeros stand in for them.
            def f(xi, *params, i=i):
                previous, rest = params[:i], params[i:]
                ctx, weights = (rest[0], rest[1:]) if extra else (None, rest)
                later = xi.new_zeros(()).expand(*xi.shape, dim - i - 1)
                x = torch.cat([*(p.unsqueeze(-1) for p in previous), xi.unsqueeze(-1), later], -1)
                return self._network(x, ctx, weights, values_only=True)[0][..., i]

            params = (*solved, *extra, *tensors)
            solved.append(monotone_inverse(f, y[..., i], params, what=type(self).__name__))
        x = torch.stack(solved, -1)
        _, log_diag = self._network(x, context, tensors)
        return x, -log_diag.sum(-1)

    def extra_repr(self) -> str:
        parts = [
            super().extra_repr(),
            f"hidden_factor={self.hidden_factor}",
            f"layers={self.layers}",
        ]
        if self.log_scale_bound != 3.0:
            parts.append(f"log_scale_bound={self.log_scale_bound}")
        return ", ".join(parts)
