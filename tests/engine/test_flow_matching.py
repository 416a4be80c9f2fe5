"""Flow matching as a loss of the engine: pf.fit(cnf, data, loss="flow_matching")."""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows.engine import FlowMatching
from pyroflows.engine.losses import _ot_assignment
from pyroflows.transforms.continuous import exact_trace

RUN = {"batch_size": 128, "progress": False, "seed": 0, "lr": 3e-3}


def gaussian_data(n: int = 2048, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) * torch.tensor([0.5, 1.5]) + torch.tensor([2.0, -1.0])


def small_cnf(**kwargs) -> pf.CNF:
    torch.manual_seed(0)
    return pf.CNF(2, hidden=(32, 32), **kwargs)


def test_the_loss_falls_and_the_flow_learns_a_gaussian():
    flow, data = small_cnf(), gaussian_data()
    history = pf.fit(flow, data, steps=600, loss="flow_matching", **RUN)
    losses = torch.tensor(history.train_loss)
    assert losses[-100:].mean() < 0.5 * losses[:20].mean()
    # validated by the exact NLL, which improves and ends near the data's entropy
    assert history.best_valid_nll < history.valid_nll[0]
    truth = torch.distributions.Normal(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5]))
    test = gaussian_data(2000, seed=1)
    result = pf.evaluate(flow, test, truth=lambda x: truth.log_prob(x.float()).sum(-1).double())
    assert result.kl_gap < 0.05, result
    with torch.no_grad():
        samples = flow().sample((4000,))
    torch.testing.assert_close(samples.mean(0), torch.tensor([2.0, -1.0]), atol=0.15, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.tensor([0.5, 1.5]), atol=0.15, rtol=0)


def test_the_loss_at_the_start_is_the_mean_squared_path_velocity():
    flow = small_cnf()  # v = 0: the loss is E‖x₁ - x₀‖²
    x = gaussian_data(20000)
    torch.manual_seed(1)  # not the data's stream: the base draws are to be independent
    value = float(FlowMatching(flow)(x).detach())
    expected = float((x.square().sum(-1)).mean()) + 2.0  # E‖x₁‖² + E‖x₀‖², independent
    assert value == pytest.approx(expected, rel=0.03)
    # with sigma_min, u = x₁ - (1 - σ) x₀
    value = float(FlowMatching(flow, sigma_min=0.5)(x).detach())
    assert value == pytest.approx(float((x.square().sum(-1)).mean()) + 0.5, rel=0.03)


def test_the_ot_coupling_is_an_optimal_assignment_and_shortens_the_paths():
    torch.manual_seed(0)
    x0, x1 = torch.randn(6, 2), torch.randn(6, 2) + 1.0
    p = _ot_assignment(x0, x1)
    assert sorted(p.tolist()) == list(range(6))
    cost = float((x0[p] - x1).square().sum())
    best = min(float((x0[list(q)] - x1).square().sum()) for q in itertools.permutations(range(6)))
    assert cost == pytest.approx(best)
    # at v = 0 the loss is the mean squared path length: E‖x₁ - x₀‖² = 9.5 for independent
    # pairs; an optimal pairing approaches W₂² = ‖m‖² + Σ(sᵢ - 1)² = 5.5 (N(m, diag s²) to
    # N(0, I)), up to the sampling error of a finite batch
    flow, data = small_cnf(), gaussian_data(1024)
    torch.manual_seed(1)
    independent = float(FlowMatching(flow)(data).detach())
    torch.manual_seed(1)
    ot = float(FlowMatching(flow, coupling="ot")(data).detach())
    assert independent == pytest.approx(9.5, rel=0.05)
    assert 5.0 < ot < 6.0, ot


def test_ot_paths_are_straighter_one_euler_step_nearly_samples_the_data():
    data, std = gaussian_data(), torch.tensor([0.5, 1.5])
    errors = {}
    for coupling in ("independent", "ot"):
        flow = small_cnf()
        pf.fit(flow, data, steps=400, loss=FlowMatching(flow, coupling=coupling), **RUN)
        with torch.no_grad(), flow.options(solver="euler", steps=1):
            samples = flow().sample((8000,))
        errors[coupling] = float((samples.std(0) - std).abs().max())
    # measured: independent 0.43 (a single step averages the crossing paths), OT 0.08
    assert errors["ot"] < 0.15 and errors["independent"] > 2 * errors["ot"], errors


def test_validation_is_the_exact_nll_even_for_a_flow_with_hutchinsons_estimate():
    torch.manual_seed(0)
    dim = 20  # above EXACT_TRACE_MAX_DIM: log_prob is Hutchinson's estimate by default
    flow = pf.CNF(dim, hidden=(16,), solver="rk4", steps=4)
    data, valid = torch.randn(512, dim) * 0.5 + 1.0, torch.randn(64, dim) * 0.5 + 1.0
    history = pf.fit(flow, data, steps=20, loss="flow_matching", valid=valid, eval_every=20, **RUN)
    assert flow.transform.trace == "auto"
    with torch.no_grad(), exact_trace(flow):
        exact = float(-flow().log_prob(valid).mean())
    assert history.valid_nll[-1] == pytest.approx(exact, rel=1e-5)
    assert pf.evaluate(flow, valid).nll == pytest.approx(exact, rel=1e-5)  # evaluate is exact too


def test_conditional_flow_matching():
    torch.manual_seed(0)
    context = torch.randint(0, 2, (2048, 1)).float()
    data = torch.randn(2048, 2) * 0.3 + 3.0 * (2 * context - 1)  # ±3 by the context
    flow = pf.CNF(2, hidden=(32, 32), context_dim=1)
    pf.fit(flow, data, context=context, steps=500, loss="flow_matching", **RUN)
    with torch.no_grad():
        for c, mean in ((0.0, -3.0), (1.0, 3.0)):
            samples = flow(torch.tensor([c])).sample((1000,))
            torch.testing.assert_close(samples.mean(0), torch.full((2,), mean), atol=0.3, rtol=0)


def test_early_stopping_checkpoints_and_resume(tmp_path):
    data = gaussian_data(1024)
    kwargs = {**RUN, "steps": 60, "eval_every": 10, "valid_rows": 200}
    whole = small_cnf()
    pf.fit(whole, data, loss="flow_matching", checkpoint=tmp_path / "whole", **kwargs)

    def kill(step, history):
        if step == 30:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        pf.fit(
            small_cnf(),
            data,
            loss="flow_matching",
            checkpoint=tmp_path / "run",
            callback=kill,
            **kwargs,
        )
    assert isinstance(pf.load(tmp_path / "run" / "model"), pf.CNF)
    resumed = small_cnf()
    history = pf.fit(
        resumed, data, loss="flow_matching", checkpoint=tmp_path / "run", resume=True, **kwargs
    )
    assert history.steps == 60
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # the checkpoint of a flow-matching run is not resumed by maximum likelihood
    with pytest.raises(pf.CheckpointError, match="loss"):
        pf.fit(
            small_cnf(), data, checkpoint=tmp_path / "run", resume=True, **{**kwargs, "steps": 90}
        )
    # patience: a learning rate of ~0 cannot improve the validation NLL
    history = pf.fit(small_cnf(), data, loss="flow_matching", patience=2, **{**kwargs, "lr": 1e-12})
    assert history.stopped_early


def test_compiled_flow_matching_trains():
    flow, data = small_cnf(), gaussian_data()
    history = pf.fit(flow, data, steps=100, loss="flow_matching", compile=True, **RUN)
    assert all(torch.isfinite(torch.tensor(history.train_loss)))
    assert (
        torch.tensor(history.train_loss[-20:]).mean() < torch.tensor(history.train_loss[:5]).mean()
    )


def test_bad_uses_are_refused_clearly():
    data = gaussian_data(256)
    flow = small_cnf()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.raises(ValueError, match=r"compile: NegativeLogLikelihood: the step solves"):
        pf.fit(flow, data, compile=True, progress=False)  # maximum likelihood: an ODE per step
    with pytest.raises(ValueError, match=r"compile: NegativeLogLikelihood: .*'flow_matching'"):
        pf.fit(flow, data, compile=True, progress=False)
    with pytest.raises(ValueError, match=r"compile: ReverseKL: .*compile=False$"):
        pf.infer.fit_target(flow, lambda z: -z.square().sum(-1), compile=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = pf.infer.AutoFlowGuide(model, flow="cnf", hidden=(8,))
    with pytest.raises(ValueError, match=r"compile: FastSVI: the step solves"):
        pf.infer.fit_svi(model, guide, steps=5, compile=True, progress=False)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"expected a continuous flow .*got MAF"):
        pf.fit(pf.MAF(2), data, loss="flow_matching", progress=False)
    with pytest.raises(ValueError, match=r"only transform is a pyroflows\.transforms\.CNF"):
        FlowMatching(pf.Flow([pf.transforms.CNF(2), pf.transforms.Reverse(2)], dim=2))
    with pytest.raises(ValueError, match=r"loss: expected one of \('nll', 'flow_matching'\)"):
        pf.fit(small_cnf(), data, loss="fm", progress=False)
    with pytest.raises(ValueError, match="another flow"):
        pf.fit(small_cnf(), data, loss=FlowMatching(small_cnf()), progress=False)
    with pytest.raises(ValueError, match="sigma_min"):
        FlowMatching(small_cnf(), sigma_min=1.0)
    with pytest.raises(ValueError, match="coupling: expected one of"):
        FlowMatching(small_cnf(), coupling="sinkhorn")
    with pytest.raises(ValueError, match=r"coupling=.ot. .* conditional"):
        FlowMatching(pf.CNF(2, context_dim=1), coupling="ot")
    with pytest.raises(ValueError, match=r"context_dim=1 and needs a context"):
        FlowMatching(pf.CNF(2, context_dim=1))(data)  # called directly, without fit's checks
    with pytest.raises(ValueError, match=r"unconditional"):
        FlowMatching(small_cnf())(data, torch.zeros(len(data), 1))
    with pytest.raises(ValueError, match=r"expected a batch of rows \(n, dim\)"):
        FlowMatching(small_cnf(), coupling="ot")(data.reshape(2, -1, 2))
    flow = small_cnf()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    bad = data.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pf.fit(flow, bad, loss="flow_matching", progress=False)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


class ShiftedBase(torch.nn.Module):
    """A fixed base N(3, 0.5²) (buffers only): flow matching's source need not be N(0, I)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("loc", torch.full((2,), 3.0))

    def forward(self, context=None):
        return dist.Normal(self.loc, 0.5).to_event(1)


def test_another_fixed_base_is_the_source_and_a_learnable_one_is_refused():
    torch.manual_seed(0)
    flow = pf.CNF(2, hidden=(8,), base=ShiftedBase())
    x0, t = FlowMatching(flow).draw(torch.zeros(4000, 2))
    torch.testing.assert_close(x0.mean(0), torch.full((2,), 3.0), atol=0.05, rtol=0)
    assert t.shape == (4000,) and 0 <= t.min() and t.max() <= 1
    history = pf.fit(flow, gaussian_data(512), steps=10, loss="flow_matching", **RUN)
    assert all(torch.isfinite(torch.tensor(history.train_loss)))
    learnable = pf.CNF(2, hidden=(8,), base="diag_normal")
    with pytest.raises(ValueError, match=r"base has trainable parameters \(loc, "):
        pf.fit(learnable, gaussian_data(512), loss="flow_matching", progress=False)


def test_the_draws_are_inputs_of_the_step_so_a_compiled_ot_step_holds_arithmetic_alone():
    data = gaussian_data(256)
    loss = FlowMatching(small_cnf(), coupling="ot")
    batch = pf.engine.Batch(rows=(data,), index=torch.arange(256), size=256)
    x, context, x0, t = loss.inputs(batch)
    assert x is data and context is None and x0.shape == (256, 2) and t.shape == (256,)
    torch.testing.assert_close(x0[_ot_assignment(x0, x)], x0)  # already paired optimally
    # the same draws give the same loss, drawn inside or handed in
    torch.manual_seed(5)
    inside = loss(data)
    torch.manual_seed(5)
    torch.testing.assert_close(loss(data, None, *loss.draw(data)), inside)
    history = pf.fit(loss.flow, data, steps=30, loss=loss, compile=True, **RUN)
    assert all(torch.isfinite(torch.tensor(history.train_loss)))


def test_an_expensive_validation_still_runs_several_times_and_valid_rows_is_honoured(
    monkeypatch,
):
    data = gaussian_data(4096)
    flow = pf.CNF(2, hidden=(8,))
    history = pf.fit(flow, data, steps=100, loss="flow_matching", **{**RUN, "batch_size": 64})
    # 410 validation rows at 80 training rows each would be one validation per 512 steps
    assert len(history.valid_steps) >= 5
    calls = []
    chunks = pf.train.validation_chunks
    monkeypatch.setattr(
        pf.train, "validation_chunks", lambda v, rows, *a: calls.append(rows) or chunks(v, rows, *a)
    )
    pf.fit(small_cnf(), data, steps=2, loss="flow_matching", **RUN)
    pf.fit(small_cnf(), data, steps=2, loss="flow_matching", valid_rows=20_000, **RUN)
    pf.fit(pf.MAF(2, layers=1), data, steps=2, **RUN)
    assert calls == [2000, 20_000, 20_000]  # "auto": 2,000 for a continuous flow
