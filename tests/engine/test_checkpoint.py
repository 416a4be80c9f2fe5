"""Checkpoints: one format for every front-end, refused clearly when they cannot be resumed."""

import os

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroflows as pf
from pyroflows import engine
from pyroflows.infer import fit_svi, fit_target


def data(n=300, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)) * 2.0 + 1.0


def small_flow(hidden=(8,)):
    torch.manual_seed(0)
    return pf.MAF(2, layers=2, hidden=hidden)


COMMON = {"steps": 20, "eval_every": 5, "batch_size": 64, "progress": False, "seed": 0}


@pytest.fixture
def checkpoint(tmp_path):
    pf.fit(small_flow(), data(), checkpoint=tmp_path, callback=lambda s, h: s == 10, **COMMON)
    return tmp_path


def unchanged(flow, before):
    return all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: os.urandom(len(b)),  # random bytes
        lambda b: b"",  # empty
    ],
    ids=["truncated", "random", "empty"],
)
def test_a_corrupt_checkpoint_is_refused_with_one_clear_error(checkpoint, damage):
    path = checkpoint / "state.pt"
    path.write_bytes(damage(path.read_bytes()))
    flow = small_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.raises(pf.CheckpointError, match=r"cannot read .*state\.pt .*delete it"):
        pf.fit(flow, data(), checkpoint=checkpoint, resume=True, **COMMON)
    assert unchanged(flow, before)
    assert issubclass(pf.CheckpointError, ValueError)  # the CLI's exit code 2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"flow": small_flow(hidden=(16,))}, r"loss\.flow\.state.*\[16, 2\]"),
        ({"lr": 1e-2}, r"settings\.lr: 0\.001 in the checkpoint, 0\.01 now"),
        ({"batch_size": 32}, r"settings\.batch_size: 64 in the checkpoint, 32 now"),
        ({"data": data(seed=1)}, r"data\.tensors\[0\]\.digest"),
        ({"data": data(n=250)}, r"data\.tensors\[0\]\.shape: \[300, 2\] in the checkpoint"),
    ],
    ids=["flow", "lr", "batch_size", "other-values", "other-size"],
)
def test_resuming_another_run_is_refused_naming_what_differs(checkpoint, change, match):
    flow = change.pop("flow", small_flow())
    x = change.pop("data", data())
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    kwargs = {**COMMON, **change}
    with pytest.raises(pf.CheckpointError, match=match):
        pf.fit(flow, x, checkpoint=checkpoint, resume=True, **kwargs)
    assert unchanged(flow, before)


def test_a_resumed_run_may_be_extended(checkpoint):
    history = pf.fit(
        small_flow(), data(), checkpoint=checkpoint, resume=True, **{**COMMON, "steps": 30}
    )
    assert history.first_step == 10 and history.steps == 30


def test_a_checkpoint_of_the_old_format_gets_a_clear_message(tmp_path):
    # What pyroflows 0.1.0's fit wrote: no format, no version.
    flow = small_flow()
    torch.save(
        {"flow": flow.state_dict(), "history": {"steps": 5}, "order": torch.arange(3)},
        tmp_path / "state.pt",
    )
    with pytest.raises(pf.CheckpointError, match=r"pyroflows 0\.1\.0 \(checkpoint format 1\)"):
        pf.fit(flow, data(), checkpoint=tmp_path, resume=True, **COMMON)


def test_every_front_end_writes_the_one_format_and_refuses_the_others(tmp_path):
    target = torch.distributions.Normal(0.0, 1.0)

    def log_p(z):
        return target.log_prob(z).sum(-1)

    flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)
    fit_target(flow, log_p, steps=4, progress=False, checkpoint=tmp_path / "t")

    def model():
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    fit_svi(model, guide, steps=4, progress=False, checkpoint=tmp_path / "s")
    for folder, kind in ((tmp_path / "t", "fit_target"), (tmp_path / "s", "fit_svi")):
        saved = torch.load(folder / "state.pt", weights_only=True)
        assert (saved["format"], saved["version"], saved["kind"]) == (
            "pyroflows.checkpoint",
            engine.checkpoint.VERSION,
            kind,
        )
    with pytest.raises(pf.CheckpointError, match="written by fit_svi, not fit_target"):
        fit_target(flow, log_p, steps=8, progress=False, checkpoint=tmp_path / "s", resume=True)
    with pytest.raises(pf.CheckpointError, match=r"loss\.log_p: .*test_every_front_end"):
        fit_target(
            flow,
            lambda z: log_p(z),
            steps=8,
            progress=False,
            checkpoint=tmp_path / "t",
            resume=True,
        )
    pyro.clear_param_store()
    with pytest.raises(pf.CheckpointError, match=r"settings\.lr"):
        fit_svi(
            model, guide, steps=8, lr=0.5, progress=False, checkpoint=tmp_path / "s", resume=True
        )


def test_a_run_without_a_seed_holds_out_the_same_rows_when_resumed(tmp_path):
    x = data(400)
    kwargs = {"steps": 20, "eval_every": 5, "progress": False}
    torch.manual_seed(0)
    whole = pf.MAF(2, layers=1, hidden=(8,))
    full = pf.fit(whole, x, checkpoint=tmp_path / "a", **kwargs)
    torch.manual_seed(0)
    pf.fit(
        pf.MAF(2, layers=1, hidden=(8,)),
        x,
        checkpoint=tmp_path / "b",
        callback=lambda s, h: s == 10,
        **kwargs,
    )
    torch.manual_seed(0)
    resumed = pf.MAF(2, layers=1, hidden=(8,))
    history = pf.fit(resumed, x, checkpoint=tmp_path / "b", resume=True, **kwargs)
    assert history.valid_nll == full.valid_nll
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


class Unregistered(pf.MAF):
    """A user's subclass of a builder, not in pf.flows.BUILDERS: pf.save refuses it."""


def test_a_flow_that_cannot_be_saved_by_name_still_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    flow = Unregistered(2, layers=1, hidden=(8,))
    pf.fit(flow, data(), checkpoint=tmp_path, callback=lambda s, h: s == 10, **COMMON)
    assert (tmp_path / "state.pt").is_file() and not (tmp_path / "model").exists()
    history = pf.fit(flow, data(), checkpoint=tmp_path, resume=True, **COMMON)
    assert history.first_step == 10 and history.steps == 20


def test_resuming_with_another_validation_split_is_refused(checkpoint):
    # another held-out fraction trains on other rows: not the run in the checkpoint
    with pytest.raises(pf.CheckpointError, match=r"valid\.tensors\[0\]\.shape: \[30, 2\]"):
        pf.fit(small_flow(), data(), checkpoint=checkpoint, resume=True, valid=0.2, **COMMON)
