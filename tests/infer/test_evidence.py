"""log_evidence on conjugate Normal models, where log p(x) is known exactly."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyroflows.infer.evidence import log_evidence
from tests.conjugate import EXACT, X, guide_with, model


def test_exact_guide_gives_exact_evidence():
    estimate, se = log_evidence(model, guide_with(1.0), X, num_samples=500)
    # Every weight equals p(x); only float32 rounding of log p(x, z) - log q(z) remains.
    assert estimate == pytest.approx(EXACT, abs=1e-4)
    assert se < 1e-5


def test_wide_guide_is_within_a_few_standard_errors():
    estimate, se = log_evidence(model, guide_with(1.5), X, num_samples=4000)
    # 4 SE: a false failure has probability ~6e-5 (the bias, O(1/n), is far below one SE here).
    assert abs(estimate - EXACT) < 4 * se
    assert 0 < se < 0.05


def test_standard_error_matches_the_spread_over_repeats():
    runs = [log_evidence(model, guide_with(1.5), X, num_samples=400) for _ in range(30)]
    estimates = torch.tensor([r[0] for r in runs])
    mean_se = sum(r[1] for r in runs) / len(runs)
    # The sample sd of 30 estimates has a relative error of about 1 / sqrt(58) = 13%; a ratio
    # in [0.6, 1.6] leaves more than 3 of those on each side.
    assert 0.6 < estimates.std().item() / mean_se < 1.6


def test_chunking_is_statistically_invariant():
    pyro.set_rng_seed(1)
    one, se_one = log_evidence(model, guide_with(1.5), X, num_samples=4000, batch=4000)
    pyro.set_rng_seed(1)
    many, se_many = log_evidence(model, guide_with(1.5), X, num_samples=4000, batch=300)
    # Different chunkings consume the generator differently, so the draws differ: the two
    # estimates must agree within 4 combined standard errors.
    assert abs(one - many) < 4 * (se_one**2 + se_many**2) ** 0.5


def test_local_latents_in_a_plate():
    # z_i ~ N(0, 1), x_i ~ N(z_i, 1) independently: log p(x) = sum_i log N(x_i; 0, 2), and the
    # exact posterior N(x_i / 2, 1 / 2) gives constant weights.
    def local_model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def local_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))

    exact = dist.Normal(0.0, 2**0.5).log_prob(X).sum().item()
    estimate, se = log_evidence(local_model, local_guide, X, num_samples=300, batch=128)
    assert estimate == pytest.approx(exact, abs=1e-4)
    assert se < 1e-5


def test_no_gradients_are_recorded():
    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))

    log_evidence(model, guide, X, num_samples=50)
    assert pyro.param("loc").grad is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 1}, "num_samples: expected at least 2"),
        ({"num_samples": 0}, "num_samples: expected a positive integer"),
        ({"batch": 0}, "batch: expected a positive integer"),
        ({"num_samples": 10.0}, "num_samples: expected a positive integer"),
    ],
)
def test_rejects_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        log_evidence(model, guide_with(1.0), X, **kwargs)
