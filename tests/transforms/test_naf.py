"""The neural autoregressive flows: DSF and DDSF on their own, BNAF's log-determinant and
inverse, and a short maximum-likelihood fit.

The generic harness (``test_generic.py``, rows in ``registry_naf.py``) checks them inside
Coupling, MaskedAutoregressive and ImageCoupling (round trips, Jacobians, gradients of the
inverse against finite differences, batch shapes, save/load); here the maths is checked where
the harness does not look: far in the tails, at the identity, and against the implicit function
theorem written out.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian
from torch.func import functional_call

from pyroflows.transforms import MaskedAutoregressive
from pyroflows.transforms.naf import BNAF, DDSF, DSF
from pyroflows.transforms.solvers import TOLERANCE

DTYPES = [torch.float32, torch.float64]
MAPS = {
    "DSF": lambda: DSF(components=5),
    "DDSF": lambda: DDSF(units=4, layers=2),
    "DDSF-deep": lambda: DDSF(units=3, layers=3),
}
N = 3  # features


def params(g, batch: tuple[int, ...], scale: float, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (*batch, N, g.params_per_feature)
    return scale * torch.randn(shape, generator=generator, dtype=dtype)


def points(batch: tuple[int, ...], dtype=torch.float64, scale: float = 2.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return scale * torch.randn(*batch, N, generator=generator, dtype=dtype)


# -- DSF and DDSF --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(MAPS))
def test_zero_parameters_are_the_identity(name, dtype):
    g = MAPS[name]()
    x = points((50,), dtype, scale=4.0)
    h = params(g, (50,), 0.0, dtype)
    eps = torch.finfo(dtype).eps
    for fn in (g.forward, g.inverse):
        y, ladj = fn(x, h)
        assert y.dtype == dtype and ladj.shape == (50,)
        torch.testing.assert_close(y, x, atol=64 * eps * 10, rtol=0)
        torch.testing.assert_close(ladj, torch.zeros_like(ladj), atol=64 * eps, rtol=0)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_strictly_increasing_and_log_derivative_matches_autograd(name):
    g = MAPS[name]()
    x = torch.linspace(-20, 20, 2001, dtype=torch.float64)[:, None].expand(-1, N)
    h = params(g, (), 2.0)  # one set of parameters per feature, broadcast over the grid
    x = x.clone().requires_grad_()
    y, ladj = g(x, h)
    assert y.shape == (2001, N) and ladj.shape == (2001,)
    assert (y.diff(dim=0) > 0).all()
    (dydx,) = torch.autograd.grad(y.sum(), x)  # elementwise: each feature's own derivative
    assert (dydx > 0).all()
    torch.testing.assert_close(ladj, dydx.log().sum(-1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(MAPS))
def test_stable_far_in_the_tails(name, dtype):
    """Finite, strictly increasing and invertible for |x| up to 1e4, with moderate and with
    extreme parameters: the log-space evaluation does not saturate to ±inf or NaN, and the map
    stays onto R."""
    g = MAPS[name]()
    radii = torch.tensor([0.0, 1.0, 10.0, 100.0, 1e3, 1e4], dtype=dtype)
    x = torch.cat([-radii.flip(0), radii[1:]])[:, None].expand(-1, N).contiguous()
    for scale in (1.0, 30.0):  # 30: every bound saturated, weights down to 1e-40
        h = params(g, (), scale, dtype, seed=2)
        y, ladj = g(x, h)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        assert (y.diff(dim=0) > 0).all()
        # onto R: linear growth, the slope at least the floor
        assert (y[-1] - y[-2] >= 0.99 * 9e3 * g.min_derivative).all()
        assert (y[1] - y[0] >= 0.99 * 9e3 * g.min_derivative).all()
        x_back, ladj_inv = g.inverse(y, h)
        assert torch.isfinite(x_back).all() and torch.isfinite(ladj_inv).all()
        error = (x_back - x).abs()
        if scale == 1.0 or dtype == torch.float64:
            tol = 1e-4 if dtype == torch.float32 else 1e-9
            assert (error / x.abs().clamp_min(1.0)).max() < tol
        else:  # on a plateau: rounding y moves x by up to ulp(y) / min_derivative
            ulp = torch.finfo(dtype).eps * y.abs().clamp_min(1.0)
            assert (error <= 8 * ulp / g.min_derivative + 1e-4 * x.abs()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(MAPS))
def test_inverse_round_trip_to_the_documented_tolerance(name, dtype):
    """The solver stops when a step changes x by at most TOLERANCE (relative above 1); Newton
    converges quadratically, so the error left is at most that. In float32 the rounding of
    y (divided by the slope) dominates: 1e-4 is what the harness asks of float32 round trips."""
    g = MAPS[name]()
    x = points((200,), dtype)
    h = params(g, (200,), 1.0, dtype)
    y, ladj = g(x, h)
    x_back, ladj_inv = g.inverse(y, h)
    scale = x.abs().clamp_min(1.0)
    if dtype == torch.float64:
        assert ((x_back - x).abs() / scale).max() <= TOLERANCE[dtype]
        torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9, rtol=0)
    else:
        assert ((x_back - x).abs() / scale).max() <= 1e-4
        torch.testing.assert_close(ladj_inv, -ladj, atol=1e-4, rtol=0)
    # batch shapes broadcast: one set of parameters for the whole batch
    x_one, _ = g.inverse(y, h[:1])
    assert x_one.shape == y.shape


@pytest.mark.parametrize("name", sorted(MAPS))
def test_inverse_gradients_by_the_implicit_function_theorem(name):
    """x = g⁻¹(y; h): autograd through the solver gives dx/dy = 1/g'(x) and dx/dh =
    -(∂g/∂h)/g'(x), and agrees with finite differences (gradcheck, float64)."""
    g = MAPS[name]()
    y = points((4,)).requires_grad_()
    h = params(g, (4,), 1.0).requires_grad_()
    x = g.inverse(y, h)[0]
    weights = torch.randn_like(x)
    grad_y, grad_h = torch.autograd.grad((weights * x).sum(), [y, h])
    # the formula, from the forward map at the solution
    xs = x.detach().requires_grad_()
    fx = g(xs, h)[0]
    (slope,) = torch.autograd.grad(fx.sum(), xs, create_graph=True)
    torch.testing.assert_close(grad_y, weights / slope.detach(), atol=1e-10, rtol=1e-8)
    (expected_h,) = torch.autograd.grad(fx, h, -(weights / slope).detach())
    torch.testing.assert_close(grad_h, expected_h, atol=1e-10, rtol=1e-8)
    # and finite differences of the whole inverse, log-derivative included
    assert gradcheck(
        lambda y, h: g.inverse(y, h), (y, h), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True
    )


@pytest.mark.parametrize("name", sorted(MAPS))
def test_inverse_of_a_non_finite_value_is_a_value_error(name):
    g = MAPS[name]()
    h = params(g, (2,), 1.0)
    for bad in (math.inf, -math.inf, math.nan):
        y = torch.zeros(2, N, dtype=torch.float64)
        y[1, 0] = bad
        with pytest.raises(ValueError, match=f"{type(g).__name__}: expected finite values"):
            g.inverse(y, h)


def test_ddsf_with_one_layer_is_a_dsf():
    """One dense sigmoidal layer over one input is the DSF (the same parameters, laid out
    [slopes, shifts, weights])."""
    x = points((20,))
    h = params(DSF(4), (20,), 1.5)
    y1, ladj1 = DSF(4)(x, h)
    y2, ladj2 = DDSF(units=4, layers=1)(x, h)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj1, ladj2, atol=1e-12, rtol=0)


def test_parameter_counts_and_checks():
    assert DSF(8).params_per_feature == 24
    assert DDSF(8, 2).params_per_feature == 8 * (2 + 8) + 8 * (2 + 8 + 1)
    assert DDSF(4, 1).params_per_feature == 12
    assert "components=3" in repr(DSF(3)) and "units=5, layers=2" in repr(DDSF(5))
    with pytest.raises(ValueError, match="components: expected a positive integer"):
        DSF(0)
    with pytest.raises(ValueError, match="layers: expected a positive integer"):
        DDSF(layers=0)
    with pytest.raises(ValueError, match="shift_bound: expected a positive number"):
        DDSF(shift_bound=-1.0)
    with pytest.raises(ValueError, match="hidden_factor: expected a positive integer"):
        BNAF(3, hidden_factor=0)


# -- BNAF ------------------------------------------------------------------------------------------
class _Inverse(nn.Module):
    """``t.inverse_and_log_det`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, t: BNAF) -> None:
        super().__init__()
        self.t = t

    def forward(self, y, context):
        return self.t.inverse_and_log_det(y, context)


def perturbed(t: BNAF, scale: float = 0.3) -> BNAF:
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


@pytest.mark.parametrize("context_dim", [0, 2])
def test_bnaf_log_det_matches_the_autograd_jacobian(context_dim):
    torch.manual_seed(0)
    t = perturbed(BNAF(4, hidden_factor=3, layers=2, context_dim=context_dim).double())
    c = torch.randn(context_dim, dtype=torch.float64) if context_dim else None
    for _ in range(3):
        x = 2.0 * torch.randn(4, dtype=torch.float64)
        ladj = t.forward_and_log_det(x, c)[1]
        jac = jacobian(lambda v: t.forward_and_log_det(v, c)[0], x)
        assert (jac.triu(1) == 0).all()  # autoregressive
        assert (jac.diagonal() > 0).all()
        torch.testing.assert_close(ladj, jac.diagonal().log().sum(), atol=1e-10, rtol=0)


def test_bnaf_starts_near_the_identity_and_is_onto():
    torch.manual_seed(0)
    hidden_factor = 4
    t = BNAF(5, hidden_factor=hidden_factor, layers=2).double()
    x = 3.0 * torch.randn(500, 5, dtype=torch.float64)
    y, _ = t.forward_and_log_det(x)
    bound = 0.1 * torch.arange(1, 6, dtype=torch.float64).mul(hidden_factor).sqrt()
    assert ((y - x).abs() <= bound).all()  # the documented bound at construction
    # far out, the skip connection carries y beyond any bound: every point has an inverse,
    # and the tanh units saturate without a non-finite log-derivative
    far = torch.tensor([[1e4] * 5, [-1e4] * 5], dtype=torch.float64)
    x_far, ladj_inv = perturbed(t).inverse_and_log_det(far)
    assert torch.isfinite(ladj_inv).all()
    y_far, ladj = t.forward_and_log_det(x_far)
    torch.testing.assert_close(y_far, far, atol=1e-6, rtol=1e-12)
    for dtype in DTYPES:
        y, ladj = t.to(dtype).forward_and_log_det(far.to(dtype))
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bnaf_inverse_round_trip(dtype):
    torch.manual_seed(1)
    t = perturbed(BNAF(4, hidden_factor=4, layers=2, context_dim=2)).to(dtype)
    x = 2.0 * torch.randn(100, 4, dtype=dtype)
    c = torch.randn(100, 2, dtype=dtype)
    y, ladj = t.forward_and_log_det(x, c)
    x_back, ladj_inv = t.inverse_and_log_det(y, c)
    tol = 1e-4 if dtype == torch.float32 else 1e-9  # per coordinate TOLERANCE, over 4 solves
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj_inv, -ladj, atol=tol, rtol=tol)


def test_bnaf_inverse_gradients_gradcheck():
    """Gradients of the sequential inverse in y, the context and every parameter against
    finite differences (float64): the solved coordinates feed the later solves, so this checks
    the implicit function theorem through the chain."""
    torch.manual_seed(2)
    t = perturbed(BNAF(3, hidden_factor=2, layers=1, context_dim=2)).double()
    names = [f"t.{name}" for name, _ in t.named_parameters()]
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    values = [p.detach().clone().requires_grad_() for p in t.parameters()]
    inverse = _Inverse(t)

    def run(y, c, *values):
        return functional_call(inverse, dict(zip(names, values, strict=True)), (y, c))

    assert gradcheck(run, (y, c, *values), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_bnaf_options_and_errors():
    t = BNAF(3, hidden_factor=2, layers=1, context_dim=2)
    assert t.inverse_kind == "numerical" and t.sign == 1
    assert "hidden_factor=2, layers=1" in repr(t)
    with pytest.raises(ValueError, match="needs a context"):
        t.forward_and_log_det(torch.randn(3))
    with pytest.raises(ValueError, match="BNAF: expected finite values"):
        t.inverse_and_log_det(torch.tensor([0.0, math.inf, 0.0]), torch.zeros(2))
    # contexts broadcast with inputs
    y = t.condition(torch.randn(5, 1, 2))(torch.randn(4, 3))
    assert y.shape == (5, 4, 3)
    assert t.condition(torch.randn(5, 1, 2)).inv(y).shape == (5, 4, 3)


# -- a short fit ---------------------------------------------------------------------------------
def test_maximum_likelihood_with_a_dsf_decreases_the_nll():
    """A MAF with the DSF map, trained 200 steps on a 2-D banana: scoring data inverts the
    map (a numerical solve), so the gradients of every step come from the implicit function
    theorem. The NLL must fall well below the untrained flow's (2.82 here; the data's entropy
    is about 1.63)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(2000, generator=generator)
    data = torch.stack([x1, 0.5 * x1**2 - 1 + 0.3 * torch.randn(2000, generator=generator)], -1)
    t = MaskedAutoregressive(2, DSF(4), hidden=(16, 16))
    optimiser = torch.optim.Adam(t.parameters(), lr=1e-2)

    def nll(batch):
        z, ladj = t.inverse_and_log_det(batch)
        return (0.5 * z.square().sum(-1) + math.log(2 * math.pi) - ladj).mean()

    with torch.no_grad():
        before = nll(data).item()
    for _ in range(200):
        loss = nll(data[torch.randint(0, len(data), (128,), generator=generator)])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = nll(data).item()
    assert math.isfinite(after) and after < before - 0.8
