"""Elementwise maps: the contract every map keeps, the linear rational spline's maths, and a map
of one's own plugged into every transform that takes one.

The generic harness (``test_generic.py``) checks each map inside Coupling, MaskedAutoregressive
and ImageCoupling (round trips, Jacobians against autograd, gradients, save/load); here the maps
are checked on their own, and the linear rational spline at its knots and edges as
``test_splines.py`` does for the rational-quadratic one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyroflows.transforms import (
    Additive,
    Affine,
    Coupling,
    ElementwiseMap,
    ImageCoupling,
    MaskedAutoregressive,
    RationalLinearSpline,
    RationalQuadraticSpline,
    rational_linear_spline,
)
from pyroflows.transforms.maps import check_map

DTYPES = [torch.float32, torch.float64]
MAPS = {
    "Affine": lambda: Affine(2.0),
    "Additive": Additive,
    "RationalQuadraticSpline": lambda: RationalQuadraticSpline(5, 2.0),
    "RationalLinearSpline": lambda: RationalLinearSpline(5, 2.0),
}
N = 3  # features


def params(g: ElementwiseMap, batch: tuple[int, ...], scale: float, dtype=torch.float64):
    """Conditioner-like output for ``g``: ``(*batch, n, P)`` or ``(*batch, P, n)``."""
    generator = torch.Generator().manual_seed(0)
    h = scale * torch.randn(*batch, N, g.params_per_feature, generator=generator, dtype=dtype)
    return h.transpose(-1, -2) if g.param_major else h


def points(batch: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return 2.5 * torch.randn(*batch, N, generator=generator, dtype=dtype)


# -- the contract, for every map ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(MAPS))
def test_zero_parameters_are_the_identity(name, dtype):
    g = MAPS[name]()
    x = points((7,), dtype)
    h = params(g, (7,), 0.0, dtype)
    for fn in (g.forward, g.inverse):
        y, ladj = fn(x, h)
        assert y.dtype == dtype and ladj.shape == (7,)
        torch.testing.assert_close(y, x, atol=8 * torch.finfo(dtype).eps * 2.5, rtol=0)
        torch.testing.assert_close(
            ladj, torch.zeros_like(ladj), atol=20 * torch.finfo(dtype).eps, rtol=0
        )


@pytest.mark.parametrize("name", sorted(MAPS))
def test_log_det_is_the_sum_of_the_autograd_derivatives(name):
    g = MAPS[name]()
    x = points((11,)).requires_grad_()
    h = params(g, (11,), 1.0)
    y, ladj = g.forward(x, h)
    # elementwise: the gradient of the sum is each feature's own derivative
    (dydx,) = torch.autograd.grad(y.sum(), x)
    assert (dydx > 0).all()  # strictly increasing
    torch.testing.assert_close(ladj, dydx.log().sum(-1), atol=1e-10, rtol=0)
    x_back, ladj_inv = g.inverse(y.detach(), h)
    torch.testing.assert_close(x_back, x.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj.detach(), atol=1e-10, rtol=0)
    assert g.volume_preserving == (name == "Additive")
    if g.volume_preserving:
        assert torch.equal(ladj, torch.zeros_like(ladj))


@pytest.mark.parametrize("name", sorted(MAPS))
def test_inputs_broadcast_with_the_parameters(name):
    g = MAPS[name]()
    h = params(g, (4, 5), 1.0)
    x = points((5,))  # one batch dimension fewer than h: broadcast
    y, ladj = g.forward(x, h)
    assert y.shape == (4, 5, N) and ladj.shape == (4, 5)
    y0, ladj0 = g.forward(x, h[0])
    torch.testing.assert_close(y[0], y0)
    torch.testing.assert_close(ladj[0], ladj0)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_maps_add_nothing_to_a_state_dict_and_name_their_settings(name):
    g = MAPS[name]()
    assert g.state_dict() == {} and list(g.parameters()) == []
    assert type(g).__name__ in repr(g)
    t = Coupling(4, g, hidden=(8,))
    assert not any(key.startswith("map") for key in t.state_dict())
    assert f"(map): {g!r}" in repr(t)


def test_a_map_must_implement_the_contract():
    class Incomplete(ElementwiseMap):
        params_per_feature = 1

        def forward(self, x, h):
            return x + h[..., 0], x.new_zeros(x.shape[:-1])

    with pytest.raises(TypeError, match=r"abstract method.*inverse"):
        Incomplete()

    class Unsized(Incomplete):
        def inverse(self, y, h):
            return y - h[..., 0], y.new_zeros(y.shape[:-1])

    with pytest.raises(TypeError, match=r"Unsized2\.params_per_feature to be a positive integer"):
        Coupling(4, type("Unsized2", (Unsized,), {"params_per_feature": 0})())
    assert Coupling(4, Unsized(), hidden=(8,)).params_per_feature == 1


def test_affine_is_the_soft_clamped_scale_and_shift():
    g = Affine(log_scale_bound=1.5)
    h = params(g, (6,), 4.0)
    x = points((6,))
    y, ladj = g.forward(x, h)
    shift, raw = h.unbind(-2)
    log_scale = 1.5 * torch.tanh(raw / 1.5)  # the documented soft clamp, written as tanh
    torch.testing.assert_close(y, x * log_scale.exp() + shift, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, log_scale.sum(-1), atol=1e-12, rtol=0)
    assert log_scale.abs().max() < 1.5 and raw.abs().max() > 3.0  # the clamp was active
    assert g.param_major and g.params_per_feature == 2


def test_additive_is_a_shift():
    g = Additive()
    h = params(g, (6,), 1.0)
    x = points((6,))
    y, ladj = g.forward(x, h)
    assert torch.equal(y, x + h[..., 0]) and torch.equal(ladj, torch.zeros(6, dtype=x.dtype))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Affine(0.0), ValueError, "log_scale_bound: expected a positive number; got 0.0"),
        (lambda: Affine(math.inf), ValueError, "log_scale_bound: expected a positive number"),
        (lambda: RationalLinearSpline(bins=1), ValueError, "bins: expected an integer >= 2"),
        (lambda: RationalLinearSpline(bound=-1.0), ValueError, "bound: expected a positive"),
        (lambda: RationalQuadraticSpline(bins=2.5), ValueError, "bins: expected an integer"),
        (lambda: check_map(Affine), TypeError, r"got the class Affine \(write Affine\(...\)\)"),
        (lambda: Coupling(4, "affine"), TypeError, "map: expected an ElementwiseMap instance"),
        (lambda: MaskedAutoregressive(3, nn.Identity()), TypeError, "got Identity"),
        (lambda: ImageCoupling((2, 2, 2), None), TypeError, "got NoneType"),
        (
            lambda: Coupling(4, Affine(), conditioner_bound=0.0),
            ValueError,
            "conditioner_bound: expected a positive number; got 0.0",
        ),
        (
            lambda: MaskedAutoregressive(3, Affine(), conditioner_bound=math.inf),
            ValueError,
            "conditioner_bound: expected a positive number; got inf",
        ),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("old", "module", "new"),
    [
        ("SplineParams", "pyroflows.transforms", RationalQuadraticSpline),
        ("SplineParams", "pyroflows.transforms.splines", RationalQuadraticSpline),
        ("AffineParams", "pyroflows.transforms.elementwise", Affine),
    ],
)
def test_the_old_mixin_names_warn_and_name_their_replacement(old, module, new):
    namespace: dict = {}
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*{new.__name__}"):
        exec(f"from {module} import {old}", namespace)
    assert namespace[old] is new
    with pytest.raises(ImportError, match="cannot import name 'NoSuchMap'"):
        exec(f"from {module} import NoSuchMap", {})


# -- a map of one's own, in every transform -----------------------------------------------------
class ScaledShift(ElementwiseMap):
    """``y = x * exp(a * tanh(raw)) + t`` with a learnable gain ``a``: a map with a parameter
    of its own, written against the contract alone."""

    params_per_feature = 2

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, h):
        log_scale = self.gain * torch.tanh(h[..., 1])
        return x * log_scale.exp() + h[..., 0], log_scale.sum(-1)

    def inverse(self, y, h):
        log_scale = self.gain * torch.tanh(h[..., 1])
        return (y - h[..., 0]) * torch.exp(-log_scale), -log_scale.sum(-1)


@pytest.mark.parametrize(
    ("make", "shape", "context_dim"),
    [
        (lambda g: Coupling(5, g, hidden=(8,), mask="alternate", context_dim=2), (5,), 2),
        (lambda g: MaskedAutoregressive(4, g, hidden=(8,), orientation="iaf"), (4,), 0),
        (lambda g: ImageCoupling((2, 4, 4), g, channels=4, blocks=1), (2, 4, 4), 0),
        (lambda g: ImageCoupling((3, 2, 2), g, channels=4, blocks=1, mask="channel"), (3, 2, 2), 0),
    ],
    ids=["coupling", "autoregressive", "image-checkerboard", "image-channel"],
)
def test_a_new_map_plugs_into_every_transform(make, shape, context_dim):
    torch.manual_seed(0)
    t = make(ScaledShift()).double()
    assert "map.gain" in t.state_dict()  # the map's own parameter is the transform's
    x = torch.randn(6, *shape, dtype=torch.float64)
    c = torch.randn(6, context_dim, dtype=torch.float64) if context_dim else None
    y, ladj = t.forward_and_log_det(x, c)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(6, dtype=torch.float64))
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y, ladj = t.forward_and_log_det(x, c)
    x_back, ladj_inv = t.inverse_and_log_det(y, c)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ladj_inv, -ladj)
    (y.sum() + ladj.sum()).backward()
    assert t.map.gain.grad is not None and t.map.gain.grad != 0


# -- the linear rational spline's maths ---------------------------------------------------------
BOUND = 3.0
BINS = 6
# float64 is exact up to rounding; float32 loses a few ulps per operation, more where a narrow
# segment amplifies the rounding of its end positions.
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def spline_params(n, dtype, scale=1.0, bins=BINS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
        for k in (bins, bins, bins - 1, bins)
    )


def reference_knots(w, h, d, lam, bound, min_size=1e-3, min_derivative=1e-3, min_split=0.025):
    """Bin ends ``(x_k, y_k, d_k)`` and intermediate positions ``λ_k`` as documented."""
    bins = w.shape[-1]

    def knots(raw):
        sizes = min_size + (1 - min_size * bins) * torch.softmax(raw, -1)
        return F.pad(torch.cumsum(sizes, -1), (1, 0)) * 2 * bound - bound

    c = math.log(math.expm1(1 - min_derivative))
    slopes = F.pad(min_derivative + F.softplus(d + c), (1, 1), value=1.0)
    return knots(w), knots(h), slopes, min_split + (1 - 2 * min_split) * torch.sigmoid(lam)


def special_points(dtype, bound=BOUND):
    eps = 1e-4
    pts = [-1e3, -bound - eps, -bound, -bound + eps, -1.3, 0.0, 0.4, bound - eps, bound, 1e3]
    return torch.tensor(pts, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spline_is_the_identity_at_zero_parameters(dtype):
    x = torch.cat([special_points(dtype), torch.linspace(-5, 5, 101, dtype=dtype)])
    zeros = spline_params(len(x), dtype, scale=0.0)
    for inverse in (False, True):
        y, ladj = rational_linear_spline(x, *zeros, BOUND, inverse=inverse)
        torch.testing.assert_close(y, x, atol=4 * torch.finfo(dtype).eps * BOUND, rtol=0)
        torch.testing.assert_close(
            ladj, torch.zeros_like(x), atol=10 * torch.finfo(dtype).eps, rtol=0
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spline_passes_the_knots_with_their_derivatives(dtype):
    w, h, d, lam = spline_params(1, torch.float64)
    kx, ky, kd, _ = (t[0] for t in reference_knots(w, h, d, lam, BOUND))
    n = BINS + 1
    args = [t.expand(n, -1).to(dtype) for t in (w, h, d, lam)]
    y, ladj = rational_linear_spline(kx.to(dtype), *args, BOUND)
    tol = TOL[dtype] if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, ky.to(dtype), atol=tol, rtol=0)
    torch.testing.assert_close(ladj, kd.log().to(dtype), atol=tol, rtol=0)
    x, ladj_inv = rational_linear_spline(ky.to(dtype), *args, BOUND, inverse=True)
    torch.testing.assert_close(x, kx.to(dtype), atol=tol, rtol=0)
    torch.testing.assert_close(ladj_inv, -kd.log().to(dtype), atol=tol, rtol=0)


def test_spline_slope_is_continuous_at_the_intermediate_knots():
    w, h, d, lam = spline_params(1, torch.float64, scale=1.5)
    kx, _, _, split = (t[0] for t in reference_knots(w, h, d, lam, BOUND))
    middle = kx[:-1] + split * (kx[1:] - kx[:-1])
    step = 1e-10  # the log-slope changes by up to ~1e4 per unit of x in narrow segments
    args = [t.expand(BINS, -1) for t in (w, h, d, lam)]
    _, left = rational_linear_spline(middle - step, *args, BOUND)
    _, right = rational_linear_spline(middle + step, *args, BOUND)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    # ... and the knots do cut it in two pieces: the curvature jumps there
    _, far_left = rational_linear_spline(middle - 1e-3, *args, BOUND)
    _, far_right = rational_linear_spline(middle + 1e-3, *args, BOUND)
    jump = (far_right - right) - (left - far_left)
    assert jump.abs().max() > 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spline_edges_and_tails(dtype):
    x = special_points(dtype)
    y, ladj = rational_linear_spline(x, *spline_params(len(x), dtype), BOUND)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    edge, tails = x.abs() == BOUND, x.abs() > BOUND
    torch.testing.assert_close(y[edge], x[edge], atol=4 * torch.finfo(dtype).eps * BOUND, rtol=0)
    torch.testing.assert_close(ladj[edge], torch.zeros_like(ladj[edge]), atol=1e-5, rtol=0)
    assert torch.equal(y[tails], x[tails]) and torch.equal(ladj[tails], torch.zeros_like(x[tails]))
    near = (x.abs() < BOUND) & (x.abs() > BOUND - 1e-3)  # continuous with the tails
    torch.testing.assert_close(y[near], x[near], atol=1e-3, rtol=0)
    assert (ladj[near].abs() < 0.05).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spline_batch_entirely_in_the_tails(dtype):
    x = torch.tensor([-1e3, -BOUND - 1e-3, BOUND + 1e-3, 1e3], dtype=dtype)
    leaves = tuple(t.requires_grad_() for t in (x.clone(), *spline_params(len(x), dtype)))
    for inverse in (False, True):
        y, ladj = rational_linear_spline(*leaves, BOUND, inverse=inverse)
        assert torch.equal(y, x) and torch.equal(ladj, torch.zeros_like(x))
        grads = torch.autograd.grad(y.sum() + ladj.sum(), leaves)
        assert torch.equal(grads[0], torch.ones_like(x))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spline_gradients_are_finite_everywhere(dtype, inverse):
    x = torch.cat([special_points(dtype), torch.linspace(-4, 4, 41, dtype=dtype)])
    for scale in (0.0, 1.0, 5.0, 30.0):
        leaves = [t.requires_grad_() for t in (x.clone(), *spline_params(len(x), dtype, scale))]
        y, ladj = rational_linear_spline(*leaves, BOUND, inverse=inverse)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        for g in torch.autograd.grad((y.square() + ladj).sum(), leaves):
            assert torch.isfinite(g).all()


def test_spline_is_strictly_increasing():
    x = torch.linspace(-BOUND - 1, BOUND + 1, 20001, dtype=torch.float64)
    for seed in range(5):
        args = (t.expand(len(x), -1) for t in spline_params(1, torch.float64, 2.0, seed=seed))
        y, _ = rational_linear_spline(x, *args, BOUND)
        assert (torch.diff(y) > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spline_round_trip(dtype):
    """The inverse is closed form: exact to rounding. Where the spline is nearly flat, rounding
    ``y`` moves ``x`` by ``ulp(y) / slope``, the problem's conditioning; so ``x`` is compared
    where the slope is at least 1e-2, and everywhere the error is measured in y-space."""
    x = torch.cat([special_points(dtype), 2 * BOUND * (2 * torch.rand(2000, dtype=dtype) - 1)])
    args = spline_params(len(x), dtype, scale=1.5)
    y, ladj = rational_linear_spline(x, *args, BOUND)
    x_back, ladj_inv = rational_linear_spline(y, *args, BOUND, inverse=True)
    slope = ladj.exp()
    ok = slope > 1e-2
    torch.testing.assert_close(x_back[ok], x[ok], atol=TOL[dtype], rtol=TOL[dtype])
    assert ((x_back - x).abs() * slope.clamp(max=1.0)).max() < TOL[dtype]
    atol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(ladj_inv[ok], -ladj[ok], atol=atol, rtol=0)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_spline_log_det_matches_the_autograd_derivative(inverse):
    x = torch.cat([special_points(torch.float64), torch.linspace(-4, 4, 401, dtype=torch.float64)])
    args = spline_params(len(x), torch.float64, scale=1.5)
    x = x.requires_grad_()
    y, ladj = rational_linear_spline(x, *args, BOUND, inverse=inverse)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(ladj, dydx.log(), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bound": 0.0}, "bound: expected a positive number; got 0.0"),
        ({"min_bin_width": 0.2}, r"min_bin_width: expected min_bin_width \* bins < 1"),
        ({"min_derivative": 1.0}, r"min_derivative: expected a number in \[0, 1\)"),
        ({"min_split": 0.5}, r"min_split: expected a number in \[0, 0.5\); got 0.5"),
        ({"min_split": "a"}, r"min_split: expected a number in \[0, 0.5\); got 'a'"),
    ],
)
def test_spline_arguments_are_validated(kwargs, match):
    args = {"bound": BOUND, **kwargs}
    with pytest.raises(ValueError, match=match):
        rational_linear_spline(torch.zeros(2), *spline_params(2, torch.float32), **args)


def test_spline_parameter_sizes_are_validated():
    w, h, d, lam = spline_params(2, torch.float64)
    with pytest.raises(ValueError, match=r"splits of size bins.*got 6, 6, 5 and 5"):
        rational_linear_spline(torch.zeros(2), w, h, d, lam[:, 1:], BOUND)


def test_spline_map_layout_and_settings():
    g = RationalLinearSpline(bins=7, bound=2.5)
    assert g.params_per_feature == 27 and not g.param_major
    assert g.bins == 7 and g.bound == 2.5 and repr(g) == "RationalLinearSpline(bins=7, bound=2.5)"
    # the map reads widths, heights, derivatives and splits from h in that order
    x = points((4,))
    h = params(g, (4,), 1.0)
    k = g.bins
    w, hh, d, lam = h[..., :k], h[..., k : 2 * k], h[..., 2 * k : 3 * k - 1], h[..., 3 * k - 1 :]
    y, ladj = g.forward(x, h)
    y_ref, ladj_ref = rational_linear_spline(x, w, hh, d, lam, 2.5)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(ladj, ladj_ref.sum(-1), atol=0, rtol=0)
