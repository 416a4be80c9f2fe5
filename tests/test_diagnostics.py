"""PSIS k-hat, importance ESS and ArviZ export, on models whose posterior is known."""

import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import pyroflows as pf
from pyroflows.diagnostics import (
    ESS,
    PSIS,
    importance_ess,
    khat_reading,
    psis_khat,
    to_inference_data,
)
from pyroflows.infer.evidence import ImportanceDraws, importance_draws
from tests.conjugate import EXACT, POST_MEAN, POST_SD, X, guide_with, model


def test_khat_is_good_for_the_exact_posterior():
    result = psis_khat(model, guide_with(1.0), X, num_samples=1000)
    # Constant weights (up to float32 rounding) have no tail at all: k-hat far below 0.5.
    assert isinstance(result, PSIS)
    assert result.khat < 0.5 and result.reading == "good"


def test_khat_flags_a_much_too_narrow_guide():
    # With q 0.2x as wide as the posterior the weights' tail is Pareto with k near
    # 1 - 0.2^2 ~ 0.96 (Yao et al. 2018, for Gaussians); 2000 draws estimate it within ~0.1.
    result = psis_khat(model, guide_with(0.2), X, num_samples=2000)
    assert result.khat > 0.7 and result.reading == "unreliable"


def test_ess_is_all_samples_for_the_exact_posterior_and_few_for_a_narrow_guide():
    exact = importance_ess(model, guide_with(1.0), X, num_samples=800)
    assert isinstance(exact, ESS)
    assert exact.ess == pytest.approx(800, rel=1e-4) and exact.fraction == pytest.approx(
        1, rel=1e-4
    )
    narrow = importance_ess(model, guide_with(0.2), X, num_samples=800)
    # Kish's ESS of a Gaussian proposal 5x too narrow is a few percent of the draws.
    assert 1 <= narrow.ess < 0.2 * 800


@pytest.mark.parametrize(
    ("khat", "reading"),
    [
        (-1.0, "good"),
        (0.49, "good"),
        (0.5, "ok"),
        (0.69, "ok"),
        (0.7, "unreliable"),
        (float("nan"), "unreliable"),
        (float("inf"), "unreliable"),
    ],
)
def test_khat_reading(khat, reading):
    assert khat_reading(khat) == reading


def shaped_model(y):
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    loc = pyro.sample("loc", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("groups", 4):
        effect = pyro.sample("effect", dist.Normal(0.0, scale))
        pyro.sample("y", dist.Normal(effect + loc.sum(), 1.0), obs=y)


def test_inference_data_has_the_sites_in_the_constrained_space():
    guide = AutoNormal(shaped_model)
    y = torch.tensor([0.5, -1.0, 2.0, 0.1])
    guide(y)  # set the guide up
    data = to_inference_data(shaped_model, guide, y, num_samples=64, batch=25)
    posterior = data.posterior
    assert set(posterior.data_vars) == {"scale", "loc", "effect"}
    assert posterior["scale"].shape == (1, 64)
    assert posterior["loc"].shape == (1, 64, 3)
    assert posterior["effect"].shape == (1, 64, 4)
    # AutoNormal samples log(scale); the export holds what the model sees, so it is positive.
    assert bool((posterior["scale"] > 0).all())
    assert data.sample_stats["log_weight"].shape == (1, 64)
    assert "y" not in posterior  # observed sites are data, not posterior draws


def test_log_weights_belong_to_their_draws():
    def one(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(x):
        pyro.sample("z", dist.Normal(0.5, 2.0))

    data = to_inference_data(one, guide, None, num_samples=200, batch=64)
    z = torch.as_tensor(data.posterior["z"].values[0])
    expected = dist.Normal(0.0, 1.0).log_prob(z) - dist.Normal(0.5, 2.0).log_prob(z)
    got = torch.as_tensor(data.sample_stats["log_weight"].values[0], dtype=expected.dtype)
    assert torch.allclose(got, expected, atol=1e-5)


def test_inference_data_without_log_weights():
    data = to_inference_data(model, guide_with(1.0), X, num_samples=10, log_weights=False)
    assert not hasattr(data, "sample_stats")  # InferenceData (ArviZ < 1) and DataTree alike
    assert data.posterior["z"].shape == (1, 10)


def test_all_non_finite_weights_are_refused():
    def positive(x):
        pyro.sample("z", dist.HalfNormal(1.0))

    def outside(x):
        pyro.sample("z", dist.Normal(-5.0, 0.01))  # every draw is outside the model's support

    with pytest.raises(ValueError, match="non-finite log weights"):
        with pyro.validation_enabled(False):
            psis_khat(positive, outside, None, num_samples=50)


def test_the_diagnostics_in_docs_objectives_run_as_written():
    """docs/objectives.md reads psis_khat's result as one object (.khat, .reading), as the
    README does; its evidence and diagnostics examples run on a model with a known posterior."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "objectives.md").read_text()
    section = text[text.index("## The evidence") :]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert any("psis_khat" in block for block in blocks)
    namespace = {"pf": pf, "model": model, "guide": guide_with(1.0), "x": X}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, "docs/objectives.md", "exec"), namespace)
    psis = namespace["psis"]
    assert isinstance(psis, PSIS) and psis.reading == "good" and psis.khat < 0.5
    assert abs(namespace["log_z"] - EXACT) < 1e-3


def test_importance_draws_is_what_the_diagnostics_read():
    pyro.set_rng_seed(0)
    draws = importance_draws(model, guide_with(1.5), (X,), num_samples=300, batch=128, latents=True)
    assert isinstance(draws, ImportanceDraws)
    assert draws.log_weights.shape == (300,) and draws.log_weights.dtype == torch.float64
    assert set(draws.latents) == {"z"} and draws.latents["z"].shape == (300,)
    z = draws.latents["z"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z[:, None], 1.0).log_prob(X).sum(-1)
        - dist.Normal(POST_MEAN, 1.5 * POST_SD).log_prob(z)
    )
    torch.testing.assert_close(draws.log_weights, expected.double(), atol=1e-4, rtol=0)
    pyro.set_rng_seed(0)
    again = importance_draws(model, guide_with(1.5), (X,), num_samples=300, batch=128)
    assert again.latents == {}
    torch.testing.assert_close(again.log_weights, draws.log_weights)
    with pytest.raises(ValueError, match="expected at least one latent sample site"):
        importance_draws(lambda x: None, lambda x: None, (X,), num_samples=10, latents=True)


def test_a_model_keyword_named_like_an_option_of_importance_draws_reaches_the_model():
    # The model's keywords travel apart from the draws' own options: a model keyword
    # ``latents`` is the model's, not a request for latent values.
    seen = []

    def keyword_model(x, latents=None):
        seen.append(latents)
        model(x)

    def keyword_guide(x, latents=None):
        guide_with(1.5)(x)

    pf.diagnostics.psis_khat(keyword_model, keyword_guide, X, num_samples=50, latents="mine")
    data = pf.diagnostics.to_inference_data(
        keyword_model, keyword_guide, X, num_samples=20, latents="mine"
    )
    assert set(seen) == {"mine"} and "z" in data.posterior
