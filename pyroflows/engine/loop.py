"""The training loop every front-end runs: :func:`train`.

It takes a :class:`~pyroflows.engine.Step` (a loss and its optimiser) and a minibatch source and
owns the rest: the learning-rate schedule's steps, the divergence guard, validation with early
stopping and the best state, checkpoints and resuming, the progress bar, callbacks and Ctrl-C.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, CheckpointError, rng_state, set_rng_state
from .distributed import Distributed, DistributedError, structure
from .sources import Batch, default_eval_every, describe
from .step import Step

__all__ = ["DIVERGENCE", "SYNC_EVERY", "History", "TrainingDiverged", "train"]

#: A loss above ``best + DIVERGENCE * max(1, |best|)`` (``best``: the lowest loss so far) for
#: ``FAR_STEPS`` steps in a row counts as divergence, like a NaN. Far beyond the noise of any
#: minibatch, and reached within a few steps by a run whose parameters blow up.
DIVERGENCE = 1e4
#: Consecutive far losses that count as divergence. One far loss alone is let through: a
#: Monte Carlo loss of a wide variational start can be 1e10 at one step and 1e3 at the next
#: (a guide's draw in the far tail), and Adam's steps stay bounded; a NaN stops at once.
FAR_STEPS = 3
#: Steps between reads of the loss on a GPU or under a process group by default (each read
#: waits for the device, which would otherwise run ahead of Python, or for the other ranks); on
#: a CPU every step's loss is read at once.
SYNC_EVERY = 25


@dataclass
class History:
    """What a training run did.

    Attributes:
        train_loss: the loss of every step (the minibatch NLL in nats per sample for
            :func:`~pyroflows.fit`; see each front-end).
        valid_steps: the steps at which the validation loss was measured.
        valid_nll: the validation loss at those steps.
        best_step: the step of the best validation loss (whose state the model holds at the
            end), or ``None`` without validation.
        best_valid_nll: that loss.
        steps: the number of steps taken (including those before a resume).
        seconds: wall-clock time of training (this call).
        stopped_early: whether ``patience`` ran out.
        interrupted: whether training ended with ``KeyboardInterrupt``.
        first_step: the step this call started from: 0, or the checkpoint's step on resume.
    """

    train_loss: list[float] = field(default_factory=list)
    valid_steps: list[int] = field(default_factory=list)
    valid_nll: list[float] = field(default_factory=list)
    best_step: int | None = None
    best_valid_nll: float | None = None
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    interrupted: bool = False
    first_step: int = 0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or rose far above its best; the parameters hold their
    last state before that.

    Attributes:
        history: the :class:`History` up to the failure.
        step: the step whose loss diverged.
    """

    def __init__(self, message: str, history: History, step: int) -> None:
        super().__init__(message)
        self.history = history
        self.step = step


class _Guard:
    """Remembers the last parameters whose loss was verified good (two snapshots), and the lowest
    loss so far (the reference of the divergence test).

    Losses are checked at sync points (every step on the CPU; every few steps on a GPU, where
    reading a loss waits for the device). ``candidate`` holds the parameters at the start of
    the current window, ``good`` those at the start of the previous one; when a window's losses
    are all good the candidate is known good.
    """

    def __init__(self, params: list[torch.Tensor], reference: float | None, step: int) -> None:
        self.params = params
        self.good = [p.detach().clone() for p in params]
        self.candidate = [p.detach().clone() for p in params]
        self.good_step = self.candidate_step = step  # both hold the state at ``step``
        self.reference = reference

    def advance(self, step: int) -> None:
        self.good, self.candidate = self.candidate, self.good
        self.good_step = self.candidate_step
        with torch.no_grad():
            torch._foreach_copy_(self.candidate, [p.detach() for p in self.params])
        self.candidate_step = step

    def restore(self, bad_step: int) -> int:
        source, step = (
            (self.candidate, self.candidate_step)
            if bad_step > self.candidate_step >= 0
            else (self.good, self.good_step)
        )
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.params], source)
        return step


def _cpu(state: Any) -> Any:
    return None if state is None else {k: v.detach().cpu() for k, v in state.items()}


class _Run:
    """The state of one call of :func:`train` (see there)."""

    def __init__(self, step: Step, source, total: int, settings: dict[str, Any]) -> None:
        self.step, self.source, self.total = step, source, total
        self.loss = step.loss
        self.__dict__.update(settings)
        self.history = History()
        self.best: Any = None
        self.since_best = 0
        self.guard: _Guard | None = None
        self.far_since: int | None = None  # the first step of the current run of far losses
        self.far_value = math.nan

    # -- checks, each against a window of losses ----------------------------------------------
    def flush(self, pending: list, step: int, t0: float) -> None:
        if not pending:
            return
        if torch.is_tensor(pending[0]):
            stacked = torch.stack(pending)
            if self.distributed is not None:  # every rank decides on the same numbers
                stacked = self.distributed.mean(stacked)
            values = [float(v) for v in stacked.tolist()]
        else:
            values = [float(v) for v in pending]
        first = step - len(values)
        pending.clear()
        guard = self.guard
        for i, v in enumerate(values):
            reference = guard.reference
            far = (
                self.divergence is not None
                and reference is not None
                and v > reference + self.divergence * max(1.0, abs(reference))
            )
            if far and self.far_since is None:
                self.far_since, self.far_value = first + i, v
            if far and first + i - self.far_since + 1 < FAR_STEPS:
                continue  # let one or two far losses through (the guard does not advance)
            if not math.isfinite(v) or far:
                bad = self.far_since if far else first + i
                self.history.train_loss.extend(values[:i])
                del self.history.train_loss[bad:]
                self.history.steps = bad
                self.history.seconds += time.perf_counter() - t0
                restored = guard.restore(bad)
                what = (
                    f"is {v}"
                    if not far
                    else f"is {self.far_value:.4g}, far above the lowest so far "
                    f"({reference:.4g}), and stayed so for {FAR_STEPS} steps: training diverged"
                )
                raise TrainingDiverged(
                    f"{self.name}: the loss at step {bad} {what}; {self.loss.what} was "
                    f"restored to its state at step {restored}, the last with a good loss. "
                    f"{self.loss.advice}",
                    self.history,
                    bad,
                )
            self.far_since = None
            guard.reference = v if reference is None else min(reference, v)
        self.history.train_loss.extend(values)

    def evaluate(self, step: int) -> bool:
        if self.valid is None:
            return False
        total = weight = 0.0
        with torch.no_grad():
            for batch in self.valid:
                t, w = self.loss.validation(batch)
                total += float(t)
                weight += w
        if self.distributed is not None:  # each rank validated its own shard
            total, weight = self.distributed.total([total, weight])
        value = total / weight
        history = self.history
        history.valid_steps.append(step)
        history.valid_nll.append(value)
        if history.best_valid_nll is None or value < history.best_valid_nll:
            history.best_valid_nll, history.best_step = value, step
            self.best = self.loss.snapshot()
            self.since_best = 0
        else:
            self.since_best += 1
        return self.patience is not None and self.since_best >= self.patience

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> None:
        if self.checkpoint is None:
            return
        distributed = self.distributed
        ranks = None
        if distributed is not None:
            # Every rank's random state (rank 0 writes them all); not after Ctrl-C, which may
            # have reached one rank only.
            ranks = None if self.history.interrupted else distributed.gather(rng_state())
            if not distributed.main:
                return
        schedule = self.schedule
        self.checkpoint.save(
            {
                "model": self.loss.state_dict(),
                "optimizer": self.step.optimizer.state_dict(),
                "scheduler": None if schedule is None else schedule.state_dict(),
                "source": self.source.state_dict(),
                "rng": rng_state(),
                "rng_ranks": ranks,
                "history": asdict(self.history),
                "best": _cpu(self.best),
                "since_best": self.since_best,
                "reference": None if self.guard is None else self.guard.reference,
            }
        )
        if self.on_save is not None:
            self.on_save()

    def load(self) -> dict[str, Any] | None:
        checkpoint = self.checkpoint
        found = self.resume and checkpoint is not None and checkpoint.exists()
        distributed = self.distributed
        if distributed is not None:
            flags = distributed.gather(bool(found))
            if any(flags) and not all(flags):
                raise DistributedError(
                    f"resume: the checkpoint in {checkpoint.folder} is on ranks "
                    f"{[r for r, f in enumerate(flags) if f]} but not on ranks "
                    f"{[r for r, f in enumerate(flags) if not f]}; every rank reads it, so "
                    "keep it in a folder all ranks share (a shared file system across nodes)"
                )
        if not found:
            return None
        state, error = None, None
        try:
            state = checkpoint.load()
            done = state["history"]["steps"]
            if done >= self.total:
                raise CheckpointError(
                    f"resume: the checkpoint in {checkpoint.folder} has already run {done} of "
                    f"{self.total} steps"
                )
        except CheckpointError as err:
            error = str(err)
        if distributed is not None:  # refused on one rank: refused on all
            error = next((e for e in distributed.gather(error) if e is not None), None)
        if error is not None:
            raise CheckpointError(error)
        return state

    def apply(self, state: dict[str, Any]) -> float | None:
        self.loss.load_state_dict(state["model"])
        self.step.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None and state["scheduler"] is not None:
            self.schedule.load_state_dict(state["scheduler"])
        self.source.load_state_dict(state["source"])
        self._set_rng(state)
        self.history = History(**state["history"])
        self.history.seconds = 0.0
        self.history.first_step = self.history.steps
        self.best, self.since_best = state["best"], state["since_best"]
        return state["reference"]

    def _set_rng(self, state: dict[str, Any]) -> None:
        distributed, ranks = self.distributed, state.get("rng_ranks")
        if distributed is None or distributed.rank == 0:
            set_rng_state(state["rng"])
        elif ranks is not None and distributed.rank < len(ranks):
            set_rng_state(ranks[distributed.rank])
        else:  # resumed on more ranks than saved (or after Ctrl-C): a stream of its own
            set_rng_state(state["rng"])
            seed = (state["history"]["steps"] * 1_000_003 + distributed.rank) % 2**63
            _seed_everything(seed)

    # -- data-parallel set-up ---------------------------------------------------------------------
    def check_ranks(self) -> None:
        """Refuse, on every rank, ranks that train different models or data."""
        distributed = self.distributed
        advice = "Build the model the same way on every rank."
        distributed.agree("the model", self.loss.fingerprint(), advice)
        described = describe(getattr(self.source, "rows", None))
        distributed.agree(
            "the training data",
            None
            if described is None
            else [
                f"{t['shape'][0]} rows of shape {tuple(t['shape'][1:])} ({t['dtype']}, digest "
                f"{t['digest']})"
                for t in described["tensors"]
            ],
            "Every rank must load the same whole data set (each trains on its own shard).",
        )

    def share_state(self) -> None:
        """Rank 0's parameters and buffers on every rank, then DDP (after initialisation)."""
        distributed = self.distributed
        tensors = self.loss.tensors()
        distributed.agree(
            "the model's parameters",
            structure(tensors),
            "Build the model the same way on every rank (the same sizes and options).",
        )
        distributed.broadcast(tensors.values())
        self.step.distribute(distributed)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> History:
        if self.distributed is not None:
            self.check_ranks()
        state = self.load()  # refuses an unusable checkpoint before anything changes
        self.loss.setup(self.source, fresh=state is None)
        reference = self.apply(state) if state is not None else None
        if self.distributed is not None:
            self.share_state()
        history = self.history
        start = history.steps
        self.guard = _Guard(self.loss.parameters(), reference, start)
        pending: list = []
        bar = tqdm(
            total=self.total,
            initial=start,
            disable=not self.progress or not (self.distributed is None or self.distributed.main),
            unit="step",
            desc=self.name,
        )
        t0 = time.perf_counter()
        step = window = start
        try:
            while step < self.total:
                if step % self.sync_every == 0:
                    self.flush(pending, step, t0)
                    current = self.loss.parameters()
                    if len(current) != len(self.guard.params):  # a parameter appeared
                        self.guard = _Guard(current, self.guard.reference, step)
                    if self.far_since is None:  # not past a far loss that may be the first
                        self.guard.advance(step)
                batch = self.source.batch(step)
                pending.append(self.step(*self.loss.inputs(batch)))
                if self.schedule is not None:
                    self.schedule.step()
                step += 1
                bar.update(1)
                if step % self.eval_every == 0 or step == self.total:
                    self.flush(pending, step, t0)
                    history.steps = step
                    stop = self.evaluate(step)
                    recent = history.train_loss[window:]
                    window = len(history.train_loss)
                    postfix = {self.loss.label: f"{sum(recent) / max(len(recent), 1):.4g}"}
                    if history.valid_nll:
                        postfix["valid"] = f"{history.valid_nll[-1]:.4g}"
                    bar.set_postfix(postfix, refresh=False)
                    self.save()
                    if self.callback is not None and self._stop(self.callback(step, history)):
                        break
                    if stop:
                        history.stopped_early = True
                        break
        except KeyboardInterrupt:
            history.interrupted = True
            self.flush(pending, step, t0)
            history.steps = step
        finally:
            bar.close()
        history.seconds += time.perf_counter() - t0
        if self.best is not None:
            self.loss.restore(self.best)
        if history.interrupted or history.stopped_early:
            self.save()
        return history

    def _stop(self, request: Any) -> bool:
        """A callback's request to stop (on any rank, under a process group)."""
        return self.distributed.any(bool(request)) if self.distributed else bool(request)


def _seed_everything(seed: int) -> None:
    pyro.set_rng_seed(seed % 2**32)


def _sync_every(step: Step) -> int:
    device = step._device()
    return 1 if device is None or device.type == "cpu" else SYNC_EVERY


def train(
    step: Step,
    source: Any,
    steps: int,
    *,
    name: str = "train",
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    valid: Iterable[Batch | None] | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    callback: Callable[[int, History], bool | None] | None = None,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
    on_save: Callable[[], None] | None = None,
    divergence: float | None = DIVERGENCE,
    sync_every: int | None = None,
    distributed: Distributed | None = None,
) -> History:
    """Run ``steps`` optimiser steps of ``step`` on batches from ``source``; the one training loop.

    Every step takes ``source.batch(s)`` (a :class:`~pyroflows.engine.Batch`, or ``None``
    without data), turns it into the loss's inputs (``step.loss.inputs``), runs the
    :class:`~pyroflows.engine.Step` and then the learning-rate ``schedule``. Every
    ``eval_every`` steps (and at the end) it measures the validation loss over ``valid`` (the
    sum of :meth:`~pyroflows.engine.Loss.validation`'s totals over the sum of its weights,
    without gradients), keeps the best state (restored at the end) and stops after ``patience``
    validations without improvement; writes the checkpoint; and calls
    ``callback(step, history)``, which may return ``True`` to stop.

    **Guards.** A loss that is NaN or infinite, or higher than ``best + divergence * max(1,
    |best|)`` where ``best`` is the lowest loss so far for ``FAR_STEPS`` (3) steps in a row (a
    run that diverges while staying finite; a single far loss, e.g. a variational start's draw
    in a far tail, is let through), stops training with :class:`TrainingDiverged`, the
    parameters restored to their state before the first bad step. Losses are read every
    ``sync_every`` steps (reading one waits for a GPU). Ctrl-C ends training with the best
    state so far (``history.interrupted``).

    **Checkpoints and resuming.** With a :class:`~pyroflows.engine.Checkpoint`, the run's whole
    state is written at every validation and at the end; with ``resume`` and a checkpoint on
    disk, the run continues where it stopped and ends as an uninterrupted run would (same
    batches, same random draws). A checkpoint that cannot be continued (unreadable, another
    format, another run, or already finished) raises
    :class:`~pyroflows.engine.CheckpointError` before anything changes.

    Args:
        step: the loss, its optimiser, clipping and compilation.
        source: :class:`~pyroflows.engine.Batches` or :class:`~pyroflows.engine.NoData`.
        steps: the number of steps of the whole run (a resumed run counts those done).
        name: the front-end, in messages and on the progress bar.
        schedule: a learning-rate scheduler stepped after every step
            (:func:`~pyroflows.engine.schedule`).
        valid: the validation batches (e.g. :class:`~pyroflows.engine.Chunks`; ``[None]`` for a
            loss that draws its own samples), or ``None``.
        eval_every: steps between validations, checkpoints and callbacks (default: about 40
            per run).
        patience: stop after this many validations without improvement.
        callback: called as ``callback(step, history)`` at those points.
        progress: show a progress bar (loss, validation loss, steps/s).
        checkpoint: where to write the run's state.
        resume: continue from ``checkpoint`` when it holds a run.
        on_save: called after each checkpoint write (e.g. to save the model beside it).
        divergence: the factor of the divergence test (``None``: only NaN/inf count).
        sync_every: steps between reads of the losses (default: every step on a CPU,
            :data:`SYNC_EVERY` on a GPU or under a process group, where reading them means
            averaging them across ranks).
        distributed: a :class:`~pyroflows.engine.distributed.Distributed` to train
            data-parallel (``source`` then holds this rank's shard; see
            :mod:`pyroflows.engine.distributed`): the ranks' models and data are checked to
            agree, rank 0's initialised state is broadcast, ``step`` is distributed, losses and
            validation totals are reduced across ranks, and rank 0 alone writes checkpoints and
            shows progress. ``None``: one process.

    Returns:
        The :class:`History`.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows import engine
        >>> _ = torch.manual_seed(0)
        >>> flow = pf.RealNVP(dim=2, layers=2, hidden=(16,))
        >>> data = torch.randn(500, 2) * 0.5 + 2.0
        >>> loss = engine.NegativeLogLikelihood(flow)
        >>> opt = engine.make_optimizer("adam", loss.parameters(), lr=1e-2)
        >>> source = engine.Batches((data,), 100, torch.Generator().manual_seed(0))
        >>> history = engine.train(engine.Step(loss, opt), source, 200, progress=False)
        >>> history.train_loss[-1] < history.train_loss[0] - 1.0
        True
    """
    settings = {
        "name": name,
        "schedule": schedule,
        "valid": valid,
        "eval_every": eval_every or default_eval_every(steps, None, 1),
        "patience": patience,
        "callback": callback,
        "progress": progress,
        "checkpoint": checkpoint,
        "resume": resume,
        "on_save": on_save,
        "divergence": divergence,
        "sync_every": sync_every or (SYNC_EVERY if distributed else _sync_every(step)),
        "distributed": distributed,
    }
    return _Run(step, source, steps, settings).run()
