"""Stochastic variational inference with the conventions of :func:`pyroflows.fit`.

:func:`fit_svi` trains a model and a guide with a Pyro ELBO: a Bayesian model for a number of
steps, or a VAE-style model over a data set in minibatches. It is a front-end to the training
engine (:mod:`pyroflows.engine`, loss :class:`~pyroflows.engine.SVILoss`), which keeps
:func:`pyroflows.fit`'s guards: a diverging loss stops training with
:class:`~pyroflows.TrainingDiverged` and the parameters restored to their last good state;
validation keeps the best state and stops early when asked; Ctrl-C keeps the best state so far;
a checkpoint folder lets a killed run resume exactly; a tqdm bar shows the loss and steps/s.
Reverse-KL fitting of a flow to a log-density, :func:`~pyroflows.infer.fit_target`, lives in
:mod:`pyroflows.infer.target`.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.optim
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from .._checks import check_length, check_positive, check_run
from ..engine import (
    DIVERGENCE,
    Batches,
    Checkpoint,
    History,
    NoData,
    PyroOptimizer,
    Step,
    SVILoss,
    make_optimizer,
    make_pyro_optimizer,
    schedule,
    train,
)
from ..engine.distributed import resolve
from ..engine.sources import (
    VALID_ROWS,
    as_rows,
    default_eval_every,
    make_generator,
    shard_of,
    split,
    validation_chunks,
)
from .fast import default_loss, fast_loss

__all__ = ["fit_svi"]

DEFAULT_STEPS = 1000
#: the default learning rate on the fast path (with the cosine schedule), measured on
#: benchmarks/vi.py's targets against 1e-3 and 1e-2
FAST_LR = 3e-3
#: the default learning rate elsewhere (constant), as Pyro's examples use
TRACED_LR = 1e-3
# Keyword arguments through which a model and guide learn which minibatch they see.
BATCH_KEYWORDS = ("size", "subsample")


def _accepts(fn: Callable, names: Sequence[str]) -> bool:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True
    return all(name in parameters for name in names)


def _to(value: Any, device: torch.device | None) -> Any:
    return value.to(device) if device is not None and isinstance(value, torch.Tensor) else value


def fit_svi(
    model: Callable,
    guide: Callable,
    *args: Any,
    loss: pyro.infer.ELBO | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    data: Any = None,
    batch_size: int = 256,
    lr: float | None = None,
    optimizer: str | pyro.optim.PyroOptim = "adam",
    valid: Any = None,
    eval_every: int | None = None,
    patience: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int | None = None,
    callback: Callable[[int, History], bool | None] | None = None,
    valid_rows: int | None = VALID_ROWS,
    divergence: float | None = DIVERGENCE,
    fast: bool | None = None,
    compile: bool | str = False,
    scheduler: str | None = "auto",
    anneal: float | None = None,
    distributed: bool | None = None,
    **kwargs: Any,
) -> History:
    """Train a guide (and the model's parameters) by stochastic variational inference.

    Runs ``pyro.infer.SVI(model, guide, optimizer, loss)`` with :func:`pyroflows.fit`'s guards.
    Parameters live in Pyro's param store, where the model and guide put them (``pyro.param``,
    ``pyro.module``, an autoguide); at the end the store holds the best state by validation
    loss (or the last one, without validation).

    **The fast path.** A flow guide (:class:`~pyroflows.infer.AutoFlowGuide`) on a model without
    ``data`` is trained without Pyro's per-step tracing: the model is recorded once as a tensor
    function of the guide's latent vector (:class:`~pyroflows.infer.Potential`) and each step
    draws all particles in one call, scores them and steps the optimiser in plain torch
    (:mod:`pyroflows.infer.fast`), eagerly or, with ``compile=True``, through ``torch.compile``
    (one CUDA graph per step on CUDA). The losses and gradients are those of the same objective
    on the same draws. A model that does not qualify (discrete or subsampled latents, parameters
    of its own, a structure that changes between calls, a model that cannot run on a batch of
    particles), or an objective without a fast equivalent, is trained the traced way, after a
    :class:`~pyroflows.infer.FastPathUnavailable` warning saying why (``fast=False`` chooses the
    traced path silently; ``fast=True`` makes the reason an error).

    **Two calling conventions.** Without ``data`` (a Bayesian model), each step calls
    ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)``. With ``data`` (a VAE, or a model
    trained on minibatches of a data set), each step draws a minibatch of rows and calls::

        model(*batch, *args, size=N, subsample=idx, **kwargs)   # and the guide alike

    where ``batch`` holds the minibatch's rows of each tensor in ``data`` (one tensor, or a
    tuple such as ``(x, y)``), ``N`` is the number of rows of the data set the batch comes from
    (training or validation set) and ``idx`` are the batch's row indices in it. Pass them on to
    the data plate, ``pyro.plate("data", size, subsample=subsample)``: the plate then scales
    the batch's log-densities by ``N / len(batch)``, so the minibatch loss is an unbiased
    estimate of the loss on all ``N`` rows, global latent variables (outside the plate) are
    counted once, and local ``pyro.param``\\ s inside the plate are indexed by ``idx``. Giving
    the keywords defaults keeps the model usable on its own::

        def model(x, size=None, subsample=None):
            with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
                ...

    In that mode the recorded losses are per data point (the loss estimate divided by ``N``),
    so training and validation values compare.

    **Checkpoints.** A checkpoint (the engine's format, :class:`~pyroflows.engine.Checkpoint`)
    holds each parameter's *unconstrained* tensor with the ``repr`` of its constraint, the
    optimiser's ``get_state()``, the random generators' states and the history; on resume the
    model and guide run once (without gradients) and the saved values are copied into the
    store's tensors in place (see :class:`~pyroflows.engine.SVILoss`). Module buffers (e.g.
    batch-norm statistics) are not in the param store and are not checkpointed. A checkpoint
    of another model, guide, objective, data or settings is refused, naming what differs.

    Args:
        model: a Pyro model.
        guide: a Pyro guide (a function, an autoguide, a module calling flows).
        *args: passed to the model and guide (after the minibatch, with ``data``).
        loss: the objective, a Pyro ``ELBO`` (e.g. ``pf.infer.IWAE(num_particles=8)``). Its
            ``loss(...)`` gives the validation value. Default: for a flow guide on the fast
            path :func:`pyroflows.infer.fast.default_loss` (sticking-the-landing with
            several particles), otherwise Pyro's ``Trace_ELBO()``.
        steps: number of SVI steps (default 1000 unless ``epochs`` is given).
        epochs: passes over ``data`` (instead of ``steps``; needs ``data``).
        data: the data set: a ``(N, ...)`` tensor or array, or a tuple of them with ``N`` rows
            each; ``None`` for a Bayesian model.
        batch_size: rows per minibatch (and per validation chunk).
        lr: learning rate of the built-in optimisers; default ``FAST_LR`` (3e-3, with the
            cosine schedule) on the fast path, 1e-3 otherwise (constant).
        optimizer: ``"adam"``, ``"clipped_adam"`` (Pyro's ``ClippedAdam``, which clamps each
            gradient element to [-10, 10]: with minibatches the loss is scaled by N/B and most
            elements can exceed that, so it is not the default), or a ``pyro.optim`` optimiser
            (``lr`` is then not used).
        valid: with ``data``, a fraction of it to hold out at random, or held-out data of the
            same structure; its loss (``loss.loss``, without gradients, in chunks) is measured
            every ``eval_every`` steps, and the best state is kept.
        eval_every: steps between validations, checkpoints and callbacks (default: about 40
            per run, but never fewer training rows between two validations than validation
            rows).
        patience: stop after this many validations without improvement (default: never).
        device: move the data (or, without ``data``, tensor arguments) there; parameters stay
            where the model and guide create them.
        progress: show a progress bar (loss, validation loss, steps/s).
        checkpoint: a folder where the run's state is written (``state.pt``) at every
            validation and at the end.
        resume: continue from ``checkpoint`` when it holds a run; with the same model, guide,
            data, arguments and ``seed``, the result equals that of an uninterrupted run.
        seed: seeds Pyro's generators (``pyro.set_rng_seed``), the validation split and the
            minibatch order.
        callback: called as ``callback(step, history)`` after every validation; returning
            ``True`` stops training.
        valid_rows: validate on at most this many rows (evenly spaced through the validation
            set); ``None``: all.
        divergence: a loss above ``best + divergence * max(1, |best|)`` (``best``: the lowest
            so far) for three steps in a row stops training as a NaN does; ``None`` checks for
            NaN/inf only.
        fast: ``None`` (default): the fast path when the guide, objective and model qualify;
            ``True``: the fast path or a :class:`~pyroflows.infer.NotTraceable` error saying
            why not; ``False``: Pyro's traced SVI.
        compile: with the fast path, ``True`` (or a ``torch.compile`` mode) compiles the step
            (seconds to a minute, once per call; worth it for long runs and on CUDA); needs
            ``optimizer="adam"``.
        scheduler: the learning rate's schedule: ``"cosine"`` (from ``lr`` down to 0 over the
            run, :func:`pyroflows.engine.schedule`; needs the fast path with
            ``optimizer="adam"``), ``None`` (constant), or ``"auto"`` (default): cosine where
            it applies, constant otherwise (Pyro's optimisers, the traced path).
        anneal: with the fast path, the fraction of the steps over which the likelihood is
            tempered, ``prior · likelihood^β`` with ``β`` rising geometrically from 0.05 to 1
            (:meth:`pyroflows.infer.fast.FastSVI.temper`); e.g. ``0.5`` with an
            :class:`~pyroflows.infer.AutoFlowMixture` for multimodal posteriors
            (docs/multimodal.md). The recorded losses are tempered until then.
        distributed: train data-parallel on ``torch.distributed`` (docs: "Scaling out"):
            ``None`` (default) when a process group of several ranks exists or ``torchrun``
            launched this process; ``True`` requires one; ``False`` trains this process
            alone. With ``data``, every rank passes the whole data set and takes its own
            ``batch_size`` rows of every global batch (``size`` stays ``N`` and ``subsample``
            holds the rows' indices in the data set, so each rank's loss is an unbiased
            estimate on all ``N`` rows and global latents count once); without ``data``,
            each rank draws its own particles. The gradients of the param store are averaged
            across ranks after every backward pass (one ``all_reduce`` per dtype), rank 0's
            initial parameters are broadcast to all, validation is split across ranks, and
            rank 0 alone writes the checkpoint and shows progress. With ``seed``, rank ``r``
            seeds Pyro with ``seed + r`` (ranks draw different noise).
        **kwargs: passed to the model and guide.

    Returns:
        A :class:`~pyroflows.History`: ``train_loss`` holds every step's loss (per data point
        with ``data``), ``valid_nll`` the validation losses.

    Raises:
        ValueError: for inconsistent arguments, data with NaN/inf, or (with ``data``) a model or
            guide that cannot take the ``size`` and ``subsample`` keywords.
        TrainingDiverged: when a loss is NaN or infinite or diverges (``divergence``); the
            param store is first restored to its last state before that.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer import fit_svi
        >>> def model(x):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        >>> guide = pyro.infer.autoguide.AutoNormal(model)
        >>> x = torch.randn(50) + 3.0
        >>> history = fit_svi(model, guide, x, steps=300, lr=0.05, progress=False, seed=0)
        >>> abs(guide.median()["mu"].item() - x.mean().item()) < 0.2
        True
    """
    defaulted = loss is None
    if not (loss is None or (hasattr(loss, "loss") and hasattr(loss, "loss_and_grads"))):
        raise TypeError(
            f"loss: expected a Pyro ELBO (e.g. Trace_ELBO()); got {type(loss).__name__}"
        )
    check_length(steps, epochs, batch_size)
    if lr is not None:
        check_positive("lr", lr)
    check_run(eval_every, patience, valid_rows, checkpoint, resume)
    _check_calling_convention(model, guide, data, epochs=epochs, valid=valid, patience=patience)
    _check_fast(fast, compile, data, optimizer, scheduler, anneal)
    pyro_optim = make_pyro_optimizer(optimizer, TRACED_LR if lr is None else lr)
    device = torch.device(device) if device is not None else None
    group = resolve(distributed, device)
    if group is not None and group.device is not None:
        device = group.device
    shard = shard_of(group)

    if seed is not None:
        pyro.set_rng_seed(seed + shard[0])
    generator = make_generator(seed, checkpoint, group)
    source, chunks, rows, valid_set = NoData(), None, None, None
    if data is not None:
        rows = as_rows("data", data)
        train_rows, valid_set = split(rows, valid, generator)
        if valid_set is not None and valid_set is valid:
            valid_set = as_rows("valid", valid)
            if len(valid_set) != len(rows):
                raise ValueError(
                    f"valid: expected the structure of data ({len(rows)} tensors); "
                    f"got {len(valid_set)}"
                )
        source = Batches(train_rows, batch_size, generator, device, shard=shard)
        chunks = validation_chunks(valid_set, valid_rows, batch_size, device, shard)
    else:
        args = tuple(_to(a, device) for a in args)
        kwargs = {k: _to(v, device) for k, v in kwargs.items()}
    total = epochs * source.steps_per_epoch if epochs is not None else (steps or DEFAULT_STEPS)

    if defaulted:
        if data is None and getattr(guide, "prototype_trace", False) is None:
            guide._setup_prototype(*args, **kwargs)  # its default objective needs latent_dim
        loss = default_loss(guide)
    objective = None
    if data is None and fast is not False and hasattr(guide, "_reverse_kl"):
        objective = fast_loss(
            model, guide, loss, args, kwargs, required=bool(fast) or anneal is not None
        )
    if anneal is not None:
        if objective is None:
            raise ValueError(
                f"anneal: needs a guide of the fast path (AutoFlowGuide, AutoFlowMixture); got "
                f"{type(guide).__name__}"
            )
        objective.temper(max(1, round(anneal * total)))
    if objective is None:
        if compile:
            raise ValueError(
                "compile: needs the fast path, which this model, guide or loss does not take "
                "(see the FastPathUnavailable warning); use compile=False"
            )
        # A model without the fast path gets Pyro's own default objective unless one was given.
        loss = Trace_ELBO() if defaulted else loss
        objective = SVILoss(model, guide, loss, args, kwargs)
        opt = PyroOptimizer(pyro_optim, objective.parameters)
    elif optimizer == "adam":  # the same update as pyro.optim.Adam, in one fused kernel
        lr = FAST_LR if lr is None else lr
        opt = make_optimizer("adam", objective.parameters(), lr)
    else:
        opt = PyroOptimizer(pyro_optim, objective.parameters)
    if scheduler == "cosine" and isinstance(opt, PyroOptimizer):
        raise ValueError(
            "scheduler: 'cosine' needs the fast path with optimizer='adam'; use scheduler=None "
            "(or a pyro.optim optimiser with its own decay, e.g. ClippedAdam's lrd)"
        )
    cosine = scheduler is not None and not isinstance(opt, PyroOptimizer)
    lr = TRACED_LR if lr is None else lr
    settings = dict(batch_size=batch_size, lr=lr, seed=seed, optimizer=optimizer)
    settings.update({"scheduler": "cosine"} if cosine else {})  # (0.2 checkpoints stay valid)
    saved = Checkpoint.for_run(checkpoint, "fit_svi", objective, rows, valid_set, **settings)
    return train(
        Step(objective, opt, compile=compile),
        source,
        total,
        name="fit_svi",
        schedule=schedule(opt, total) if cosine else None,
        valid=chunks,
        eval_every=eval_every or default_eval_every(total, chunks, batch_size * shard[1]),
        patience=patience,
        callback=callback,
        progress=progress,
        checkpoint=saved,
        resume=resume,
        divergence=divergence,
        distributed=group,
    )


def _check_fast(
    fast: Any, compile: Any, data: Any, optimizer: Any, scheduler: Any, anneal: Any
) -> None:
    """The options of the fast path, against each other and the calling convention."""
    if fast not in (None, True, False):
        raise ValueError(f"fast: expected None (auto), True or False; got {fast!r}")
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"compile: expected a bool or a torch.compile mode; got {compile!r}")
    if fast and data is not None:
        raise ValueError(
            "fast: the fast path trains a guide on a model without data minibatches; "
            "with data, use fast=None or False"
        )
    if compile and (fast is False or data is not None):
        raise ValueError("compile: needs the fast path (no data, fast not False)")
    if compile and optimizer != "adam":
        raise ValueError(f"compile: needs optimizer='adam' (a torch optimiser); got {optimizer!r}")
    if anneal is not None and not (isinstance(anneal, (int, float)) and 0 < anneal <= 1):
        raise ValueError(f"anneal: expected a fraction of the steps in (0, 1]; got {anneal!r}")
    if anneal is not None and (fast is False or data is not None):
        raise ValueError("anneal: needs the fast path (no data, fast not False)")
    if scheduler not in ("auto", "cosine", None):
        raise ValueError(f"scheduler: expected 'auto', 'cosine' or None; got {scheduler!r}")


NEEDS_DATA = {
    "epochs": "epochs: needs data to iterate over; give steps for a model without data",
    "valid": "valid: needs data (validation holds out rows of a data set)",
    "patience": "patience: early stopping needs validation data (data and valid)",
}


def _check_calling_convention(model: Callable, guide: Callable, data: Any, **given: Any) -> None:
    """Without data, no data-only options; with data, a model and guide that take the batch."""
    if data is None:
        for name, value in given.items():
            if value is not None:
                raise ValueError(NEEDS_DATA[name])
        return
    for what, fn in (("model", model), ("guide", guide)):
        if not _accepts(fn, BATCH_KEYWORDS):
            raise ValueError(
                f"{what}: with data, fit_svi calls {what}(*batch, *args, size=N, "
                f"subsample=idx, **kwargs); add the keywords (size=None, subsample=None) "
                "and pass them to the data plate: pyro.plate('data', size, subsample=subsample)"
            )


def __getattr__(name: str) -> Any:
    # fit_target moved to pyroflows.infer.target (pyroflows 0.2).
    if name == "fit_target":
        warnings.warn(
            "pyroflows.infer.svi.fit_target moved: use pyroflows.infer.fit_target "
            "(pyroflows.infer.target.fit_target)",
            DeprecationWarning,
            stacklevel=2,
        )
        from .target import fit_target

        return fit_target
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
