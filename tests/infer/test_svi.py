"""fit_svi and fit_target: convergence, minibatch scaling, guards, best state, resume."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

import pyroflows as pf
from pyroflows.engine.losses import load_store as _load_store
from pyroflows.infer import fit_svi, fit_target

# z ~ N(0, 1), x_i | z ~ N(z, 1): z | x ~ N(sum(x) / (1 + N), 1 / (1 + N)).
X = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.9, 1.4, 0.2, 1.1])


def model(x, size=None, subsample=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def normal_guide(x, size=None, subsample=None):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def delta_guide(x, size=None, subsample=None):
    pyro.sample("z", dist.Delta(pyro.param("loc", torch.tensor(0.5))))


def full_loss(x, loc):
    """The exact negative ELBO of delta_guide: -log p(z = loc) - sum_i log p(x_i | loc)."""
    loc = torch.as_tensor(loc)
    return -(dist.Normal(0.0, 1.0).log_prob(loc) + dist.Normal(loc, 1.0).log_prob(x).sum()).item()


def test_bayesian_model_reaches_the_posterior():
    history = fit_svi(model, normal_guide, X, steps=600, lr=0.05, progress=False, seed=0)
    n = len(X)
    # Adam at lr 0.05 with a 1-sample ELBO leaves a jitter of a few hundredths in each
    # parameter; 0.1 is a tolerance well above it and well below the prior-to-posterior shift.
    assert pyro.param("loc").item() == pytest.approx(X.sum().item() / (1 + n), abs=0.1)
    assert pyro.param("scale").item() == pytest.approx((1 / (1 + n)) ** 0.5, abs=0.1)
    assert len(history.train_loss) == history.steps == 600
    assert history.best_step is None and history.valid_nll == []


def test_minibatch_loss_is_unbiased_for_the_full_data_loss():
    torch.manual_seed(0)
    x = torch.randn(60) + 1.0
    # A Delta guide makes each minibatch loss deterministic, and lr 0 keeps the parameter fixed:
    # over one epoch (6 batches of 10 partitioning the data) the mean of the N/B-scaled
    # minibatch losses must equal the full-data loss (global prior counted once) exactly.
    history = fit_svi(
        model,
        delta_guide,
        data=x,
        batch_size=10,
        epochs=1,
        optimizer=pyro.optim.SGD({"lr": 0.0}),
        progress=False,
        seed=0,
    )
    assert len(history.train_loss) == 6
    per_point = sum(history.train_loss) / 6
    assert per_point * len(x) == pytest.approx(full_loss(x, 0.5), rel=1e-5)
    # Each minibatch differs from it (the scaling is not a plain average of equal losses).
    assert max(history.train_loss) - min(history.train_loss) > 1e-3


def test_validation_loss_is_the_full_held_out_loss():
    torch.manual_seed(1)
    x, held_out = torch.randn(40), torch.randn(25) + 0.5
    history = fit_svi(
        model,
        delta_guide,
        data=x,
        valid=held_out,
        batch_size=8,
        steps=5,
        eval_every=5,
        optimizer=pyro.optim.SGD({"lr": 0.0}),
        progress=False,
        seed=0,
    )
    # Validation runs in chunks of 8 (8, 8, 8, 1 rows) with size=25: the chunk losses,
    # averaged by chunk size, give the loss on all 25 rows.
    assert history.valid_nll[-1] * 25 == pytest.approx(full_loss(held_out, 0.5), rel=1e-5)


def test_minibatch_training_reaches_the_posterior():
    torch.manual_seed(2)
    x = torch.randn(200) * 1.0 + 2.0
    fit_svi(model, normal_guide, data=x, batch_size=50, steps=500, lr=0.05, progress=False, seed=0)
    # Posterior N(sum(x) / 201, 1 / 201): sd 0.07; the minibatch noise adds a few hundredths.
    assert pyro.param("loc").item() == pytest.approx(x.sum().item() / 201, abs=0.1)


def test_early_stopping_restores_the_best_state():
    # The training data pull z towards 3 while the held-out data sit at 0: the validation loss
    # only gets worse, so the best state is the first validated one.
    x, held_out = torch.full((64,), 3.0), torch.zeros(16)
    seen = {}

    def callback(step, history):
        seen[step] = pyro.param("loc").item()

    history = fit_svi(
        model,
        delta_guide,
        data=x,
        valid=held_out,
        batch_size=16,
        steps=200,
        eval_every=4,
        patience=2,
        lr=0.05,
        progress=False,
        seed=0,
        callback=callback,
    )
    assert history.stopped_early and history.steps == 12
    assert history.best_step == 4
    assert pyro.param("loc").item() == seen[4] != seen[12]


class Exploding:
    """A model whose log-density is -inf from a given step on (the warm-up run is call 0)."""

    def __init__(self, bad_step):
        self.bad_step, self.calls = bad_step, 0

    def __call__(self, x):
        step = self.calls - 1
        self.calls += 1
        model(x)
        if step >= self.bad_step:  # an infinite observation: loss inf, gradients inf
            pyro.sample("boom", dist.Normal(0.0, 1.0), obs=torch.tensor(math.inf))


def test_non_finite_loss_stops_with_the_last_good_parameters():
    seen = []

    def guide(x):
        normal_guide(x)
        seen.append(pyro.param("loc").item())  # seen[0]: warm-up; seen[1 + i]: step i

    with pytest.raises(pf.TrainingDiverged, match="loss at step 7 is inf") as info:
        fit_svi(Exploding(7), guide, X, steps=50, lr=0.05, progress=False, seed=0)
    assert info.value.step == 7 and len(info.value.history.train_loss) == 7
    # Step 7's parameters gave the NaN; step 6's were the last with a finite loss.
    assert pyro.param("loc").item() == seen[1 + 6]


def flow_guide_factory():
    torch.manual_seed(5)  # the same initial flow in every run
    flow = pf.IAF(dim=2, layers=2, hidden=(8,))

    def guide(x, size=None, subsample=None):
        pyro.module("q", flow)
        scale = pyro.param("scale", torch.ones(2), constraint=constraints.positive)
        pyro.sample(
            "z",
            dist.TransformedDistribution(flow(), [torch.distributions.AffineTransform(0.0, scale)]),
        )

    return guide


def flow_model(x, size=None, subsample=None):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
        pyro.sample("x", dist.Normal(z[0] + z[1], 1.0), obs=x)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(30) + 1.0
    common = dict(data=x, batch_size=8, steps=24, eval_every=6, lr=0.02, progress=False, seed=0)

    pyro.clear_param_store()
    full = fit_svi(flow_model, flow_guide_factory(), checkpoint=tmp_path / "a", **common)
    expected = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    pyro.clear_param_store()
    fit_svi(
        flow_model,
        flow_guide_factory(),
        checkpoint=tmp_path / "b",
        callback=lambda step, h: step == 12,
        **common,
    )
    saved = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert saved["history"]["steps"] == 12

    pyro.clear_param_store()  # a new process: fresh modules, fresh store
    resumed = fit_svi(
        flow_model, flow_guide_factory(), checkpoint=tmp_path / "b", resume=True, **common
    )
    assert resumed.train_loss == full.train_loss
    for name, value in pyro.get_param_store().named_parameters():
        assert torch.equal(value, expected[name]), name


def test_load_store_rebuilds_missing_parameters_and_checks_constraints():
    store = pyro.get_param_store()
    _load_store(store, {"s": torch.tensor([0.0, 1.0])}, {"s": repr(constraints.positive)}, "test")
    assert torch.allclose(pyro.param("s"), torch.tensor([1.0, math.e]))
    with pytest.raises(ValueError, match="constraint"):
        _load_store(store, {"s": torch.zeros(2)}, {"s": repr(constraints.real)}, "test")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 5, "epochs": 1, "data": X}, ValueError, "give one of them"),
        ({"epochs": 1}, ValueError, "epochs: needs data"),
        ({"valid": 0.2}, ValueError, "valid: needs data"),
        ({"patience": 3}, ValueError, "patience"),
        ({"lr": 0.0}, ValueError, "lr: expected a positive"),
        ({"loss": "elbo"}, TypeError, "loss: expected a Pyro ELBO"),
        ({"optimizer": "sgd"}, ValueError, "optimizer: expected"),
        ({"resume": True}, ValueError, "resume: needs the checkpoint"),
        ({"data": torch.tensor([1.0, math.nan])}, ValueError, r"rows \[1\] contain NaN"),
    ],
)
def test_fit_svi_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_svi(model, normal_guide, *([] if "data" in kwargs else [X]), progress=False, **kwargs)


def test_fit_svi_needs_the_batch_keywords_with_data():
    def plain(x):
        model(x)

    with pytest.raises(ValueError, match=r"size=N, subsample=idx"):
        fit_svi(plain, normal_guide, data=X, steps=1, progress=False)


# ---------------------------------------------------------------------------------------------
# fit_target

CORRELATED = dist.MultivariateNormal(
    torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.8], [0.8, 1.0]])
)


def test_fit_target_matches_a_correlated_gaussian():
    flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)  # affine: the target is reachable
    history = fit_target(flow, CORRELATED.log_prob, steps=200, lr=2e-2, progress=False, seed=0)
    with torch.no_grad():
        z = flow().sample((20000,))
    # 20000 draws estimate the mean within ~0.01 and the covariance within ~0.02; 0.08 leaves
    # room for the optimisation error after 200 steps.
    assert torch.allclose(z.mean(0), CORRELATED.mean, atol=0.08)
    assert torch.allclose(torch.cov(z.T), CORRELATED.covariance_matrix, atol=0.08)
    # The target is normalised (log Z = 0): the loss, KL(q || p), ends near 0.
    assert abs(sum(history.train_loss[-20:]) / 20) < 0.03


def banana(z):
    # A shear of a standard normal: z2 - b * z1^2 is volume-preserving, so Z = 2 pi exactly.
    return -0.5 * z[..., 0] ** 2 - 0.5 * (z[..., 1] - 0.5 * z[..., 0] ** 2) ** 2


def test_fit_target_bends_to_a_banana():
    # An affine autoregressive layer z2 | z1 ~ N(mu(z1), sigma(z1)) can express the banana.
    flow = pf.IAF(dim=2, layers=2, hidden=(16,))
    history = fit_target(
        flow,
        banana,
        steps=400,
        num_particles=64,
        lr=5e-3,
        progress=False,
        seed=0,
        eval_particles=4096,
    )
    log_z = math.log(2 * math.pi)
    # -loss is an ELBO on log Z: no higher than log Z (up to the estimate's noise, ~0.01 with
    # 4096 draws) and, for a flow that fits, within 0.1 nats (KL(q || p) < 0.1).
    assert -0.02 < history.best_valid_nll + log_z < 0.1
    with torch.no_grad():
        z = flow().sample((8000,))
    # The bend: E[z2] = 0.5 E[z1^2] = 0.5 (8000 draws: SE 0.014) and corr(z1^2, z2) =
    # 1 / sqrt(3) = 0.58 under the target, 0 for any unbent (Gaussian-like) fit.
    assert z[:, 1].mean().item() == pytest.approx(0.5, abs=0.15)
    assert torch.corrcoef(torch.stack([z[:, 0] ** 2, z[:, 1]]))[0, 1] > 0.4


def test_fit_target_non_finite_loss_restores_the_flow():
    flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)
    states, calls = [], [0]

    def log_p(z):
        calls[0] += 1
        states.append({k: v.clone() for k, v in flow.state_dict().items()})
        out = CORRELATED.log_prob(z)
        return out * math.nan if calls[0] - 1 >= 6 else out  # call 0 checks log_p

    with pytest.raises(pf.TrainingDiverged, match="loss at step 5") as info:
        fit_target(flow, log_p, steps=30, lr=1e-2, progress=False, seed=0)
    assert info.value.step == 5
    for k, v in flow.state_dict().items():
        assert torch.equal(v, states[1 + 4][k])  # step 4's state: the last finite loss


def test_fit_target_resume_equals_an_uninterrupted_run(tmp_path):
    common = dict(steps=20, eval_every=5, lr=1e-2, progress=False, seed=0, num_particles=16)
    torch.manual_seed(0)
    flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)
    init = {k: v.clone() for k, v in flow.state_dict().items()}
    full = fit_target(flow, CORRELATED.log_prob, checkpoint=tmp_path / "a", **common)
    expected = {k: v.clone() for k, v in flow.state_dict().items()}

    flow.load_state_dict(init)
    fit_target(
        flow,
        CORRELATED.log_prob,
        checkpoint=tmp_path / "b",
        callback=lambda step, h: step == 10,
        **common,
    )
    flow.load_state_dict(init)
    resumed = fit_target(
        flow, CORRELATED.log_prob, checkpoint=tmp_path / "b", resume=True, **common
    )
    assert resumed.train_loss == full.train_loss
    for k, v in flow.state_dict().items():
        assert torch.equal(v, expected[k])


@pytest.mark.parametrize(
    ("log_p", "kwargs", "error", "match"),
    [
        (lambda z: z.sum(), {}, ValueError, r"log_p: expected log-densities of shape \(2,\)"),
        ("not callable", {}, TypeError, "log_p: expected a callable"),
        (CORRELATED.log_prob, {"patience": 2}, ValueError, "give eval_particles"),
        (CORRELATED.log_prob, {"num_particles": 0}, ValueError, "num_particles"),
    ],
)
def test_fit_target_rejects_bad_arguments(log_p, kwargs, error, match):
    flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)
    with pytest.raises(error, match=match):
        fit_target(flow, log_p, steps=2, progress=False, **kwargs)


def test_fit_target_rejects_a_conditional_flow():
    with pytest.raises(ValueError, match="unconditional"):
        fit_target(pf.IAF(dim=2, layers=1, hidden=(4,), context_dim=3), CORRELATED.log_prob)


@pytest.mark.cuda
def test_fit_svi_moves_data_to_the_device():
    x = torch.randn(40)

    def guide(x, size=None, subsample=None):
        loc = pyro.param("loc", torch.tensor(0.0, device="cuda"))
        pyro.sample("z", dist.Normal(loc, 1.0))

    def cuda_model(x, size=None, subsample=None):
        assert x.device.type == "cuda"
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, device="cuda"), 1.0))
        with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    fit_svi(cuda_model, guide, data=x, batch_size=10, steps=5, device="cuda", progress=False)
    assert pyro.param("loc").device.type == "cuda"
