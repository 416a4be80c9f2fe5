"""The posteriordb models of ``benchmarks/posteriors.py`` match their reference draws.

Score (Stein) identity: for the correct density in unconstrained coordinates,
``E[grad_u log p(x, z(u)) + log|dz/du|] = 0`` under the posterior. On 200 reference draws (every
50th), each coordinate's mean gradient over its Monte Carlo standard error must be within noise;
a deliberately wrong density (draws shifted by half a posterior sd) must be rejected. Each
model's joint log density also matches the README's formula written out directly with
``scipy.stats`` (up to the additive constant Stan drops). The NumPyro versions of the models and
of ``vi.py``'s synthetic targets (``benchmarks/numpyro_peers.py``) have the same log density in
the same unconstrained coordinates, constants included, so ELBOs compare across libraries
(skipped without numpyro). Skipped when the shared posteriordb data are absent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.poutine.util import prune_subsample_sites

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_module(name: str = "posteriors"):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"benchmark_{name}", module)
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


# -- the README formulas, written out directly ----------------------------------------------------
def _data(post) -> dict:
    with open(P.DATA_ROOT / post.folder / "data.json") as f:
        return json.load(f)


def _direct_eight_schools(d, p):
    st = pytest.importorskip("scipy.stats")
    theta, mu, tau = p[:, :8], p[:, 8], p[:, 9]
    trans = (theta - mu[:, None]) / tau[:, None]  # the model's latent
    prior = st.norm.logpdf(mu, 0, 5) + st.halfcauchy.logpdf(tau, scale=5)
    prior = prior + st.norm.logpdf(trans).sum(-1)
    return prior + st.norm.logpdf(np.array(d["y"]), theta, np.array(d["sigma"])).sum(-1)


def _direct_kidiq(d, p):
    st = pytest.importorskip("scipy.stats")
    beta, sigma = p[:, :4], p[:, 4]
    hs, iq = np.array(d["mom_hs"]), np.array(d["mom_iq"])
    mean = beta[:, :1] + beta[:, 1:2] * hs + beta[:, 2:3] * iq + beta[:, 3:4] * hs * iq
    lik = st.norm.logpdf(np.array(d["kid_score"]), mean, sigma[:, None]).sum(-1)
    return lik + st.halfcauchy.logpdf(sigma, scale=2.5)


def _direct_mesquite(d, p):
    st = pytest.importorskip("scipy.stats")
    beta, sigma = p[:, :7], p[:, 7]
    c = {k: np.array(v, dtype=float) for k, v in d.items() if isinstance(v, list)}
    d1, d2 = c["diam1"], c["diam2"]
    cols = [
        np.ones_like(d1),
        np.log(d1 * d2 * c["canopy_height"]),
        np.log(d1 * d2),
        np.log(d1 / d2),
        np.log(c["total_height"]),
        np.log(c["density"]),
        c["group"],
    ]
    mean = sum(beta[:, k : k + 1] * col for k, col in enumerate(cols))
    return st.norm.logpdf(np.log(c["weight"]), mean, sigma[:, None]).sum(-1)


def _direct_arK(d, p):
    st = pytest.importorskip("scipy.stats")
    K, T, y = int(d["K"]), int(d["T"]), np.array(d["y"])
    alpha, beta, sigma = p[:, 0], p[:, 1 : K + 1], p[:, K + 1]
    out = st.norm.logpdf(alpha, 0, 10) + st.norm.logpdf(beta, 0, 10).sum(-1)
    out = out + st.halfcauchy.logpdf(sigma, scale=2.5)
    for t in range(K, T):  # Stan's t = K + 1, ..., T
        mean = alpha + sum(beta[:, k - 1] * y[t - k] for k in range(1, K + 1))
        out = out + st.norm.logpdf(y[t], mean, sigma)
    return out


def _direct_diamonds(d, p):
    st = pytest.importorskip("scipy.stats")
    X = np.array(d["X"])[:, 1:]
    Xc = X - X.mean(0)
    b, intercept, sigma = p[:, :24], p[:, 24], p[:, 25]
    prior = st.norm.logpdf(b, 0, 1).sum(-1) + st.t.logpdf(intercept, 3, 8, 10)
    prior = prior + st.t.logpdf(sigma, 3, 0, 10)  # half-t: the factor 2 is a constant
    mean = intercept[:, None] + b @ Xc.T
    return prior + st.norm.logpdf(np.array(d["Y"]), mean, sigma[:, None]).sum(-1)


def _direct_gp_pois_regr(d, p):
    st = pytest.importorskip("scipy.stats")
    x, k = np.array(d["x"]), np.array(d["k"])
    rho, alpha, f = p[:, 0], p[:, 1], p[:, 2:]
    out = st.gamma.logpdf(rho, 25, scale=1 / 4) + st.halfnorm.logpdf(alpha, scale=2)
    for i in range(len(p)):
        K = alpha[i] ** 2 * np.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * rho[i] ** 2))
        f_tilde = np.linalg.solve(np.linalg.cholesky(K + 1e-10 * np.eye(len(x))), f[i])
        out[i] += st.norm.logpdf(f_tilde).sum() + st.poisson.logpmf(k, np.exp(f[i])).sum()
    return out


def _direct_low_dim_gauss_mix(d, p):
    st = pytest.importorskip("scipy.stats")
    y = np.array(d["y"])
    mu, sigma, theta = p[:, :2], p[:, 2:4], p[:, 4]
    prior = st.norm.logpdf(mu, 0, 2).sum(-1) + st.halfnorm.logpdf(sigma, scale=2).sum(-1)
    prior = prior + st.beta.logpdf(theta, 5, 5)
    one = theta[:, None] * st.norm.pdf(y, mu[:, :1], sigma[:, :1])
    two = (1 - theta[:, None]) * st.norm.pdf(y, mu[:, 1:], sigma[:, 1:])
    return prior + np.log(one + two).sum(-1)


def _direct_garch(d, p):
    st = pytest.importorskip("scipy.stats")
    y = np.array(d["y"])
    mu, alpha0, alpha1, beta1 = p.T
    s2 = np.full_like(mu, d["sigma1"] ** 2)
    out = st.norm.logpdf(y[0], mu, np.sqrt(s2))
    for t in range(1, len(y)):
        s2 = alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * s2
        out = out + st.norm.logpdf(y[t], mu, np.sqrt(s2))
    # flat on (alpha1, beta1); the model's latent is beta1 / (1 - alpha1): Jacobian 1 - alpha1
    return out + np.log(1 - alpha1)


DIRECT = {name: globals()[f"_direct_{name}"] for name in NAMES}


def test_log_density_matches_the_readme_formula(posterior):
    """The model's joint log density at 20 reference draws (in its own latent coordinates)
    equals the README's model written out with scipy, up to one additive constant."""
    params = torch.tensor(posterior.draws[::500])
    values = posterior.from_params(params)
    with pyro.plate("particles", len(params), dim=-2):
        vec = {k: v.reshape(len(params), *posterior.sites[k][2]) for k, v in values.items()}
        trace = poutine.trace(poutine.condition(posterior.model, data=vec)).get_trace()
    trace = prune_subsample_sites(trace)
    trace.compute_log_prob()
    ours = sum(
        s["log_prob"].reshape(len(params), -1).sum(-1)
        for s in trace.nodes.values()
        if s["type"] == "sample"
    ).numpy()
    direct = DIRECT[posterior.name](_data(posterior), params.numpy())
    diff = ours - direct
    # float64 throughout: differences of a few 1e-9 come from sums of ~5000 terms
    np.testing.assert_allclose(diff - diff.mean(), 0.0, atol=1e-6)


# -- the NumPyro twins of the targets -------------------------------------------------------------
@pytest.fixture(scope="module")
def peers():
    pytest.importorskip("numpyro")
    return _load_module("numpyro_peers")


def _numpyro_log_density(peers, name: str, us: dict[str, torch.Tensor]) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    from numpyro.infer.util import potential_energy

    with peers._x64(name in peers.X64_TARGETS):  # as numpyro_peers.py runs it
        model = peers.numpyro_model(name)
        # jit(vmap): eager JAX compiles each operation on first use, ten times slower here
        log_density = jax.jit(jax.vmap(lambda u: -potential_energy(model, (), {}, u)))
        return np.asarray(log_density({k: jnp.asarray(v.numpy()) for k, v in us.items()}))


def test_numpyro_posterior_matches_pyro(posterior, peers):
    params = torch.tensor(posterior.draws[::2500])  # 4 draws
    log_p, us = P.unconstrained_log_density(posterior, params)
    theirs = _numpyro_log_density(peers, posterior.name, {k: v.detach() for k, v in us.items()})
    ours = log_p.detach().numpy()
    # NumPyro computes in float32: a relative error of 1e-6 on sums of up to 5000 terms
    np.testing.assert_allclose(theirs, ours, rtol=2e-5, atol=1e-3)


@pytest.mark.parametrize("name", ["funnel10", "banana2", "banana10", "mixture2", "mixture10"])
def test_numpyro_synthetic_target_matches_pyro(name, peers):
    vi = peers.vi
    model = vi.make_target(name).model
    trace = poutine.trace(model).get_trace()
    sites = [
        s for s, site in trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]
    ]
    generator = torch.Generator().manual_seed(0)
    us = {
        s: 2 * torch.randn((4, *trace.nodes[s]["value"].shape), generator=generator) for s in sites
    }
    ours = []
    for i in range(4):
        point = {s: v[i] for s, v in us.items()}
        ours.append(
            float(poutine.trace(poutine.condition(model, point)).get_trace().log_prob_sum())
        )
    theirs = _numpyro_log_density(peers, name, us)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-4)
