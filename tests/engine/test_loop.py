"""The engine's loop: divergence that stays finite, the one schedule, losses as objects."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows import engine
from pyroflows.infer import fit_svi, fit_target
from pyroflows.transforms import ElementwiseAffine


def data(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 1.0


def test_a_run_that_blows_up_while_staying_finite_stops_with_its_last_good_state():
    # lr 1e3 with the default clipping: the loss reached 8e24 and fit ran all its steps before.
    torch.manual_seed(0)
    flow = pf.MAF(4, layers=3, hidden=(32, 32))
    with pytest.raises(pf.TrainingDiverged, match="far above the lowest so far") as info:
        pf.fit(flow, data(), steps=200, lr=1e3, progress=False, seed=0)
    assert info.value.step < 10
    assert len(info.value.history.train_loss) == info.value.step
    # the flow holds the state before the blow-up: its NLL is near the first losses', not 1e12
    with torch.no_grad():
        nll = -flow().log_prob(data(500, seed=1)).mean().item()
    assert nll < 2 * max(info.value.history.train_loss)


class Jumping(pf.Flow):
    """A flow whose shift jumps by ``jump`` (finite) inside its ``bad_call``-th call."""

    def __init__(self, bad_call, jump):
        super().__init__([ElementwiseAffine(2)], dim=2)
        self.calls, self.bad_call, self.jump = 0, bad_call, jump

    def forward(self, context=None, **kwargs):
        self.calls += 1
        if self.calls == self.bad_call:
            with torch.no_grad():
                self.transforms[0].shift.add_(self.jump)
        return super().forward(context, **kwargs)


def test_the_divergence_test_restores_the_state_before_the_jump_and_can_be_switched_off():
    x = torch.randn(200, 2)
    flow = Jumping(bad_call=12, jump=1e4)  # call 1 initialises, step s is call s + 2
    with pytest.raises(pf.TrainingDiverged, match="the loss at step 10 is") as info:
        pf.fit(flow, x, steps=50, valid=None, progress=False, lr=1e-3)
    assert info.value.step == 10
    assert flow.transforms[0].shift.abs().max() < 1.0  # the jump was undone
    # a loss 1e7 nats higher is far for the default factor; with divergence=None it trains on
    flow = Jumping(bad_call=12, jump=1e4)
    history = pf.fit(flow, x, steps=15, valid=None, progress=False, divergence=None)
    assert history.steps == 15 and max(history.train_loss) > 1e6


def test_fit_target_and_fit_svi_detect_finite_divergence_too():
    target = torch.distributions.Normal(0.0, 1.0)
    calls = [0]

    def log_p(z):  # finite but absurd from the 8th call on (call 0 checks log_p)
        calls[0] += 1
        out = target.log_prob(z).sum(-1)
        return out - 1e9 if calls[0] > 8 else out

    flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)
    with pytest.raises(pf.TrainingDiverged, match=r"step 7 is .* far above"):
        fit_target(flow, log_p, steps=30, progress=False, seed=0)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(loc, 1.0))

    x = torch.randn(20)
    pyro.clear_param_store()
    # SGD at lr 1e3 throws loc far away at the first step: the ELBO falls by ~1e7 nats
    with pytest.raises(pf.TrainingDiverged, match="far above"):
        fit_svi(
            model, guide, x, steps=20, optimizer=pyro.optim.SGD({"lr": 1e3}), progress=False, seed=0
        )
    assert abs(pyro.param("loc").item()) < 10.0  # restored before the jump


def test_warmup_cosine_is_one_schedule_for_every_front_end():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = engine.schedule(opt, 10, warmup=3)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [
        2.0 * min(1, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)
    ]
    assert seen == pytest.approx(expected)
    assert engine.schedule(opt, 10, cosine=False) is None


class Quadratic(engine.Loss):
    """A loss of our own: ``|w - target|^2`` over the rows of a batch (a new way to train is a
    new loss, not a new loop)."""

    label = "sq"

    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros(2))

    def parameters(self):
        return [self.w]

    def inputs(self, batch):
        return (batch.rows[0],)

    def __call__(self, y):
        return (y - self.w).square().sum(-1).mean()

    def validation(self, batch):
        (y,) = self.inputs(batch)
        return (y - self.w).square().sum(-1).sum(), float(len(y))

    def state_dict(self):
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])

    snapshot, restore = state_dict, load_state_dict


def test_a_loss_of_ones_own_trains_validates_and_resumes(tmp_path):
    y = torch.randn(300, 2) + torch.tensor([3.0, -1.0])

    def run(callback=None, resume=False):
        loss = Quadratic()
        opt = engine.make_optimizer("adam", loss.parameters(), lr=0.1)
        source = engine.Batches((y,), 50, torch.Generator().manual_seed(0))
        valid = engine.Chunks((y[:100],), 40)
        checkpoint = engine.Checkpoint(tmp_path, "mine", {"lr": 0.1})
        history = engine.train(
            engine.Step(loss, opt),
            source,
            60,
            valid=valid,
            eval_every=10,
            progress=False,
            checkpoint=checkpoint,
            resume=resume,
            callback=callback,
        )
        return loss, history

    loss, history = run(callback=lambda step, h: step == 30)
    assert history.steps == 30
    loss, history = run(resume=True)
    assert history.first_step == 30 and history.steps == 60
    torch.testing.assert_close(loss.w.detach(), y.mean(0), atol=0.3, rtol=0)
    assert history.best_valid_nll == min(history.valid_nll)


def test_a_pyro_elbo_cannot_be_compiled():
    loss = engine.SVILoss(lambda: None, lambda: None, pyro.infer.Trace_ELBO())
    with pytest.raises(ValueError, match="cannot be compiled"):
        engine.Step(loss, engine.PyroOptimizer(pyro.optim.Adam({}), loss.parameters), compile=True)


def test_a_resumed_run_that_diverges_at_once_names_the_step_it_resumed_from(tmp_path):
    x = torch.randn(200, 2)
    kwargs = {"steps": 20, "valid": None, "progress": False, "seed": 0, "eval_every": 5}
    steady = Jumping(bad_call=10**9, jump=0.0)
    pf.fit(steady, x, checkpoint=tmp_path, callback=lambda step, h: step == 10, **kwargs)
    flow = Jumping(bad_call=1, jump=1e4)  # a resumed run skips initialisation: call 1 = step 10
    match = r"loss at step 10 is .* restored to its state at step 10,"
    with pytest.raises(pf.TrainingDiverged, match=match):
        pf.fit(flow, x, checkpoint=tmp_path, resume=True, **kwargs)
    torch.testing.assert_close(flow.transforms[0].shift, steady.transforms[0].shift)


def test_one_far_loss_is_let_through_and_three_in_a_row_stop():
    target = torch.distributions.Normal(0.0, 1.0)

    def make(bad_calls):
        calls = [0]

        def log_p(z):  # calls 1 and 2 check log_p; step s is call s + 2
            calls[0] += 1
            out = target.log_prob(z).sum(-1)
            return out - 1e9 if calls[0] in bad_calls else out

        return log_p

    flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)
    history = fit_target(flow, make({6}), steps=20, progress=False, seed=0)  # one outlier
    assert history.steps == 20 and max(history.train_loss) > 1e8
    flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)
    with pytest.raises(pf.TrainingDiverged, match=r"step 4 is .* stayed so for 3 steps") as info:
        fit_target(flow, make({6, 7, 8}), steps=20, progress=False, seed=0)
    assert info.value.step == 4 and len(info.value.history.train_loss) == 4
