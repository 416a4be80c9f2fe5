"""End-to-end tests of every flow builder, unconditional and conditional, as Pyro distributions."""

from __future__ import annotations

import inspect
import io
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.autograd.functional import jacobian

import pyroflows as pf
from pyroflows.engine import FlowMatching
from pyroflows.transforms import Coupling, MaskedAutoregressive

SMALL = {"layers": 2, "hidden": (16, 16)}
BUILDERS = {
    "NICE": lambda **kw: pf.NICE(2, **SMALL, **kw),
    "RealNVP": lambda **kw: pf.RealNVP(2, **SMALL, **kw),
    "MAF": lambda **kw: pf.MAF(2, **SMALL, **kw),
    "IAF": lambda **kw: pf.IAF(2, **SMALL, **kw),
    "NSF": lambda **kw: pf.NSF(2, **SMALL, bins=6, **kw),
    "NSF-autoregressive": lambda **kw: pf.NSF(2, **SMALL, bins=6, autoregressive=True, **kw),
    "LinearFlow": lambda **kw: pf.LinearFlow(2, layers=2, **kw),
    "LinearFlow-qr": lambda **kw: pf.LinearFlow(2, layers=2, linear="qr", **kw),
    "NAF": lambda **kw: pf.NAF(2, **SMALL, units=4, **kw),
    "BNAF": lambda **kw: pf.BNAF(2, layers=2, hidden_factor=4, **kw),
    "ResidualFlow": lambda **kw: pf.ResidualFlow(2, **SMALL, **kw),
    "SylvesterFlow-orthogonal": lambda **kw: pf.SylvesterFlow(2, layers=2, fast="density", **kw),
    "SylvesterFlow-householder-density": lambda **kw: pf.SylvesterFlow(
        2, layers=2, kind="householder", fast="density", **kw
    ),
    "SylvesterFlow-triangular": lambda **kw: pf.SylvesterFlow(
        2, layers=3, kind="triangular", fast="density", **kw
    ),
    "SylvesterFlow-planar": lambda **kw: pf.SylvesterFlow(2, layers=4, kind="planar", **kw),
    "SylvesterFlow-radial": lambda **kw: pf.SylvesterFlow(
        2, layers=4, kind="radial", fast="density", **kw
    ),
    # trained by flow matching in the fixture; a fixed-step solver keeps the density grid quick
    # (the adaptive default and maximum likelihood are tested in test_continuous.py)
    "CNF": lambda **kw: pf.CNF(2, hidden=(16, 16), solver="rk4", steps=4, **kw),
}
NAMES = sorted(BUILDERS)
#: how far log_prob may be from the autograd log-determinant of the inverse (default 1e-6): a
#: continuous flow integrates its log-determinant with the solver, so it matches the Jacobian
#: of the solver's discrete map up to the discretisation error (Runge-Kutta 4, 4 steps: 2e-3)
LOG_DET_TOL = {"CNF": 1e-2}
CONDITIONS = [0, 1]  # context_dim


def banana(n: int, context: torch.Tensor | None = None) -> torch.Tensor:
    """A curved 2-D density, shifted and bent by the context when there is one."""
    u = torch.randn(n, 2)
    c = torch.zeros(n, 1) if context is None else context
    x1 = 1.2 * u[:, 0] + c[:, 0]
    x2 = 0.4 * (x1 - c[:, 0]) ** 2 - 1.0 + 0.35 * u[:, 1] - c[:, 0]
    return torch.stack([x1, x2], -1)


def make_context(n: int) -> torch.Tensor:
    return torch.randint(0, 2, (n, 1)).float() * 2 - 1  # ±1


def fit(flow: pf.Flow, conditional: bool, steps: int = 250) -> tuple[float, float]:
    """Maximum likelihood on the banana; returns (NLL before, NLL after) on held-out data."""
    torch.manual_seed(0)
    context = make_context(4096) if conditional else None
    data = banana(4096, context)
    test_c = make_context(2048) if conditional else None
    test = banana(2048, test_c)

    def nll(x, c):
        return -flow(c).log_prob(x).mean()

    with torch.no_grad():
        before = nll(test, test_c).item()
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    # a continuous flow trains by flow matching here (no ODE solved per step)
    objective = FlowMatching(flow) if isinstance(flow, pf.CNF) else nll
    for _ in range(steps):
        idx = torch.randint(len(data), (256,))
        loss = objective(data[idx], None if context is None else context[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = nll(test, test_c).item()
    return before, after


@pytest.fixture(scope="module")
def fitted():
    """Every builder, unconditional and conditional, fitted briefly, in float64."""
    flows = {}
    for name in NAMES:
        for context_dim in CONDITIONS:
            torch.manual_seed(1)
            flow = BUILDERS[name](context_dim=context_dim)
            before, after = fit(flow, bool(context_dim))
            flows[name, context_dim] = (flow.double(), before, after)
    return flows


def context_for(context_dim: int, *batch: int) -> torch.Tensor | None:
    if not context_dim:
        return None
    return torch.ones(*batch, context_dim, dtype=torch.float64)


@pytest.mark.parametrize("context_dim", CONDITIONS)
@pytest.mark.parametrize("name", NAMES)
def test_fit_moves_away_from_the_base_and_the_density_integrates_to_one(fitted, name, context_dim):
    flow, before, after = fitted[name, context_dim]
    # The standard Normal scores the banana at ~3 nats; the fit must have learned its shape
    # (LinearFlow can only bend it a little).
    assert after < before - 0.3, (before, after)
    n, half_width = 500, 9.0
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    d = flow(None if not context_dim else torch.ones(1, context_dim, dtype=torch.float64))
    with torch.no_grad():
        samples = d.sample((20_000,)).reshape(-1, 2)
        density = d.log_prob(grid.unsqueeze(-2) if context_dim else grid).exp().reshape(n, n)
    assert (samples.abs() < half_width).all(-1).double().mean() > 0.999
    total = torch.trapezoid(torch.trapezoid(density, axis), axis).item()
    # Tolerance 1e-2: quadrature error ~1e-3 at this grid spacing, mass outside < 1e-3.
    assert total == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("context_dim", CONDITIONS)
@pytest.mark.parametrize("name", NAMES)
def test_log_prob_is_base_log_prob_plus_autograd_log_det_of_the_inverse(fitted, name, context_dim):
    flow, _, _ = fitted[name, context_dim]
    context = context_for(context_dim)
    d = flow(context)
    with torch.no_grad():
        on_sample = d.sample((3,))
    off_sample = torch.tensor([[4.0, -3.0], [-0.5, 6.0]], dtype=torch.float64)

    def inverse(x):
        for t in reversed(d.transforms):
            x = t.with_cache(0).inv(x) if hasattr(t, "with_cache") else t.inv(x)
        return x

    for x in torch.cat([on_sample, off_sample]):
        z = inverse(x)
        log_det = torch.log(torch.abs(torch.det(jacobian(inverse, x))))
        expected = d.base_dist.log_prob(z) + log_det
        tol = LOG_DET_TOL.get(name, 1e-6)
        torch.testing.assert_close(flow(context).log_prob(x), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("context_dim", CONDITIONS)
@pytest.mark.parametrize("name", NAMES)
def test_sample_moments_agree_with_importance_estimates(fitted, name, context_dim):
    flow, _, _ = fitted[name, context_dim]
    context = context_for(context_dim)
    torch.manual_seed(3)
    with torch.no_grad():
        d = flow(context)
        samples = d.sample((40_000,))
        proposal = dist.Normal(torch.zeros(2, dtype=torch.float64), 3.0).to_event(1)
        xs = proposal.sample((200_000,))
        log_w = flow(context).log_prob(xs) - proposal.log_prob(xs)
        w = torch.softmax(log_w, 0).unsqueeze(-1)
        is_mean = (w * xs).sum(0)
        is_var = (w * (xs - is_mean) ** 2).sum(0)
    # Monte Carlo errors: ~0.01 on the sample mean, a few 0.01 on the importance estimates
    # (effective sample size in the thousands); 0.1 on means and 10% on variances is ample.
    torch.testing.assert_close(samples.mean(0), is_mean, atol=0.1, rtol=0)
    torch.testing.assert_close(samples.var(0), is_var, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("context_dim", CONDITIONS)
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_reparameterised_samples(name, context_dim):
    flow = BUILDERS[name](context_dim=context_dim)
    with torch.no_grad():  # move away from the identity so gradients are non-trivial
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    context = torch.randn(5, context_dim) if context_dim else None
    d = flow(context)
    batch = (5,) if context_dim else ()
    assert d.batch_shape == batch and d.event_shape == (2,)
    x = d.rsample((4, 3))
    assert x.shape == (4, 3, *batch, 2)
    assert d.log_prob(x).shape == (4, 3, *batch)
    x.sum().backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert d.has_rsample


def conditioners(flow: pf.Flow) -> list[torch.nn.Module]:
    return [
        t.conditioner for t in flow.transforms if isinstance(t, (Coupling, MaskedAutoregressive))
    ]


@pytest.mark.parametrize("context_dim", CONDITIONS)
@pytest.mark.parametrize("name", ["IAF", "RealNVP", "NICE", "NSF"])
def test_scoring_own_samples_costs_no_extra_pass(name, context_dim):
    flow = BUILDERS[name](context_dim=context_dim)
    nets = conditioners(flow)
    calls = []
    for net in nets:
        net.register_forward_hook(lambda *_: calls.append(1))
    context = torch.randn(8, context_dim) if context_dim else None
    for _ in range(2):  # twice in a row, each with its own backward pass
        calls.clear()
        d = flow(context)
        x = d.rsample((8,))
        log_prob = d.log_prob(x)
        assert len(calls) == len(nets)  # one pass per layer, all spent by rsample
        (log_prob.sum() + x.sum()).backward()


def test_maf_density_is_one_pass_per_layer_and_sampling_is_sequential():
    flow = pf.MAF(3, layers=2, hidden=(8, 8))
    calls = []
    for net in conditioners(flow):
        net.register_forward_hook(lambda *_: calls.append(1))
    flow().log_prob(torch.randn(4, 3))
    assert len(calls) == 2
    calls.clear()
    flow().sample((4,))
    assert len(calls) == 2 * 3


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_float64_and_state_dict(name):
    flow = BUILDERS[name](context_dim=2)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(6, 2)
    c = torch.randn(6, 2)
    lp32 = flow(c).log_prob(x)
    assert lp32.dtype == torch.float32 and torch.isfinite(lp32).all()
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(99)
    fresh = BUILDERS[name](context_dim=2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(c).log_prob(x), lp32)
    lp64 = flow.double()(c.double()).log_prob(x.double())
    assert lp64.dtype == torch.float64
    torch.testing.assert_close(lp64.float(), lp32, atol=1e-4, rtol=1e-4)
    assert flow(c.double()).sample().dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_context_errors(name):
    conditional = BUILDERS[name](context_dim=3)
    with pytest.raises(ValueError, match="needs a context"):
        conditional()
    with pytest.raises(ValueError, match="expected a context with last dimension 3"):
        conditional(torch.randn(4, 2))
    with pytest.raises(ValueError, match="is unconditional"):
        BUILDERS[name]()(torch.randn(4, 3))


@pytest.mark.parametrize("name", NAMES)
def test_in_a_pyro_model_and_guide_under_a_plate(name):
    """SVI with a conditional flow guide under a plate: no shape warnings, params registered."""
    flow = BUILDERS[name](context_dim=2)
    encoder = torch.nn.Linear(2, 2)
    data = torch.randn(16, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(x):
        pyro.module("flow", flow)
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", flow(encoder(x)))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step(data) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    names = set(pyro.get_param_store().keys())
    assert {f"flow$$${n}" for n, _ in flow.named_parameters()} <= names


def test_flow_of_a_single_feature_and_conditional_base():
    q = pf.IAF(1, layers=2, hidden=(8,), context_dim=3, base="conditional_normal")
    context = torch.randn(4, 3)
    d = q(context)
    assert d.batch_shape == (4,) and d.rsample().shape == (4, 1)
    assert isinstance(q.base, pf.bases.ConditionalDiagNormal)
    # the base starts at N(0, I) for every context and then depends on it
    torch.testing.assert_close(d.base_dist.mean, torch.zeros(4, 1))
    with torch.no_grad():
        for p in q.base.parameters():
            p.add_(torch.randn_like(p))
    means = q(context).base_dist.mean
    assert not torch.allclose(means[0], means[1])
    with pytest.raises(ValueError, match="needs context_dim > 0"):
        pf.MAF(2, base="conditional_normal")


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="layers: expected a positive integer"):
        pf.RealNVP(2, layers=0)
    with pytest.raises(ValueError, match="mixing: expected one of"):
        pf.MAF(2, mixing="shuffle")
    with pytest.raises(ValueError, match="spline coupling needs at least 2 features"):
        pf.NSF(1)
    with pytest.raises(ValueError, match="linear: expected 'lu' or 'qr'"):
        pf.LinearFlow(2, linear="svd")
    with pytest.raises(ValueError, match="base: expected one of"):
        pf.RealNVP(2, base="laplace")
    with pytest.raises(TypeError, match="expected Pyro/torch transforms"):
        pf.Flow([torch.nn.Linear(2, 2)], dim=2)


def test_custom_flow_with_a_plain_torch_transform():
    flow = pf.Flow(
        [pf.transforms.AffineCoupling(2, hidden=(8,)), dist.transforms.ExpTransform()], dim=2
    )
    x = flow().sample((10,))
    assert (x > 0).all() and torch.isfinite(flow().log_prob(x)).all()


def _check_device(device: str) -> None:
    for name in NAMES:
        flow = BUILDERS[name](context_dim=2).to(device)
        c = torch.randn(4, 2, device=device)
        x = flow(c).rsample()
        assert x.device.type == device
        assert flow(c).log_prob(x).device.type == device


@pytest.mark.cuda
def test_flows_move_to_cuda():
    _check_device("cuda")


def test_parameters_behind_inverses_are_registered():
    """``m.inv`` is a plain Transform; the flow must still own m's parameters (Pyro's too)."""
    ours = pf.transforms.AffineCoupling(2, hidden=(8,))
    theirs = dist.transforms.affine_autoregressive(2, hidden_dims=[8])
    flow = pf.Flow([ours.inv, theirs.inv], dim=2)
    params = {id(p) for p in flow.parameters()}
    assert {id(p) for p in ours.parameters()} <= params
    assert {id(p) for p in theirs.parameters()} <= params
    flow().log_prob(torch.randn(5, 2)).sum().backward()
    assert all(p.grad is not None for p in theirs.parameters())
    assert all(p.grad is not None for p in ours.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda: pf.MAF(3, layers=2, hidden=(8, 8)),
        lambda: pf.NSF(3, layers=2, hidden=(8,), bins=4),
        lambda: pf.RealNVP(3, layers=2, hidden=(8,), context_dim=2),
    ],
    ids=["MAF", "NSF", "RealNVP-conditional"],
)
def test_the_fast_distribution_equals_pyros_generic_one(make):
    torch.manual_seed(0)
    flow = make()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    context = torch.randn(4, 2) if flow.context_dim else None
    d = flow(context)
    assert isinstance(d, dist.TransformedDistribution) and d._simple
    generic = dist.TransformedDistribution(d.base_dist, [t.with_cache(0) for t in d.transforms])
    x = torch.randn(4, 3)
    torch.testing.assert_close(d.log_prob(x), generic.log_prob(x))
    z = d.rsample()
    torch.testing.assert_close(d.log_prob(z), generic.log_prob(z.detach().clone()))
    expanded = flow(context).expand((5, 4))
    assert expanded.batch_shape == (5, 4) and expanded.log_prob(x).shape == (5, 4)
    torch.testing.assert_close(expanded.log_prob(x)[2], d.log_prob(x))


def test_temperature_scales_the_base_and_keeps_the_density_exact():
    torch.manual_seed(0)
    flow = pf.RealNVP(dim=2, layers=2, hidden=(8,), base="diag_normal").double()
    with torch.no_grad():
        flow.base.loc.copy_(torch.tensor([1.0, -2.0]))
    x = torch.randn(5, 2, dtype=torch.float64)
    # The tempered flow is the tempered base pushed through the same transforms.
    cold = flow(temperature=0.5)
    base = flow().base_dist
    expected = dist.TransformedDistribution(
        dist.Normal(base.base_dist.loc, 0.5 * base.base_dist.scale).to_event(1),
        list(flow().transforms),
    )
    assert torch.allclose(cold.log_prob(x), expected.log_prob(x))
    assert torch.allclose(flow(temperature=1.0).log_prob(x), flow().log_prob(x))
    # The mean of the base stays: only its spread shrinks.
    z = cold.base_dist.sample((20000,))
    assert torch.allclose(z.mean(0), torch.tensor([1.0, -2.0], dtype=torch.float64), atol=0.02)


def test_temperature_of_a_conditional_image_flow():
    torch.manual_seed(0)
    flow = pf.Glow((1, 4, 4), levels=2, steps=1, channels=4, context_dim=3)
    c = torch.randn(6, 3)
    d = flow(c, temperature=0.7)
    x = d.sample()
    assert x.shape == (6, 1, 4, 4) and d.batch_shape == (6,)
    assert torch.isfinite(d.log_prob(x)).all()
    spread = [flow(c, temperature=t).sample((200,)).std() for t in (0.3, 1.0)]
    assert spread[0] < spread[1]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "hot", True])
def test_bad_temperature_is_refused(bad):
    with pytest.raises(ValueError, match="temperature: expected a positive"):
        pf.MAF(2, layers=1, hidden=(4,))(temperature=bad)


def test_temperature_needs_a_normal_base():
    with pytest.raises(ValueError, match="needs a Normal base distribution; got Uniform"):
        pf.bases.tempered(dist.Uniform(torch.zeros(2), 1.0).to_event(1), 0.5)


# --- configuration and the builder table ----------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_names_the_builder_and_rebuilds_the_same_architecture(name):
    flow = BUILDERS[name](context_dim=1)
    config = flow.config
    assert pf.flows.BUILDERS[config["builder"]] is type(flow)
    torch.manual_seed(0)
    rebuilt = pf.flows.BUILDERS[config["builder"]](**config["kwargs"])
    own = flow.state_dict()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in own.items()
    }
    assert rebuilt.config == config
    # the recorded arguments are the builder's, all of them (defaults included)
    assert set(config["kwargs"]) == set(inspect.signature(type(flow)).parameters)


def test_iaf_shares_mafs_constructor_and_differs_in_orientation():
    assert "__init__" not in pf.IAF.__dict__  # no copied signature to keep in step
    assert inspect.signature(pf.IAF) == inspect.signature(pf.MAF)
    iaf, maf = pf.IAF(3, layers=2), pf.MAF(3, layers=2)
    assert (iaf.config["builder"], maf.config["builder"]) == ("iaf", "maf")
    assert iaf.config["kwargs"] == maf.config["kwargs"]
    assert {t.orientation for t in iaf.transforms if hasattr(t, "orientation")} == {"iaf"}


def test_the_builder_table():
    table = pf.flows.BUILDERS
    assert table["nsf"] is pf.NSF and table["glow"] is pf.Glow
    assert table["image_realnvp"] is pf.flows.ImageRealNVP
    assert sorted(pf.flows.vector_builders()) == [
        *("bnaf", "cnf", "iaf", "linear", "maf", "naf", "nice", "nsf", "realnvp", "residual"),
        "sylvester",
    ]
    assert all(pf.flows.builder_name(cls) == name for name, cls in table.items())
    assert pf.flows.builder_name(pf.Flow) is None
    assert pf.Flow([pf.transforms.Reverse(2)], dim=2).config is None  # assembled by hand
    with pytest.raises(TypeError):
        table["mine"] = pf.NSF  # read-only: pyroflows.flows.register_builder adds names


def test_realnvp_of_a_shape_is_the_image_realnvp_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"use pyroflows.flows.ImageRealNVP\(shape"):
        flow = pf.RealNVP(shape=(1, 4, 4), channels=4, blocks=1)
    assert type(flow) is pf.flows.ImageRealNVP and flow.event_shape == (1, 4, 4)
    assert flow.config["kwargs"]["channels"] == 4
    assert "shape" not in inspect.signature(pf.RealNVP).parameters
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="layers"):
        pf.RealNVP(shape=(1, 4, 4), layers=3)  # vector options do not apply to images
