import math

import numpy as np
import pytest
import torch

import pyroflows as pf
from pyroflows.transforms import ElementwiseAffine


def data(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    return torch.stack([2 * z[:, 0] + 1, 0.3 * z[:, 1] + 0.5 * z[:, 0] ** 2], -1)


def small_flow(**kw):
    return pf.MAF(2, layers=2, hidden=(16, 16), mixing="random", **kw)


def test_loss_decreases_and_the_best_state_is_restored():
    torch.manual_seed(0)
    flow = small_flow()
    x = data()
    history = pf.fit(flow, x, steps=200, eval_every=20, progress=False, seed=0)
    assert len(history.train_loss) == 200 == history.steps
    assert np.mean(history.train_loss[-20:]) < np.mean(history.train_loss[:20]) - 0.3
    assert history.valid_steps == list(range(20, 201, 20))
    assert history.best_valid_nll == min(history.valid_nll)
    # the flow holds the best state: its validation NLL is the best one (same split, seed 0)
    generator = torch.Generator().manual_seed(0)
    valid = x[torch.randperm(len(x), generator=generator)[:200]]
    with torch.no_grad():
        nll = -flow().log_prob(valid).mean().item()
    assert nll == pytest.approx(history.best_valid_nll, abs=1e-5)


def test_early_stopping_triggers_when_validation_only_gets_worse():
    torch.manual_seed(0)
    flow = pf.RealNVP(2, layers=2, hidden=(8,), actnorm=False)
    narrow = 0.1 * torch.randn(1000, 2)
    far = 4.0 + torch.randn(200, 2)  # fitting the narrow data makes these ever less likely
    history = pf.fit(
        flow, narrow, valid=far, steps=400, eval_every=10, patience=3, lr=1e-2, progress=False
    )
    assert history.stopped_early
    assert (
        history.steps < 400
        and len(history.valid_nll) == history.valid_nll.index(history.best_valid_nll) + 4
    )


def test_epochs_numpy_input_and_no_validation():
    flow = small_flow()
    history = pf.fit(flow, data(300).numpy(), epochs=2, batch_size=64, valid=None, progress=False)
    assert history.steps == 2 * 5 and history.best_step is None and not history.valid_nll


def test_conditional_fit_with_validation_tensors():
    torch.manual_seed(0)
    flow = pf.RealNVP(2, layers=2, hidden=(16,), context_dim=1)
    c = torch.randint(0, 2, (1000, 1)).float()
    x = torch.randn(1000, 2) * 0.3 + 3 * c
    cv = torch.randint(0, 2, (200, 1)).float()
    xv = torch.randn(200, 2) * 0.3 + 3 * cv
    history = pf.fit(
        flow, x, context=c, valid=xv, valid_context=cv, steps=300, lr=5e-3, progress=False, seed=1
    )
    assert history.best_valid_nll < history.valid_nll[0] - 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data": torch.randn(10, 3)}, r"data: expected shape \(N, 2\)"),
        ({"data": torch.randn(10)}, r"data: expected shape \(N, 2\)"),
        ({"data": torch.zeros(0, 2)}, "expected at least one row"),
        ({"steps": 10, "epochs": 1}, "give one of them, not both"),
        ({"steps": 0}, "steps: expected a positive integer"),
        ({"valid": 1.5}, r"valid: expected a fraction in \[0, 1\)"),
        ({"context": torch.randn(10, 1)}, "the flow is unconditional"),
        ({"resume": True}, "needs the checkpoint folder"),
        ({"optimizer": "sgd"}, "optimizer: expected 'adam', 'adamw' or a callable"),
        ({"scheduler": "step"}, "scheduler: expected 'cosine' or None"),
        ({"warmup": -1}, "warmup: expected a non-negative integer; got -1"),
    ],
)
def test_bad_arguments_are_refused_before_training(kwargs, match):
    flow = small_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    kwargs = {"data": data(10), "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        pf.fit(flow, kwargs.pop("data"), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


@pytest.mark.parametrize("scheduler", ["cosine", None])
def test_warmup_rises_linearly_then_hands_over_to_the_schedule(scheduler):
    seen = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(float(self.param_groups[0]["lr"]))
            return super().step(closure)

    pf.fit(
        small_flow(),
        data(64),
        steps=10,
        batch_size=64,
        valid=None,
        warmup=4,
        scheduler=scheduler,
        optimizer=lambda params: Recording(params, lr=0.1),
        progress=False,
    )
    cosine = [0.5 * (1 + math.cos(math.pi * s / 10)) if scheduler else 1.0 for s in range(10)]
    expected = [0.1 * min(1.0, (s + 1) / 4) * c for s, c in enumerate(cosine)]
    assert seen == pytest.approx(expected)


def test_nan_and_inf_in_data_name_the_rows():
    x = data(50)
    x[3, 0] = float("nan")
    x[17, 1] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[3, 17\] contain NaN or inf \(2 of 50 rows\)"):
        pf.fit(small_flow(), x, progress=False)


def test_conditional_flow_needs_matching_contexts():
    flow = pf.RealNVP(2, layers=1, hidden=(8,), context_dim=2)
    with pytest.raises(ValueError, match=r"pass one context row per data row, shape \(N, 2\)"):
        pf.fit(flow, data(20), progress=False)
    with pytest.raises(ValueError, match="expected 20 rows, one per data row; got 5"):
        pf.fit(flow, data(20), context=torch.randn(5, 2), progress=False)
    c = torch.randn(20, 2)
    c[4] = float("nan")
    with pytest.raises(ValueError, match=r"context: expected finite values; rows \[4\]"):
        pf.fit(flow, data(20), context=c, progress=False)


class Flaky(pf.Flow):
    """A flow whose parameters turn NaN inside its ``bad_call``-th call."""

    def __init__(self, bad_call):
        super().__init__([ElementwiseAffine(2)], dim=2)
        self.calls = 0
        self.bad_call = bad_call

    def forward(self, context=None):
        self.calls += 1
        if self.calls == self.bad_call:
            with torch.no_grad():
                self.transforms[0].shift.fill_(float("nan"))
        return super().forward(context)


def test_a_non_finite_loss_stops_with_the_last_good_state():
    flow = Flaky(bad_call=12)  # call 1 initialises, calls 2.. are steps 0..; step 10 goes bad
    with pytest.raises(pf.TrainingDiverged, match="the loss at step 10 is nan") as info:
        pf.fit(flow, data(200), steps=50, valid=None, progress=False, lr=0.05)
    assert info.value.step == 10
    assert len(info.value.history.train_loss) == 10
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    assert torch.isfinite(flow().log_prob(data(5))).all()


def test_keyboard_interrupt_keeps_the_best_state():
    flow = small_flow()

    def interrupt(step, history):
        if step == 60:
            raise KeyboardInterrupt

    history = pf.fit(
        flow, data(), steps=200, eval_every=20, callback=interrupt, progress=False, seed=0
    )
    assert history.interrupted and history.steps == 60
    assert history.best_step in (20, 40, 60)


def test_callback_can_stop_training():
    history = pf.fit(
        small_flow(),
        data(),
        steps=100,
        eval_every=10,
        callback=lambda step, h: step >= 30,
        progress=False,
    )
    assert history.steps == 30 and not history.stopped_early


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    x = data(600)
    kwargs = {"steps": 60, "eval_every": 10, "batch_size": 64, "progress": False, "seed": 3}

    torch.manual_seed(0)
    whole = small_flow()
    pf.fit(whole, x, checkpoint=tmp_path / "whole", **kwargs)

    def kill(step, history):
        if step == 30:
            raise RuntimeError("killed")

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="killed"):
        pf.fit(small_flow(), x, checkpoint=tmp_path / "run", callback=kill, **kwargs)
    # the checkpoint holds a loadable model too
    assert isinstance(pf.load(tmp_path / "run" / "model"), pf.MAF)

    torch.manual_seed(99)  # a different initialisation and random permutation, overwritten
    resumed = small_flow()
    history = pf.fit(resumed, x, checkpoint=tmp_path / "run", resume=True, **kwargs)
    assert history.steps == 60 and len(history.train_loss) == 60
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_resume_of_a_finished_run_is_refused(tmp_path):
    flow = small_flow()
    pf.fit(flow, data(100), steps=5, checkpoint=tmp_path, progress=False)
    with pytest.raises(ValueError, match="already run 5 of 5 steps"):
        pf.fit(flow, data(100), steps=5, checkpoint=tmp_path, resume=True, progress=False)


def test_progress_bar_shows_train_and_valid(capsys):
    pf.fit(small_flow(), data(200), steps=20, eval_every=10, progress=True)
    err = capsys.readouterr().err
    assert "train=" in err and "valid=" in err and "20/20" in err


@pytest.mark.cuda
def test_fit_on_cuda():
    flow = small_flow()
    history = pf.fit(flow, data(), steps=60, device="cuda", progress=False)
    assert next(flow.parameters()).device.type == "cuda"
    assert np.isfinite(history.train_loss).all()


# -- TrainStep and the compiled path --------------------------------------------------------------
def test_train_step_lowers_the_loss_and_checks_its_input():
    torch.manual_seed(0)
    flow = pf.MAF(dim=2, layers=2, hidden=(16, 16))
    step = pf.TrainStep(flow, lr=1e-2)
    x = data()[:256]
    first = step(x)
    assert first.shape == () and not first.requires_grad
    for _ in range(40):
        last = step(x)
    assert last < first - 0.2
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        step(torch.randn(8, 3))
    with pytest.raises(ValueError, match="lr"):
        pf.TrainStep(flow, lr=0.0)


def test_train_step_of_a_conditional_flow_needs_the_context():
    flow = pf.RealNVP(dim=2, layers=2, hidden=(8,), context_dim=3)
    step = pf.TrainStep(flow)
    with pytest.raises(ValueError, match=r"context of shape \(5, 3\)"):
        step(torch.randn(5, 2))
    assert torch.isfinite(step(torch.randn(5, 2), torch.randn(5, 3)))


def test_train_step_takes_a_built_optimizer_and_clips():
    flow = pf.RealNVP(dim=2, layers=1, hidden=(8,))
    opt = torch.optim.SGD(flow.parameters(), lr=0.1)
    step = pf.TrainStep(flow, opt, clip_grad=1e-3)
    before = [p.detach().clone() for p in flow.parameters()]
    step(torch.randn(64, 2) * 3)
    # SGD moves each parameter by lr * grad, and the clipped gradient has norm <= 1e-3.
    moved = sum(
        (p.detach() - b).square().sum() for p, b in zip(flow.parameters(), before, strict=True)
    )
    assert 0 < moved.sqrt() <= 0.1 * 1e-3 * (1 + 1e-4)


def test_compiled_steps_equal_eager_steps():
    """torch.compile changes how the step runs, not what it computes."""
    torch.manual_seed(0)
    eager = pf.MAF(dim=2, layers=2, hidden=(16, 16))
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled = pf.MAF(dim=2, layers=2, hidden=(16, 16))
    compiled.load_state_dict(eager.state_dict())
    x = data()[:128]
    a, b = pf.TrainStep(eager, lr=1e-2), pf.TrainStep(compiled, lr=1e-2, compile=True)
    losses = [(float(a(x)), float(b(x))) for _ in range(4)]  # b: eager, then compiled, then reused
    for la, lb in losses:
        assert la == pytest.approx(lb, abs=1e-4)
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_fit_with_compile_takes_full_batches():
    torch.manual_seed(0)
    flow = pf.MAF(dim=2, layers=1, hidden=(8, 8))
    # 300 training rows, batches of 128: two full batches per epoch, the rest skipped.
    history = pf.fit(
        flow,
        data()[:300],
        epochs=3,
        batch_size=128,
        valid=None,
        compile=True,
        progress=False,
        seed=0,
    )
    assert history.steps == 6 and all(np.isfinite(history.train_loss))


@pytest.mark.cuda
def test_compiled_steps_on_cuda_replay_one_graph_and_equal_eager_steps():
    torch.manual_seed(0)
    eager = pf.NSF(dim=2, layers=2, hidden=(16, 16), actnorm=True).cuda()
    compiled = pf.NSF(dim=2, layers=2, hidden=(16, 16), actnorm=True).cuda()
    compiled.load_state_dict(eager.state_dict())
    batches = [data(256, seed=i).cuda() for i in range(9)]
    batches[7] = batches[7][:100]  # another shape after the graph is recorded
    a = pf.TrainStep(eager, lr=1e-2, clip_grad=1.0)
    b = pf.TrainStep(compiled, lr=1e-2, clip_grad=1.0, compile=True)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(a.optimizer, 9)
    expected = []
    for x in batches:
        expected.append(a(x))
        sched_a.step()
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(b.optimizer, 9)
    kept = []
    for x in batches:
        kept.append(b(x))  # losses kept across replays must not be overwritten
        sched_b.step()  # updates the graph's tensor learning rate in place
    assert b._graph is not None
    torch.testing.assert_close(torch.stack(kept), torch.stack(expected), atol=1e-4, rtol=1e-4)
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("warmup", [0, 10])
def test_fit_with_compile_on_cuda_equals_eager_fit(warmup):
    """One recorded CUDA graph per run trains exactly as the eager steps do (the schedule, with
    or without warmup, writes the graph's learning-rate tensor in place)."""
    histories = []
    for compile in (False, True):
        torch.manual_seed(0)
        flow = small_flow()
        kw = {"steps": 40, "batch_size": 200, "device": "cuda", "progress": False, "seed": 0}
        kw["warmup"] = warmup
        histories.append(pf.fit(flow, data(), compile=compile, **kw))
    eager, compiled = histories
    assert np.isfinite(compiled.train_loss).all(), compiled.train_loss
    np.testing.assert_allclose(compiled.train_loss, eager.train_loss, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(compiled.valid_nll, eager.valid_nll, rtol=1e-4, atol=1e-4)


def test_fit_dequantises_batches_into_the_unit_interval_open_at_one():
    # (255 + u) / 256 rounds to exactly 1.0 for u within an ulp of 1 (about 30 in 4 million
    # float32 draws): fit's batches go through images.dequantize, which keeps them below 1.
    from pyroflows.train import _dequantization

    torch.manual_seed(0)
    prepare, _ = _dequantization(8, (torch.full((4_000_000,), 255.0),), None, None, torch.float32)
    assert prepare(torch.full((4_000_000,), 255.0)).max() < 1.0
