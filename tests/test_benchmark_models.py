"""The posteriordb models of ``benchmarks/posteriors.py`` match their reference draws.

Score (Stein) identity: for the correct density in unconstrained coordinates,
``E[grad_u log p(x, z(u)) + log|dz/du|] = 0`` under the posterior. On 200 reference draws (every
50th), each coordinate's mean gradient over its Monte Carlo standard error must be within noise;
a deliberately wrong density (draws shifted by half a posterior sd) must be rejected. Skipped
when the shared posteriordb data are absent.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import prune_subsample_sites

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "posteriors.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("benchmark_posteriors", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("benchmark_posteriors", module)
    spec.loader.exec_module(module)
    return module


P = _load_module()
NAMES = sorted(P.FOLDERS)
THINNING = 50  # 10,000 draws -> 200
MAX_Z = 4.0  # max over <= 10 coordinates of |N(0, 1)|: exceeded with probability < 1e-3


def _z_scores(post, params: torch.Tensor) -> torch.Tensor:
    log_p, us = P.unconstrained_log_density(post, params)
    grads = torch.autograd.grad(log_p.sum(), list(us.values()))
    g = torch.cat([x.reshape(len(params), -1) for x in grads], dim=-1)
    return g.mean(0) / (g.std(0) / len(params) ** 0.5)


@pytest.fixture(params=NAMES)
def posterior(request):
    if not P.available(request.param):
        pytest.skip(f"shared posteriordb data absent under {P.DATA_ROOT}")
    return P.load(request.param, dtype=torch.float64)


def test_model_runs_and_packs(posterior):
    """One unvectorised run has the declared latent sites and shapes; draws round-trip."""
    values = posterior.from_params(torch.tensor(posterior.draws[:1]))
    values = {k: v[0] for k, v in values.items()}
    trace = poutine.trace(poutine.condition(posterior.model, data=values)).get_trace()
    sites = prune_subsample_sites(trace).nodes
    samples = [name for name, site in sites.items() if site["type"] == "sample"]
    # the declared latents, in order, then one observed data site
    assert samples[:-1] == list(posterior.sites)
    for name, (_, shape, _) in posterior.sites.items():
        assert tuple(sites[name]["value"].shape) == shape
    assert torch.isfinite(trace.log_prob_sum())
    params = torch.tensor(posterior.draws[::THINNING])
    back = posterior.to_params(posterior.from_params(params))
    torch.testing.assert_close(back, params)
    assert len(posterior.param_names) == params.shape[1]


def test_score_identity(posterior):
    params = torch.tensor(posterior.draws[::THINNING])
    z = _z_scores(posterior, params)
    assert torch.isfinite(z).all()
    assert z.abs().max() < MAX_Z, dict(zip(posterior.param_names, z.tolist(), strict=False))


def test_score_identity_rejects_a_wrong_density(posterior):
    """Draws shifted by half a posterior sd in every coordinate: the check has power."""
    params = torch.tensor(posterior.draws[::THINNING])
    sd = params.std(0)
    shifted = params + 0.5 * sd
    assert _z_scores(posterior, shifted).abs().max() > 2 * MAX_Z


def test_vectorised_log_density_matches_unvectorised(posterior):
    """The particle-vectorised model (as the benchmark's objectives run it) agrees with a loop."""
    params = torch.tensor(posterior.draws[:3])
    log_p, _ = P.unconstrained_log_density(posterior, params)
    for i in range(3):
        values = {k: v[0] for k, v in posterior.from_params(params[i : i + 1]).items()}
        trace = poutine.trace(poutine.condition(posterior.model, data=values)).get_trace()
        joint = trace.log_prob_sum()
        log_det = 0.0
        for name, (support, _, _) in posterior.sites.items():
            t = torch.distributions.biject_to(support)
            u = t.inv(values[name])
            log_det = log_det + t.log_abs_det_jacobian(u, values[name]).sum()
        torch.testing.assert_close(log_p[i].detach(), (joint + log_det).detach())
    pyro.clear_param_store()
