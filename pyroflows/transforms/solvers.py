"""Numerical inverses with gradients by the implicit function theorem.

Transforms without a closed-form inverse (the neural autoregressive maps, BNAF, planar, radial,
Sylvester and residual flows) invert with these solvers. Each solves to a documented tolerance
in float32 and float64 and raises :class:`InverseNotConverged` (naming the transform and the
worst residual) when it cannot; each is a custom autograd function whose backward pass uses the
implicit function theorem at the solution, never the solver's iterations:

* :func:`monotone_inverse`: ``f(x, *params) = y`` elementwise, ``f`` strictly increasing in
  ``x`` (a bracket is expanded until it holds the root, then safeguarded Newton steps with
  bisection fallback). Backward: ``dx/dy = 1 / f'(x)`` and ``dx/dθ = -(∂f/∂θ) / f'(x)``.
* :func:`fixed_point_inverse`: ``x + g(x, *params) = y`` for vectors, with ``g`` a contraction
  (Lipschitz constant below 1, as in residual flows); Banach iterations ``x <- y - g(x)``.
  Backward: ``v = grad + J_g^T v`` solved by the same kind of iteration, then ``dx/dy = v`` and
  ``dx/dθ = -(∂g/∂θ)^T v``.

``params`` are the tensors ``f``/``g`` depend on *with gradients*: module parameters and any
other input (a conditioner's output, the coordinates already solved). ``f``/``g`` must use only
them (and constants), so that the backward pass sees every dependency.

Only first derivatives are supported (``torch.autograd.grad(..., create_graph=True)`` through
an inverse raises).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "MAX_ITERATIONS",
    "TOLERANCE",
    "InverseNotConverged",
    "fixed_point_inverse",
    "monotone_inverse",
]

#: The absolute tolerance on ``|x - x*|`` by dtype (relative for ``|x| > 1``): a few hundred ulps
#: of the dtype at unit scale, what a round trip through a deep stack keeps.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
#: Iterations before :class:`InverseNotConverged` is raised.
MAX_ITERATIONS = 200


class InverseNotConverged(RuntimeError):
    """A numerical inverse did not reach its tolerance (the transform, the iterations and the
    worst residual are in the message)."""


def _tolerance(dtype: torch.dtype, tol: float | None) -> float:
    return TOLERANCE.get(dtype, 1e-5) if tol is None else tol


def _elementwise_derivative(f, x, params):
    """``f(x)`` and ``df/dx`` (elementwise), with a graph into ``x`` and ``params``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = f(x, *params)
        (dy,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    return x, y, dy


def _bisect_newton(f, y, params, lower, upper, tol, max_iter, what):
    """The root of ``f(x) - y`` (increasing) elementwise, under no_grad."""
    dtype = y.dtype
    lo = torch.full_like(y, lower)
    hi = torch.full_like(y, upper)
    # Expand the bracket geometrically until f(lo) <= y <= f(hi) everywhere (or give up).
    for _ in range(64):
        f_lo, f_hi = f(lo, *params), f(hi, *params)
        low_bad, high_bad = f_lo > y, f_hi < y
        if not (low_bad.any() or high_bad.any()):
            break
        width = hi - lo
        lo = torch.where(low_bad, lo - width, lo)
        hi = torch.where(high_bad, hi + width, hi)
    else:
        raise InverseNotConverged(
            f"{what}: no bracket holds the root of the inverse (values up to "
            f"{y.abs().max().item():.3g} outside the range the map reaches within "
            f"[{lo.min().item():.3g}, {hi.max().item():.3g}])"
        )
    x = (lo + hi) / 2
    tolerance = _tolerance(dtype, tol)
    for _ in range(max_iter):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            fx = f(xg, *params)
            (dfx,) = torch.autograd.grad(fx, xg, torch.ones_like(fx))
        fx = fx.detach()
        r = fx - y
        # Shrink the bracket with the sign of the residual, then a Newton step kept inside it.
        lo = torch.where(r < 0, x, lo)
        hi = torch.where(r > 0, x, hi)
        step = r / dfx.clamp_min(torch.finfo(dtype).tiny)
        newton = x - step
        # A step within the tolerance is taken even when it lands on a bracket end (a step
        # below one ulp does), rather than bisecting away from a root already found.
        small = step.abs() <= tolerance * x.abs().clamp_min(1.0)
        inside = (((newton > lo) & (newton < hi)) | small) & torch.isfinite(newton)
        new = torch.where(inside, newton, (lo + hi) / 2)
        change = (new - x).abs()
        x = new
        if bool((change <= tolerance * x.abs().clamp_min(1.0)).all()):
            return x
    worst = (f(x, *params) - y).abs().max().item()
    raise InverseNotConverged(
        f"{what}: the inverse did not converge in {max_iter} iterations (largest residual "
        f"{worst:.3g}, tolerance {tolerance:.1g})"
    )


class _MonotoneInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, lower, upper, tol, max_iter, what, y, *params):
        with torch.no_grad():
            x = _bisect_newton(
                f, y.detach(), [p.detach() for p in params], lower, upper, tol, max_iter, what
            )
        ctx.f = f
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        f = ctx.f
        with torch.enable_grad():
            inputs = [p.detach().requires_grad_(p.requires_grad) for p in params]
            xg = x.detach().requires_grad_(True)
            fx = f(xg, *inputs)
            (dfx,) = torch.autograd.grad(fx, xg, torch.ones_like(fx), create_graph=True)
            scaled = grad / dfx  # dL/dy, elementwise
            wanted = [p for p in inputs if p.requires_grad]
            # dx/dθ = -(∂f/∂θ)/f'(x): the vector-Jacobian product of f with -dL/dy.
            found = torch.autograd.grad(fx, wanted, -scaled.detach(), allow_unused=True)
        grads = iter(found)
        out = [next(grads) if p.requires_grad else None for p in inputs]
        return (None, None, None, None, None, None, scaled.detach(), *out)


def monotone_inverse(
    f: Callable[..., torch.Tensor],
    y: torch.Tensor,
    params: tuple[torch.Tensor, ...] = (),
    *,
    lower: float = -1.0,
    upper: float = 1.0,
    tol: float | None = None,
    max_iter: int = MAX_ITERATIONS,
    what: str = "inverse",
) -> torch.Tensor:
    """``x`` with ``f(x, *params) = y`` elementwise, for ``f`` strictly increasing in ``x``.

    The bracket ``[lower, upper]`` is doubled outward (up to 64 times) until ``f(lower) <= y <=
    f(upper)`` everywhere; then safeguarded Newton steps (bisection when a step leaves the
    bracket) run until an iteration changes ``x`` by at most :data:`TOLERANCE` (relative above
    1). ``f`` is evaluated on tensors of ``y``'s shape and must be elementwise in ``x``.

    Args:
        f: ``f(x, *params) -> y``, increasing in each element of ``x``.
        y: the values to invert.
        params: the tensors ``f`` depends on, which get gradients by the implicit function
            theorem.
        lower, upper: the initial bracket.
        tol: the tolerance (default :data:`TOLERANCE` of ``y``'s dtype).
        max_iter: Newton/bisection iterations before giving up.
        what: the transform's name, in the error message.

    Returns:
        ``x``, of ``y``'s shape, differentiable in ``y`` and ``params``.

    Raises:
        InverseNotConverged: when ``y`` lies outside the map's range or the iterations do not
            reach the tolerance.

    Example:
        >>> import torch
        >>> from pyroflows.transforms.solvers import monotone_inverse
        >>> scale = torch.tensor(2.0, requires_grad=True)
        >>> y = torch.tensor([-3.0, 0.5, 8.0])
        >>> x = monotone_inverse(lambda x, s: s * x + x**3, y, (scale,))
        >>> torch.allclose(scale * x + x**3, y, atol=1e-5)
        True
        >>> x.sum().backward()  # by the implicit function theorem
        >>> bool(torch.isfinite(scale.grad))
        True
    """
    return _MonotoneInverse.apply(f, lower, upper, tol, max_iter, what, y, *params)


def _scale(x: torch.Tensor) -> torch.Tensor:
    """Each vector's (last dimension's) largest magnitude, at least 1."""
    return x.abs().amax(-1, keepdim=True).clamp_min(1.0) if x.dim() else x.abs().clamp_min(1.0)


def _fixed_point(g, y, params, tol, max_iter, what):
    x = y.clone()
    tolerance = _tolerance(y.dtype, tol)
    for _ in range(max_iter):
        new = y - g(x, *params)
        change = (new - x).abs()
        x = new
        # vector by vector (g mixes a vector's elements, so their rounding is that of the
        # largest): absolute below 1, relative to the vector's largest element above
        if bool((change <= tolerance * _scale(x)).all()):
            return x
        change = change.max()
    raise InverseNotConverged(
        f"{what}: the fixed-point inverse did not converge in {max_iter} iterations (last "
        f"change {float(change):.3g}, tolerance {tolerance:.1g}); the residual branch's "
        "Lipschitz constant must stay below 1"
    )


class _FixedPointInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, tol, max_iter, what, y, *params):
        with torch.no_grad():
            x = _fixed_point(g, y.detach(), [p.detach() for p in params], tol, max_iter, what)
        ctx.g, ctx.tol, ctx.max_iter, ctx.what = g, tol, max_iter, what
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [p.detach().requires_grad_(p.requires_grad) for p in params]
            xg = x.detach().requires_grad_(True)
            gx = ctx.g(xg, *inputs)
            # x = y - g(x): dL/dy = v with v = grad - J_g^T v (a contraction's fixed point).
            v = grad.clone()
            tolerance = _tolerance(grad.dtype, ctx.tol)
            for _ in range(ctx.max_iter):
                (jtv,) = torch.autograd.grad(gx, xg, v, retain_graph=True)
                new = grad - jtv
                change = (new - v).abs()
                v = new
                if bool((change <= tolerance * _scale(v)).all()):
                    break
            else:
                raise InverseNotConverged(
                    f"{ctx.what}: the backward pass of the fixed-point inverse did not converge"
                )
            wanted = [p for p in inputs if p.requires_grad]
            found = torch.autograd.grad(gx, wanted, -v, allow_unused=True) if wanted else ()
        grads = iter(found)
        out = [next(grads) if p.requires_grad else None for p in inputs]
        return (None, None, None, None, v, *out)


def fixed_point_inverse(
    g: Callable[..., torch.Tensor],
    y: torch.Tensor,
    params: tuple[torch.Tensor, ...] = (),
    *,
    tol: float | None = None,
    max_iter: int = MAX_ITERATIONS,
    what: str = "inverse",
) -> torch.Tensor:
    """``x`` with ``x + g(x, *params) = y``, for ``g`` a contraction in ``x`` (Lipschitz < 1).

    Banach iterations ``x <- y - g(x)`` from ``x = y`` until an iteration changes every vector
    (last dimension) of ``x`` by at most :data:`TOLERANCE` (relative to its largest element
    where that exceeds 1); with Lipschitz constant ``c`` the error shrinks
    by ``c`` per iteration (about 20 iterations in float32 at ``c = 0.5``).

    Args:
        g: ``g(x, *params) -> tensor of x's shape`` (it may mix the event's elements).
        y: the values to invert.
        params: the tensors ``g`` depends on (gradients by the implicit function theorem).
        tol: the tolerance (default :data:`TOLERANCE` of ``y``'s dtype).
        max_iter: iterations before giving up (forward and backward alike).
        what: the transform's name, in the error message.

    Returns:
        ``x``, of ``y``'s shape, differentiable in ``y`` and ``params``.

    Raises:
        InverseNotConverged: when the iterations do not reach the tolerance.

    Example:
        >>> import torch
        >>> from pyroflows.transforms.solvers import fixed_point_inverse
        >>> w = torch.tensor([[0.3, -0.2], [0.1, 0.4]], requires_grad=True)
        >>> y = torch.tensor([[1.0, -2.0]])
        >>> x = fixed_point_inverse(lambda x, w: torch.tanh(x @ w), y, (w,))
        >>> torch.allclose(x + torch.tanh(x @ w), y, atol=1e-5)
        True
    """
    return _FixedPointInverse.apply(g, tol, max_iter, what, y, *params)
