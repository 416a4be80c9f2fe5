"""Tests of pyroflows.infer.guides: AutoFlowGuide and AmortizedFlow.

Statistical checks compare against exact posteriors (conjugate Gaussian regressions; the
Student-t posterior of a regression with flat priors) computed in float64. Monte Carlo summaries
use 4000 posterior draws, whose standard errors are 1.6% of a posterior sd for a mean and about
1.1% (relative) for a sd; the tolerances (10-15%) leave room for the residual optimisation noise
of a few hundred SVI steps at a small learning rate.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, init_to_feasible, init_to_value
from pyro.optim import Adam, ClippedAdam
from torch.distributions import biject_to, constraints

import pyroflows as pf
from pyroflows.infer import fit_svi
from pyroflows.infer.guides import (
    FLOWS,
    AmortizedFlow,
    AutoFlowGuide,
    WarmStart,
    init_to_unconstrained_zero,
)
from pyroflows.transforms import ActNorm

NUM_DRAWS = 4000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """SVI on tiny tensors gains nothing from intra-op threads; on a loaded machine, thread
    hand-offs cost ~15 ms per small kernel (measured), which would dominate these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(model, guide, steps, *args, lr=0.02, decay_to=0.1, num_particles=1):
    """ClippedAdam whose learning rate decays geometrically to ``decay_to * lr``."""
    optim = ClippedAdam({"lr": lr, "lrd": decay_to ** (1 / steps)})
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    svi = SVI(model, guide, optim, elbo)
    losses = [svi.step(*args) for _ in range(steps)]
    return losses


def _exact_gaussian(X, y, sigma, prior_sd):
    """Posterior of beta for y ~ N(X beta, sigma²), beta ~ N(0, prior_sd² I), in float64."""
    X, y = X.double(), y.double()
    precision = X.T @ X / sigma**2 + torch.eye(X.shape[1], dtype=X.dtype) / prior_sd**2
    cov = torch.linalg.inv(precision)
    return cov @ X.T @ y / sigma**2, cov


def regression(X, y, sigma=1.0, prior_sd=100.0):
    beta = pyro.sample("beta", dist.Normal(0.0, prior_sd).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * beta).sum(-1), sigma), obs=y)


def flat_regression(X, y):
    """Linear regression with improper flat priors on the coefficients and on sigma > 0."""
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (X.shape[1],)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * beta).sum(-1), sigma), obs=y)


def hierarchical(y, group):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", 3):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(theta[..., group], 1.0), obs=y)


def _hierarchical_data():
    gen = torch.Generator().manual_seed(2)
    group = torch.arange(3).repeat(5)
    y = torch.tensor([-1.0, 0.5, 2.0])[group] + torch.randn(15, generator=gen)
    return y, group


def _correlated_data(n=40, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, generator=gen)
    X = torch.stack([x1, x1 + 0.5 * torch.randn(n, generator=gen)], -1)
    y = X @ torch.tensor([1.0, -2.0]) + torch.randn(n, generator=gen)
    return X, y


# -- initialisation -------------------------------------------------------------------------------
def model_mixed():
    pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", 3):
        pyro.sample("s", dist.LogNormal(0.0, 1.0))
    pyro.sample("p", dist.Dirichlet(torch.ones(3)))


def test_init_location_and_spread():
    values = {
        "a": torch.tensor(2.0),
        "s": torch.tensor([0.5, 1.0, 4.0]),
        "p": torch.tensor([0.2, 0.3, 0.5]),
    }
    guide = AutoFlowGuide(model_mixed, init_loc_fn=init_to_value(values=values), init_scale=0.05)
    guide()
    expected = torch.cat(
        [
            values["a"].reshape(1),
            values["s"].log(),
            biject_to(constraints.simplex).inv(values["p"]),
        ]
    )
    shift, factor = guide.gaussian()
    torch.testing.assert_close(shift, expected)
    torch.testing.assert_close(factor, 0.05 * torch.eye(6))
    # The untrained flow is the identity: draws are N(init, 0.05² I) in unconstrained space
    # (sd of a sample sd from 4000 draws: 1.1%; tolerance 5%).
    latent = guide.get_posterior().sample((NUM_DRAWS,))
    assert (latent.mean(0) - expected).abs().max() < 4 * 0.05 / math.sqrt(NUM_DRAWS)
    torch.testing.assert_close(latent.std(0), torch.full((6,), 0.05), rtol=0.05, atol=0)
    draws = guide.sample_posterior(NUM_DRAWS)
    assert draws["a"].shape == (NUM_DRAWS,)
    assert draws["s"].shape == (NUM_DRAWS, 3)
    assert draws["p"].shape == (NUM_DRAWS, 3)
    torch.testing.assert_close(draws["p"].sum(-1), torch.ones(NUM_DRAWS))


def test_init_to_unconstrained_zero_does_not_sample():
    site = {"name": "x", "fn": dist.ImproperUniform(constraints.interval(0.0, 4.0), (2,), ())}
    torch.testing.assert_close(init_to_unconstrained_zero(site), torch.full((2,), 2.0))
    simplex = {"name": "p", "fn": dist.ImproperUniform(constraints.simplex, (), (4,))}
    torch.testing.assert_close(init_to_unconstrained_zero(simplex), torch.full((4,), 0.25))
    assert init_to_unconstrained_zero() is init_to_unconstrained_zero


# -- accuracy -------------------------------------------------------------------------------------
def test_conjugate_gaussian_posterior_recovered():
    """SVI from the prior's centre, no warm start. Over seeds 0-2 the errors measured up to
    0.11 posterior sds (means) and 7% (sds): tolerances 0.2 sd and 15%."""
    X, y = _correlated_data()
    mean, cov = _exact_gaussian(X, y, sigma=1.0, prior_sd=10.0)
    sd = cov.diagonal().sqrt()
    guide = AutoFlowGuide(regression, layers=2, hidden=(16,), init_loc_fn=init_to_feasible)
    _train(regression, guide, 600, X, y, 1.0, 10.0, lr=0.05, num_particles=4)
    beta = guide.sample_posterior(NUM_DRAWS)["beta"].double()
    print("conjugate: mean err / sd", ((beta.mean(0) - mean) / sd).tolist())
    print("conjugate: sd ratio", (beta.std(0) / sd).tolist())
    assert ((beta.mean(0) - mean) / sd).abs().max() < 0.2
    assert ((beta.std(0) / sd) - 1).abs().max() < 0.15
    # The posterior correlation (-0.9 here) is learnt too.
    corr = torch.corrcoef(beta.T)[0, 1]
    exact_corr = cov[0, 1] / (sd[0] * sd[1])
    assert abs(corr - exact_corr) < 0.05
    # median and quantiles of a Gaussian posterior
    median = guide.median()["beta"].double()
    assert ((median - mean) / sd).abs().max() < 0.2
    q = guide.quantiles([0.1, 0.5, 0.9])["beta"].double()
    assert q.shape == (3, 2)
    assert (q[0] < q[1]).all() and (q[1] < q[2]).all()
    z90 = 1.2815515655446004
    assert (((q[2] - q[0]) / (2 * z90 * sd)) - 1).abs().max() < 0.15


def test_improper_flat_priors():
    """Pyro's autoguides cannot initialise ImproperUniform sites; AutoFlowGuide can, and (with a
    Laplace warm start) recovers the exact Student-t posterior of the coefficients."""
    gen = torch.Generator().manual_seed(4)
    n, k = 30, 3
    X = torch.randn(n, k, generator=gen)
    y = X @ torch.tensor([1.0, 2.0, 3.0]) + 0.5 * torch.randn(n, generator=gen)
    with pytest.raises(NotImplementedError):
        AutoMultivariateNormal(flat_regression)(X, y)

    guide = AutoFlowGuide(flat_regression, layers=2, hidden=(16,))
    guide(X, y)
    shift, _ = guide.gaussian()
    torch.testing.assert_close(shift, torch.zeros(k + 1))  # beta = 0, log(sigma) = 0
    assert guide.median(X, y)["sigma"].shape == ()

    # Exact posterior under p(beta, sigma) ∝ 1: beta ~ t_nu(beta_hat, S/nu (XᵀX)⁻¹) with
    # nu = n - k - 1, so cov = S/(nu - 2) (XᵀX)⁻¹; p(sigma | y) ∝ sigma^-(n-k) exp(-S/(2 sigma²)).
    Xd, yd = X.double(), y.double()
    beta_hat = torch.linalg.solve(Xd.T @ Xd, Xd.T @ yd)
    S = ((yd - Xd @ beta_hat) ** 2).sum()
    nu = n - k - 1
    sd = (S / (nu - 2) * torch.linalg.inv(Xd.T @ Xd).diagonal()).sqrt()
    grid = torch.linspace(0.2, 1.5, 20001, dtype=torch.float64)
    log_w = -(n - k) * grid.log() - S / (2 * grid**2)
    w = (log_w - log_w.max()).exp()
    sigma_mean = (grid * w).sum() / w.sum()

    # Measured over seeds 0-2: mean errors <= 0.07 sd, sds within 8% (the Laplace start alone
    # is 9% narrow: the joint mode's sigma is below its posterior mean). Tolerances 0.15, 15%.
    guide.warm_start(X, y)
    _train(flat_regression, guide, 400, X, y, lr=0.02, num_particles=4)
    draws = guide.sample_posterior(NUM_DRAWS)
    beta, sigma = draws["beta"].double(), draws["sigma"].double()
    print("flat: mean err / sd", ((beta.mean(0) - beta_hat) / sd).tolist())
    print("flat: sd ratio", (beta.std(0) / sd).tolist(), "sigma", sigma.mean().item(), sigma_mean)
    assert ((beta.mean(0) - beta_hat) / sd).abs().max() < 0.15
    assert ((beta.std(0) / sd) - 1).abs().max() < 0.15
    assert abs(sigma.mean() / sigma_mean - 1) < 0.05


def _uncentred_regression_data():
    gen = torch.Generator().manual_seed(1)
    n = 50
    x = 100 + torch.randn(n, generator=gen, dtype=torch.float64)
    X = torch.stack([torch.ones(n, dtype=torch.float64), x], -1)
    y = X @ torch.tensor([1.0, 2.0], dtype=torch.float64) + torch.randn(n, generator=gen).double()
    return X.float(), y.float()


def test_warm_start_on_badly_scaled_regression():
    """Covariates x ~ 100 + N(0, 1): the intercept and slope have posterior sds 13 and 0.13
    and correlation -0.99995. After a Laplace warm start and 300 SVI steps the guide matches
    the exact posterior; AutoMultivariateNormal with the same 300 steps is far off (measured:
    slope mean 15 sds away, intercept sd 1% of the truth; still far off after 3000 steps)."""
    X, y = _uncentred_regression_data()
    mean, cov = _exact_gaussian(X, y, sigma=1.0, prior_sd=100.0)
    sd = cov.diagonal().sqrt()

    guide = AutoFlowGuide(regression, layers=2, hidden=(16,))
    ws = guide.warm_start(X, y)
    assert isinstance(ws, WarmStart) and not ws.diagonal_fallback
    # The posterior is Gaussian, so the Laplace approximation is exact (float32 maths: 2%).
    torch.testing.assert_close(ws.loc.double(), mean, rtol=0, atol=0.02 * sd.min().item())
    laplace_cov = (ws.scale_tril @ ws.scale_tril.T).double()
    torch.testing.assert_close(laplace_cov.diagonal(), cov.diagonal(), rtol=0.02, atol=0)
    _train(regression, guide, 300, X, y, lr=0.01)
    beta = guide.sample_posterior(NUM_DRAWS)["beta"].double()
    ours_mean_err = ((beta.mean(0) - mean) / sd).abs().max().item()
    ours_sd_err = ((beta.std(0) / sd) - 1).abs().max().item()

    pyro.set_rng_seed(0)
    amvn = AutoMultivariateNormal(regression)
    _train(regression, amvn, 300, X, y, lr=0.01)
    pred = Predictive(regression, guide=amvn, num_samples=NUM_DRAWS, return_sites=["beta"])
    theirs = pred(X, y)["beta"].reshape(NUM_DRAWS, 2).double()
    theirs_mean_err = ((theirs.mean(0) - mean) / sd).abs().max().item()
    theirs_sd_err = ((theirs.std(0) / sd) - 1).abs().max().item()
    print(
        f"AutoFlowGuide+warm start: max |mean err|/sd {ours_mean_err:.3f}, sd err {ours_sd_err:.3f}"
    )
    print(
        f"AutoMultivariateNormal: max |mean err|/sd {theirs_mean_err:.3f}, sd {theirs_sd_err:.3f}"
    )
    assert ours_mean_err < 0.1 and ours_sd_err < 0.1
    assert theirs_mean_err > 1.0  # reliably: 15 sds at this seed, and far off at every seed tried


def test_warm_start_map_only_keeps_spread():
    X, y = _correlated_data()
    mean, _ = _exact_gaussian(X, y, sigma=1.0, prior_sd=10.0)
    guide = AutoFlowGuide(regression, init_scale=0.2)
    ws = guide.warm_start(X, y, 1.0, 10.0, method="map")
    assert ws.scale_tril is None and ws.grad_norm < 1e-2
    shift, factor = guide.gaussian()
    torch.testing.assert_close(shift.double(), mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(factor, 0.2 * torch.eye(2))


def test_warm_start_adam_and_diagonal():
    X, y = _correlated_data()
    mean, cov = _exact_gaussian(X, y, sigma=1.0, prior_sd=10.0)
    guide = AutoFlowGuide(regression, covariance="diagonal")
    guide.warm_start(X, y, 1.0, 10.0, optim="adam", steps=1500, lr=0.05)
    shift, factor = guide.gaussian()
    assert factor.shape == (2,)
    torch.testing.assert_close(shift.double(), mean, atol=0.02, rtol=0)
    # the diagonal guide takes the Laplace marginal sds
    torch.testing.assert_close(factor.double(), cov.diagonal().sqrt(), rtol=0.02, atol=0)


def test_warm_start_falls_back_to_diagonal():
    def model(y):
        pyro.sample("unused", dist.ImproperUniform(constraints.real, (), ()))  # flat: H = 0
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    guide = AutoFlowGuide(model, init_scale=0.3)
    with pytest.warns(UserWarning, match="not positive definite"):
        ws = guide.warm_start(torch.tensor(1.0))
    assert ws.diagonal_fallback
    _, factor = guide.gaussian()
    torch.testing.assert_close(factor.diagonal(), torch.tensor([0.3, 0.5**0.5]))


def test_warm_start_validation():
    guide = AutoFlowGuide(regression)
    X, y = _correlated_data()
    with pytest.raises(ValueError, match="method: expected"):
        guide.warm_start(X, y, method="newton")
    with pytest.raises(ValueError, match="optim: expected"):
        guide.warm_start(X, y, optim="sgd")
    with pytest.raises(ValueError, match="steps: expected"):
        guide.warm_start(X, y, steps=0)


# -- plates, Predictive, summaries ----------------------------------------------------------------
def test_plates_over_global_latents_and_predictive():
    y, group = _hierarchical_data()
    guide = AutoFlowGuide(hierarchical, layers=2, hidden=(16,))
    losses = _train(hierarchical, guide, 50, y, group, num_particles=2)
    assert all(math.isfinite(v) for v in losses)
    trace = pyro.poutine.trace(guide).get_trace(y, group)
    assert trace.nodes["theta"]["value"].shape == (3,)
    assert trace.nodes["theta"]["cond_indep_stack"][0].name == "groups"

    draws = guide.sample_posterior(100, y, group)
    assert {k: v.shape for k, v in draws.items()} == {
        "mu": (100,),
        "tau": (100,),
        "theta": (100, 3),
    }
    assert (draws["tau"] > 0).all()
    assert guide.median()["theta"].shape == (3,)
    assert guide.quantiles([0.25, 0.75])["theta"].shape == (2, 3)

    predictive = Predictive(hierarchical, guide=guide, num_samples=20)
    samples = predictive(y, group)
    assert {"mu", "tau", "theta", "y"} <= set(samples)
    assert samples["theta"].shape == (20, 3)
    assert samples["y"].shape == (20, 15)
    parallel = Predictive(hierarchical, guide=guide, num_samples=20, parallel=True)
    assert parallel(y, group)["theta"].shape[0] == 20


def test_vectorized_particles():
    y, group = _hierarchical_data()
    guide = AutoFlowGuide(hierarchical, layers=1, hidden=(8,))
    svi = SVI(hierarchical, guide, Adam({"lr": 0.01}), Trace_ELBO(4, vectorize_particles=True))
    assert math.isfinite(svi.step(y, group))


def test_quantiles_validation():
    guide = AutoFlowGuide(hierarchical)
    y, group = _hierarchical_data()
    with pytest.raises(ValueError, match="levels in"):
        guide.quantiles([0.5, 1.5], y, group)


# -- flows ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flow", FLOWS)
def test_each_flow_trains(flow):
    y, group = _hierarchical_data()
    guide = AutoFlowGuide(hierarchical, flow=flow, layers=2, hidden=(8,))
    losses = _train(hierarchical, guide, 5, y, group)
    assert all(math.isfinite(v) for v in losses)
    names = list(pyro.get_param_store().keys())
    assert {"AutoFlowGuide.loc", "AutoFlowGuide.scale", "AutoFlowGuide.scale_tril"} <= set(names)
    assert any(n.startswith("AutoFlowGuide.flow$$$") for n in names)
    # every flow parameter is trained by SVI (it has received a gradient)
    assert all(p.grad is not None for p in guide.flow.parameters())
    assert guide.sample_posterior(10)["theta"].shape == (10, 3)


def test_one_dimensional_latent():
    def model():
        pyro.sample("x", dist.Gamma(2.0, 1.0))

    for flow in ("iaf", "maf", "nsf"):
        pyro.clear_param_store()
        guide = AutoFlowGuide(model, flow=flow, layers=1, hidden=(8,))
        assert math.isfinite(_train(model, guide, 3)[-1])
    with pytest.raises(ValueError, match="at least 2"):
        AutoFlowGuide(model, flow="realnvp")()


def test_callable_and_instance_flow():
    y, group = _hierarchical_data()
    built = []

    def make(dim):
        built.append(dim)
        return pf.NSF(dim, layers=1, hidden=(8,), bins=4)  # ActNorm on by default

    guide = AutoFlowGuide(hierarchical, flow=make, init_scale=0.05)
    guide(y, group)
    assert built == [5]
    # ActNorm is declared initialised at the identity, so the guide starts at its Gaussian
    assert all(bool(m.initialized) for m in guide.flow.modules() if isinstance(m, ActNorm))
    latent = guide.get_posterior().sample((NUM_DRAWS,))
    torch.testing.assert_close(latent.std(0), torch.full((5,), 0.05), rtol=0.05, atol=0)
    assert math.isfinite(_train(hierarchical, guide, 3, y, group)[-1])

    pyro.clear_param_store()
    instance = AutoFlowGuide(hierarchical, flow=pf.RealNVP(5, layers=1, hidden=(8,)))
    assert math.isfinite(_train(hierarchical, instance, 3, y, group)[-1])


def test_every_vector_builder_of_the_table_is_a_named_flow_and_image_flows_are_refused():
    assert set(FLOWS) == set(pf.flows.vector_builders()) >= {"iaf", "maf", "nsf", "realnvp"}
    assert {"nice", "linear"} <= set(FLOWS)
    for name in ("glow", "image_realnvp"):
        with pytest.raises(ValueError, match=rf"got '{name}', an image flow"):
            AutoFlowGuide(hierarchical, flow=name)


class _TinyIAF(pf.IAF):
    """A user's builder: an IAF subclass, registered under a name of its own."""


def test_a_registered_builder_is_a_named_flow():
    pf.flows.register_builder("tiny_iaf", _TinyIAF)
    try:
        y, group = _hierarchical_data()
        guide = AutoFlowGuide(hierarchical, flow="tiny_iaf", layers=1, hidden=(8,), mixing=None)
        assert math.isfinite(_train(hierarchical, guide, 3, y, group)[-1])
        assert type(guide.flow) is _TinyIAF and guide.flow.config["kwargs"]["layers"] == 1
    finally:
        pf.flows.unregister_builder("tiny_iaf")
    assert "tiny_iaf" not in FLOWS and "tiny_iaf" not in pf.flows.BUILDERS


def test_flow_validation():
    y, group = _hierarchical_data()
    with pytest.raises(ValueError, match="flow: expected one of"):
        AutoFlowGuide(hierarchical, flow="glow")
    with pytest.raises(TypeError, match="flow: expected a name"):
        AutoFlowGuide(hierarchical, flow=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        AutoFlowGuide(hierarchical, flow=lambda d: pf.IAF(d), bins=4)
    with pytest.raises(ValueError, match="init_scale: expected"):
        AutoFlowGuide(hierarchical, init_scale=0.0)
    with pytest.raises(ValueError, match="covariance: expected"):
        AutoFlowGuide(hierarchical, covariance="low_rank")
    with pytest.raises(ValueError, match="over 5 latent dimensions"):
        AutoFlowGuide(hierarchical, flow=pf.IAF(4))(y, group)
    with pytest.raises(ValueError, match="unconditional"):
        AutoFlowGuide(hierarchical, flow=lambda d: pf.IAF(d, context_dim=2))(y, group)
    with pytest.raises(TypeError, match="return a Flow"):
        AutoFlowGuide(hierarchical, flow=lambda d: "iaf")(y, group)


def test_dtype_follows_the_model():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))

    guide = AutoFlowGuide(model, layers=1, hidden=(8,))
    guide()
    assert guide.gaussian()[0].dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in guide.flow.parameters())
    assert guide.sample_posterior(3)["x"].dtype == torch.float64

    # improper priors hold no tensor: the guide follows the data
    pyro.clear_param_store()
    X = torch.randn(20, 2, dtype=torch.float64)
    flat = AutoFlowGuide(flat_regression, layers=1, hidden=(8,))
    flat(X, X.sum(-1))
    assert flat.gaussian()[0].dtype == torch.float64


def test_param_store_round_trip(tmp_path):
    y, group = _hierarchical_data()
    guide = AutoFlowGuide(hierarchical, layers=1, hidden=(8,))
    guide.warm_start(y, group, steps=50)
    _train(hierarchical, guide, 20, y, group)
    store = pyro.get_param_store()
    assert "AutoFlowGuide.ref_loc" in store and "AutoFlowGuide.ref_scale" in store
    store.save(tmp_path / "params.pt")
    before = {k: v.detach().clone() for k, v in store.items()}
    pyro.clear_param_store()
    store.load(tmp_path / "params.pt")
    fresh = AutoFlowGuide(hierarchical, layers=1, hidden=(8,))
    fresh(y, group)
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(value.detach(), before[name])
    torch.testing.assert_close(fresh.gaussian()[0], guide.gaussian()[0])
    # the flow computes with the loaded tensors, which SVI then optimises
    for p_fresh, p_old in zip(fresh.flow.parameters(), guide.flow.parameters(), strict=True):
        torch.testing.assert_close(p_fresh, p_old)
    pyro.set_rng_seed(1)
    a = fresh.sample_posterior(5)["theta"]
    pyro.set_rng_seed(1)
    torch.testing.assert_close(a, guide.sample_posterior(5)["theta"])


# -- amortised posteriors (VAE) -------------------------------------------------------------------
def test_amortized_flow_vae():
    n, x_dim, z_dim, h_dim, batch = 64, 6, 2, 8, 16
    gen = torch.Generator().manual_seed(5)
    data = torch.randn(n, 2, generator=gen) @ torch.randn(2, x_dim, generator=gen)
    decoder = torch.nn.Sequential(
        torch.nn.Linear(z_dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, x_dim)
    )
    encoder = torch.nn.Sequential(
        torch.nn.Linear(x_dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, h_dim)
    )
    flow = pf.IAF(z_dim, layers=2, hidden=(16,), context_dim=h_dim, base="conditional_normal")
    q = AmortizedFlow(encoder, flow)

    def model(data):
        pyro.module("decoder", decoder)
        with pyro.plate("data", n, subsample_size=batch) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([z_dim]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=data[idx])

    def guide(data):
        pyro.module("q", q)
        with pyro.plate("data", n, subsample_size=batch) as idx:
            pyro.sample("z", q(data[idx]))

    trace = pyro.poutine.trace(guide).get_trace(data)
    trace.compute_log_prob()
    assert trace.nodes["z"]["value"].shape == (batch, z_dim)
    assert trace.nodes["z"]["fn"].batch_shape == (batch,)
    assert trace.nodes["z"]["log_prob"].shape == (batch,)

    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(data) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    names = set(pyro.get_param_store().keys())
    assert any(k.startswith("q$$$encoder.") for k in names)
    assert any(k.startswith("q$$$flow.transforms.") for k in names)
    assert any(k.startswith("q$$$flow.base.") for k in names)
    assert all(p.grad is not None for p in q.parameters())


def test_amortized_flow_validation():
    encoder = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match="conditional flow"):
        AmortizedFlow(encoder, pf.IAF(2))
    with pytest.raises(TypeError, match="encoder: expected"):
        AmortizedFlow(lambda x: x, pf.IAF(2, context_dim=4))
    with pytest.raises(TypeError, match="flow: expected"):
        AmortizedFlow(encoder, torch.nn.Linear(4, 2))
    q = AmortizedFlow(encoder, pf.IAF(2, context_dim=5))
    with pytest.raises(ValueError, match="last dimension 5"):
        q(torch.randn(7, 3))


# -- devices --------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda():
    device = torch.device("cuda")
    y, group = _hierarchical_data()
    y, group = y.to(device), group.to(device)

    def model(y, group):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, device=device), 5.0))
        with pyro.plate("groups", 3):
            theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(theta[..., group], 1.0), obs=y)

    guide = AutoFlowGuide(model, layers=1, hidden=(8,))
    guide.warm_start(y, group, steps=20)
    assert math.isfinite(_train(model, guide, 5, y, group)[-1])
    assert guide.gaussian()[0].device.type == "cuda"
    assert all(p.device.type == "cuda" for p in guide.parameters())
    assert guide.sample_posterior(10)["theta"].device.type == "cuda"
    assert Predictive(model, guide=guide, num_samples=5)(y, group)["y"].device.type == "cuda"

    # improper priors hold no tensor: the guide follows the data's device
    X = torch.randn(20, 2, device=device)
    yy = X @ torch.tensor([1.0, -1.0], device=device) + 0.1 * torch.randn(20, device=device)
    pyro.clear_param_store()
    flat = AutoFlowGuide(flat_regression, layers=1, hidden=(8,))
    assert math.isfinite(_train(flat_regression, flat, 3, X, yy)[-1])
    assert flat.gaussian()[0].device.type == "cuda"


@pytest.mark.parametrize("validate", [True, False], ids=["validation", "no-validation"])
def test_warm_start_without_a_finite_mode_leaves_the_guide_unchanged(validate):
    """A density that grows without bound as log-scale -> -inf: the search cannot end well, and
    the guide must be left as it was rather than take NaN (with Pyro's argument checks on, the
    model itself fails first; with them off, the search ends at a non-finite point)."""
    pyro.enable_validation(validate)

    def model():
        v = pyro.sample("v", dist.ImproperUniform(constraints.real, (), ()))
        pyro.sample("x", dist.Normal(0.0, torch.exp(v)), obs=torch.tensor(0.0))

    guide = pf.infer.AutoFlowGuide(model, flow="iaf")
    guide()  # set up the parameters
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(ValueError, match="no finite mode"):
        guide.warm_start()
    for key, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), before[key]), key


def test_a_continuous_flow_guide_trains_by_the_elbo_and_recovers_the_posterior():
    """Reverse KL through the ODE: rsample solves it with the trace, the draws are scored from
    the cache (no second solve)."""
    X, y = _correlated_data()
    mean, cov = _exact_gaussian(X, y, sigma=1.0, prior_sd=10.0)
    sd = cov.diagonal().sqrt()
    guide = AutoFlowGuide(regression, flow="cnf", hidden=(16, 16))
    assert type(guide.default_loss()).__name__ == "Trace_ELBO"
    history = fit_svi(regression, guide, X, y, 1.0, 10.0, steps=200, progress=False, seed=0)
    assert all(math.isfinite(v) for v in history.train_loss)
    assert isinstance(guide.flow, pf.CNF)
    beta = guide.sample_posterior(NUM_DRAWS)["beta"].double()
    assert ((beta.mean(0) - mean) / sd).abs().max() < 0.3
    assert ((beta.std(0) / sd) - 1).abs().max() < 0.3


@pytest.mark.parametrize("flow", ["naf", "bnaf", "residual", "sylvester"])
def test_flows_with_numerical_inverses_train_on_the_fast_path(flow):
    """The newer families in a guide: built sampling-fast, trained with the ELBO (whose draws
    are scored from the cache, no solve), and close to a conjugate Gaussian posterior."""
    X, y = _correlated_data()
    mean, cov = _exact_gaussian(X, y, sigma=1.0, prior_sd=10.0)
    sd = cov.diagonal().sqrt()
    guide = AutoFlowGuide(regression, flow=flow, layers=2, hidden=(16,))
    assert type(guide.default_loss()).__name__ == "Trace_ELBO"
    history = fit_svi(regression, guide, X, y, 1.0, 10.0, steps=300, progress=False, seed=0)
    assert all(math.isfinite(v) for v in history.train_loss)
    assert guide.flow.config["kwargs"]["fast"] == "sampling"
    beta = guide.sample_posterior(NUM_DRAWS)["beta"].double()
    assert ((beta.mean(0) - mean) / sd).abs().max() < 0.3
    assert ((beta.std(0) / sd) - 1).abs().max() < 0.3
