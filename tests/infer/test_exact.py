"""PSIS-corrected draws and NeuTra MCMC, on models whose posterior is known."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyroflows.infer import AutoFlowGuide, fit_svi
from pyroflows.infer.exact import (
    NeuTraModel,
    PSISDraws,
    _resample,
    neutra,
    psis_draws,
)
from tests.conjugate import POST_MEAN, POST_SD, X, model

# ---------------------------------------------------------------------------------------------
# PSIS-corrected draws
# ---------------------------------------------------------------------------------------------


def off_guide(x):
    """Half a posterior sd off centre and 1.4x too wide: a deliberately imperfect guide."""
    pyro.sample("z", dist.Normal(POST_MEAN + 0.5 * POST_SD, 1.4 * POST_SD))


@pytest.mark.parametrize("method", ["systematic", "multinomial"])
def test_resampled_draws_match_the_exact_posterior(method):
    result = psis_draws(model, off_guide, X, num_samples=8000, method=method, seed=1)
    assert isinstance(result, PSISDraws)
    z = result.draws["z"]
    assert z.shape == (8000,) and result.num_samples == 8000
    assert result.reading == "good" and result.khat < 0.5
    # A guide wider than the posterior: bounded weights, an ESS of a large fraction of draws.
    assert 0.5 * 8000 < result.ess <= 8000
    # Monte Carlo error of the mean is about sd / sqrt(ess) (~0.014 sd here); 4 of those
    # leaves a false failure below 1e-4, while the guide's own mean is 0.5 sd off.
    tolerance = 4 * POST_SD / math.sqrt(result.ess)
    assert abs(z.mean().item() - POST_MEAN) < tolerance < 0.5 * POST_SD
    # The sd's relative error is about 1 / sqrt(2 ess) (~1%): within 5% of the exact one,
    # where the guide's is 40% too large.
    assert z.std().item() == pytest.approx(POST_SD, rel=0.05)


def test_systematic_resampling_keeps_each_draw_floor_or_ceil_of_its_share():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0], dtype=torch.float64)
    for seed in range(5):
        index = _resample(probs, 100, "systematic", torch.Generator().manual_seed(seed))
        counts = torch.bincount(index, minlength=len(probs)).double()
        share = 100 * probs
        assert ((counts >= share.floor()) & (counts <= share.ceil())).all(), counts
        assert counts.sum() == 100 and counts[-1] == 0  # a zero weight is never drawn
    # Shuffled: the draws do not come sorted by index (ArviZ reads a chain's order).
    assert not torch.equal(index, index.sort().values)


def test_a_narrow_guide_warns_about_khat():
    def narrow(x):
        pyro.sample("z", dist.Normal(POST_MEAN, 0.2 * POST_SD))

    # q 0.2x as wide as the posterior: Pareto tail with k near 0.96 (Yao et al., 2018).
    with pytest.warns(UserWarning, match=r"PSIS k-hat = .* >= 0.7.*neutra"):
        result = psis_draws(model, narrow, X, num_samples=2000, seed=0)
    assert result.reading == "unreliable" and result.khat > 0.7


def test_a_good_guide_does_not_warn(recwarn):
    psis_draws(model, off_guide, X, num_samples=2000, seed=0)
    assert not [w for w in recwarn if "k-hat" in str(w.message)]


def test_a_seed_reproduces_the_draws_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    one = psis_draws(model, off_guide, X, num_samples=500, num_draws=300, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the global state was restored
    two = psis_draws(model, off_guide, X, num_samples=500, num_draws=300, seed=7)
    other = psis_draws(model, off_guide, X, num_samples=500, num_draws=300, seed=8)
    assert one.draws["z"].shape == (300,)
    assert torch.equal(one.draws["z"], two.draws["z"]) and one.khat == two.khat
    assert not torch.equal(one.draws["z"], other.draws["z"])


def shaped_model(y):
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    loc = pyro.sample("loc", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("groups", 4):
        effect = pyro.sample("effect", dist.Normal(0.0, scale))
        pyro.sample("y", dist.Normal(effect + loc.sum(), 1.0), obs=y)


@pytest.mark.filterwarnings("ignore:PSIS k-hat")  # an untrained guide: only shapes matter here
def test_draws_and_inference_data_have_the_sites_in_the_constrained_space():
    y = torch.tensor([0.5, -1.0, 2.0, 0.1])
    guide = AutoNormal(shaped_model)
    guide(y)
    result = psis_draws(
        shaped_model, guide, y, num_samples=200, num_draws=50, inference_data=True, batch=64
    )
    assert {name: tuple(v.shape) for name, v in result.draws.items()} == {
        "scale": (50,),
        "loc": (50, 3),
        "effect": (50, 4),
    }
    assert bool((result.draws["scale"] > 0).all())
    posterior = result.inference_data.posterior
    assert set(posterior.data_vars) == {"scale", "loc", "effect"}
    assert posterior["loc"].shape == (1, 50, 3) and posterior["effect"].shape == (1, 50, 4)
    assert torch.equal(torch.as_tensor(posterior["loc"].values[0]), result.draws["loc"])
    assert psis_draws(shaped_model, guide, y, num_samples=20).inference_data is None


def test_resampled_values_are_guide_draws():
    # Each resampled value is one of the guide's own draws (resampling invents nothing).
    result = psis_draws(model, off_guide, X, num_samples=300, num_draws=1000, seed=3)
    assert len(torch.unique(result.draws["z"])) <= 300


def test_a_guide_outside_the_support_is_refused():
    def positive(x):
        pyro.sample("z", dist.HalfNormal(1.0))

    def outside(x):
        pyro.sample("z", dist.Normal(-5.0, 0.01))  # every draw is outside the model's support

    with pytest.raises(ValueError, match="non-finite log weights"):
        with pyro.validation_enabled(False):
            psis_draws(positive, outside, None, num_samples=50)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"method": "stratified"}, ValueError, "method: expected one of"),
        ({"num_draws": 0}, ValueError, "num_draws: expected a positive integer; got 0"),
        ({"num_samples": 1}, ValueError, "num_samples: expected at least 2"),
        ({"seed": 1.5}, TypeError, "seed: expected an integer or None; got 1.5"),
    ],
)
def test_bad_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        psis_draws(model, off_guide, X, **options)


# ---------------------------------------------------------------------------------------------
# NeuTra
# ---------------------------------------------------------------------------------------------


def known_model(x):
    """z | x is the conjugate posterior; scale and effects keep their priors (no data)."""
    model(x)
    pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("groups", 3):
        pyro.sample("effect", dist.Normal(0.0, 1.0))


# RealNVP's map is checked below, without the NUTS run (~3 s each).
@pytest.mark.parametrize("flow", ["iaf", "nsf"])
def test_neutra_nuts_after_fit_svi_samples_the_posterior(flow):
    guide = AutoFlowGuide(known_model, flow=flow, layers=2, hidden=(16,))
    fit_svi(known_model, guide, X, steps=150, lr=0.02, progress=False, seed=0)
    reparameterised = neutra(known_model, guide)
    assert isinstance(reparameterised, NeuTraModel)
    assert reparameterised.latent_name == "z_shared_latent"
    mcmc = MCMC(NUTS(reparameterised), num_samples=100, warmup_steps=100, disable_progbar=True)
    mcmc.run(X)
    latent = mcmc.get_samples()
    assert set(latent) == {"z_shared_latent"} and latent["z_shared_latent"].shape == (100, 5)
    samples = reparameterised.transform_samples(latent)
    assert {name: tuple(v.shape) for name, v in samples.items()} == {
        "z": (100,),
        "scale": (100,),
        "effect": (100, 3),
    }
    assert bool((samples["scale"] > 0).all())
    # Rough moments from 100 correlated draws: the posterior sd of each coordinate is
    # 1 (log scale, effects) or POST_SD (z); 0.5 sd for a mean and a factor 2 for an sd
    # leave room for an effective sample size down to ~20.
    z, log_scale = samples["z"], samples["scale"].log()
    assert abs(z.mean() - POST_MEAN) < 0.5 * POST_SD
    assert 0.5 * POST_SD < z.std() < 2 * POST_SD
    assert abs(log_scale.mean()) < 0.5 and 0.5 < log_scale.std() < 2
    assert abs(samples["effect"].mean()) < 0.5 and 0.5 < samples["effect"].std() < 2
    grouped = reparameterised.transform_samples(mcmc.get_samples(group_by_chain=True))
    assert grouped["effect"].shape == (1, 100, 3)
    torch.testing.assert_close(grouped["effect"][0], samples["effect"])


@pytest.mark.parametrize("flow", ["iaf", "nsf", "realnvp"])
def test_transform_samples_gives_what_the_reparameterised_model_sees(flow):
    guide = AutoFlowGuide(known_model, flow=flow, layers=1, hidden=(8,), init_scale=0.5)
    guide(X)
    reparameterised = neutra(known_model, guide)
    latent = torch.randn(4, guide.latent_dim)
    samples = reparameterised.transform_samples(latent)
    for i in range(4):
        conditioned = poutine.condition(reparameterised, {"z_shared_latent": latent[i]})
        trace = poutine.trace(conditioned).get_trace(X)
        for name in ("z", "scale", "effect"):
            torch.testing.assert_close(trace.nodes[name]["value"], samples[name][i])


def test_neutra_takes_pyro_autocontinuous_guides():
    guide = AutoMultivariateNormal(known_model)
    guide(X)
    reparameterised = neutra(known_model, guide)
    samples = reparameterised.transform_samples(torch.zeros(2, 3, 5))
    assert samples["effect"].shape == (2, 3, 3)


def test_neutra_refuses_what_it_cannot_use():
    with pytest.raises(TypeError, match=r"expected an AutoContinuous guide.*got AutoNormal"):
        neutra(known_model, AutoNormal(known_model))
    with pytest.raises(TypeError, match=r"expected an AutoContinuous guide.*got function"):
        neutra(known_model, off_guide)
    with pytest.raises(ValueError, match="expected a trained guide"):
        neutra(known_model, AutoFlowGuide(known_model))
    with pytest.raises(TypeError, match="model: expected a callable"):
        neutra(None, AutoFlowGuide(known_model))
    guide = AutoFlowGuide(known_model, layers=1, hidden=(8,))
    guide(X)
    reparameterised = neutra(known_model, guide)
    with pytest.raises(ValueError, match="expected a dict with the site 'z_shared_latent'"):
        reparameterised.transform_samples({"z": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"expected draws of shape \(\*batch, 5\); got \(3, 4\)"):
        reparameterised.transform_samples(torch.zeros(3, 4))
