"""Maximum-likelihood training of flows: :func:`fit`.

``fit`` minimises the mean negative log-likelihood of data (the forward KL divergence from the
data distribution to the flow) with minibatches, keeps the best state by validation NLL, stops
early when asked, and guards the run: bad data is refused before training, a non-finite loss
stops training with the flow restored to its last state whose loss was finite, Ctrl-C keeps the
best state so far, and a checkpoint folder lets a killed run resume exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._checks import check_nonnegative_int, check_positive_int
from .flows import Flow

__all__ = ["History", "TrainStep", "TrainingDiverged", "fit"]

DEFAULT_STEPS = 1000
EVAL_BATCH = 4096
INIT_BATCH = 4096
# Data larger than this stays on the CPU and moves to the device one batch at a time.
DEVICE_DATA_BYTES = 1 << 30


@dataclass
class History:
    """What :func:`fit` did.

    Attributes:
        train_loss: the minibatch NLL (nats per sample) of every step.
        valid_steps: the steps at which the validation NLL was measured.
        valid_nll: the validation NLL (nats per sample) at those steps.
        best_step: the step of the best validation NLL (whose state the flow holds at the end),
            or ``None`` without validation.
        best_valid_nll: that NLL.
        steps: the number of steps taken (including those before a resume).
        seconds: wall-clock time of training (this call).
        stopped_early: whether ``patience`` ran out.
        interrupted: whether training ended with ``KeyboardInterrupt``.
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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the flow holds its last state with a finite loss.

    Attributes:
        history: the :class:`History` up to the failure.
        step: the step whose loss was not finite.
    """

    def __init__(self, message: str, history: History, step: int) -> None:
        super().__init__(message)
        self.history = history
        self.step = step


def _as_tensor(name: str, value: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or a numpy array; got {type(value).__name__}")
    if not (value.is_floating_point() or value.dtype in (torch.uint8, torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected real numbers; got dtype {value.dtype}")
    return value.to(dtype)


def _check_rows(name: str, x: torch.Tensor, width: int | tuple[int, ...], what: str) -> None:
    """Rows of ``width`` numbers, or of events of the shape ``width``, all finite."""
    shape = (width,) if isinstance(width, int) else tuple(width)
    if tuple(x.shape[1:]) != shape:
        expected = ", ".join(map(str, ("N", *shape)))
        raise ValueError(f"{name}: expected shape ({expected}) ({what}); got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row; got none")
    bad = (~torch.isfinite(x)).flatten(1).any(dim=1).nonzero().squeeze(1)
    if bad.numel():
        shown = bad[:10].tolist()
        more = f" and {bad.numel() - 10} more" if bad.numel() > 10 else ""
        raise ValueError(
            f"{name}: expected finite values; rows {shown}{more} contain NaN or inf "
            f"({bad.numel()} of {x.shape[0]} rows)"
        )


def _split(
    x: torch.Tensor,
    c: torch.Tensor | None,
    valid: Any,
    valid_context: Any,
    generator: torch.Generator,
    flow: Flow,
    dtype: torch.dtype,
):
    """Training and validation sets (validation may be None)."""
    if valid is None or (isinstance(valid, (int, float)) and not isinstance(valid, bool)):
        fraction = 0.0 if valid is None else float(valid)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"valid: expected a fraction in [0, 1); got {valid!r}")
        n_valid = round(fraction * len(x))
        if fraction > 0 and n_valid == 0:
            n_valid = 1
        if n_valid >= len(x):
            raise ValueError(
                f"valid: a fraction of {fraction} leaves no training data out of {len(x)} rows"
            )
        if n_valid == 0:
            return x, c, None, None
        order = torch.randperm(len(x), generator=generator)
        v_idx, t_idx = order[:n_valid], order[n_valid:]
        if c is None:
            return x[t_idx], None, x[v_idx], None
        return x[t_idx], c[t_idx], x[v_idx], c[v_idx]
    xv = _as_tensor("valid", valid, dtype)
    _check_rows("valid", xv, flow.event_shape, "rows of validation data")
    cv = None
    if flow.context_dim:
        if valid_context is None:
            raise ValueError("valid_context: a conditional flow needs the validation contexts")
        cv = _as_tensor("valid_context", valid_context, dtype)
        _check_rows("valid_context", cv, flow.context_dim, "one context per validation row")
        if len(cv) != len(xv):
            raise ValueError(
                f"valid_context: expected {len(xv)} rows, one per validation row; got {len(cv)}"
            )
    return x, c, xv, cv


def _adam(cls: type[torch.optim.Optimizer], params: list, lr: float, weight_decay: float):
    """Adam(W) with the fused implementation (one kernel over every parameter) where this torch
    has it for these tensors (CPU and CUDA floating point since torch 2.4), else the default."""
    params = list(params)
    if params and all(p.dtype in (torch.float32, torch.float64) for p in params):
        try:
            return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(params, lr=lr, weight_decay=weight_decay)


def _make_optimizer(optimizer: Any, params, lr: float, weight_decay: float):
    if optimizer == "adam":
        return _adam(torch.optim.Adam, params, lr, weight_decay)
    if optimizer == "adamw":
        return _adam(torch.optim.AdamW, params, lr, weight_decay)
    if callable(optimizer):
        return optimizer(params)
    raise ValueError(
        f"optimizer: expected 'adam', 'adamw' or a callable params -> optimizer; got {optimizer!r}"
    )


class TrainStep:
    """One maximum-likelihood optimiser step on a minibatch: the body of :func:`fit`'s loop.

    ``step(x)`` (``step(x, context)`` for a conditional flow) computes the mean negative
    log-likelihood of the batch, back-propagates, clips the gradient norm (when ``clip_grad`` is
    set) and steps the optimiser; it returns the loss before the step as a detached 0-d tensor
    (reading it with ``float()`` waits for a GPU, so read it only when needed). The batch's
    shape is checked, its values are not (:func:`fit` checks its data once, up front); a batch
    with NaN or inf gives a non-finite loss.

    **Compiled steps.** ``compile=True`` runs the loss and its gradient through
    ``torch.compile``, which fuses the elementwise work of every layer. On CUDA it also records
    the whole step (loss, backward, clipping and the optimiser's update) as one CUDA graph after
    three warm-up steps, and from then on replays it for every batch of the same shape: one
    launch per step instead of hundreds, which is what small batches are bound by. The
    optimiser's param groups are switched to ``capturable`` with a tensor learning rate for
    that (LR schedulers update it in place). A batch of another shape takes an ordinary
    compiled step (compiling once more). A string is passed to ``torch.compile`` as its
    ``mode`` instead (e.g. ``"reduce-overhead"``: torch's own CUDA graphs of the loss and its
    gradient, without the optimiser). The first call always runs eagerly, so that
    data-dependent initialisation such as :class:`~pyroflows.transforms.ActNorm`'s happens
    outside any graph; compiling takes seconds to a minute. The default optimiser is Adam with
    its fused implementation where torch has it.

    Args:
        flow: the flow to train (in place).
        optimizer: ``"adam"``, ``"adamw"``, a callable ``params -> torch.optim.Optimizer``, or an
            optimizer already built over the flow's parameters.
        lr: learning rate (of ``"adam"``/``"adamw"``).
        weight_decay: weight decay (of ``"adam"``/``"adamw"``).
        clip_grad: maximum gradient norm, ``None`` for no clipping.
        compile: ``False``, ``True`` or a ``torch.compile`` mode.

    Shapes:
        ``x``: ``(batch, *flow.event_shape)`` (``(batch, dim)`` for vectors); ``context``:
        ``(batch, context_dim)``; returns a 0-d tensor.

    Example:
        >>> import torch, pyroflows as pf
        >>> _ = torch.manual_seed(0)
        >>> flow = pf.MAF(dim=2, layers=2, hidden=(16, 16))
        >>> step = pf.TrainStep(flow, lr=1e-2)
        >>> data = torch.randn(256, 2) * 0.5 + 1.0
        >>> first = step(data)
        >>> for _ in range(50):
        ...     last = step(data)
        >>> bool(last < first)
        True
    """

    #: ordinary (compiled) steps before a CUDA graph is recorded
    WARMUP = 3

    def __init__(
        self,
        flow: Flow,
        optimizer: str | Callable | torch.optim.Optimizer = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        clip_grad: float | None = None,
        compile: bool | str = False,
    ) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f"flow: expected a pyroflows Flow; got {type(flow).__name__}")
        if not lr > 0:
            raise ValueError(f"lr: expected a positive number; got {lr!r}")
        if clip_grad is not None and not clip_grad > 0:
            raise ValueError(f"clip_grad: expected a positive number or None; got {clip_grad!r}")
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile: expected a bool or a torch.compile mode; got {compile!r}")
        self.flow = flow
        self.params = [p for p in flow.parameters() if p.requires_grad]
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        else:
            self.optimizer = _make_optimizer(optimizer, self.params, lr, weight_decay)
        self.clip_grad = clip_grad
        self.compile = compile
        self.calls = 0
        self._compiled: Callable | None = None
        self._capture: bool | None = None  # decided on the first call, from the device
        self._graph: tuple | None = None  # (graph, static x, static context, static loss)

    def _loss(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        # No value-by-value validation of the batch (fit checks its data once, up front; a
        # non-finite batch gives a non-finite loss): the check waits for the device, which a
        # CUDA graph cannot record.
        d = self.flow(context)
        d._validate_args = False
        return -d.log_prob(x).mean()

    def _loss_fn(self) -> Callable:
        if not self.compile or self.calls == 0:
            return self._loss
        if self._compiled is None:
            mode = self.compile if isinstance(self.compile, str) else None
            # torch.compile keeps compiled variants on the function's code object, which every
            # TrainStep would share (a few flows would exhaust dynamo's recompile limit and
            # fall back to eager silently): each step compiles its own copy.
            loss = TrainStep._loss
            own = types.FunctionType(loss.__code__.replace(), loss.__globals__, loss.__name__)
            self._compiled = torch.compile(types.MethodType(own, self), mode=mode, dynamic=False)
        return self._compiled

    def _update(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()

    def _step(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        loss = self._loss_fn()(x, context)
        # Once a graph is recorded, the gradients live in its memory: zero them in place.
        self.optimizer.zero_grad(set_to_none=self._graph is None)
        self._update(loss)
        return loss.detach()

    def _prepare_capture(self, x: torch.Tensor) -> None:
        self._capture = self.compile is True and x.device.type == "cuda"
        if not self._capture:
            return
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
                if not torch.is_tensor(group["lr"]):
                    group["lr"] = torch.tensor(float(group["lr"]), device=x.device)

    def _record(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        static_x = x.clone()
        static_context = None if context is None else context.clone()
        fn = self._loss_fn()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = fn(static_x, static_context)
            self._update(loss)
        self._graph = (graph, static_x, static_context, loss.detach())

    def __call__(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        flow = self.flow
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != flow.event_shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            expected = ", ".join(map(str, flow.event_shape))
            raise ValueError(
                f"TrainStep: expected a batch of shape (batch, {expected}); got {shape}"
            )
        if flow.context_dim and (context is None or context.shape != (len(x), flow.context_dim)):
            shape = None if context is None else tuple(context.shape)
            raise ValueError(
                f"TrainStep: expected a context of shape ({len(x)}, {flow.context_dim}) for the "
                f"conditional flow; got {shape}"
            )
        if self._capture is None:
            self._prepare_capture(x)
        if self._capture:
            graph = self._graph
            if graph is None and self.calls > self.WARMUP:
                self._record(x, context)
                graph = self._graph
            if graph is not None and graph[1].shape == x.shape:
                graph[1].copy_(x)
                if context is not None:
                    graph[2].copy_(context)
                graph[0].replay()
                self.calls += 1
                return graph[3].clone()
            if graph is None and self.calls > 0:
                # Warm-up steps run on a side stream, as CUDA graph capture requires.
                stream = torch.cuda.Stream(device=x.device)
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):
                    loss = self._step(x, context)
                torch.cuda.current_stream(x.device).wait_stream(stream)
                self.calls += 1
                return loss
        loss = self._step(x, context)
        self.calls += 1
        return loss


class _Guard:
    """Remembers the last parameters whose loss was verified finite (two snapshots).

    Losses are checked at sync points (every step on the CPU; every few steps on a GPU, where
    reading a loss waits for the device). ``candidate`` holds the parameters at the start of
    the current window, ``good`` those at the start of the previous one; when a window's losses
    are all finite the candidate is known good.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.good = [p.detach().clone() for p in params]
        self.candidate = [p.detach().clone() for p in params]
        self.good_step = self.candidate_step = -1

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


def _nll(flow: Flow, x: torch.Tensor, c: torch.Tensor | None, device) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), EVAL_BATCH):
            xb = x[start : start + EVAL_BATCH].to(device, non_blocking=True)
            cb = None if c is None else c[start : start + EVAL_BATCH].to(device)
            total += -flow(cb).log_prob(xb).sum().item()
    return total / len(x)


@dataclass
class _Loop:
    """Steps, the non-finite guard, validation with best state, the bar, checkpoints, callback.

    The owner supplies ``step() -> loss`` (one optimiser step; the loss of the state before it,
    a float or a 0-d tensor), ``params()`` (the live tensors the guard snapshots and restores),
    ``evaluate() -> float`` (or ``None``), ``snapshot()``/``restore(s)`` for the best state and
    ``save()`` for a checkpoint; it reads ``best``/``since_best``/``history`` back afterwards.
    """

    name: str
    total: int
    history: History
    step: Callable[[], torch.Tensor | float]
    params: Callable[[], list[torch.Tensor]]
    evaluate: Callable[[], float] | None
    snapshot: Callable[[], Any]
    restore: Callable[[Any], None]
    eval_every: int
    patience: int | None
    callback: Callable[[int, History], bool | None] | None
    progress: bool
    sync_every: int
    label: str
    what: str
    advice: str
    save: Callable[[], None] | None = None
    best: Any = None
    since_best: int = 0

    def _flush(self, pending: list, step: int, guard: _Guard, t0: float) -> None:
        if not pending:
            return
        values = [
            float(v)
            for v in (torch.stack(pending).tolist() if torch.is_tensor(pending[0]) else pending)
        ]
        first = step - len(values)
        pending.clear()
        for i, v in enumerate(values):
            if not math.isfinite(v):
                self.history.train_loss.extend(values[:i])
                self.history.steps = first + i
                self.history.seconds += time.perf_counter() - t0
                restored = guard.restore(first + i)
                raise TrainingDiverged(
                    f"{self.name}: the loss at step {first + i} is {v}; {self.what} was restored "
                    f"to its state at step {max(restored, 0)}, the last with a finite loss. "
                    f"{self.advice}",
                    self.history,
                    first + i,
                )
        self.history.train_loss.extend(values)

    def _evaluate(self, step: int) -> bool:
        if self.evaluate is None:
            return False
        value = float(self.evaluate())
        history = self.history
        history.valid_steps.append(step)
        history.valid_nll.append(value)
        if history.best_valid_nll is None or value < history.best_valid_nll:
            history.best_valid_nll, history.best_step = value, step
            self.best = self.snapshot()
            self.since_best = 0
        else:
            self.since_best += 1
        return self.patience is not None and self.since_best >= self.patience

    def run(self, start: int) -> History:
        history = self.history
        params = self.params()
        guard = _Guard(params)
        pending: list = []
        bar = tqdm(
            total=self.total, initial=start, disable=not self.progress, unit="step", desc=self.name
        )
        t0 = time.perf_counter()
        step = window = start
        try:
            while step < self.total:
                if step % self.sync_every == 0:
                    self._flush(pending, step, guard, t0)
                    current = self.params()
                    if len(current) != len(guard.params):  # a parameter appeared: guard it too
                        guard = _Guard(current)
                    guard.advance(step)
                pending.append(self.step())
                step += 1
                bar.update(1)
                if step % self.eval_every == 0 or step == self.total:
                    self._flush(pending, step, guard, t0)
                    history.steps = step
                    stop = self._evaluate(step)
                    recent = history.train_loss[window:]
                    window = len(history.train_loss)
                    postfix = {self.label: f"{sum(recent) / max(len(recent), 1):.4g}"}
                    if history.valid_nll:
                        postfix["valid"] = f"{history.valid_nll[-1]:.4g}"
                    bar.set_postfix(postfix, refresh=False)
                    if self.save is not None:
                        self.save()
                    if self.callback is not None and self.callback(step, history):
                        break
                    if stop:
                        history.stopped_early = True
                        break
        except KeyboardInterrupt:
            history.interrupted = True
            self._flush(pending, step, guard, t0)
            history.steps = step
        finally:
            bar.close()
        history.seconds += time.perf_counter() - t0
        if self.best is not None:
            self.restore(self.best)
        if (history.interrupted or history.stopped_early) and self.save is not None:
            self.save()
        return history


def _schedule(
    opt: torch.optim.Optimizer, scheduler: str | None, warmup: int, total: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule of :func:`fit`: linear warmup, then cosine decay to 0."""
    if scheduler is None and not warmup:
        return None

    def factor(step: int) -> float:
        rise = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if scheduler == "cosine":
            return rise * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        return rise

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    flow: Flow,
    data: torch.Tensor | np.ndarray,
    *,
    context: torch.Tensor | np.ndarray | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    optimizer: str | Callable = "adam",
    weight_decay: float = 0.0,
    scheduler: str | None = "cosine",
    warmup: int = 0,
    valid: float | torch.Tensor | np.ndarray | None = 0.1,
    valid_context: torch.Tensor | np.ndarray | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    clip_grad: float | None = 10.0,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int | None = None,
    callback: Callable[[int, History], bool | None] | None = None,
    compile: bool | str = False,
    dequantize: int | None = None,
) -> History:
    """Fit a flow to data by maximum likelihood (minibatch Adam on the mean NLL).

    The validation NLL is measured every ``eval_every`` steps; at the end the flow holds the
    parameters of the best one (or the last step's, without validation).

    Args:
        flow: the flow to train (in place).
        data: ``(N, dim)`` tensor or array (``(N, C, H, W)`` for an image flow: ``(N,
            *flow.event_shape)``); converted to the flow's dtype.
        context: ``(N, context_dim)`` contexts for a conditional flow (p(x | c)).
        steps: number of optimiser steps (default 1000 unless ``epochs`` is given).
        epochs: number of passes over the training data (instead of ``steps``).
        batch_size: rows per step.
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or a callable ``params -> torch.optim.Optimizer``.
        weight_decay: weight decay of the Adam optimisers.
        scheduler: ``"cosine"`` (decay to 0 over the run) or ``None`` (constant rate).
        warmup: steps over which the learning rate rises linearly from ``lr / warmup`` to
            ``lr`` before the schedule takes over (multiplying it). Deep, wide flows such as
            :class:`~pyroflows.flows.Glow` with 256-channel conditioners need a few hundred
            steps of it: at the full rate from the start their zero-initialised couplings take
            steps large enough to wreck the initialisation.
        valid: a fraction of ``data`` to hold out (taken at random), a validation tensor, or
            ``None``/``0`` for none.
        valid_context: the contexts of a validation tensor (conditional flows).
        eval_every: steps between validations (default: about 40 per run).
        patience: stop after this many validations without improvement (default: never).
        clip_grad: maximum gradient norm (``None``: no clipping).
        device: train there (``"cuda"``); the flow stays there afterwards. Data up to 1 GiB moves
            with it, larger data moves one batch at a time.
        progress: show a progress bar (step, train and validation NLL, steps/s).
        checkpoint: a folder where the run's complete state is written at every validation and
            at the end (``state.pt``, loaded with ``weights_only=True``, and ``model/`` as
            written by :func:`pyroflows.save` when the flow has a builder configuration).
        resume: continue from ``checkpoint`` when it holds a run (the same flow architecture,
            data and arguments give the same result as an uninterrupted run).
        seed: seeds the validation split, the minibatches and torch's global generator.
        callback: called as ``callback(step, history)`` after every validation; returning
            ``True`` stops training.
        compile: run each step through ``torch.compile`` (``True``, or a ``torch.compile``
            mode); see :class:`TrainStep`. Every step then takes a full batch (the rows left
            over when ``batch_size`` does not divide the training set are skipped in that
            epoch, a different few each epoch), so that one compiled graph serves the run.
        dequantize: for discrete images, their bit depth (``8``): ``data`` then holds integers
            in ``[0, 2**bits - 1]`` and every batch is dequantised afresh,
            ``(x + u) / 2**bits`` with uniform ``u`` (:func:`pyroflows.images.dequantize`),
            so the flow models ``[0, 1]`` images (use one ending in
            :class:`~pyroflows.transforms.ImageSigmoid`); validation data is dequantised once.
            Report the result with :func:`pyroflows.images.bits_per_dim`.

    Returns:
        A :class:`History`.

    Raises:
        ValueError: for data of the wrong shape or with NaN/inf (naming the rows), missing or
            mis-sized contexts, or inconsistent arguments; nothing is trained then.
        TrainingDiverged: when a loss is NaN or infinite; the flow is first restored to its last
            state whose loss was finite, and the exception carries the history.

    Example:
        >>> import torch, pyroflows as pf
        >>> _ = torch.manual_seed(0)
        >>> data = torch.randn(512, 2) * torch.tensor([2.0, 0.5]) + 1.0
        >>> flow = pf.RealNVP(dim=2, layers=2, hidden=(16,))
        >>> history = pf.fit(flow, data, steps=200, progress=False, seed=0)
        >>> history.best_valid_nll < history.valid_nll[0]
        True
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow: expected a pyroflows Flow; got {type(flow).__name__}")
    if steps is not None and epochs is not None:
        raise ValueError("steps, epochs: give one of them, not both")
    for name, value in (("batch_size", batch_size), ("steps", steps), ("epochs", epochs)):
        if value is not None:
            check_positive_int(name, value)
    if not lr > 0:
        raise ValueError(f"lr: expected a positive number; got {lr!r}")
    if scheduler not in ("cosine", None):
        raise ValueError(f"scheduler: expected 'cosine' or None; got {scheduler!r}")
    check_nonnegative_int("warmup", warmup)
    if resume and checkpoint is None:
        raise ValueError("resume: needs the checkpoint folder to resume from")

    params = list(flow.parameters())
    dtype = params[0].dtype if params else torch.get_default_dtype()
    x = _as_tensor("data", data, dtype)
    _check_rows("data", x, flow.event_shape, "one row per point, each of the flow's event shape")
    c = None
    if flow.context_dim:
        if context is None:
            raise ValueError(
                f"context: the flow was built with context_dim={flow.context_dim}; pass one "
                f"context row per data row, shape (N, {flow.context_dim})"
            )
        c = _as_tensor("context", context, dtype)
        _check_rows("context", c, flow.context_dim, "one context per data row")
        if len(c) != len(x):
            raise ValueError(f"context: expected {len(x)} rows, one per data row; got {len(c)}")
    elif context is not None:
        raise ValueError("context: the flow is unconditional (context_dim=0); got a context")

    if seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    x, c, xv, cv = _split(x, c, valid, valid_context, generator, flow, dtype)
    if dequantize is not None:
        from .images import dequantize as _dequantize

        check_positive_int("dequantize", dequantize)
        _dequantize(x, dequantize)  # refuses data that are not integers in range
        if xv is not None:
            xv = _dequantize(xv, dequantize, generator=generator).to(dtype)
    n = len(x)
    if compile and n >= batch_size:
        steps_per_epoch = n // batch_size  # full batches only: one compiled graph
    else:
        steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch if epochs is not None else (steps or DEFAULT_STEPS)
    eval_every = eval_every or max(1, total // 40)

    device = torch.device(device) if device is not None else (params[0].device if params else None)
    flow.to(device)
    params = list(flow.parameters())
    if x.numel() * x.element_size() <= DEVICE_DATA_BYTES:
        x = x.to(device)
        c = None if c is None else c.to(device)

    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    train_step = TrainStep(flow, opt, clip_grad=clip_grad, compile=compile)
    sched = _schedule(opt, scheduler, warmup, total)
    history = History()
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    start = 0
    order = torch.randperm(n, generator=generator)
    folder = Path(checkpoint) if checkpoint is not None else None
    if resume and folder is not None and (folder / "state.pt").is_file():
        saved = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        flow.load_state_dict(saved["flow"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None and saved["scheduler"] is not None:
            sched.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        order = saved["order"]
        history = History(**saved["history"])
        history.seconds = 0.0
        best_state = saved["best"]
        since_best = saved["since_best"]
        start = history.steps
        if start >= total:
            raise ValueError(
                f"resume: the checkpoint in {folder} has already run {start} of {total} steps"
            )
    elif len(x):
        # Data-dependent initialisation (ActNorm) from one large batch rather than the first
        # minibatch.
        with torch.no_grad():
            first = x[:INIT_BATCH].to(device)
            if dequantize is not None:
                first = (first + torch.rand_like(first)) / 2**dequantize
            flow(None if c is None else c[:INIT_BATCH]).log_prob(first)

    loop: _Loop

    def one_step() -> torch.Tensor:
        nonlocal order, step
        position = step % steps_per_epoch
        if position == 0 and step > 0:
            order = torch.randperm(n, generator=generator)
        idx = order[position * batch_size : (position + 1) * batch_size]
        xb = x[idx.to(x.device)].to(device, non_blocking=True)
        if dequantize is not None:
            xb = (xb + torch.rand_like(xb)) / 2**dequantize
        cb = None if c is None else c[idx.to(c.device)].to(device, non_blocking=True)
        loss = train_step(xb, cb)
        if sched is not None:
            sched.step()
        step += 1
        return loss

    def save_checkpoint() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "flow": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "generator": generator.get_state(),
            "order": order,
            "history": asdict(loop.history),
            "best": None if loop.best is None else {k: v.cpu() for k, v in loop.best.items()},
            "since_best": loop.since_best,
        }
        torch.save(state, folder / "state.pt.tmp")
        os.replace(folder / "state.pt.tmp", folder / "state.pt")
        if flow.config is not None:
            from .io import save

            save(flow, folder / "model")

    step = start
    loop = _Loop(
        name="fit",
        total=total,
        history=history,
        step=one_step,
        params=lambda: params,
        evaluate=None if xv is None else (lambda: _nll(flow, xv, cv, device)),
        snapshot=lambda: {k: v.detach().clone() for k, v in flow.state_dict().items()},
        restore=flow.load_state_dict,
        eval_every=eval_every,
        patience=patience,
        callback=callback,
        progress=progress,
        sync_every=1 if device is None or device.type == "cpu" else 25,
        label="train",
        what="the flow",
        advice="Try a lower lr, gradient clipping (clip_grad) or standardised data.",
        save=None if folder is None else save_checkpoint,
        best=best_state,
        since_best=since_best,
    )
    return loop.run(start)
