"""Tests for pyroflows.infer.objectives: IWAE (standard and DReG), STL_ELBO and the weights.

Most checks use a conjugate Gaussian model with an analytic posterior and log evidence, in
float64, so that exact identities hold to rounding. Statistical checks draw many independent
gradient estimates in ONE call: the problem is replicated R times in a plate ("reps") with one
set of guide parameters per replica, so the objective factorises over the replicas and the
gradient with respect to replica r's parameters is one independent draw of the estimator.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineAutoregressive, Planar
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import AutoRegressiveNN

import pyroflows as pf
from pyroflows.infer.objectives import IWAE, STL_ELBO, log_importance_weights

F64 = torch.float64
D, S = 2, 0.8  # latent dimension, observation noise
X = torch.tensor([[0.5, -1.0], [1.2, -0.4], [0.9, -1.3]], dtype=F64)
N_OBS = X.shape[0]
POST_PREC = 1 + N_OBS / S**2
POST_LOC = X.sum(0) / S**2 / POST_PREC
POST_SCALE = POST_PREC**-0.5
# Each coordinate of the observations is jointly Gaussian: cov = 1 1^T + S^2 I.
LOG_PX = sum(
    dist.MultivariateNormal(
        torch.zeros(N_OBS, dtype=F64),
        torch.ones(N_OBS, N_OBS, dtype=F64) + S**2 * torch.eye(N_OBS, dtype=F64),
    ).log_prob(X[:, j])
    for j in range(D)
).item()
# A guide off the optimum (used for bias and unbiasedness checks).
OFF_LOC, OFF_SCALE = POST_LOC + 0.3, 1.5 * POST_SCALE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny: intra-op threads only add synchronisation, which on a loaded
    # machine costs 10-100x (a 10k-element op waiting for a descheduled worker). Restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(x):
    """z ~ N(prior_loc, I_D); x_i | z ~ N(z, S^2 I_D); prior_loc is a model parameter (0)."""
    prior_loc = pyro.param("prior_loc", lambda: torch.zeros(D, dtype=F64))
    z = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
    with pyro.plate("obs", x.shape[0]):
        pyro.sample("x", dist.Normal(z, S).to_event(1), obs=x)


def make_guide(loc, scale, captured=None):
    def guide(x):
        q_loc = pyro.param("loc", lambda: loc.clone())
        q_scale = pyro.param("scale", lambda: scale.clone(), constraint=constraints.positive)
        z = pyro.sample("z", dist.Normal(q_loc, q_scale).to_event(1))
        if captured is not None:
            captured.append(z.detach())

    return guide


def rep_model(x, reps):
    """``reps`` independent copies of ``model`` (plate dim -1; observations at dim -2)."""
    prior_loc = pyro.param("prior_loc", lambda: torch.zeros(D, dtype=F64))
    with pyro.plate("reps", reps, dim=-1):
        z = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
        with pyro.plate("obs", x.shape[0], dim=-2):
            pyro.sample("x", dist.Normal(z, S).to_event(1), obs=x.unsqueeze(-2))


def make_rep_guide(loc, scale):
    def guide(x, reps):
        q_loc = pyro.param("loc", lambda: loc.expand(reps, D).clone())
        q_scale = pyro.param(
            "scale", lambda: scale.expand(reps, D).clone(), constraint=constraints.positive
        )
        with pyro.plate("reps", reps, dim=-1):
            pyro.sample("z", dist.Normal(q_loc, q_scale).to_event(1))

    return guide


def scale_vector(scale):
    return torch.as_tensor(scale, dtype=F64) * torch.ones(D, dtype=F64)


def guide_grads():
    """Per-replica gradients of (loc, log scale), shape (R, 2 D), then zeroed."""
    store = pyro.get_param_store()
    loc, scale = store["loc"].unconstrained(), store["scale"].unconstrained()
    out = torch.cat([loc.grad, scale.grad], -1).clone()
    loc.grad = scale.grad = None
    return out


def rep_gradients(objective, loc, scale, reps, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    objective.loss_and_grads(rep_model, make_rep_guide(loc, scale_vector(scale)), X, reps)
    return guide_grads()


# ---------------------------------------------------------------------------------------------
# (a) values
# ---------------------------------------------------------------------------------------------


def test_one_particle_iwae_and_stl_equal_trace_elbo_on_the_same_draws():
    guide = make_guide(OFF_LOC, scale_vector(OFF_SCALE))
    pyro.set_rng_seed(1)
    elbo = Trace_ELBO(max_plate_nesting=1).loss(model, guide, X)
    pyro.set_rng_seed(1)
    iwae = IWAE(num_particles=1, max_plate_nesting=1).loss(model, guide, X)
    pyro.set_rng_seed(1)
    stl = STL_ELBO(num_particles=1, max_plate_nesting=1).loss(model, guide, X)
    assert iwae == pytest.approx(elbo, abs=1e-12)
    assert stl == pytest.approx(elbo, abs=1e-12)
    # With K particles STL's value is vectorised Trace_ELBO's (same plate dim, same draws).
    pyro.set_rng_seed(2)
    elbo_k = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    elbo_k = elbo_k.loss(model, guide, X)
    pyro.set_rng_seed(2)
    stl_k = STL_ELBO(num_particles=16, max_plate_nesting=1).loss(model, guide, X)
    assert stl_k == pytest.approx(elbo_k, abs=1e-12)


@pytest.mark.parametrize("num_particles", [1, 3, 50])
def test_exact_posterior_gives_log_evidence_with_zero_variance(num_particles):
    # With q = p(z | x) every weight equals p(x): each bound is log p(x) on every draw.
    guide = make_guide(POST_LOC, scale_vector(POST_SCALE))
    for _ in range(3):
        iwae = IWAE(num_particles, max_plate_nesting=1).loss(model, guide, X)
        stl = STL_ELBO(num_particles, max_plate_nesting=1).loss(model, guide, X)
        assert iwae == pytest.approx(-LOG_PX, abs=1e-10)
        assert stl == pytest.approx(-LOG_PX, abs=1e-10)
    lw = log_importance_weights(model, guide, X, num_particles=num_particles, max_plate_nesting=1)
    assert lw.shape == (num_particles,)
    assert torch.allclose(lw, torch.full_like(lw, LOG_PX), atol=1e-10)


def test_bound_increases_with_particles_towards_log_evidence():
    # Each call averages the bound over R replicas (independent draws); CALLS calls give the
    # mean and its standard error from the spread of the call means.
    reps, calls = 250, 8
    guide = make_rep_guide(OFF_LOC, scale_vector(OFF_SCALE))
    means, ses = {}, {}
    for k in (1, 4, 16, 64, 512):
        objective = IWAE(num_particles=k, max_plate_nesting=2)
        values = torch.tensor(
            [-objective.loss(rep_model, guide, X, reps) / reps for _ in range(calls)]
        )
        means[k], ses[k] = values.mean().item(), values.std().item() / calls**0.5
    print({k: (round(means[k] - LOG_PX, 5), round(ses[k], 5)) for k in means})
    for small, large in [(1, 4), (4, 16), (16, 64)]:
        # strictly increasing, by more than 3 combined standard errors (the gaps are 6 or more)
        assert means[large] - means[small] > 3 * math.hypot(ses[small], ses[large])
    # L_512 is log p(x) within 4 SE once its known bias is allowed for: L_K = log p(x) -
    # Var_q(w / p(x)) / (2K) + O(K^-2), and for Gaussians Var_q(w / p(x)) has a closed form,
    # prod_d s_q^2 / (s_p sqrt(2 s_q^2 - s_p^2)) exp(delta^2 / (2 s_q^2 - s_p^2)) - 1 = 0.94 here,
    # so the bias is 0.0009 (the SE is about 0.0013).
    bias = 0.94 / (2 * 512)
    assert abs(means[512] - (LOG_PX - bias)) < 4 * ses[512]
    assert means[512] < LOG_PX + 4 * ses[512]


# ---------------------------------------------------------------------------------------------
# (b) gradient estimators
# ---------------------------------------------------------------------------------------------


def z_score(a, b):
    """Per-component z statistic of the difference of the means of two independent samples."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    return (a.mean(0) - b.mean(0)).abs() / se


def test_dreg_and_stl_are_unbiased():
    # 4 components each; |z| < 4 has a false-alarm rate of 6e-5 per component under the null.
    reps, k = 4000, 8
    standard = rep_gradients(IWAE(k, "standard", max_plate_nesting=2), OFF_LOC, OFF_SCALE, reps, 0)
    dreg = rep_gradients(IWAE(k, "dreg", max_plate_nesting=2), OFF_LOC, OFF_SCALE, reps, 1)
    elbo = Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=2)
    score = rep_gradients(elbo, OFF_LOC, OFF_SCALE, reps, 2)
    stl = rep_gradients(STL_ELBO(k, max_plate_nesting=2), OFF_LOC, OFF_SCALE, reps, 3)
    print("DReG vs IWAE z:", z_score(dreg, standard), "STL vs ELBO z:", z_score(stl, score))
    assert (z_score(dreg, standard) < 4).all()
    assert (z_score(stl, score) < 4).all()
    # The tests have power: the gradient is several SE away from zero in every component.
    assert (standard.mean(0).abs() / (standard.std(0) / reps**0.5) > 3).all()
    print(
        "variance ratio off the optimum (K=8): DReG/IWAE",
        dreg.var(0) / standard.var(0),
        "STL/ELBO",
        stl.var(0) / score.var(0),
    )


def test_variance_at_the_optimum():
    # At q = p(z | x), d/dz [log p(x, z) - log q(z)] = d/dz log p(x) = 0: the DReG and STL
    # guide gradients vanish on every draw (float64 rounding only), while the standard IWAE and
    # ELBO estimators keep the score term's variance.
    reps, k = 2000, 8
    standard = rep_gradients(
        IWAE(k, "standard", max_plate_nesting=2), POST_LOC, POST_SCALE, reps, 0
    )
    dreg = rep_gradients(IWAE(k, "dreg", max_plate_nesting=2), POST_LOC, POST_SCALE, reps, 1)
    elbo = Trace_ELBO(num_particles=k, vectorize_particles=True, max_plate_nesting=2)
    score = rep_gradients(elbo, POST_LOC, POST_SCALE, reps, 2)
    stl = rep_gradients(STL_ELBO(k, max_plate_nesting=2), POST_LOC, POST_SCALE, reps, 3)
    dreg_ratio = dreg.var(0) / standard.var(0)
    stl_ratio = stl.var(0) / score.var(0)
    print("variance ratio at the optimum: DReG/IWAE", dreg_ratio, "STL/ELBO", stl_ratio)
    assert (standard.var(0) > 1e-3).all() and (score.var(0) > 1e-3).all()
    assert stl.abs().max() < 1e-12
    assert dreg.abs().max() < 1e-12
    assert (dreg_ratio < 1e-20).all() and (stl_ratio < 1e-20).all()


def test_dreg_matches_the_formula_on_the_same_draws():
    # DReG for q = N(loc, diag(scale^2)), z = loc + scale * eps:
    #   dL/dloc = sum_k w_k^2 g_k,  dL/dlog scale = sum_k w_k^2 g_k (z_k - loc),
    #   g_k = d/dz [log p(x, z) - log q(z)] at z_k with q's parameters held fixed.
    # Model parameters get the standard gradient, identical for both estimators on the same
    # draws: dL/dprior_loc = sum_k w_k (z_k - prior_loc).
    k = 6
    loc, scale = OFF_LOC, scale_vector(OFF_SCALE)
    grads = {}
    for estimator in ("standard", "dreg"):
        pyro.clear_param_store()
        captured = []
        pyro.set_rng_seed(5)
        IWAE(k, estimator, max_plate_nesting=1).loss_and_grads(
            model, make_guide(loc, scale, captured), X
        )
        store = pyro.get_param_store()
        grads[estimator] = {
            name: store[name].unconstrained().grad.clone() for name in ("loc", "scale", "prior_loc")
        }
    z = captured[0]
    q = dist.Normal(loc, scale).to_event(1)
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(z.unsqueeze(-2), S).log_prob(X).sum((-1, -2))
        - q.log_prob(z)
    )
    w = torch.softmax(log_w, 0).unsqueeze(-1)
    g = -z + (X.sum(0) - N_OBS * z) / S**2 + (z - loc) / scale**2
    # the loss is -L: gradients of the loss are the negated estimates
    assert torch.allclose(grads["dreg"]["loc"], -(w**2 * g).sum(0), atol=1e-10)
    assert torch.allclose(grads["dreg"]["scale"], -(w**2 * g * (z - loc)).sum(0), atol=1e-10)
    assert torch.allclose(grads["dreg"]["prior_loc"], -(w * z).sum(0), atol=1e-10)
    assert torch.allclose(grads["standard"]["prior_loc"], grads["dreg"]["prior_loc"], atol=1e-12)
    assert not torch.allclose(grads["standard"]["loc"], grads["dreg"]["loc"], atol=1e-3)


@pytest.mark.parametrize("estimator", ["standard", "dreg"])
def test_differentiable_loss_matches_loss_and_grads(estimator):
    guide = make_guide(OFF_LOC, scale_vector(OFF_SCALE))
    objective = IWAE(5, estimator, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    value = objective.loss_and_grads(model, guide, X)
    expected = guide_grads()
    pyro.set_rng_seed(3)
    loss = objective.differentiable_loss(model, guide, X)
    assert loss.item() == pytest.approx(value, abs=1e-12)
    loss.backward()
    assert torch.allclose(guide_grads(), expected, atol=1e-12)


def test_dreg_with_one_particle_is_stl():
    guide = make_guide(OFF_LOC, scale_vector(OFF_SCALE))
    pyro.set_rng_seed(4)
    IWAE(1, "dreg", max_plate_nesting=1).loss_and_grads(model, guide, X)
    dreg = guide_grads()
    pyro.set_rng_seed(4)
    STL_ELBO(1, max_plate_nesting=1).loss_and_grads(model, guide, X)
    assert torch.allclose(guide_grads(), dreg, atol=1e-12)


def test_standard_iwae_score_function_term_is_unbiased_for_discrete_guides():
    # z ~ Bernoulli(0.3), x | z ~ N(2z - 1, 1), q(z) = Bernoulli(sigmoid(logit)); with K = 2 the
    # bound is a finite sum over (z1, z2), so its gradient is exact by enumeration. R replicas
    # give R independent estimates; |z| < 4 as above.
    reps, x, logit0 = 50000, torch.tensor(0.4, dtype=F64), torch.tensor(0.5, dtype=F64)

    def bern_model(reps):
        with pyro.plate("reps", reps):
            z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.3, dtype=F64)))
            pyro.sample("x", dist.Normal(2 * z - 1, 1.0), obs=x)

    def bern_guide(reps):
        logit = pyro.param("logit", lambda: logit0.expand(reps).clone())
        with pyro.plate("reps", reps):
            pyro.sample("z", dist.Bernoulli(logits=logit))

    IWAE(2, max_plate_nesting=1).loss_and_grads(bern_model, bern_guide, reps)
    estimates = -pyro.param("logit").unconstrained().grad

    logit = logit0.clone().requires_grad_()
    q = dist.Bernoulli(logits=logit)
    zs = torch.tensor([0.0, 1.0], dtype=F64)
    log_w = (
        dist.Bernoulli(torch.tensor(0.3, dtype=F64)).log_prob(zs)
        + dist.Normal(2 * zs - 1, 1.0).log_prob(x)
        - q.log_prob(zs)
    )
    bound = sum(
        q.log_prob(zs[i]).exp()
        * q.log_prob(zs[j]).exp()
        * (torch.logaddexp(log_w[i], log_w[j]) - math.log(2))
        for i in range(2)
        for j in range(2)
    )
    (exact,) = torch.autograd.grad(bound, logit)
    se = estimates.std() / reps**0.5
    print("score-function IWAE gradient:", estimates.mean().item(), "+-", se.item(), exact.item())
    assert abs(estimates.mean() - exact) < 4 * se
    pyro.clear_param_store()
    with pytest.raises(NotImplementedError, match="reparameterised guide"):
        IWAE(2, "dreg", max_plate_nesting=1).loss_and_grads(bern_model, bern_guide, 4)
    with pytest.raises(NotImplementedError, match="reparameterised guide"):
        STL_ELBO(2, max_plate_nesting=1).loss_and_grads(bern_model, bern_guide, 4)


# ---------------------------------------------------------------------------------------------
# (c) plates
# ---------------------------------------------------------------------------------------------


def local_model(x, subsample_size=None):
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=F64), 1.0))
        pyro.sample("x", dist.Normal(z, S), obs=x[idx])


def make_local_guide(loc, scale, captured=None):
    def guide(x, subsample_size=None):
        q_loc = pyro.param("loc", lambda: loc.clone())
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(q_loc[idx], scale[idx]))
        if captured is not None:
            captured.append((z.detach(), idx))

    return guide


XL = torch.tensor([0.3, -1.1, 2.0, 0.7], dtype=F64)


def local_log_weights(z, idx, loc, scale):
    """log w_{k,n} (unscaled) for the local model, by hand."""
    x = XL[idx]
    return (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, S).log_prob(x)
        - dist.Normal(loc[idx], scale[idx]).log_prob(z)
    )


@pytest.mark.parametrize("subsample_size", [None, 2])
def test_iwae_factorises_over_a_common_plate(subsample_size):
    # Every site lies in "data": L = (N / B) sum_{n in batch} logmeanexp_k log w_{k,n}, not the
    # joint logmeanexp_k sum_n log w_{k,n} (the two differ by far more than rounding here).
    k = 5
    loc = torch.tensor([0.1, -0.2, 1.0, 0.0], dtype=F64)
    scale = torch.tensor([1.2, 0.8, 1.0, 1.5], dtype=F64)
    captured = []
    guide = make_local_guide(loc, scale, captured)
    pyro.set_rng_seed(7)
    loss = IWAE(k, max_plate_nesting=1).loss(local_model, guide, XL, subsample_size)
    z, idx = captured[0]
    assert z.shape == (k, len(idx))
    log_w = local_log_weights(z, idx, loc, scale)
    factor = len(XL) / len(idx)
    per_point = factor * (torch.logsumexp(log_w, 0) - math.log(k)).sum()
    joint = torch.logsumexp(factor * log_w.sum(1), 0) - math.log(k)
    assert -loss == pytest.approx(per_point.item(), abs=1e-10)
    assert abs(per_point - joint) > 1e-2
    # log_importance_weights is the documented joint (scaled) weight, on the same draws.
    pyro.set_rng_seed(7)
    lw = log_importance_weights(
        local_model, guide, XL, subsample_size, num_particles=k, max_plate_nesting=1
    )
    assert torch.allclose(lw, factor * log_w.sum(1), atol=1e-10)


def test_iwae_uses_joint_weights_with_a_global_latent():
    def model(x):
        g = pyro.sample("g", dist.Normal(torch.zeros((), dtype=F64), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(g, 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x)

    def guide(x):
        pyro.sample("g", dist.Normal(torch.tensor(0.2, dtype=F64), 0.7))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x, 0.9))

    pyro.set_rng_seed(8)
    loss = IWAE(7, max_plate_nesting=1).loss(model, guide, XL)
    pyro.set_rng_seed(8)
    lw = log_importance_weights(model, guide, XL, num_particles=7, max_plate_nesting=1)
    assert -loss == pytest.approx((torch.logsumexp(lw, 0) - math.log(7)).item(), abs=1e-10)


@pytest.mark.parametrize("num_particles", [1, 4])
def test_exact_local_posteriors_give_the_subsampled_log_evidence(num_particles):
    prec = 1 + 1 / S**2
    loc, scale = XL / S**2 / prec, torch.full_like(XL, prec**-0.5)
    log_px = dist.Normal(torch.zeros((), dtype=F64), (1 + S**2) ** 0.5).log_prob(XL)
    captured = []
    guide = make_local_guide(loc, scale, captured)
    loss = IWAE(num_particles, "dreg", max_plate_nesting=1).loss(local_model, guide, XL, 2)
    idx = captured[0][1]
    assert -loss == pytest.approx(2 * log_px[idx].sum().item(), abs=1e-10)


# ---------------------------------------------------------------------------------------------
# (c) flow guides
# ---------------------------------------------------------------------------------------------


def standard_posterior_model():
    # z ~ N(0, 2 I), x | z ~ N(z, 2 I), x = 0: the posterior is N(0, I), which an untrained
    # flow (identity at initialisation) represents exactly.
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 2**0.5).to_event(1))
    pyro.sample("x", dist.Normal(z, 2**0.5).to_event(1), obs=torch.zeros(3))


FLOWS = {
    "iaf": lambda: pf.IAF(3, layers=2, hidden=(8,)),
    "realnvp": lambda: pf.RealNVP(3, layers=2, hidden=(8,), actnorm=False),
}


def pyro_iaf_at_identity():
    """Pyro's own AffineAutoregressive (it caches by tensor identity), zeroed to the identity."""
    network = AutoRegressiveNN(3, [8])
    with torch.no_grad():
        for param in network.layers[-1].parameters():
            param.zero_()
    transform = AffineAutoregressive(network)
    base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    return transform, lambda: dist.TransformedDistribution(base, [transform])


def pyroflows_at_identity(name):
    flow = FLOWS[name]()  # zero-initialised conditioners: the identity
    return flow, flow


AT_POSTERIOR = {
    "iaf": lambda: pyroflows_at_identity("iaf"),
    "realnvp": lambda: pyroflows_at_identity("realnvp"),
    "pyro-affine-autoregressive": pyro_iaf_at_identity,
}


@pytest.mark.parametrize("name", sorted(AT_POSTERIOR))
def test_flow_guide_at_the_posterior_has_zero_stl_and_dreg_gradients(name):
    # A sharp check that log q is re-evaluated with stopped parameters (through the flow's
    # inverse): the score term is what makes the standard estimator's gradient nonzero here.
    # Pyro's transforms would hand back their cached, unfrozen pass for the very same tensor;
    # replaying fresh aliases of the values prevents that (without them, 0.2-0.7 here).
    torch.manual_seed(0)
    module, distribution = AT_POSTERIOR[name]()

    def guide():
        pyro.module("q", module)
        pyro.sample("z", distribution())

    for objective in (IWAE(4, "dreg", max_plate_nesting=0), STL_ELBO(4, max_plate_nesting=0)):
        module.zero_grad()
        objective.loss_and_grads(standard_posterior_model, guide)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and max(g.abs().max().item() for g in grads) < 1e-5
        assert all(p.requires_grad for p in module.parameters())
    module.zero_grad()
    IWAE(4, "standard", max_plate_nesting=0).loss_and_grads(standard_posterior_model, guide)
    assert max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None) > 1e-2


def shifted_model():
    # posterior N((2.88, -1.92, 0.96), 0.04 I): far from the flows' initial N(0, I)
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z, 0.2).to_event(1), obs=torch.tensor([3.0, -2.0, 1.0]))


@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("objective", ["dreg", "stl"])
def test_flow_guide_svi_decreases_the_loss(name, objective):
    torch.manual_seed(0)
    flow = FLOWS[name]()

    def guide():
        pyro.module("q", flow)
        pyro.sample("z", flow())

    loss = IWAE(8, "dreg", max_plate_nesting=0) if objective == "dreg" else STL_ELBO(8)
    svi = SVI(shifted_model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    losses = torch.tensor([svi.step() for _ in range(60)])
    assert torch.isfinite(losses).all()
    # q = N(0, I) starts far from the posterior: the loss falls from 50-100 to about 10 nats
    assert losses[-10:].mean() < losses[:10].mean() - 20


@pytest.mark.parametrize("objective", ["standard", "dreg", "stl"])
def test_vae_with_a_conditional_iaf_guide_and_subsampling(objective):
    torch.manual_seed(0)
    n, b, x_dim, z_dim, c_dim = 64, 16, 6, 2, 8
    mixing = torch.randn(z_dim, x_dim)
    data = torch.randn(n, z_dim) @ mixing + 0.3 * torch.randn(n, x_dim)
    decoder = torch.nn.Linear(z_dim, x_dim)
    encoder = torch.nn.Sequential(torch.nn.Linear(x_dim, c_dim), torch.nn.Tanh())
    q = pf.IAF(z_dim, layers=2, hidden=(16,), context_dim=c_dim)

    def vae_model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", n, subsample_size=b) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.3).to_event(1), obs=x[idx])

    def vae_guide(x):
        pyro.module("encoder", encoder)
        pyro.module("q", q)
        with pyro.plate("data", n, subsample_size=b) as idx:
            pyro.sample("z", q(encoder(x[idx])))

    loss = STL_ELBO(4) if objective == "stl" else IWAE(4, objective)  # max_plate_nesting guessed
    svi = SVI(vae_model, vae_guide, pyro.optim.Adam({"lr": 0.02}), loss=loss)
    losses = torch.tensor([svi.step(data) for _ in range(80)])
    assert loss.max_plate_nesting == 1
    assert torch.isfinite(losses).all()
    # minibatch losses are noisy (scale N/B = 4) but fall from 2500-3500 to about 600 nats
    assert losses[-15:].mean() < 0.5 * losses[:15].mean()
    assert all(p.grad is not None for p in decoder.parameters())


# ---------------------------------------------------------------------------------------------
# validation and hygiene
# ---------------------------------------------------------------------------------------------


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="estimator: expected one of"):
        IWAE(4, estimator="stl")
    with pytest.raises(ValueError, match="num_particles: expected a positive integer"):
        IWAE(0)
    with pytest.raises(TypeError, match="num_particles: expected a positive integer"):
        STL_ELBO(2.5)
    with pytest.raises(TypeError, match="num_particles: expected a positive integer"):
        IWAE(True)
    with pytest.raises(ValueError, match="max_plate_nesting: expected a non-negative"):
        IWAE(4, max_plate_nesting=-1)
    with pytest.raises(ValueError, match="num_particles: expected a positive integer"):
        log_importance_weights(model, make_guide(POST_LOC, scale_vector(1.0)), X, num_particles=0)


@pytest.mark.parametrize("objective", [IWAE(3, "dreg", max_plate_nesting=1), STL_ELBO(3, 1)])
def test_parameters_are_unfrozen_when_the_replay_raises(objective):
    calls = []
    inner = make_guide(OFF_LOC, scale_vector(OFF_SCALE))

    def guide(x):
        calls.append(1)
        if len(calls) > 1:  # the stopped-gradient replay
            assert not pyro.param("loc").unconstrained().requires_grad
            raise RuntimeError("boom")
        inner(x)

    with pytest.raises(RuntimeError, match="boom"):
        objective.loss_and_grads(model, guide, X)
    assert all(p.requires_grad for _, p in pyro.get_param_store().named_parameters())


def planar_guide(model):
    """An AutoFlowGuide over a flow without an inverse (Pyro's planar transform)."""
    return pf.infer.AutoFlowGuide(model, flow=pf.Flow([Planar(2)], dim=2))


def planar_model():
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


@pytest.mark.parametrize(
    ("objective", "name"),
    [
        (lambda: STL_ELBO(2, max_plate_nesting=0), "STL_ELBO"),
        (lambda: IWAE(4, "dreg", max_plate_nesting=0), r"IWAE\(estimator='dreg'\)"),
    ],
    ids=["STL_ELBO", "IWAE-dreg"],
)
def test_a_guide_flow_without_an_inverse_is_refused_by_the_objectives_that_invert(objective, name):
    """They score the guide's draws with stopped parameters, i.e. by inverting the flow (this
    raised Pyro's opaque KeyError from the planar transform's cache)."""
    runs = []

    def counted_model():
        runs.append(1)
        planar_model()

    guide = planar_guide(counted_model)
    guide()  # builds the guide (one unvectorised run of the model, for the prototype)
    runs.clear()
    svi = SVI(counted_model, guide, pyro.optim.Adam({"lr": 0.01}), objective())
    with pytest.raises(
        ValueError,
        match=rf"{name}: expected a guide whose transforms have inverses.*Planar, which has no",
    ):
        svi.step()
    assert not runs  # refused before the model ran
    assert math.isfinite(svi.evaluate_loss())  # the bound itself needs no inverse


@pytest.mark.parametrize("objective", [lambda: IWAE(4), Trace_ELBO], ids=["IWAE", "Trace_ELBO"])
def test_a_guide_flow_without_an_inverse_trains_with_objectives_that_do_not_invert(objective):
    guide = planar_guide(planar_model)
    svi = SVI(planar_model, guide, pyro.optim.Adam({"lr": 0.01}), objective())
    assert all(math.isfinite(svi.step()) for _ in range(3))


# ---------------------------------------------------------------------------------------------
# DReG with an IAF guide off the optimum, and particles of zero weight
# ---------------------------------------------------------------------------------------------


def test_dreg_gradient_of_an_iaf_guide_off_the_optimum_matches_an_independent_reference():
    # The objective scores the IAF's own draws with frozen parameters by inverting the flow
    # (dim sequential passes per layer). The reference never inverts: with z = T(eps),
    #   d log q / dz = J^{-T} d/deps [log N(eps) - log|det J(eps)|],   J = dT/deps,
    # and DReG's flow gradient is sum_k w_k^2 (d log p/dz - d log q/dz)_k . dz_k/dphi.
    torch.manual_seed(0)
    flow = pf.IAF(D, layers=3, hidden=(8,)).to(F64)
    with torch.no_grad():  # off the identity, hence off the optimum
        for param in flow.parameters():
            param.add_(0.4 * torch.randn_like(param))
    captured = []

    def guide(x):
        pyro.module("q", flow)
        z = pyro.sample("z", flow())
        captured.append(z.detach())

    def forward(eps):
        out = eps
        for t in flow().transforms:
            out = t(out)
        return out

    k = 6
    pyro.clear_param_store()
    flow.zero_grad()
    pyro.set_rng_seed(3)
    IWAE(k, "dreg", max_plate_nesting=1).loss_and_grads(model, guide, X)
    dreg = [p.grad.clone() for p in flow.parameters()]
    z = captured[0].reshape(k, D)
    eps = z.clone()
    for t in reversed(flow().transforms):
        eps = t.inv(eps)
    eps = eps.detach()
    assert torch.allclose(forward(eps), z, atol=1e-10)

    def log_q(e):
        jac = torch.autograd.functional.jacobian(forward, e, create_graph=True)
        return dist.Normal(0.0, 1.0).log_prob(e).sum() - torch.linalg.slogdet(jac)[1]

    grad_q, lq = [], []
    for i in range(k):
        e = eps[i].clone().requires_grad_(True)
        value = log_q(e)
        (g_eps,) = torch.autograd.grad(value, e)
        jac = torch.autograd.functional.jacobian(forward, eps[i])
        grad_q.append(torch.linalg.solve(jac.T, g_eps))
        lq.append(value.detach())
    grad_q, lq = torch.stack(grad_q), torch.stack(lq)
    log_p = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(z.unsqueeze(-2), S).log_prob(
        X
    ).sum((-1, -2))
    grad_p = -z + (X.sum(0) - N_OBS * z) / S**2
    w = torch.softmax(log_p - lq, 0).unsqueeze(-1)
    assert w.max() < 0.99  # several particles carry weight
    flow.zero_grad()
    surrogate = (w**2 * (grad_p - grad_q) * forward(eps)).sum()
    (-surrogate).backward()
    reference = [p.grad.clone() for p in flow.parameters()]
    total = torch.cat([r.flatten() for r in reference]).norm()
    assert total > 1e-2
    for got, want in zip(dreg, reference, strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-8 * total)


def test_dreg_and_standard_iwae_agree_in_mean_for_an_iaf_guide_off_the_optimum():
    # Unbiasedness with a non-Gaussian (flow) guide, whose frozen log q needs the IAF inverse.
    torch.manual_seed(1)
    flow = pf.IAF(D, layers=2, hidden=(8,)).to(F64)
    with torch.no_grad():
        for param in flow.parameters():
            param.add_(0.3 * torch.randn_like(param))

    def guide(x):
        pyro.module("q", flow)
        pyro.sample("z", flow())

    reps, k = 600, 4
    grads = {}
    for seed, estimator in enumerate(("standard", "dreg")):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        objective = IWAE(k, estimator, max_plate_nesting=1)
        rows = []
        for _ in range(reps):
            flow.zero_grad()
            objective.loss_and_grads(model, guide, X)
            rows.append(torch.cat([p.grad.flatten() for p in flow.parameters()]))
        grads[estimator] = torch.stack(rows)
    z = z_score(grads["dreg"], grads["standard"])
    z = z[torch.isfinite(z)]  # parameters that never get a gradient (MADE's masked weights)
    # ~100 components: |z| < 4.5 everywhere has a false-alarm rate below 1e-3
    assert z.numel() > 20 and (z < 4.5).all()
    assert z.pow(2).mean() < 2.0  # about 1 under the null


def test_dreg_particles_of_zero_weight_contribute_zero_not_nan():
    # A particle far in the tails, whose variance exp(u)^2 underflows to 0 (float32, u < -52),
    # has weight exactly 0, but autograd evaluates d log N(x; 0, sigma)/d var = inf along its
    # path and multiplies it by that 0. Its exact contribution is 0; the gradient is the DReG
    # formula over the other particles.
    x = torch.tensor([0.3, -0.5, 0.8])
    k = 32
    captured = []

    def sigma_model():
        u = pyro.sample("u", dist.Normal(0.0, 100.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(0.0, u.exp()), obs=x)

    def sigma_guide():
        loc = pyro.param("loc", torch.tensor(-30.0))
        scale = pyro.param("scale", torch.tensor(20.0), constraint=constraints.positive)
        captured.append(pyro.sample("u", dist.Normal(loc, scale)).detach())

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    loss = IWAE(k, "dreg", max_plate_nesting=1).loss_and_grads(sigma_model, sigma_guide)
    u = captured[0].reshape(k)
    assert (u.exp().pow(2) == 0).any() and (u.exp() > 0).all()  # some variances underflow
    assert math.isfinite(loss)
    store = pyro.get_param_store()
    got = torch.stack([store[n].unconstrained().grad for n in ("loc", "scale")])
    assert torch.isfinite(got).all()
    with torch.no_grad():
        alive = u.exp().pow(2) > 0
        ua = u[alive].double()
        log_p = dist.Normal(0.0, 100.0).log_prob(ua) + dist.Normal(
            0.0, ua.exp().unsqueeze(-1)
        ).log_prob(x.double()).sum(-1)
        log_q = dist.Normal(-30.0, 20.0).log_prob(ua)
        w = torch.softmax(log_p - log_q, 0)
        g = -ua / 100.0**2 + (-1 + x.double().pow(2) * (-2 * ua).exp().unsqueeze(-1)).sum(-1)
        g = g + (ua + 30.0) / 20.0**2  # - d log q / du, with q = N(-30, 20^2)
        want = -torch.stack([(w**2 * g).sum(), (w**2 * g * (ua + 30.0)).sum()])
    assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-4 * want.abs().max())


def test_dreg_with_an_iaf_autoflowguide_on_a_scale_model_stays_finite():
    # The reported failure: 52 steps in, one IAF particle's log sigma reached -25 and beyond,
    # sigma underflowed, and 0 * inf = nan in the frozen model replay poisoned every gradient.
    def scale_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, sigma), obs=x)

    pyro.clear_param_store()
    torch.manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(100)
    guide = pf.infer.AutoFlowGuide(scale_model, flow="iaf")
    svi = SVI(scale_model, guide, pyro.optim.Adam({"lr": 1e-2}), IWAE(8, estimator="dreg"))
    losses = torch.tensor([svi.step(x) for _ in range(70)])
    assert torch.isfinite(losses).all()
    for param in pyro.get_param_store().values():
        assert torch.isfinite(param).all()
    pyro.clear_param_store()
