"""Tests of pyroflows.infer.mixture: FlowMixture and AutoFlowMixture.

Densities are checked against numerical integration on grids (1-D and 2-D, float64, where the
trapezoid rule's error is far below the tolerances used). Gradients of the stratified ELBO are
checked against autograd through the ELBO computed by quadrature, with enough particles that
the Monte Carlo error (a few standard errors, stated at each check) is below the tolerance.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import init_to_value
from torch.distributions import constraints

import pyroflows as pf
from pyroflows.infer.mixture import MIXTURE_OBJECTIVES, AutoFlowMixture, FlowMixture


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mixture_density(z: torch.Tensor, centres, weights, sd=1.0) -> torch.Tensor:
    """log of sum_j weights_j N(z; centres_j, sd² I), z of shape (..., d)."""
    centres = torch.as_tensor(centres, dtype=z.dtype)
    weights = torch.as_tensor(weights, dtype=z.dtype)
    parts = dist.Normal(centres, sd).to_event(1).log_prob(z.unsqueeze(-2))
    return torch.logsumexp(parts + weights.log(), -1)


def two_modes(dim: int = 2, shift: float = 3.0, weights=(0.5, 0.5)):
    """A model whose posterior over ``z`` is two unit Gaussians at ``±shift`` (first axis)."""
    centres = torch.zeros(2, dim)
    centres[:, 0] = torch.tensor([-shift, shift])
    prior = dist.Normal(torch.zeros(dim), 4.0).to_event(1)

    def log_p(z):
        return _mixture_density(z, centres, weights)

    def model():
        z = pyro.sample("z", prior)
        pyro.factor("lik", log_p(z) - prior.log_prob(z))

    return model, log_p, centres


def _perturb(guide: AutoFlowMixture, sd: float = 0.3) -> None:
    """Move every parameter off its initial value, so that the flows are not the identity."""
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(sd * torch.randn_like(p))


def _guide(model, *args, **kwargs) -> AutoFlowMixture:
    kwargs.setdefault("layers", 2)
    kwargs.setdefault("hidden", (16,))
    guide = AutoFlowMixture(model, **kwargs)
    guide._setup_prototype(*args)
    return guide


# -- the distribution -----------------------------------------------------------------------------
def test_flow_mixture_shapes_and_expand():
    parts = [dist.Normal(torch.full((3,), m), 1.0).to_event(1) for m in (-2.0, 0.0, 2.0)]
    q = FlowMixture(torch.zeros(3), parts)
    assert q.batch_shape == () and q.event_shape == (3,)
    z = q.rsample((4, 5))
    assert z.shape == (4, 5, 3) and q.log_prob(z).shape == (4, 5)
    e = q.expand((6,))
    assert isinstance(e, FlowMixture) and e.batch_shape == (6,)
    z = e.rsample((2,))
    assert z.shape == (2, 6, 3) and e.log_prob(z).shape == (2, 6)
    assert e.log_prob(torch.zeros(3)).shape == (6,)  # broadcast against the batch shape
    assert q.sample((0,)).shape == (0, 3)


def test_flow_mixture_component_frequencies_follow_the_weights():
    # 20000 draws: the se of a frequency is at most 0.0035; tolerance 0.015 (4 se)
    weights = torch.tensor([0.2, 0.3, 0.5])
    parts = [dist.Normal(torch.full((1,), m), 0.1).to_event(1) for m in (-5.0, 0.0, 5.0)]
    q = FlowMixture(weights.log(), parts)
    z = q.sample((20_000,))
    k = FlowMixture.drawn_from(z)
    assert torch.allclose(torch.bincount(k, minlength=3) / 20_000.0, weights, atol=0.015)
    # each draw comes from the component it is labelled with
    assert torch.all((z[:, 0] - torch.tensor([-5.0, 0.0, 5.0])[k]).abs() < 1.0)


def test_flow_mixture_score_parts():
    loc = torch.tensor([-3.0, 3.0], requires_grad=True)
    parts = [dist.Normal(loc[i : i + 1], 1.0).to_event(1) for i in range(2)]
    logits = torch.tensor([0.3, -0.2], requires_grad=True)
    q = FlowMixture(logits, parts)
    z = q.rsample((7,))
    sp = q.score_parts(z)
    k = FlowMixture.drawn_from(z)
    assert torch.equal(sp.score_function, logits.log_softmax(-1)[k])
    assert torch.equal(sp.entropy_term, sp.log_prob)
    detached = q.sample((7,))  # no gradient path: not reparameterised
    sp = q.score_parts(detached)
    assert torch.equal(sp.score_function, sp.log_prob) and sp.entropy_term == 0
    assert FlowMixture.drawn_from(z * 1.0) is None
    with pytest.raises(ValueError, match="drawn by this FlowMixture's rsample"):
        q.score_parts(z * 1.0)  # a gradient path, but no component indices


def test_flow_mixture_validation():
    part = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    with pytest.raises(ValueError, match=r"logits: expected a tensor of shape \(K,\)"):
        FlowMixture(torch.zeros(2, 1), [part, part])
    with pytest.raises(ValueError, match="components: expected 3 distributions"):
        FlowMixture(torch.zeros(3), [part, part])
    with pytest.raises(ValueError, match=r"components\[1\]: expected batch shape \(\)"):
        FlowMixture(torch.zeros(2), [part, dist.Normal(torch.zeros(4, 2), 1.0).to_event(1)])
    with pytest.raises(ValueError, match=r"components\[0\]: expected a reparameterised"):
        FlowMixture(torch.zeros(1), [dist.Categorical(torch.ones(2, 3)).to_event(1)])


# -- the guide: structure -------------------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_guide_shapes(covariance):
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("groups", 3):
            pyro.sample("b", dist.LogNormal(0.0, 1.0))

    guide = AutoFlowMixture(model, components=3, layers=1, hidden=(8,), covariance=covariance)
    values = guide()
    assert values["a"].shape == () and values["b"].shape == (3,) and (values["b"] > 0).all()
    assert guide.latent_dim == 4 and guide.loc.shape == (3, 4) and guide.logits.shape == (3,)
    assert guide.full_covariance == (covariance == "full")
    q = guide.get_posterior()
    assert isinstance(q, FlowMixture) and q.event_shape == (4,) and q.batch_shape == ()
    assert len(q.components) == 3 and torch.allclose(guide.weights, torch.full((3,), 1 / 3))
    z = q.rsample((5,))
    assert z.shape == (5, 4) and q.log_prob(z).shape == (5,)
    assert guide.component(2).event_shape == (4,)
    assert guide.sample_posterior(6)["b"].shape == (6, 3)
    with pytest.raises(NotImplementedError, match="no single base distribution"):
        guide.get_transform()


def test_components_start_apart_around_the_init_location():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 5.0).to_event(1))

    centre = torch.tensor([1.0, -1.0, 2.0])
    init = init_to_value(values={"z": centre})
    two = _guide(model, components=2, init_loc_fn=init, init_spread=1.0)
    assert torch.allclose(two.loc.mean(0), centre, atol=1e-5)  # centred: z_2 - m = -(z_1 - m)
    assert (two.loc[0] - centre).abs().max() > 1.0  # a few prior sds (5) apart
    same = _guide(model, components=3, init_loc_fn=init, init_spread=0.0)
    assert torch.allclose(same.loc, centre.expand(3, 3))
    assert torch.allclose(same.scale, torch.full((3, 3), 1.0))


def test_prior_scale_is_read_in_unconstrained_space_and_is_one_for_improper_sites():
    def model():
        pyro.sample("wide", dist.Normal(0.0, 10.0))
        pyro.sample("positive", dist.LogNormal(0.0, 2.0))
        pyro.sample("flat", dist.ImproperUniform(constraints.real, (), (2,)))

    guide = _guide(model, components=2)
    scale = guide._prior_scale()
    # 64 draws: the IQR-based scale has a relative se of about 12%; tolerance 40%
    assert 6.0 < scale[0] < 14.0 and 1.2 < scale[1] < 2.8
    assert torch.equal(scale[2:], torch.ones(2, dtype=scale.dtype))


def test_dtype_follows_the_model():
    def model(y):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=y.dtype), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=y)

    guide = _guide(model, torch.tensor(0.5, dtype=torch.float64), components=2)
    assert guide.loc.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in guide.parameters())


# -- normalisation and sampling -------------------------------------------------------------------
def test_log_density_is_normalised_in_one_dimension():
    model, _, _ = two_modes(dim=1)
    guide = _guide(model, components=3, flow="nsf", init_spread=0.5, init_scale=0.5)
    _perturb(guide)
    q = guide.get_posterior()
    z = torch.linspace(-40, 40, 80_001)[:, None]
    with torch.no_grad():
        density = q.log_prob(z).double().exp()
    # trapezoid error on a 0.001 grid (components' sds about 0.5) and tails beyond ±40 are far
    # below 1e-3
    assert torch.trapezoid(density, z[:, 0].double()).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("flow", ["realnvp", "nsf"])
def test_log_density_is_normalised_in_two_dimensions(flow):
    model, _, _ = two_modes(dim=2)
    guide = _guide(model, components=2, flow=flow, init_scale=0.7)
    _perturb(guide, 0.1)
    q = guide.get_posterior()
    g = torch.linspace(-14, 14, 561, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = q.log_prob(grid.float()).double().exp().reshape(len(g), len(g))
    total = torch.trapezoid(torch.trapezoid(density, g, dim=1), g).item()
    assert total == pytest.approx(1.0, abs=5e-3)  # grid step 0.05, mass beyond ±14 < 1e-4


def test_samples_follow_the_log_density():
    # 1-D: the empirical CDF of 20000 draws against the CDF of the density by quadrature. The
    # Kolmogorov distance of 20000 iid draws exceeds 0.012 with probability < 0.1%.
    model, _, _ = two_modes(dim=1)
    guide = _guide(model, components=2, flow="nsf", init_spread=1.0, init_scale=0.8)
    _perturb(guide)
    q = guide.get_posterior()
    with torch.no_grad():
        draws = q.sample((20_000,))[:, 0].double().sort().values
        z = torch.linspace(-40, 40, 80_001, dtype=torch.float64)
        density = q.log_prob(z[:, None].float()).double().exp()
    cdf = torch.cat([torch.zeros(1, dtype=z.dtype), torch.cumulative_trapezoid(density, z)])
    at_draws = torch.from_numpy(__import__("numpy").interp(draws, z, cdf))
    empirical = torch.arange(1, len(draws) + 1, dtype=torch.float64) / len(draws)
    assert (at_draws - empirical).abs().max().item() < 0.012


# -- the fast-path objective ----------------------------------------------------------------------
def _quadrature_elbo(guide: AutoFlowMixture, log_p) -> torch.Tensor:
    """The ELBO of a 1-D guide, integral of q (log p - log q), by the trapezoid rule."""
    z = torch.linspace(-25, 25, 20_001)[:, None]
    log_q = guide.get_posterior().log_prob(z)
    return torch.trapezoid(log_q.exp() * (log_p(z) - log_q), z[:, 0])


@pytest.mark.parametrize("objective", ["elbo", "stl"])
def test_reverse_kl_gradient_matches_quadrature(objective):
    # The stratified estimator with 40000 particles against the exact gradient of the ELBO;
    # the tolerance (0.05 absolute or 10%) is several Monte Carlo standard errors (measured:
    # the largest se over parameters is below 0.01 here).
    model, log_p, _ = two_modes(dim=1, weights=(0.3, 0.7))
    guide = _guide(model, components=2, flow="nsf", init_spread=0.6, init_scale=0.8)
    _perturb(guide, 0.1)
    params = [guide.logits, guide.loc, guide.scale_unconstrained]
    exact = torch.autograd.grad(_quadrature_elbo(guide, log_p), params)
    value, surrogate = guide._reverse_kl(log_p, 40_000, objective)
    estimate = torch.autograd.grad(-surrogate, params)
    assert value.item() == pytest.approx(-_quadrature_elbo(guide, log_p).item(), abs=0.03)
    for e, g in zip(exact, estimate, strict=True):
        assert torch.allclose(g, e, atol=0.05, rtol=0.1), (g, e)


def test_reverse_kl_values_and_gradients_are_finite_and_reach_every_parameter():
    model, log_p, _ = two_modes(dim=3)
    guide = _guide(model, components=2)
    for objective in MIXTURE_OBJECTIVES:
        guide.zero_grad()
        value, surrogate = guide._reverse_kl(log_p, 7, objective)
        assert value.shape == () and surrogate.shape == () and not value.requires_grad
        assert torch.isfinite(value) and value.item() == pytest.approx(surrogate.item())
        surrogate.backward()
        for name, p in guide.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (objective, name)
    # the flows' last layers are zero-initialised, but they get a gradient
    assert any(p.grad.abs().sum() > 0 for p in guide.flows.parameters())


def test_siwae_bound_is_above_the_stratified_elbo_on_the_same_draws():
    model, log_p, _ = two_modes(dim=2)
    guide = _guide(model, components=3)
    _perturb(guide, 0.1)
    values = {}
    for objective in MIXTURE_OBJECTIVES:
        torch.manual_seed(3)
        values[objective] = guide._reverse_kl(log_p, 12, objective)[0].item()
    assert values["stl"] == pytest.approx(values["elbo"], rel=1e-5)
    assert values["iwae"] <= values["elbo"] + 1e-5  # values are negated bounds


def test_short_training_finds_both_modes():
    # A fixed seed (0, from conftest); the per-mode fractions of 4000 draws have se < 0.008.
    model, log_p, centres = two_modes(dim=2, shift=4.0)
    guide = _guide(model, components=2, hidden=(8,), init_scale=1.0)
    optim = torch.optim.Adam(guide.parameters(), lr=0.05)
    for _ in range(120):
        optim.zero_grad()
        guide._reverse_kl(log_p, 16, "stl")[1].backward()
        optim.step()
    with torch.no_grad():
        z = guide.get_posterior().sample((4000,))
    nearest = torch.cdist(z, centres).argmin(-1).float().mean().item()
    assert 0.4 < nearest < 0.6


def test_reverse_kl_validation():
    model, log_p, _ = two_modes(dim=2)
    guide = AutoFlowMixture(model, components=2, layers=1, hidden=(8,))
    with pytest.raises(ValueError, match="expected a set-up guide"):
        guide._reverse_kl(log_p, 4, "elbo")
    guide._setup_prototype()
    with pytest.raises(ValueError, match=r"objective: expected one of .* no DReG"):
        guide._reverse_kl(log_p, 4, "dreg")
    with pytest.raises(ValueError, match="num_particles: expected a positive integer"):
        guide._reverse_kl(log_p, 0, "elbo")
    with pytest.raises(ValueError, match=r"log_p: expected a tensor of shape \(4,\)"):
        guide._reverse_kl(lambda z: log_p(z)[:, None], 3, "elbo")


# -- Pyro's machinery -----------------------------------------------------------------------------
def test_trace_elbo_gradient_of_the_weights_is_unbiased():
    # Pyro's Trace_ELBO scores the component choice (score_parts); with 40000 vectorised
    # particles its weight gradient matches the quadrature gradient within 0.05 (REINFORCE
    # without a baseline: measured se about 0.01).
    model, log_p, _ = two_modes(dim=1, weights=(0.3, 0.7))
    guide = _guide(model, components=2, flow="nsf", init_spread=0.6, init_scale=0.8)
    (exact,) = torch.autograd.grad(_quadrature_elbo(guide, log_p), [guide.logits])
    elbo = Trace_ELBO(num_particles=40_000, vectorize_particles=True, max_plate_nesting=0)
    loss = elbo.differentiable_loss(model, guide)
    (estimate,) = torch.autograd.grad(-loss, [guide.logits])
    assert torch.allclose(estimate, exact, atol=0.05), (estimate, exact)


def test_svi_predictive_and_log_evidence():
    model, _, _ = two_modes(dim=2)
    guide = AutoFlowMixture(model, components=2, layers=1, hidden=(8,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    predictive = Predictive(model, guide=guide, num_samples=5, parallel=True)
    assert predictive()["z"].shape == (5, 2)
    assert Predictive(model, guide=guide, num_samples=4)()["z"].shape == (4, 2)
    log_z, se = pf.infer.log_evidence(model, guide, num_samples=200, max_plate_nesting=0)
    assert math.isfinite(log_z) and math.isfinite(se)


def test_log_evidence_of_an_exact_mixture_guide():
    # Components placed on the modes (flows at the identity, unit scales): q = p, so every
    # importance weight is 1 and log Z = 0 (float32 rounding only).
    model, _, centres = two_modes(dim=2, weights=(0.2, 0.8))
    guide = _guide(model, components=2, init_scale=1.0)
    with torch.no_grad():
        guide.loc.copy_(centres)
        guide.logits.copy_(torch.tensor([0.2, 0.8]).log())
    log_z, se = pf.infer.log_evidence(model, guide, num_samples=500, max_plate_nesting=0)
    assert abs(log_z) < 1e-4 and se < 1e-4


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("components", [0, -1, 1.5, True, "2"])
def test_components_must_be_a_positive_integer(components):
    model, _, _ = two_modes()
    with pytest.raises(ValueError, match="components: expected a positive integer"):
        AutoFlowMixture(model, components=components)


@pytest.mark.parametrize("flow", ["iaf", "maf"])
def test_flows_without_a_fast_inverse_are_refused(flow):
    model, _, _ = two_modes()
    with pytest.raises(ValueError, match="samples and scores in one pass per layer"):
        AutoFlowMixture(model, flow=flow)
    guide = AutoFlowMixture(model, flow=lambda dim: getattr(pf, flow.upper())(dim, layers=1))
    with pytest.raises(ValueError, match="samples and scores in one pass per layer"):
        guide._setup_prototype()


def test_argument_validation():
    model, _, _ = two_modes()
    with pytest.raises(TypeError, match="2 components need 2 flows"):
        AutoFlowMixture(model, flow=pf.RealNVP(2))
    with pytest.raises(ValueError, match="flow: expected one of"):
        AutoFlowMixture(model, flow="nope")
    with pytest.raises(ValueError, match="init_scale: expected a positive number"):
        AutoFlowMixture(model, init_scale=0.0)
    with pytest.raises(ValueError, match="init_spread: expected a non-negative number"):
        AutoFlowMixture(model, init_spread=-1.0)
    with pytest.raises(ValueError, match="covariance: expected one of"):
        AutoFlowMixture(model, covariance="dense")
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        AutoFlowMixture(model, flow=lambda d: pf.RealNVP(d), bins=4)
