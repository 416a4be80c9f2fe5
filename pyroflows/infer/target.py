"""Reverse-KL fitting of a flow to an unnormalised log-density: :func:`fit_target`.

The flow is the variational family and ``log_p`` the target; the loss is the engine's
:class:`~pyroflows.engine.ReverseKL`, whose negative is the ELBO, a lower bound on ``log Z``.
Its companions for Pyro models are the objectives of :mod:`pyroflows.infer.objectives` and
:func:`~pyroflows.infer.log_evidence`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .._checks import check_positive, check_positive_int, check_run
from ..engine import (
    DIVERGENCE,
    Checkpoint,
    History,
    NoData,
    ReverseKL,
    Step,
    make_optimizer,
    schedule,
    train,
)
from ..engine.distributed import resolve
from ..flows import Flow

__all__ = ["fit_target"]

DEFAULT_STEPS = 1000


def fit_target(
    flow: Flow,
    log_p: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int = DEFAULT_STEPS,
    num_particles: int = 64,
    lr: float = 1e-3,
    optimizer: str | Callable = "adam",
    weight_decay: float = 0.0,
    scheduler: str | None = "cosine",
    clip_grad: float | None = 10.0,
    eval_particles: int | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int | None = None,
    callback: Callable[[int, History], bool | None] | None = None,
    divergence: float | None = DIVERGENCE,
    compile: bool | str = False,
    distributed: bool | None = None,
) -> History:
    """Fit a flow ``q`` to an unnormalised density ``p`` by minimising the reverse KL divergence.

    Each step draws ``num_particles`` reparameterised samples ``z ~ q`` and minimises the
    Monte Carlo estimate of

    ``E_q[log q(z) - log p(z)] = KL(q || p / Z) - log Z``,

    whose negative is a lower bound (the ELBO) on ``log Z = log ∫ p``. For IAF and coupling
    flows the sampling direction is one pass and ``log q`` of the flow's own samples needs no
    inversion; a MAF samples in ``dim`` sequential passes. The reverse KL is mode-seeking: on
    a multimodal target the flow may cover only some modes.

    The same flow is reachable from a Pyro model, with a flat dummy prior and a factor::

        def model():
            z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (2,)))
            pyro.factor("target", log_p(z))

        guide = pf.infer.AutoFlowGuide(model, flow="iaf")
        pf.infer.fit_svi(model, guide, steps=2000)

    Args:
        flow: an unconditional :class:`~pyroflows.Flow` over ``R^dim`` (trained in place).
        log_p: the target's unnormalised log-density: maps ``(n, dim)`` points to ``(n,)``
            log-densities, differentiably.
        steps: number of optimiser steps.
        num_particles: samples per step.
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or a callable ``params -> torch.optim.Optimizer``.
        weight_decay: weight decay of the Adam optimisers.
        scheduler: ``"cosine"`` (decay to 0 over the run) or ``None``.
        clip_grad: maximum gradient norm (``None``: no clipping).
        eval_particles: when given, the loss is also estimated every ``eval_every`` steps with
            this many samples (without gradients) into ``history.valid_nll``, and the flow
            ends with the parameters of the best such estimate.
        eval_every: steps between evaluations, checkpoints and callbacks (default: about 40
            per run).
        patience: stop after this many evaluations without improvement (needs
            ``eval_particles``).
        device: train there; the flow stays there afterwards.
        progress: show a progress bar (loss, evaluation, steps/s).
        checkpoint: a folder where the run's state is written (``state.pt``, loaded with
            ``weights_only=True``).
        resume: continue from ``checkpoint`` when it holds a run (the same flow, target and
            arguments give the same result as an uninterrupted run; other ones are refused).
        seed: seeds torch's global generator.
        callback: called as ``callback(step, history)`` after every evaluation point;
            returning ``True`` stops training.
        divergence: a loss above ``best + divergence * max(1, |best|)`` (``best``: the lowest
            so far) for three steps in a row stops training as a NaN does; ``None`` checks for
            NaN/inf only.
        compile: ``True`` (or a ``torch.compile`` mode) compiles the step (the draw, ``log q``,
            ``log_p`` if it is torch code, the backward pass; on CUDA the whole step with the
            optimiser as one CUDA graph): seconds to a minute once, then faster steps.

        distributed: train data-parallel on ``torch.distributed`` as :func:`pyroflows.fit`
            does (``None``: when a process group or ``torchrun`` is there): every rank draws
            its own ``num_particles`` (with ``seed``, rank ``r`` seeds torch with ``seed +
            r``) and ``DistributedDataParallel`` averages the gradients, so a step uses
            ``world * num_particles`` draws; evaluations average the ranks' estimates.

    Returns:
        A :class:`~pyroflows.History` whose ``train_loss`` holds each step's estimate of
        ``KL(q || p / Z) - log Z`` (nats).

    Raises:
        ValueError: for inconsistent arguments, a conditional flow, or a ``log_p`` that does not
            return one value per sample.
        TrainingDiverged: when a loss is NaN or infinite or diverges (``divergence``); the flow
            is first restored to its last state before that.
        CheckpointError: (a ``ValueError``) when ``resume`` finds a checkpoint that cannot be
            continued (unreadable, of another run, or finished).

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.infer import fit_target
        >>> target = torch.distributions.MultivariateNormal(
        ...     torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.8], [0.8, 1.0]]))
        >>> flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)  # affine: exact here
        >>> history = fit_target(flow, target.log_prob, steps=150, lr=2e-2, progress=False, seed=0)
        >>> abs(history.train_loss[-1]) < 0.1  # KL - log Z, with log Z = 0 here
        True
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow: expected a pyroflows Flow; got {type(flow).__name__}")
    if flow.context_dim:
        raise ValueError(
            f"flow: expected an unconditional flow; got context_dim={flow.context_dim}"
        )
    if not callable(log_p):
        raise TypeError(f"log_p: expected a callable z -> log p(z); got {type(log_p).__name__}")
    for name, value in (("steps", steps), ("num_particles", num_particles)):
        check_positive_int(name, value)
    if eval_particles is not None:
        check_positive_int("eval_particles", eval_particles)
    check_positive("lr", lr)
    if scheduler not in ("cosine", None):
        raise ValueError(f"scheduler: expected 'cosine' or None; got {scheduler!r}")
    check_run(eval_every, patience, None, checkpoint, resume)
    if patience is not None and eval_particles is None:
        raise ValueError("patience: early stopping needs evaluations; give eval_particles")

    params = list(flow.parameters())
    device = torch.device(device) if device is not None else (params[0].device if params else None)
    group = resolve(distributed, device)
    if group is not None and group.device is not None:
        device = group.device
    if seed is not None:
        torch.manual_seed(seed + (group.rank if group is not None else 0))
    flow.to(device)
    loss = ReverseKL(flow, log_p, num_particles, eval_particles)
    opt = make_optimizer(optimizer, loss.parameters(), lr, weight_decay)
    settings = dict(lr=lr, optimizer=optimizer, weight_decay=weight_decay, seed=seed)
    settings.update(scheduler=scheduler, clip_grad=clip_grad)
    saved = Checkpoint.for_run(checkpoint, "fit_target", loss, **settings)
    return train(
        Step(loss, opt, clip_grad=clip_grad, compile=compile),
        NoData(),
        steps,
        name="fit_target",
        schedule=schedule(opt, steps, cosine=scheduler == "cosine"),
        valid=None if eval_particles is None else [None],
        eval_every=eval_every,
        patience=patience,
        callback=callback,
        progress=progress,
        checkpoint=saved,
        resume=resume,
        divergence=divergence,
        distributed=group,
    )
