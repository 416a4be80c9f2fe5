"""Rational-quadratic splines: the scalar maths at its edges, and the transforms built on it.

The generic harness (``test_generic.py``) covers round trips, shapes, Jacobians, gradients,
save/load and Pyro integration of the transforms; here we check what is particular to splines:
knots, the interval's edges, the identity tails, monotonicity, the identity at zero parameters
and agreement with Pyro's own implementation.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.distributions.transforms.spline import _monotonic_rational_spline

from pyroflows.transforms.splines import (
    SplineAutoregressive,
    SplineCoupling,
    rational_quadratic_spline,
)

DTYPES = [torch.float32, torch.float64]
# float64 is exact up to rounding; float32 loses a few ulps per operation and more where a
# narrow bin amplifies the rounding of y - y_k (bins are at least 2e-3 * bound wide).
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
BOUND = 3.0
BINS = 6


def params(n: int, dtype: torch.dtype, scale: float = 1.0, bins: int = BINS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
        for k in (bins, bins, bins - 1)
    )


def reference_knots(widths, heights, derivatives, bound, min_size=1e-3, min_derivative=1e-3):
    """The knots ``(x_k, y_k, d_k)`` as the documented parametrisation defines them."""
    bins = widths.shape[-1]

    def knots(raw):
        sizes = min_size + (1 - min_size * bins) * torch.softmax(raw, -1)
        return F.pad(torch.cumsum(sizes, -1), (1, 0)) * 2 * bound - bound

    c = math.log(math.expm1(1 - min_derivative))
    d = F.pad(min_derivative + F.softplus(derivatives + c), (1, 1), value=1.0)
    return knots(widths), knots(heights), d


def special_points(dtype: torch.dtype, bound: float = BOUND) -> torch.Tensor:
    """Exactly at and just either side of ±bound, far in the tails, and a few inside."""
    eps = 1e-4
    pts = [
        -1e3,
        -100.0,
        -bound - eps,
        -bound,
        -bound + eps,
        -1.3,
        0.0,
        0.4,
        bound - eps,
        bound,
        bound + eps,
        100.0,
        1e3,
    ]
    return torch.tensor(pts, dtype=dtype)


def with_grad(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


# -- the scalar spline --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_at_zero_parameters(dtype):
    x = torch.cat([special_points(dtype), torch.linspace(-5, 5, 101, dtype=dtype)])
    zeros = params(len(x), dtype, scale=0.0)
    for inverse in (False, True):
        y, ladj = rational_quadratic_spline(x, *zeros, BOUND, inverse=inverse)
        torch.testing.assert_close(y, x, atol=4 * torch.finfo(dtype).eps * BOUND, rtol=0)
        torch.testing.assert_close(
            ladj, torch.zeros_like(x), atol=10 * torch.finfo(dtype).eps, rtol=0
        )


def test_inner_derivatives_are_one_at_zero_raw_input():
    w, h, _ = params(1, torch.float64)
    zero = torch.zeros(1, BINS - 1, dtype=torch.float64)
    knots_x, _, d = reference_knots(w, h, zero, 2.0)
    assert torch.equal(d, torch.ones_like(d))
    _, ladj = rational_quadratic_spline(knots_x[0], w[0], h[0], zero[0], 2.0)
    torch.testing.assert_close(ladj, torch.zeros_like(ladj), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_log_det_at_the_knots(dtype):
    w, h, d = params(1, torch.float64)
    kx, ky, kd = (t[0] for t in reference_knots(w, h, d, BOUND))
    n = BINS + 1
    args = (t.expand(n, -1).to(dtype) for t in (w, h, d))
    y, ladj = rational_quadratic_spline(kx.to(dtype), *args, BOUND)
    tol = TOL[dtype] if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, ky.to(dtype), atol=tol, rtol=0)
    torch.testing.assert_close(ladj, kd.log().to(dtype), atol=tol, rtol=0)
    # and the inverse at the knots' images
    args = (t.expand(n, -1).to(dtype) for t in (w, h, d))
    x, ladj_inv = rational_quadratic_spline(ky.to(dtype), *args, BOUND, inverse=True)
    torch.testing.assert_close(x, kx.to(dtype), atol=tol, rtol=0)
    torch.testing.assert_close(ladj_inv, -kd.log().to(dtype), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edges_of_the_interval_and_the_tails(dtype):
    x = special_points(dtype)
    w, h, d = params(len(x), dtype)
    y, ladj = rational_quadratic_spline(x, w, h, d, BOUND)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    edge = x.abs() == BOUND
    tails = x.abs() > BOUND
    # ±bound map to ±bound with slope 1 (the boundary derivatives), the tails are the identity
    torch.testing.assert_close(y[edge], x[edge], atol=4 * torch.finfo(dtype).eps * BOUND, rtol=0)
    torch.testing.assert_close(ladj[edge], torch.zeros_like(ladj[edge]), atol=1e-5, rtol=0)
    assert torch.equal(y[tails], x[tails]) and torch.equal(ladj[tails], torch.zeros_like(x[tails]))
    # just inside: continuous with the tails, in value and in slope
    near = (x.abs() < BOUND) & (x.abs() > BOUND - 1e-3)
    assert near.sum() == 2
    torch.testing.assert_close(y[near], x[near], atol=1e-3, rtol=0)
    assert (ladj[near].abs() < 0.05).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_batch_entirely_in_the_tails(dtype):
    x = torch.tensor([-1e3, -50.0, -BOUND - 1e-3, BOUND + 1e-3, 7.0, 1e3], dtype=dtype)
    x, w, h, d = with_grad(x, *params(len(x), dtype))
    for inverse in (False, True):
        y, ladj = rational_quadratic_spline(x, w, h, d, BOUND, inverse=inverse)
        assert torch.equal(y, x) and torch.equal(ladj, torch.zeros_like(x))
        gx, gw, gh, gd = torch.autograd.grad(y.sum() + ladj.sum(), (x, w, h, d))
        assert torch.equal(gx, torch.ones_like(x))
        for g in (gw, gh, gd):
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_are_finite_everywhere(dtype, inverse):
    x = torch.cat([special_points(dtype), torch.linspace(-4, 4, 41, dtype=dtype)])
    for scale in (0.0, 1.0, 5.0):
        x_, w, h, d = with_grad(x, *params(len(x), dtype, scale=scale))
        y, ladj = rational_quadratic_spline(x_, w, h, d, BOUND, inverse=inverse)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        grads = torch.autograd.grad((y.square() + ladj).sum(), (x_, w, h, d))
        for g in grads:
            assert torch.isfinite(g).all()


def test_monotone_increasing():
    x = torch.linspace(-BOUND - 1, BOUND + 1, 20001, dtype=torch.float64)
    for seed in range(5):
        w, h, d = (t.expand(len(x), -1) for t in params(1, torch.float64, 2.0, seed=seed))
        y, _ = rational_quadratic_spline(x, w, h, d, BOUND)
        assert (torch.diff(y) > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inverse_round_trip(dtype):
    x = torch.cat([special_points(dtype), 2 * BOUND * (2 * torch.rand(2000, dtype=dtype) - 1)])
    w, h, d = params(len(x), dtype, scale=1.5)
    y, ladj = rational_quadratic_spline(x, w, h, d, BOUND)
    x_back, ladj_inv = rational_quadratic_spline(y, w, h, d, BOUND, inverse=True)
    # Where the spline is nearly flat (slopes down to 1e-5 with these parameters), rounding y
    # moves x by ulp(y) / slope: that is the problem's conditioning, not the inverse's error.
    # So x is compared where the slope is at least 1e-2 and, everywhere, the error is scaled by
    # the slope (an error in y-space).
    slope = ladj.exp()
    ok = slope > 1e-2
    torch.testing.assert_close(x_back[ok], x[ok], atol=TOL[dtype], rtol=TOL[dtype])
    assert ((x_back - x).abs() * slope.clamp(max=1.0)).max() < TOL[dtype]
    # log-dets agree to the precision θ is known to (1e-3 in float32 in the narrowest bins)
    atol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(ladj_inv[ok], -ladj[ok], atol=atol, rtol=0)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_log_det_matches_the_autograd_derivative(inverse):
    x = torch.cat([special_points(torch.float64), torch.linspace(-4, 4, 401, dtype=torch.float64)])
    w, h, d = params(len(x), torch.float64, scale=1.5)
    (x,) = with_grad(x)
    y, ladj = rational_quadratic_spline(x, w, h, d, BOUND, inverse=inverse)
    # the spline is elementwise, so the gradient of the sum is the derivative of each element
    (dydx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ladj, dydx.log(), atol=1e-10, rtol=0)


def test_broadcasts_parameters_over_a_batch():
    x = torch.randn(7, 3, dtype=torch.float64)
    w, h, d = params(3, torch.float64)
    y, ladj = rational_quadratic_spline(x, w, h, d, BOUND)
    assert y.shape == ladj.shape == (7, 3)
    y0, ladj0 = rational_quadratic_spline(x[0], w, h, d, BOUND)
    torch.testing.assert_close(y[0], y0)
    torch.testing.assert_close(ladj[0], ladj0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_parameters_stay_finite_and_invertible(dtype):
    x = torch.cat([special_points(dtype), torch.linspace(-3, 3, 61, dtype=dtype)])
    x, w, h, d = with_grad(x, *params(len(x), dtype, scale=30.0))
    y, ladj = rational_quadratic_spline(x, w, h, d, BOUND)
    x_back, ladj_inv = rational_quadratic_spline(y, w, h, d, BOUND, inverse=True)
    for t in (y, ladj, x_back, ladj_inv):
        assert torch.isfinite(t).all()
    for g in torch.autograd.grad((y + ladj + x_back + ladj_inv).sum(), (x, w, h, d)):
        assert torch.isfinite(g).all()
    if dtype == torch.float64:
        torch.testing.assert_close(x_back, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_agrees_with_pyros_spline(inverse):
    # Pyro takes softmax-normalised sizes and positive derivatives, adds min_derivative to the
    # inner ones and pads the boundary ones with 1 - min_derivative; with min_derivative = 0
    # both parametrisations give the same spline, with boundary derivatives 1.
    x = torch.cat(
        [special_points(torch.float64), 2 * BOUND * (2 * torch.rand(500, dtype=torch.float64) - 1)]
    )
    w, h, d = params(len(x), torch.float64, scale=1.5)
    ours = rational_quadratic_spline(x, w, h, d, BOUND, inverse=inverse, min_derivative=0.0)
    pyro_d = F.softplus(d + math.log(math.expm1(1.0)))
    theirs = _monotonic_rational_spline(
        x, w.softmax(-1), h.softmax(-1), pyro_d, inverse=inverse, bound=BOUND, min_derivative=0.0
    )
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bound": 0.0}, "bound: expected a positive number; got 0.0"),
        ({"bound": -1}, "bound: expected a positive number"),
        ({"min_bin_width": 0.2}, r"min_bin_width: expected min_bin_width \* bins < 1"),
        ({"min_bin_height": -1e-3}, "min_bin_height: expected a non-negative number"),
        ({"min_derivative": 1.0}, r"min_derivative: expected a number in \[0, 1\)"),
    ],
)
def test_spline_arguments_are_validated(kwargs, match):
    w, h, d = params(2, torch.float64)
    args = {"bound": BOUND, **kwargs}
    with pytest.raises(ValueError, match=match):
        rational_quadratic_spline(torch.zeros(2, dtype=torch.float64), w, h, d, **args)


def test_parameter_sizes_are_validated():
    w, h, d = params(2, torch.float64)
    with pytest.raises(ValueError, match=r"derivatives of size bins - 1.*got 6, 6 and 6"):
        rational_quadratic_spline(torch.zeros(2), w, h, torch.cat([d, d[:, :1]], -1), BOUND)


# -- the transforms -----------------------------------------------------------------------------
TRANSFORMS = {
    "coupling": lambda **kw: SplineCoupling(4, hidden=(16, 16), **kw),
    "coupling-alternate": lambda **kw: SplineCoupling(5, hidden=(16,), mask="alternate", **kw),
    "maf": lambda **kw: SplineAutoregressive(4, hidden=(16, 16), **kw),
    "iaf": lambda **kw: SplineAutoregressive(4, hidden=(16, 16), orientation="iaf", **kw),
}


def perturbed(make, scale: float = 0.5, **kwargs):
    torch.manual_seed(0)
    t = make(**kwargs).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_start_at_the_identity(name):
    t = TRANSFORMS[name](bins=5, bound=3.0).double()
    dim = t.event_shape[0]
    x = torch.cat([3 * torch.randn(50, dim, dtype=torch.float64), torch.full((1, dim), 1e3)])
    for fn in (t.forward_and_log_det, t.inverse_and_log_det):
        y, ladj = fn(x)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(
            ladj, torch.zeros(len(x), dtype=torch.float64), atol=1e-12, rtol=0
        )


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_log_prob_is_finite_far_from_the_data(name):
    t = perturbed(TRANSFORMS[name], bins=5, bound=3.0)
    dim = t.event_shape[0]
    base = dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [t])
    for r in (10.0, 100.0, 1000.0):
        y = r * torch.tensor(
            [[1.0] * dim, [-1.0] * dim, [(-1.0) ** i for i in range(dim)]], dtype=torch.float64
        )
        y = torch.cat([y, r * torch.nn.functional.normalize(torch.randn(5, dim), dim=-1).double()])
        lp = d.log_prob(y)
        assert torch.isfinite(lp).all()
        t.zero_grad()
        lp.sum().backward()
        for p in t.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
    # and in float32
    t32 = perturbed(TRANSFORMS[name], bins=5, bound=3.0).float()
    d32 = dist.TransformedDistribution(dist.Normal(torch.zeros(dim), 1.0).to_event(1), [t32])
    y = torch.tensor([10.0, 100.0, 1000.0])[:, None] * torch.ones(dim)
    assert torch.isfinite(d32.log_prob(y)).all()


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_round_trip_across_the_edges(name):
    t = perturbed(TRANSFORMS[name], bins=4, bound=1.0)
    dim = t.event_shape[0]
    x = torch.cat(
        [
            torch.tensor(
                [[1.0, -1.0, 1.0 + 1e-9, -1.0 - 1e-9, 0.0][:dim]] * 2, dtype=torch.float64
            ),
            3 * torch.randn(100, dim, dtype=torch.float64),
        ]
    )
    x[0, -1] = 1e3
    y, ladj = t.forward_and_log_det(x)
    x_back, ladj_inv = t.inverse_and_log_det(y)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_params_per_feature_and_repr(name):
    t = TRANSFORMS[name](bins=7, bound=2.5)
    assert t.params_per_feature == 20
    assert t.bins == 7 and t.bound == 2.5
    assert "bins=7, bound=2.5" in repr(t)


def test_conditional_spline_coupling_with_a_context():
    t = perturbed(lambda: SplineCoupling(4, hidden=(8,), context_dim=3, bins=5))
    context = torch.randn(6, 3, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64)
    tc = t.condition(context).with_cache(0)
    y = tc(x)
    torch.testing.assert_close(tc.inv(y), x)
    assert tc.log_abs_det_jacobian(x, y).shape == (6,)
    with pytest.raises(ValueError, match="needs a context"):
        t(x)


@pytest.mark.parametrize("cls", [SplineCoupling, SplineAutoregressive])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bins": 1}, "bins: expected an integer >= 2; got 1"),
        ({"bins": 4.0}, "bins: expected an integer >= 2; got 4.0"),
        ({"bins": True}, "bins: expected an integer >= 2; got True"),
        ({"bins": 1000}, "bins: expected fewer than 1000 bins"),
        ({"bound": 0}, "bound: expected a positive number; got 0"),
        ({"bound": -2.0}, "bound: expected a positive number; got -2.0"),
        ({"bound": "5"}, "bound: expected a positive number; got '5'"),
        ({"bound": math.inf}, "bound: expected a finite number; got inf"),
    ],
)
def test_transform_arguments_are_validated(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(4, **kwargs)
