"""Planar, radial and Sylvester flows: the invertibility constraints under any raw parameters,
inverses (values and gradients), the identity at start, amortised shapes, and use in a Pyro
guide. The generic checks (Jacobians, round trips, devices, state dicts) are in
``test_generic.py`` through ``registry_sylvester.py``."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.autograd.functional import jacobian

from pyroflows.infer import STL_ELBO
from pyroflows.transforms.base import has_inverse
from pyroflows.transforms.sylvester import MARGIN, Planar, Radial, Sylvester

D, C = 4, 3
F64 = torch.float64
MAKERS = {
    "Planar": lambda c=0: Planar(D, context_dim=c),
    "Radial": lambda c=0: Radial(D, context_dim=c),
    "Sylvester-orthogonal": lambda c=0: Sylvester(D, context_dim=c, columns=3),
    "Sylvester-householder": lambda c=0: Sylvester(D, "householder", context_dim=c, reflections=3),
    "Sylvester-triangular": lambda c=0: Sylvester(D, "triangular", context_dim=c, flip=True),
}
# The least log|det J| the margin allows: every scalar factor of det J is at least MARGIN.
FACTORS = {"Planar": 1, "Radial": D}
SYLVESTER_FACTORS = {"Sylvester-orthogonal": 3}


def least_log_det(name: str) -> float:
    return FACTORS.get(name, SYLVESTER_FACTORS.get(name, D)) * math.log(MARGIN)


def randomised(name: str, scale: float, context_dim: int = 0, dtype=F64, seed: int = 0):
    """The transform with every raw parameter (or the head) drawn at ``scale``."""
    torch.manual_seed(seed)
    t = MAKERS[name](context_dim).to(dtype)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0.0, scale)
    return t


# -- the invertibility constraints hold for any raw parameters -----------------------------------
@pytest.mark.parametrize("scale", [1e3, 1e6])
@pytest.mark.parametrize("direction", [-1.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_planar_constraint_with_u_huge_along_w(scale, direction, dtype):
    """u = ±scale·w: w·û stays above -1 + MARGIN, log|det J| is finite and bounded below
    even where tanh' = 1 (w·x + b = 0), and the map inverts. Along +w the map stretches by
    up to ``scale``: y's own rounding (relative to |y|) then bounds the round trip."""
    torch.manual_seed(1)
    t = Planar(D).to(dtype)
    with torch.no_grad():
        t.u.copy_(direction * scale * t.w)
        t.b.fill_(0.3)
        perp, w, b, norm2, a, _ = t._parts(None)
        u_hat = perp + a / norm2 * w
        assert float((w * u_hat).sum()) >= -1 + MARGIN - 1e-5
    x = 3 * torch.randn(200, D, dtype=dtype)
    on_plane = x[:20] - ((x[:20] @ w + b) / norm2).unsqueeze(-1) * w
    x = torch.cat([on_plane, x])
    with torch.no_grad():
        y, ladj = t.forward_and_log_det(x)
        x_back, ladj_inv = t.inverse_and_log_det(y)
    assert torch.isfinite(ladj).all() and torch.isfinite(y).all()
    assert (ladj >= math.log(MARGIN) - 1e-5).all()
    tol = (1e-9 if dtype == F64 else 1e-5) * (1 + float(y.abs().max()))
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9 if dtype == F64 else 1e-3, rtol=0)


def test_radial_constraint_at_the_extremes():
    """β far below -α (ρ -> -1 + MARGIN) or far above it, α tiny or large: log|det J| is
    finite and at least D·log(MARGIN), at x0 too, and the map inverts with a consistent
    log|det J|."""
    for alpha_raw in (-100.0, 0.0, 50.0):
        for beta_raw in (-1e4, 1e4):
            t = Radial(D).double()
            with torch.no_grad():
                t.alpha_raw.fill_(alpha_raw)
                t.beta_raw.fill_(beta_raw)
            x = 3 * torch.randn(100, D, dtype=F64)
            x[0] = t.x0.detach()
            with torch.no_grad():
                y, ladj = t.forward_and_log_det(x)
                x_back, ladj_inv = t.inverse_and_log_det(y)
            assert torch.isfinite(ladj).all()
            assert (ladj >= D * math.log(MARGIN) - 1e-9).all()
            torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(ladj_inv, -ladj, atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind", ["orthogonal", "householder", "triangular"])
def test_sylvester_constraint_with_saturated_diagonals(kind):
    """r_ii r̃_ii pushed to its bound (raw diagonals ±50): every factor stays above MARGIN."""
    torch.manual_seed(2)
    t = Sylvester(D, kind).double()
    with torch.no_grad():
        t.r_diag.fill_(50.0)
        t.s_diag.fill_(-50.0)
        t.r_upper.normal_(0.0, 3.0)
        t.s_upper.normal_(0.0, 3.0)
        t.b.normal_()
    x = 3 * torch.randn(200, D, dtype=F64)
    with torch.no_grad():
        y, ladj = t.forward_and_log_det(x)
        x_back, ladj_inv = t.inverse_and_log_det(y)
    assert torch.isfinite(ladj).all()
    assert (ladj >= D * math.log(MARGIN) - 1e-9).all()
    assert ladj.min() < math.log(MARGIN) + 1.0  # some factor comes close to the margin
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_any_raw_parameters_give_an_invertible_map(name):
    """Raw parameters at scale 10 (seeds 0-2): log|det J| matches autograd, is finite and
    respects the margin, and the inverse maps back."""
    for seed in range(3):
        t = randomised(name, 10.0, seed=seed)
        x = 3 * torch.randn(64, D, dtype=F64)
        with torch.no_grad():
            y, ladj = t.forward_and_log_det(x)
            x_back, _ = t.inverse_and_log_det(y)
        assert torch.isfinite(ladj).all()
        assert (ladj >= least_log_det(name) - 1e-9).all()
        torch.testing.assert_close(x_back, x, atol=1e-7, rtol=1e-7)
        jac = jacobian(lambda v, t=t: t.forward_and_log_det(v)[0], x[0])
        torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1], atol=1e-6, rtol=0)
        assert torch.linalg.det(jac) > 0  # the declared sign


# -- inverses: round trips and gradients ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_amortised_round_trip(name, dtype):
    """A batch of contexts (B, C) with x of shape (S, B, D): both directions, both dtypes."""
    t = randomised(name, 0.5, context_dim=C, dtype=dtype)
    context = torch.randn(6, C, dtype=dtype)
    x = torch.randn(5, 6, D, dtype=dtype)
    with torch.no_grad():
        y, ladj = t.forward_and_log_det(x, context)
        x_back, ladj_inv = t.inverse_and_log_det(y, context)
    tol = {F64: 1e-9, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj_inv, -ladj, atol=tol, rtol=tol)


class _Inverse(nn.Module):
    """``y, context -> (x, log|det ∂x/∂y|)``, for ``functional_call`` over the parameters."""

    def __init__(self, t: nn.Module) -> None:
        super().__init__()
        self.t = t

    def forward(self, y, context):
        return self.t.inverse_and_log_det(y, context)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_inverse_gradcheck_amortised(name):
    """Gradients of the inverse (by the implicit function theorem) against finite differences,
    in float64, with respect to y, the context and the head's bias (every raw parameter)."""
    t = randomised(name, 0.5, context_dim=C)
    wrapper = _Inverse(t)
    y = torch.randn(2, D, dtype=F64, requires_grad=True)
    context = torch.randn(2, C, dtype=F64, requires_grad=True)
    bias = t.head.bias.detach().clone().requires_grad_(True)

    def inverse(y, context, bias):
        return torch.func.functional_call(wrapper, {"t.head.bias": bias}, (y, context))

    assert torch.autograd.gradcheck(inverse, (y, context, bias))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_inverse_gradcheck_unconditional(name):
    """As above, with respect to y and every parameter of an unconditional transform."""
    t = randomised(name, 0.5)
    wrapper = _Inverse(t)
    names = [n for n, _ in t.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in t.parameters()]
    y = torch.randn(2, D, dtype=F64, requires_grad=True)

    def inverse(y, *params):
        state = {f"t.{n}": p for n, p in zip(names, params, strict=True)}
        return torch.func.functional_call(wrapper, state, (y, None))

    assert torch.autograd.gradcheck(inverse, (y, *params))


# -- the identity at start -----------------------------------------------------------------------
@pytest.mark.parametrize("context_dim", [0, C])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_identity_at_start_for_every_context(name, context_dim):
    torch.manual_seed(0)
    t = MAKERS[name](context_dim).double()
    x = 3 * torch.randn(8, D, dtype=F64)
    context = 100 * torch.randn(8, context_dim, dtype=F64) if context_dim else None
    for fn in (t.forward_and_log_det, t.inverse_and_log_det):
        y, ladj = fn(x, context)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(ladj, torch.zeros(8, dtype=F64), atol=1e-12, rtol=0)


# -- amortised shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_amortised_shapes_broadcast(name):
    t = randomised(name, 0.5, context_dim=C)
    context = torch.randn(6, C, dtype=F64)
    for x_shape, batch in [((6, D), (6,)), ((5, 6, D), (5, 6)), ((D,), (6,)), ((1, D), (6,))]:
        x = torch.randn(x_shape, dtype=F64)
        bound = t.condition(context).with_cache(0)
        y = bound(x)
        assert y.shape == (*batch, D)
        assert bound.log_abs_det_jacobian(x, y).shape == batch
        x_back = bound.inv(y)
        assert x_back.shape == (*batch, D)
        torch.testing.assert_close(x_back, x.expand(*batch, D))
    with pytest.raises(ValueError, match="broadcasts with the input's"):
        t.condition(context)(torch.randn(4, D, dtype=F64))
    # One context, many points, and an unconditional transform in a conditional stack.
    y, ladj = t.forward_and_log_det(torch.randn(7, D, dtype=F64), context[0])
    assert y.shape == (7, D) and ladj.shape == (7,)
    assert MAKERS[name]().double().condition(context)(torch.randn(6, D, dtype=F64)).shape == (6, D)


# -- validation and repr -------------------------------------------------------------------------
def test_arguments_are_checked():
    with pytest.raises(ValueError, match="kind: expected one of 'orthogonal'"):
        Sylvester(D, "qr")
    with pytest.raises(ValueError, match="columns: expected at most dim=4; got 5"):
        Sylvester(D, columns=5)
    with pytest.raises(ValueError, match="columns: only kind='orthogonal' takes it"):
        Sylvester(D, "householder", columns=2)
    with pytest.raises(ValueError, match="reflections: only kind='householder' takes it"):
        Sylvester(D, "triangular", reflections=2)
    with pytest.raises(ValueError, match="flip: only kind='triangular' takes it"):
        Sylvester(D, flip=True)
    with pytest.raises(ValueError, match="reflections: expected a positive integer"):
        Sylvester(D, "householder", reflections=0)
    for cls in (Planar, Radial, Sylvester):
        with pytest.raises(ValueError, match="dim: expected a positive integer"):
            cls(0)
    with pytest.raises(ValueError, match="context_dim: expected a non-negative integer"):
        Planar(D, context_dim=-1)


def test_repr_defaults_and_declared_properties():
    assert repr(Sylvester(D, "householder", context_dim=C)) == (
        "Sylvester(\n  dim=4, context_dim=3, kind='householder', reflections=4\n"
        "  (head): Linear(in_features=3, out_features=40, bias=True)\n)"
    )
    assert "columns=2" in repr(Sylvester(D, columns=2))
    assert "flip=True" in repr(Sylvester(D, "triangular", flip=True))
    assert Sylvester(20, "householder").reflections == 8  # the paper's default
    for make in MAKERS.values():
        t = make()
        assert t.inverse_kind == "numerical" and t.sign == 1 and has_inverse(t)
    # M = 1: no empty parameters
    t = Sylvester(D, columns=1)
    assert all(p.numel() for p in t.parameters())


def test_orthogonal_q_has_orthonormal_columns_and_householder_q_is_orthogonal():
    t = randomised("Sylvester-orthogonal", 1.0, context_dim=C)
    q, *_ = t._parts(torch.randn(5, C, dtype=F64))
    eye = torch.eye(3, dtype=F64)
    torch.testing.assert_close(q.transpose(-1, -2) @ q, eye.expand(5, 3, 3), atol=1e-12, rtol=0)
    t = randomised("Sylvester-householder", 1.0)
    v = torch.randn(D, dtype=F64)
    q, *_ = t._parts(None)
    torch.testing.assert_close(t._from_v(t._to_v(v, q), q), v)
    torch.testing.assert_close(t._to_v(v, q).norm(), v.norm())


# -- in a Pyro guide -----------------------------------------------------------------------------
def test_amortised_sylvester_posterior_in_svi():
    """A VAE-style guide (encoder -> Gaussian base and the flow's context) trains with
    Trace_ELBO and with STL_ELBO (which scores the samples by inverting the flow)."""
    pyro.set_rng_seed(0)
    n, latent, observed, hidden = 16, 2, 3, 8
    data = torch.randn(n, latent) @ torch.randn(latent, observed) + 0.3 * torch.randn(n, observed)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent), 1.0).to_event(1))
            loc = nn.functional.pad(z, (0, observed - latent))
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)

    encoder = nn.Sequential(nn.Linear(observed, hidden), nn.Tanh())
    heads = nn.Linear(hidden, 2 * latent)
    flow = nn.ModuleList(
        [
            Sylvester(latent, "orthogonal", context_dim=hidden),
            Sylvester(latent, "triangular", context_dim=hidden, flip=True),
        ]
    )

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("heads", heads)
        pyro.module("flow", flow)
        h = encoder(x)
        loc, log_scale = heads(h).chunk(2, -1)
        base = dist.Normal(loc, log_scale.exp()).to_event(1)
        q = dist.TransformedDistribution(base, [t.condition(h) for t in flow])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q)
        return q

    start = [p.detach().clone() for p in flow.parameters()]
    optim = pyro.optim.Adam({"lr": 1e-2})
    for loss in (Trace_ELBO(), STL_ELBO(num_particles=2)):
        svi = SVI(model, guide, optim, loss=loss)
        for _ in range(3):
            assert math.isfinite(svi.step(data))
    assert all(not torch.equal(a, b) for a, b in zip(start, flow.parameters(), strict=True))
    assert any(name.startswith("flow$$$0.head") for name in pyro.get_param_store())
    # The posterior scores points it did not draw (the inverse), with gradients.
    q = guide(data)
    log_q = q.log_prob(torch.randn(n, latent))
    assert log_q.shape == (n,) and torch.isfinite(log_q).all()
    log_q.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters())
