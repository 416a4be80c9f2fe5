"""Training flows on data: :func:`fit`, a front-end to :mod:`pyroflows.engine`.

``fit`` minimises the mean negative log-likelihood of data (the forward KL divergence from the
data distribution to the flow; or, for a continuous flow, the flow-matching loss) with
minibatches, keeps the best state by validation NLL, stops early when asked, and guards the
run: bad data is refused before training, a diverging loss (NaN, inf, or far above its best)
stops training with the flow restored to its last good state, Ctrl-C keeps the best state so
far, and a checkpoint folder lets a killed run resume exactly where it stopped.
:class:`~pyroflows.engine.TrainStep`, :class:`~pyroflows.engine.History` and
:class:`~pyroflows.engine.TrainingDiverged` live in the engine and are re-exported here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import images
from ._checks import (
    check_length,
    check_nonnegative_int,
    check_positive,
    check_positive_int,
    check_run,
)
from .engine import (
    DIVERGENCE,
    Batches,
    Checkpoint,
    FlowMatching,
    History,
    Loss,
    NegativeLogLikelihood,
    Step,
    TrainingDiverged,
    TrainStep,
    make_optimizer,
    schedule,
    train,
)
from .engine.distributed import resolve
from .engine.sources import (
    VALID_ROWS,
    as_rows,
    check_rows,
    default_eval_every,
    make_generator,
    shard_of,
    split,
    validation_chunks,
)
from .flows import Flow
from .io import can_save, save
from .transforms.continuous import continuous_transforms

__all__ = ["History", "TrainStep", "TrainingDiverged", "fit"]

DEFAULT_STEPS = 1000
EVAL_BATCH = 4096
#: the default ``valid_rows`` of a flow with a continuous transform (each validation row is an
#: ODE solve with the exact trace, against one network pass for the other flows)
CONTINUOUS_VALID_ROWS = 2000
#: the losses :func:`fit` names
LOSSES = ("nll", "flow_matching")


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
    valid_rows: int | str | None = "auto",
    divergence: float | None = DIVERGENCE,
    distributed: bool | None = None,
    loss: str | Loss = "nll",
) -> History:
    """Fit a flow to data by maximum likelihood (minibatch Adam on the mean NLL), or a continuous
    flow by flow matching.

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
        valid_rows: validate on at most this many rows (evenly spaced through the validation
            set, which a held-out fraction has already shuffled): the NLL of 20,000 rows has a
            standard error of under 1% of the data's standard deviation of log q, and checking
            200,000 rows after every step would cost more than training. ``None``: all rows.
            ``"auto"`` (default): 20,000, or 2,000 (:data:`CONTINUOUS_VALID_ROWS`) for a flow
            with a continuous transform (:class:`~pyroflows.CNF`), where each is an ODE solve.
        eval_every: steps between validations (default: about 40 per run, but never fewer
            training rows between two validations than validation rows, so that validating
            costs at most about a third of training; with ``loss="flow_matching"``,
            ``20 (dim + 2)`` training rows per validation row, since validating solves the ODE
            with the exact trace and training does not, but at least 5 validations per run).
        patience: stop after this many validations without improvement (default: never).
        clip_grad: maximum gradient norm (``None``: no clipping).
        device: train there (``"cuda"``); the flow stays there afterwards. Data up to 1 GiB moves
            with it, larger data moves one batch at a time.
        progress: show a progress bar (step, train and validation NLL, steps/s).
        checkpoint: a folder where the run's complete state is written at every validation and
            at the end (``state.pt``, loaded with ``weights_only=True``, and ``model/`` as
            written by :func:`pyroflows.save` when the flow has a builder configuration).
        resume: continue from ``checkpoint`` when it holds a run (the same flow architecture,
            data and arguments give the same result as an uninterrupted run); a checkpoint made
            with another flow, other data or other settings is refused, naming what differs.
        seed: seeds the validation split, the minibatches and torch's global generator. Without
            a seed the split and minibatches are random, except with a ``checkpoint``, where
            they use seed 0 so that a resumed run holds out the same rows.
        callback: called as ``callback(step, history)`` after every validation; returning
            ``True`` stops training.
        compile: run each step through ``torch.compile`` (``True``, or a ``torch.compile``
            mode); see :class:`TrainStep`. Every step then takes a full batch (the rows left
            over when ``batch_size`` does not divide the training set are skipped in that
            epoch, a different few each epoch), so that one compiled graph serves the run.
        divergence: a loss above ``best + divergence * max(1, |best|)``, with ``best`` the
            lowest loss so far, for three steps in a row stops training as a NaN does (a run that
            blows up while staying finite; one far loss alone is let through); ``None`` checks
            for NaN/inf only.
        dequantize: for discrete images, their bit depth (``8``): ``data`` then holds integers
            in ``[0, 2**bits - 1]`` and every batch is dequantised afresh,
            ``(x + u) / 2**bits`` with uniform ``u`` (:func:`pyroflows.images.dequantize`),
            so the flow models ``[0, 1]`` images (use one ending in
            :class:`~pyroflows.transforms.ImageSigmoid`); validation data is dequantised once.
            Report the result with :func:`pyroflows.images.bits_per_dim`.
        distributed: train data-parallel on ``torch.distributed`` (docs: "Scaling out"):
            ``None`` (default) when a process group of several ranks exists or ``torchrun``
            launched this process (the group is then joined: NCCL for a CUDA ``device``, gloo
            otherwise); ``True`` requires one; ``False`` trains this process alone. Every
            rank passes the same flow (built alike; rank 0's values are broadcast) and the
            whole ``data``; each takes ``batch_size`` rows of every global batch of ``world *
            batch_size`` (only full global batches), gradients are averaged by
            ``DistributedDataParallel``, validation is split across ranks, and rank 0 alone
            writes the checkpoint and shows progress. ``device="cuda"`` means each rank's
            own GPU (``LOCAL_RANK``). With ``seed``, rank ``r`` seeds torch with ``seed + r``.
        loss: ``"nll"`` (maximum likelihood, the default), ``"flow_matching"`` (a continuous
            flow's velocity regressed on straight paths from its base to the data:
            :class:`~pyroflows.engine.FlowMatching` with its defaults; the recorded training
            loss is then the regression loss, and validation is still the exact NLL), or a
            loss object built on ``flow``, e.g. ``FlowMatching(flow, coupling="ot")``.

    Returns:
        A :class:`History`.

    Raises:
        ValueError: for data of the wrong shape or with NaN/inf (naming the rows), missing or
            mis-sized contexts, or inconsistent arguments; nothing is trained then.
        TrainingDiverged: when a loss is NaN or infinite, or far above the lowest so far (see
            ``divergence``); the flow is first restored to its last state before that, and the
            exception carries the history.
        CheckpointError: (a ``ValueError``) when ``resume`` finds a checkpoint that cannot be
            continued: unreadable, of another format, made by another run, or finished.

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
    check_length(steps, epochs, batch_size)
    check_positive("lr", lr)
    if scheduler not in ("cosine", None):
        raise ValueError(f"scheduler: expected 'cosine' or None; got {scheduler!r}")
    check_nonnegative_int("warmup", warmup)
    if dequantize is not None:
        check_positive_int("dequantize", dequantize)
    if valid_rows == "auto":
        valid_rows = CONTINUOUS_VALID_ROWS if continuous_transforms(flow) else VALID_ROWS
    check_run(eval_every, patience, valid_rows, checkpoint, resume)
    loss = _loss(flow, loss)

    params = list(flow.parameters())
    dtype = params[0].dtype if params else torch.get_default_dtype()
    rows = _flow_rows(flow, "data", data, "context", context, dtype)
    device = torch.device(device) if device is not None else (params[0].device if params else None)
    group = resolve(distributed, device)
    if group is not None and group.device is not None:
        device = group.device
    if seed is not None:
        torch.manual_seed(seed + (group.rank if group is not None else 0))
    generator = make_generator(seed, checkpoint, group)
    train_rows, valid_set = split(rows, valid, generator)
    if valid_set is not None and valid_set is valid:
        valid_set = _flow_rows(flow, "valid", valid, "valid_context", valid_context, dtype)
    prepare, valid_set = _dequantization(dequantize, train_rows, valid_set, generator, dtype)

    flow.to(device)
    shard = shard_of(group)
    source = Batches(train_rows, batch_size, generator, device, bool(compile), prepare, shard)
    total = epochs * source.steps_per_epoch if epochs is not None else (steps or DEFAULT_STEPS)
    opt = make_optimizer(optimizer, loss.parameters(), lr, weight_decay)
    chunks = validation_chunks(valid_set, valid_rows, EVAL_BATCH, device, shard)
    folder = None if checkpoint is None else Path(checkpoint)
    settings = dict(batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed)
    settings.update(weight_decay=weight_decay, scheduler=scheduler, warmup=warmup)
    settings.update(clip_grad=clip_grad, dequantize=dequantize, compile=compile)
    saved = Checkpoint.for_run(folder, "fit", loss, rows, valid_set, **settings)
    return train(
        Step(loss, opt, clip_grad=clip_grad, compile=compile),
        source,
        total,
        name="fit",
        schedule=schedule(opt, total, cosine=scheduler == "cosine", warmup=warmup),
        valid=chunks,
        eval_every=eval_every
        or default_eval_every(total, chunks, batch_size * shard[1], loss.validation_cost),
        patience=patience,
        callback=callback,
        progress=progress,
        checkpoint=saved,
        resume=resume,
        on_save=None
        if folder is None or not can_save(flow)
        else lambda: save(flow, folder / "model"),
        divergence=divergence,
        distributed=group,
    )


def _loss(flow: Flow, loss: str | Loss) -> Loss:
    """The loss object ``fit`` minimises for ``loss`` (a name, or a loss built on ``flow``)."""
    if isinstance(loss, Loss):
        if getattr(loss, "flow", None) is not flow:
            raise ValueError(
                "loss: expected a loss built on the flow being fitted; got a "
                f"{type(loss).__name__} of another flow (build it as FlowMatching(flow, ...) "
                "with this flow)"
            )
        if not isinstance(loss, (NegativeLogLikelihood, FlowMatching)):
            raise ValueError(
                f"loss: fit trains on data with NegativeLogLikelihood or FlowMatching; got "
                f"{type(loss).__name__} (use pyroflows.engine.train for other losses)"
            )
        return loss
    if loss == "nll":
        return NegativeLogLikelihood(flow)
    if loss == "flow_matching":
        return FlowMatching(flow)
    raise ValueError(f"loss: expected one of {LOSSES} or a loss object; got {loss!r}")


def _flow_rows(flow: Flow, name: str, data: Any, context_name: str, context: Any, dtype):
    """``(x,)`` or ``(x, context)`` for ``flow``, checked and converted to its dtype."""
    (x,) = as_rows(name, data, dtype)
    check_rows(name, x, flow.event_shape, "one row per point, each of the flow's event shape")
    if not flow.context_dim:
        if context is not None:
            raise ValueError(f"{context_name}: the flow is unconditional (context_dim=0); got one")
        return (x,)
    if context is None:
        raise ValueError(
            f"{context_name}: the flow was built with context_dim={flow.context_dim}; pass one "
            f"context row per data row, shape (N, {flow.context_dim})"
        )
    (c,) = as_rows(context_name, context, dtype)
    check_rows(context_name, c, flow.context_dim, "one context per data row")
    if len(c) != len(x):
        raise ValueError(f"{context_name}: expected {len(x)} rows, one per data row; got {len(c)}")
    return x, c


def _dequantization(bits: int | None, train_rows: tuple, valid_set: tuple | None, generator, dtype):
    """With ``bits``: the per-batch dequantisation of training images (torch's global generator,
    which checkpoints save, so resumed runs repeat it), and the validation set dequantised once
    (from ``generator``); without, nothing and the validation set as it is."""
    if bits is None:
        return None, valid_set
    images.check_images(train_rows[0], bits)  # refuses data that are not integers in range
    if valid_set is not None:
        noisy = images.dequantize(valid_set[0], bits, generator=generator).to(dtype)
        valid_set = (noisy, *valid_set[1:])
    return functools.partial(images.dequantize, bits=bits, check=False), valid_set
