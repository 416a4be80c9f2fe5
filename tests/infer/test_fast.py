"""The fast reverse-KL path of fit_svi: the recorded model, gradients, refusals and fallbacks."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Predictive, Trace_ELBO

import pyroflows as pf
from pyroflows.infer import IWAE, STL_ELBO, AutoFlowGuide, fit_svi
from pyroflows.infer.fast import FastPathUnavailable, FastSVI, default_loss, objective_of
from pyroflows.infer.potential import NotTraceable, Potential


@pytest.fixture(autouse=True)
def _clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def hierarchical(y, x):
    """Plates over global latents, constrained sites, an improper flat prior, data as args."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    b = pyro.sample("b", dist.ImproperUniform(constraints.real, (), ()))
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3, dtype=y.dtype)))
    with pyro.plate("groups", 3):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
    with pyro.plate("data", len(y)):
        loc = theta.repeat_interleave(2, -1) + b * x + p[..., 0]
        pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, generator=g, dtype=dtype), torch.randn(6, generator=g, dtype=dtype)


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


OBJECTIVES = [
    Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    STL_ELBO(num_particles=4, max_plate_nesting=1),
    IWAE(num_particles=4, max_plate_nesting=1),
    IWAE(num_particles=4, estimator="dreg", max_plate_nesting=1),
]


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("elbo", OBJECTIVES, ids=["elbo", "stl", "iwae", "dreg"])
def test_same_loss_and_gradients_as_the_traced_objective_on_the_same_draws(elbo, float64):
    y, x = data()
    pyro.set_rng_seed(1)
    guide = AutoFlowGuide(hierarchical, flow="realnvp", layers=2, hidden=(8,), init_scale=0.5)
    loss = FastSVI(hierarchical, guide, elbo, (y, x))
    with torch.no_grad():  # a flow away from the identity, so that every parameter matters
        for p in guide.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = loss.parameters()
    pyro.set_rng_seed(5)
    value = loss.backward()
    fast = _grads(params)
    for p in params:
        p.grad = None
    pyro.set_rng_seed(5)
    expected = elbo.loss_and_grads(hierarchical, guide, y, x)
    assert float(value) == pytest.approx(expected, rel=1e-10)
    traced = _grads(params)
    assert sum(g is not None for g in fast) >= 10
    for name, a, b in zip(loss._names, fast, traced, strict=True):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any()), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_potential_matches_the_model_and_is_one_value_per_particle():
    y, x = data()
    guide = AutoFlowGuide(hierarchical)
    potential = Potential(hierarchical, guide, (y, x))
    z = torch.randn(7, guide.latent_dim, dtype=y.dtype)
    log_prior, log_lik = potential(z)
    assert log_prior.shape == log_lik.shape == (7,)
    for i in range(7):
        expected = guide.log_density(z[i], y, x)
        assert float(log_prior[i] + log_lik[i]) == pytest.approx(float(expected), rel=1e-10)


def test_potential_refuses_a_wrong_shape():
    guide = AutoFlowGuide(hierarchical)
    potential = Potential(hierarchical, guide, data())
    with pytest.raises(ValueError, match=r"expected z of shape \(n, 8\)"):
        potential(torch.zeros(3, 4, dtype=torch.float64))


def discrete():
    k = pyro.sample("k", dist.Bernoulli(0.3))
    pyro.sample("z", dist.Normal(k, 1.0))


def subsampled(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y), subsample_size=2) as idx:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])


def with_param():
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("z", dist.Normal(loc, 1.0))


def branching():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    if (z > 0).all():
        pyro.sample("w", dist.Normal(z, 1.0))
    else:
        pyro.sample("w", dist.Normal(-z, 2.0))


def outside_randomness():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.factor("noise", torch.randn(()) * z)


@pytest.mark.parametrize(
    "model, args, reason",
    [
        (subsampled, (torch.randn(5),), "subsampled plate 'data'"),
        (with_param, (), "the model has a parameter 'loc'"),
        (branching, (), "reads the value of a tensor that depends on its latents"),
        (outside_randomness, (), "depends on something outside"),
    ],
    ids=["subsampling", "model-param", "structure", "randomness"],
)
def test_models_that_do_not_qualify_fall_back_to_traced_svi_with_a_reason(model, args, reason):
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, layers=1, hidden=(4,))
    with pytest.warns(FastPathUnavailable, match=reason):
        history = fit_svi(model, guide, *args, steps=3, progress=False)
    assert len(history.train_loss) == 3  # and it trained, the traced way
    pyro.clear_param_store()
    guide = AutoFlowGuide(model, layers=1, hidden=(4,))
    with pytest.raises(NotTraceable, match=reason):
        fit_svi(model, guide, *args, steps=3, progress=False, fast=True)


def test_discrete_latents_are_refused_by_name():
    # AutoContinuous refuses discrete sites itself; one hidden from the guide reaches the model
    guide = AutoFlowGuide(pyro.poutine.block(discrete, hide=["k"]))
    with pytest.raises(NotTraceable, match="latent site 'k' is discrete"):
        FastSVI(discrete, guide, Trace_ELBO())


def test_a_model_that_is_not_vectorised_is_refused_naming_the_site():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z * torch.ones(3), 1.0), obs=torch.zeros(3))  # no plate

    guide = AutoFlowGuide(model)
    with pytest.raises(NotTraceable, match="failed on a batch of 8 particles"):
        FastSVI(model, guide, Trace_ELBO(num_particles=4))


def test_objectives_without_a_fast_equivalent_take_the_traced_path():
    assert objective_of(pyro.infer.TraceMeanField_ELBO()) is None
    guide = AutoFlowGuide(with_param)
    with pytest.warns(FastPathUnavailable, match="TraceMeanField_ELBO has no fast equivalent"):
        fit_svi(with_param, guide, loss=pyro.infer.TraceMeanField_ELBO(), steps=2, progress=False)


def test_other_guides_keep_pyro_defaults_and_the_traced_path():
    guide = pyro.infer.autoguide.AutoNormal(branching)
    assert type(default_loss(guide)) is Trace_ELBO
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathUnavailable)  # no fast path offered, no warning
        fit_svi(branching, guide, steps=2, progress=False)
    assert type(default_loss(AutoFlowGuide(branching))) is Trace_ELBO
    assert type(default_loss(AutoFlowGuide(branching, flow="realnvp"))) is STL_ELBO


def test_the_default_path_trains_and_predictive_sees_the_trained_guide():
    y, x = data(torch.float32)
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(hierarchical, layers=2, hidden=(16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathUnavailable)
        history = fit_svi(hierarchical, guide, y, x, steps=300, lr=1e-2, progress=False)
    assert history.train_loss[-1] < history.train_loss[0]
    draws = guide.sample_posterior(200)  # (Predictive cannot run a model with ImproperUniform)
    assert draws["theta"].shape == (200, 3) and (draws["tau"] > 0).all()
    # the draws come from the trained guide: the same parameters as the param store's
    store = dict(pyro.get_param_store().named_parameters())
    loc = store["AutoFlowGuide.loc"]
    assert loc is guide.loc and loc.abs().sum() > 0


def test_fast_and_traced_paths_reach_the_same_answer_on_a_conjugate_model():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([1.0, 2.0, 0.5, 1.5])
    post_var = 1 / (1 / 4 + 4)
    post_mean = post_var * y.sum()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, layers=1, hidden=(8,))
    fit_svi(model, guide, y, steps=600, lr=1e-2, progress=False)
    draws = Predictive(model, guide=guide, num_samples=4000)(y)["mu"]
    assert float(draws.mean()) == pytest.approx(float(post_mean), abs=0.05)
    assert float(draws.std()) == pytest.approx(post_var**0.5, rel=0.1)


def test_fast_checkpoints_resume_to_the_uninterrupted_result(tmp_path):
    def model():
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 2.0).to_event(1))

    def run(resume=False, folder=None, callback=None):
        if not resume:
            pyro.clear_param_store()
        guide = AutoFlowGuide(model, layers=1, hidden=(8,))
        fit_svi(
            model,
            guide,
            steps=40,
            seed=3,
            progress=False,
            checkpoint=folder,
            resume=resume,
            eval_every=10,
            callback=callback,
        )
        return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    whole = run()
    folder = tmp_path / "run"
    run(folder=folder, callback=lambda step, h: step == 20)  # "killed" after step 20
    pyro.clear_param_store()
    resumed = run(resume=True, folder=folder)
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, msg=name)


def test_a_traced_checkpoint_is_not_resumed_on_the_fast_path(tmp_path):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    guide = AutoFlowGuide(model, layers=1, hidden=(4,))
    fit_svi(model, guide, steps=4, progress=False, checkpoint=tmp_path, fast=False)
    pyro.clear_param_store()
    guide = AutoFlowGuide(model, layers=1, hidden=(4,))
    with pytest.raises(ValueError, match="path"):
        fit_svi(model, guide, steps=8, progress=False, checkpoint=tmp_path, resume=True)


def test_fast_path_arguments_are_checked():
    guide = AutoFlowGuide(branching)
    with pytest.raises(ValueError, match="fast: expected None"):
        fit_svi(branching, guide, steps=1, fast="yes")
    with pytest.raises(ValueError, match="compile: needs optimizer='adam'"):
        fit_svi(branching, guide, steps=1, compile=True, optimizer="clipped_adam")
    with pytest.raises(ValueError, match="compile: needs the fast path"):
        fit_svi(branching, guide, steps=1, compile=True, fast=False)


def test_compiled_fast_path_gives_the_eager_losses():
    def model():
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 2.0).to_event(1))

    def run(compile):
        pyro.clear_param_store()
        guide = AutoFlowGuide(model, flow="realnvp", layers=1, hidden=(8,))
        return fit_svi(model, guide, steps=6, seed=0, progress=False, compile=compile)

    eager, compiled = run(False), run(True)
    torch.testing.assert_close(
        torch.tensor(compiled.train_loss), torch.tensor(eager.train_loss), rtol=1e-4, atol=1e-5
    )


@pytest.mark.cuda
def test_fast_path_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    y, x = (t.cuda() for t in data(torch.float32))
    guide = AutoFlowGuide(hierarchical, layers=1, hidden=(8,))
    history = fit_svi(hierarchical, guide, y, x, steps=20, progress=False, compile=True)
    assert len(history.train_loss) == 20
    assert guide.loc.device.type == "cuda"


def test_public_names():
    assert pf.infer.FastPathUnavailable is FastPathUnavailable


def test_fit_target_compiles():
    target = torch.distributions.Normal(torch.tensor([1.0, -1.0]), 1.0)

    def log_p(z):
        return target.log_prob(z).sum(-1)

    def run(compile):
        torch.manual_seed(0)
        flow = pf.RealNVP(dim=2, layers=1, hidden=(8,))
        return pf.infer.fit_target(flow, log_p, steps=5, progress=False, seed=0, compile=compile)

    eager, compiled = run(False), run(True)
    torch.testing.assert_close(
        torch.tensor(compiled.train_loss), torch.tensor(eager.train_loss), rtol=1e-4, atol=1e-5
    )


def uncentred_regression(x, y):
    """A badly scaled, strongly correlated posterior: covariates far from 0 (corr(a, b) ~ -1)."""
    a = pyro.sample("a", dist.Normal(0.0, 1e4))
    b = pyro.sample("b", dist.Normal(0.0, 1e3))
    sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)


def test_the_default_start_is_laplace_on_a_badly_scaled_posterior():
    g = torch.Generator().manual_seed(0)
    x = 100.0 + 10.0 * torch.randn(50, generator=g)
    y = 3.0 + 0.5 * (x - 100.0) + torch.randn(50, generator=g)
    design = torch.stack([torch.ones_like(x), x], -1).double()
    ols = torch.linalg.lstsq(design, y.double()[:, None]).solution[:, 0]  # ~ the posterior mean

    def fit(laplace):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlowGuide(uncentred_regression, layers=1, hidden=(8,), laplace=laplace)
        fit_svi(uncentred_regression, guide, x, y, steps=200, lr=1e-2, progress=False)
        return guide.sample_posterior(2000)["b"]

    b = fit("auto")
    sd = float(1.0 / (x - x.mean()).square().sum().sqrt())  # sigma ~ 1
    assert abs(float(b.mean()) - float(ols[1])) < 0.2 * sd + 1e-3
    assert 0.7 < float(b.std()) / sd < 1.4
    b_cold = fit(False)  # the same budget from the default start: far off
    assert abs(float(b_cold.mean()) - float(ols[1])) > 10 * sd


def test_laplace_auto_keeps_the_default_start_when_the_laplace_start_is_worse():
    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))

    guide = AutoFlowGuide(funnel, layers=1, hidden=(4,))
    loss = FastSVI(funnel, guide, STL_ELBO(4))
    assert loss.start.startswith("Laplace start not used")
    assert float(guide.ref_scale.detach().diagonal().min()) == 1.0  # the default start, unchanged
    assert FastSVI(funnel, guide, STL_ELBO(4)).start is None  # decided once per guide
    with pytest.raises(ValueError, match="laplace: expected True, False or 'auto'"):
        AutoFlowGuide(funnel, laplace="yes")


def test_laplace_auto_leaves_a_loaded_guide_alone():
    def model():
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 2.0).to_event(1))

    guide = AutoFlowGuide(model, layers=1, hidden=(4,))
    fit_svi(model, guide, steps=20, lr=1e-2, progress=False)
    trained = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
    again = AutoFlowGuide(model, layers=1, hidden=(4,))  # a new guide on the loaded store
    loss = FastSVI(model, again, STL_ELBO(4))
    assert loss.start is None
    for name, value in pyro.get_param_store().named_parameters():
        torch.testing.assert_close(value.detach(), trained[name], msg=name)


def test_a_new_guide_computes_with_a_loaded_param_store(tmp_path):
    def model():  # the posterior is far from the prior's median, where the guide starts
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        pyro.sample("y", dist.Normal(z, 0.5).to_event(1), obs=torch.tensor([3.0, -2.0]))

    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, layers=1, hidden=(4,), laplace=False)
    fit_svi(model, guide, steps=300, lr=3e-2, progress=False)
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "store.pt")
    again = AutoFlowGuide(model, layers=1, hidden=(4,))
    draws = Predictive(model, guide=again, num_samples=2000)()["z"]
    torch.testing.assert_close(draws.mean(0), torch.tensor([3.0, -2.0]), atol=0.1, rtol=0)


def test_the_default_objective_follows_the_cost_of_the_flows_inverse():
    def model(d):
        pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))

    for flow, d, expected in [
        ("iaf", 2, STL_ELBO),
        ("iaf", 4, Trace_ELBO),
        ("realnvp", 4, STL_ELBO),
        ("maf", 4, STL_ELBO),
    ]:
        guide = AutoFlowGuide(model, flow=flow, layers=1, hidden=(64,))
        guide._setup_prototype(d)
        loss = default_loss(guide)
        assert type(loss) is expected and loss.num_particles == 16, (flow, d)


def test_a_store_holding_another_flow_is_refused_by_name():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    fit_svi(model, AutoFlowGuide(model, flow="nsf"), steps=2, progress=False)
    other = AutoFlowGuide(model, flow="realnvp")  # the store not cleared
    with pytest.raises(ValueError, match=r"call pyro.clear_param_store\(\) before building"):
        fit_svi(model, other, steps=2, progress=False)


def test_annealing_tempers_the_likelihood_then_trains_on_the_posterior(tmp_path):
    def model():  # prior N(0, 3²), likelihood N(2 | z, 0.5²)
        z = pyro.sample("z", dist.Normal(0.0, 3.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=torch.tensor(2.0))

    guide = AutoFlowGuide(model, layers=1, hidden=(8,), laplace=False)
    loss = FastSVI(model, guide, Trace_ELBO(num_particles=8))
    loss.temper(10)
    betas = [float(loss.inputs(None)[0]) for _ in range(12)]
    assert betas[0] == pytest.approx(0.05) and betas[5] == pytest.approx(0.05**0.5)
    assert betas[9] < 1.0 and betas[10] == betas[11] == 1.0
    z = torch.randn(6, 1)
    log_prior, log_lik = loss.potential(z)
    torch.testing.assert_close(loss.log_p(z, torch.tensor(0.25)), log_prior + 0.25 * log_lik)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(model, layers=1, hidden=(8,))
    history = fit_svi(model, guide, steps=400, anneal=0.5, lr=1e-2, progress=False)
    draws = guide.sample_posterior(4000)["z"]
    post_var = 1 / (1 / 9 + 4)
    assert float(draws.mean()) == pytest.approx(post_var * 8, abs=0.05)
    assert len(history.train_loss) == 400
    with pytest.raises(ValueError, match="anneal: expected a fraction"):
        fit_svi(model, guide, steps=4, anneal=2.0)
    with pytest.raises(ValueError, match="anneal: needs a guide of the fast path"):
        fit_svi(model, pyro.infer.autoguide.AutoNormal(model), steps=4, anneal=0.5)
