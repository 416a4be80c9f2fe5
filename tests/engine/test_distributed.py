"""Data-parallel training (pyroflows.engine.distributed) with real processes on gloo.

Each test launches two processes with ``torch.multiprocessing.spawn`` (the CLI test launches
``torchrun``); the workers are this module's functions and report through files. The
single-process references run in the test process itself (which has no process group).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

import pyroflows as pf
from pyroflows.engine import Batches, DistributedError
from pyroflows.engine.distributed import resolve
from pyroflows.engine.sources import Chunks
from pyroflows.infer import fit_svi

WORLD = 2


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------


def _entry(rank: int, world: int, folder: str, name: str, run: str, options: dict) -> None:
    tdist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous-{run}", rank=rank, world_size=world
    )
    try:
        result = WORKERS[name](rank, folder, **options)
        torch.save(result, Path(folder) / f"{run}-{rank}.pt")
    finally:
        tdist.destroy_process_group()
    # Leave without the interpreter's teardown: once in a few CI runs a compiled worker's
    # native threads aborted the process at exit ("terminate called without an active
    # exception"), after its result was written.
    os._exit(0)


def launch(tmp_path: Path, name: str, **options) -> list[dict]:
    """Run ``WORKERS[name]`` on two ranks; each rank's returned dict, in rank order."""
    run = f"{name}-{uuid.uuid4().hex[:8]}"  # a fresh rendezvous file and result files
    mp.spawn(_entry, args=(WORLD, str(tmp_path), name, run, options), nprocs=WORLD)
    return [torch.load(tmp_path / f"{run}-{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _floats(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def assert_same(a: dict, b: dict, atol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-10, msg=key)


# ---------------------------------------------------------------------------------------------
# maximum likelihood: pf.fit with ActNorm
# ---------------------------------------------------------------------------------------------


def _data(n: int = 640) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    return torch.randn(n, 3, generator=g, dtype=torch.float64) * scale + 1.0


def _flow(seed: int, hidden: int = 8) -> pf.Flow:
    torch.manual_seed(seed)  # ranks build with different seeds: rank 0's values are broadcast
    return pf.RealNVP(dim=3, layers=2, hidden=(hidden,), actnorm=True).double()


FIT = dict(steps=40, lr=3e-2, seed=3, valid=0.25, eval_every=4, patience=2, progress=False)


def fit_worker(rank: int, folder: str, checkpoint: bool = True) -> dict:
    flow = _flow(seed=rank)
    own = Path(folder) / f"checkpoint-{rank}" if checkpoint else None  # only rank 0 writes
    shown = io.StringIO()
    with contextlib.redirect_stderr(shown):  # the progress bar: rank 0's only
        history = pf.fit(flow, _data(), batch_size=30, checkpoint=own, **{**FIT, "progress": True})
    return {
        "state": _floats(flow.state_dict()),
        "history": asdict(history),
        "progress": shown.getvalue(),
    }


def test_fit_two_ranks_take_the_steps_of_one_process_with_twice_the_batch(tmp_path):
    ranks = launch(tmp_path, "fit")
    flow = _flow(seed=0)
    history = pf.fit(flow, _data(), batch_size=60, **FIT)
    reference = asdict(history)
    reference["seconds"] = None
    for result in ranks:
        assert_same(result["state"], _floats(flow.state_dict()))
        result["history"]["seconds"] = None
        assert result["history"]["train_loss"] == pytest.approx(reference["train_loss"], 1e-12)
        assert result["history"]["valid_nll"] == pytest.approx(reference["valid_nll"], 1e-12)
        for key in ("valid_steps", "best_step", "steps", "stopped_early"):
            assert result["history"][key] == reference[key]
    assert reference["stopped_early"] and reference["best_step"] < reference["steps"]
    assert "fit" in ranks[0]["progress"] and ranks[1]["progress"] == ""
    assert (tmp_path / "checkpoint-0" / "state.pt").is_file()
    assert (tmp_path / "checkpoint-0" / "model").is_dir()
    assert not (tmp_path / "checkpoint-1").exists()


# ---------------------------------------------------------------------------------------------
# SVI on a small VAE: per-rank minibatches with the plate's scaling
# ---------------------------------------------------------------------------------------------

D, Z, N_VAE = 4, 2, 240


def _vae_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(N_VAE, Z, generator=g, dtype=torch.float64)
    mix = torch.randn(Z, D, generator=g, dtype=torch.float64)
    return z @ mix + 0.3 * torch.randn(N_VAE, D, generator=g, dtype=torch.float64)


class VAE(nn.Module):
    """A linear VAE; with ``common_noise`` its guide draws ``z = loc + scale * eps[row]`` with a
    fixed ``eps`` per data row (a reparameterised Normal whose noise one process and two ranks
    share), else ordinary random draws."""

    def __init__(self, seed: int, common_noise: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.decoder = nn.Linear(Z, D).double()
        self.encoder = nn.Linear(D, 2 * Z).double()
        g = torch.Generator().manual_seed(5)
        self.eps = torch.randn(N_VAE, Z, generator=g, dtype=torch.float64)
        self.common_noise = common_noise

    def model(self, x, size=None, subsample=None):
        pyro.module("decoder", self.decoder)
        one = torch.tensor(1.0, dtype=torch.float64)
        noise = pyro.param("noise", one, dist.constraints.positive)
        with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x[:, :Z]), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), noise).to_event(1), obs=x)

    def guide(self, x, size=None, subsample=None):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            q = dist.Normal(loc, log_scale.exp()).to_event(1)
            if not self.common_noise:
                pyro.sample("z", q)
                return
            z = loc + log_scale.exp() * self.eps[subsample]
            pyro.sample("z", dist.Delta(z, log_density=q.log_prob(z), event_dim=1))


SVI = dict(lr=1e-2, seed=4, progress=False, valid=0.25, eval_every=6)


def _store() -> dict:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def svi_worker(rank: int, folder: str, common_noise: bool = True, **options) -> dict:
    pyro.clear_param_store()
    vae = VAE(seed=10 + rank, common_noise=common_noise)
    callback = options.pop("kill_at", None)
    if callback is not None:
        at = callback

        def callback(step, history):
            if step >= at:
                os._exit(3)  # killed right after the checkpoint of this validation

    history = fit_svi(
        vae.model, vae.guide, data=_vae_data(), callback=callback, **{**SVI, **options}
    )
    return {"store": _store(), "history": asdict(history)}


def test_fit_svi_vae_two_ranks_take_the_steps_of_one_process_with_twice_the_batch(tmp_path):
    ranks = launch(tmp_path, "svi", batch_size=15, steps=24)
    pyro.clear_param_store()
    vae = VAE(seed=10, common_noise=True)
    history = fit_svi(vae.model, vae.guide, data=_vae_data(), batch_size=30, steps=24, **SVI)
    for result in ranks:
        assert_same(result["store"], _store())
        assert result["history"]["train_loss"] == pytest.approx(history.train_loss, 1e-12)
        assert result["history"]["valid_nll"] == pytest.approx(history.valid_nll, 1e-12)
        assert result["history"]["best_step"] == history.best_step
    pyro.clear_param_store()


def test_killed_two_rank_svi_run_resumes_to_the_uninterrupted_result(tmp_path):
    options = dict(batch_size=15, steps=24, common_noise=False)
    whole = launch(tmp_path, "svi", checkpoint=str(tmp_path / "whole"), **options)
    assert_same(whole[0]["store"], whole[1]["store"])
    folder = str(tmp_path / "killed")
    with pytest.raises(mp.ProcessExitedException):  # os._exit in the callback, on both ranks
        launch(tmp_path, "svi", checkpoint=folder, kill_at=12, **options)
    assert (tmp_path / "killed" / "state.pt").is_file()
    resumed = launch(tmp_path, "svi", checkpoint=folder, resume=True, **options)
    for result in resumed:
        assert result["history"]["first_step"] == 12
        assert_same(result["store"], whole[0]["store"])
        assert result["history"]["train_loss"] == pytest.approx(
            whole[0]["history"]["train_loss"], 1e-12
        )
    # On another number of ranks (one process here): it continues, not bit for bit.
    pyro.clear_param_store()
    vae = VAE(seed=10, common_noise=False)
    kwargs = {**SVI, "batch_size": 15, "steps": 30, "checkpoint": folder, "resume": True}
    with pytest.raises(pf.engine.CheckpointError, match="steps"):
        fit_svi(vae.model, vae.guide, data=_vae_data(), **{**kwargs, "steps": 24})
    history = fit_svi(vae.model, vae.guide, data=_vae_data(), **kwargs)
    assert history.first_step == 24 and history.steps == 30
    pyro.clear_param_store()


# ---------------------------------------------------------------------------------------------
# bad set-ups
# ---------------------------------------------------------------------------------------------


def bad_worker(rank: int, folder: str) -> dict:
    messages = {}
    for case in ("data", "flow", "checkpoint", "small"):
        data, flow = _data(), _flow(seed=0)
        options = dict(FIT)
        if case == "data":
            data = _data(640 if rank == 0 else 600)
        elif case == "flow":
            flow = _flow(seed=0, hidden=8 if rank == 0 else 9)
        elif case == "checkpoint":
            own = Path(folder) / f"local-disk-{rank}"  # as on two nodes without a shared disk
            if rank == 1:
                own.mkdir()
                torch.save({"format": "x"}, own / "state.pt")
            options.update(checkpoint=own, resume=True)
        before = _floats(flow.state_dict())
        try:
            pf.fit(flow, data, batch_size=300 if case == "small" else 30, **options)
            messages[case] = None
        except ValueError as err:  # DistributedError and CheckpointError are ValueErrors
            messages[case] = f"{type(err).__name__}: {err}"
            messages[case + " unchanged"] = all(
                torch.equal(v, flow.state_dict()[k]) for k, v in before.items()
            )
    return messages


def test_ranks_that_disagree_are_refused_clearly_on_every_rank(tmp_path):
    for messages in launch(tmp_path, "bad"):
        assert "the training data differs between ranks" in messages["data"]
        assert "480 rows of shape (3,)" in messages["data"]  # the training rows after the split
        assert "450 rows of shape (3,)" in messages["data"]
        assert "DistributedError: distributed: the model differs between ranks" in messages["flow"]
        assert "hidden" in messages["flow"]
        assert "is on ranks [1] but not on ranks [0]" in messages["checkpoint"]
        assert "lower batch_size" in messages["small"]
        for case in ("data", "flow", "checkpoint", "small"):
            assert messages[case + " unchanged"]


# ---------------------------------------------------------------------------------------------
# compiled steps under DDP
# ---------------------------------------------------------------------------------------------


def compiled_worker(rank: int, folder: str) -> dict:
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # no compile worker pool in the ranks
    torch.manual_seed(rank)
    flow = pf.MAF(dim=2, layers=1, hidden=(8,))
    data = _data(256)[:, :2].float()
    history = pf.fit(
        flow,
        data,
        batch_size=32,
        steps=12,
        lr=1e-2,
        seed=0,
        valid=None,
        progress=False,
        compile=True,
    )
    return {"state": _floats(flow.state_dict()), "loss": history.train_loss}


def test_compiled_steps_under_ddp_match_eager_ones(tmp_path):
    ranks = launch(tmp_path, "compiled")
    torch.manual_seed(0)
    flow = pf.MAF(dim=2, layers=1, hidden=(8,))
    history = pf.fit(
        flow,
        _data(256)[:, :2].float(),
        batch_size=64,
        steps=12,
        lr=1e-2,
        seed=0,
        valid=None,
        progress=False,
    )
    for result in ranks:
        assert_same(result["state"], _floats(flow.state_dict()), atol=1e-5)
        assert result["loss"] == pytest.approx(history.train_loss, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# without data: fit_target and the fast path of fit_svi (each rank draws its own particles)
# ---------------------------------------------------------------------------------------------


def _bayes_model():
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("obs", dist.Normal(mu, 0.5).to_event(1), obs=torch.tensor([0.3, -0.2]))


def particles_worker(rank: int, folder: str) -> dict:
    torch.manual_seed(rank)
    flow = pf.MAF(dim=2, layers=1, hidden=(8,))
    target = torch.distributions.Normal(torch.tensor([1.0, -1.0]), 1.0)
    history = pf.infer.fit_target(
        flow,
        lambda z: target.log_prob(z).sum(-1),
        steps=20,
        num_particles=16,
        lr=1e-2,
        seed=0,
        progress=False,
    )
    pyro.clear_param_store()
    guide = pf.infer.AutoFlowGuide(_bayes_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pf.infer.FastPathUnavailable)
        svi = fit_svi(_bayes_model, guide, steps=20, seed=0, progress=False, fast=True)
    return {
        "target": _floats(flow.state_dict()),
        "target_loss": history.train_loss,
        "svi": _store(),
        "svi_loss": svi.train_loss,
        "noise": torch.randn(4),  # seed + rank: the ranks' streams differ
    }


def test_without_data_ranks_draw_their_own_particles_and_stay_equal(tmp_path):
    first, second = launch(tmp_path, "particles")
    for key in ("target", "svi"):
        assert_same(first[key], second[key], atol=0.0)
    assert first["target_loss"] == second["target_loss"]  # averaged across ranks
    assert first["svi_loss"] == second["svi_loss"]
    assert not torch.equal(first["noise"], second["noise"])
    pyro.clear_param_store()


WORKERS = {
    "fit": fit_worker,
    "svi": svi_worker,
    "bad": bad_worker,
    "compiled": compiled_worker,
    "particles": particles_worker,
}


# ---------------------------------------------------------------------------------------------
# the command line under torchrun
# ---------------------------------------------------------------------------------------------


def test_cli_fit_under_torchrun_writes_one_model(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "pyroflows",
        "fit",
        "builtin:ring",
        "-n",
        "1200",
        "--flow",
        "realnvp",
        "--layers",
        "2",
        "--hidden",
        "8",
        "--steps",
        "20",
        "--batch-size",
        "64",
        "--out",
        str(out),
        "--no-progress",
        "--no-plot",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own, so that a hung run is killed with every process torchrun started.
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"] == {"world": 2, "backend": "gloo", "batch_size_per_rank": 64}
    assert metrics["steps"] == 20
    assert stdout.count("pyroflows fit:") == 1  # rank 0 alone prints
    flow = pf.load(out / "model")
    assert flow.dim == 2


# ---------------------------------------------------------------------------------------------
# in this process: no group
# ---------------------------------------------------------------------------------------------


def test_without_a_process_group_training_is_local():
    assert not tdist.is_initialized()
    assert resolve(None) is None and resolve(False) is None
    with pytest.raises(DistributedError, match="torchrun"):
        resolve(True)
    with pytest.raises(ValueError, match="distributed: expected"):
        resolve("yes")
    with pytest.raises(DistributedError, match="torchrun"):
        pf.fit(pf.MAF(dim=2, layers=1), torch.randn(64, 2), steps=2, distributed=True)


def test_shards_together_are_the_batches_of_one_process():
    rows = (torch.arange(100.0)[:, None],)
    one = Batches(rows, 20, torch.Generator().manual_seed(0))
    shards = [Batches(rows, 10, torch.Generator().manual_seed(0), shard=(r, 2)) for r in range(2)]
    assert one.steps_per_epoch == shards[0].steps_per_epoch == 5
    for step in range(12):  # across epochs
        whole = one.batch(step).index
        parts = [s.batch(step) for s in shards]
        assert torch.equal(torch.cat([b.index for b in parts]), whole)
        assert parts[1].size == 100
    odd = [Batches(rows, 12, torch.Generator().manual_seed(0), shard=(r, 2)) for r in range(2)]
    assert odd[0].steps_per_epoch == 4  # full global batches of 24 rows only
    with pytest.raises(ValueError, match="lower batch_size"):
        Batches(rows, 60, torch.Generator(), shard=(0, 2))
    chunks = [list(Chunks(rows, 16, shard=(r, 2))) for r in range(2)]
    seen = torch.cat([b.index for part in chunks for b in part])
    assert torch.equal(seen, torch.arange(100)) and chunks[1][0].size == 100
