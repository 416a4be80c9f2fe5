"""Variational training with the conventions of :func:`pyroflows.fit`.

:func:`fit_svi` runs Pyro's ``SVI`` on a model and a guide: a Bayesian model for a number of steps,
or a VAE-style model over a data set in minibatches. :func:`fit_target` fits a flow to an
unnormalised log-density by minimising the reverse KL divergence. Both keep
:func:`pyroflows.fit`'s guards: a non-finite loss stops training with :class:`TrainingDiverged`
and the parameters restored to their last state with a finite loss; validation keeps the best
state and stops early when asked; Ctrl-C keeps the best state so far; a checkpoint folder lets a
killed run resume exactly; a tqdm bar shows the loss and steps/s.
"""

from __future__ import annotations

import inspect
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.distributions import constraints

from .._checks import check_positive_int
from ..flows import Flow
from ..train import History, _Loop, _make_optimizer

__all__ = ["fit_svi", "fit_target"]

DEFAULT_STEPS = 1000
# Data larger than this stays where it is and moves to the device one batch at a time.
DEVICE_DATA_BYTES = 1 << 30
# Keyword arguments through which a model and guide learn which minibatch they see.
BATCH_KEYWORDS = ("size", "subsample")


# --------------------------------------------------------------------------------------------
# The loop shared by fit_svi and fit_target.


def _check_count(name: str, value: Any) -> None:
    if value is not None:
        check_positive_int(name, value)


def _rng_state() -> dict[str, Any]:
    """Every generator Pyro may draw from, in types that ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (pyro seeds it)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "random": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))  # noqa: NPY002


def _save(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "state.pt.tmp")
    os.replace(folder / "state.pt.tmp", folder / "state.pt")


def _load(folder: Path | None) -> dict[str, Any] | None:
    if folder is None or not (folder / "state.pt").is_file():
        return None
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# fit_svi


def _constraint_registry() -> dict[str, constraints.Constraint]:
    """Constraint objects by ``repr``, for parameters a checkpoint holds but the store lacks."""
    found: dict[str, list] = {}
    for module in (constraints, pyro.distributions.constraints):
        for value in vars(module).values():
            if isinstance(value, constraints.Constraint):
                found.setdefault(repr(value), [])
                if all(value is not v for v in found[repr(value)]):
                    found[repr(value)].append(value)
    return {key: values[0] for key, values in found.items() if len(values) == 1}


def _accepts(fn: Callable, names: Sequence[str]) -> bool:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True
    return all(name in parameters for name in names)


def _as_rows(name: str, value: Any) -> tuple[torch.Tensor, ...]:
    """A tensor, an array or a tuple of them, as a tuple of tensors with as many rows each."""
    parts = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not parts:
        raise ValueError(
            f"{name}: expected a tensor or a tuple of tensors; got an empty {type(value).__name__}"
        )
    out = []
    for part in parts:
        if isinstance(part, np.ndarray):
            part = torch.from_numpy(part)
            if part.is_floating_point():
                part = part.to(torch.get_default_dtype())
        if not isinstance(part, torch.Tensor):
            raise TypeError(
                f"{name}: expected a tensor, a numpy array or a tuple of them; "
                f"got {type(part).__name__}"
            )
        if part.dim() == 0:
            raise ValueError(f"{name}: expected one row per data point; got a 0-d tensor")
        if part.is_floating_point():
            bad = (~torch.isfinite(part.reshape(len(part), -1))).any(dim=1).nonzero().squeeze(1)
            if bad.numel():
                raise ValueError(
                    f"{name}: expected finite values; rows {bad[:10].tolist()} contain NaN or "
                    f"inf ({bad.numel()} of {len(part)} rows)"
                )
        out.append(part)
    if len({len(p) for p in out}) != 1:
        raise ValueError(
            f"{name}: expected tensors with the same number of rows; got {[len(p) for p in out]}"
        )
    if len(out[0]) == 0:
        raise ValueError(f"{name}: expected at least one row; got none")
    return tuple(out)


def _make_pyro_optimizer(optimizer: Any, lr: float) -> pyro.optim.PyroOptim:
    if optimizer == "adam":
        return pyro.optim.Adam({"lr": lr})
    if optimizer == "clipped_adam":
        return pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 10.0})
    if isinstance(optimizer, pyro.optim.PyroOptim):
        return optimizer
    raise ValueError(
        "optimizer: expected 'adam', 'clipped_adam' or a pyro.optim optimiser "
        f"(e.g. pyro.optim.Adam({{'lr': 1e-3}})); got {optimizer!r}"
    )


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
    lr: float = 1e-3,
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
    **kwargs: Any,
) -> History:
    """Train a guide (and the model's parameters) by stochastic variational inference.

    Runs ``pyro.infer.SVI(model, guide, optimizer, loss)`` with :func:`pyroflows.fit`'s guards.
    Parameters live in Pyro's param store, where the model and guide put them (``pyro.param``,
    ``pyro.module``, an autoguide); at the end the store holds the best state by validation
    loss (or the last one, without validation).

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

    **Checkpoints.** The param store's own ``get_state()`` holds constraint objects, which
    ``torch.load(weights_only=True)`` refuses. A checkpoint therefore stores each parameter's
    *unconstrained* tensor with the ``repr`` of its constraint, plus the optimiser's
    ``get_state()`` (tensors and numbers), the random generators' states and the history. On
    resume, the model and guide are run once (without gradients) so that the store holds
    every parameter with the constraint the code declares; the saved unconstrained values are
    then copied *in place* into those tensors, which keeps ``pyro.module`` parameters shared
    with their modules. A parameter that the run does not create is rebuilt from a registry
    of the constraint singletons of ``torch.distributions.constraints`` and
    ``pyro.distributions.constraints`` (keyed by ``repr``); a constraint that differs from the
    saved one is an error. Module buffers (e.g. batch-norm statistics) are not in the param
    store and are not checkpointed.

    Args:
        model: a Pyro model.
        guide: a Pyro guide (a function, an autoguide, a module calling flows).
        *args: passed to the model and guide (after the minibatch, with ``data``).
        loss: the objective, a Pyro ``ELBO`` (default ``Trace_ELBO()``; e.g.
            ``pf.infer.IWAE(num_particles=8)``). Its ``loss(...)`` gives the validation value.
        steps: number of SVI steps (default 1000 unless ``epochs`` is given).
        epochs: passes over ``data`` (instead of ``steps``; needs ``data``).
        data: the data set: a ``(N, ...)`` tensor or array, or a tuple of them with ``N`` rows
            each; ``None`` for a Bayesian model.
        batch_size: rows per minibatch (and per validation chunk).
        lr: learning rate of the built-in optimisers.
        optimizer: ``"adam"``, ``"clipped_adam"`` (Pyro's ``ClippedAdam``, which clamps each
            gradient element to [-10, 10]: with minibatches the loss is scaled by N/B and most
            elements can exceed that, so it is not the default), or a ``pyro.optim`` optimiser
            (``lr`` is then not used).
        valid: with ``data``, a fraction of it to hold out at random, or held-out data of the
            same structure; its loss (``loss.loss``, without gradients, in chunks) is measured
            every ``eval_every`` steps, and the best state is kept.
        eval_every: steps between validations, checkpoints and callbacks (default: about 40
            per run).
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
        **kwargs: passed to the model and guide.

    Returns:
        A :class:`~pyroflows.History`: ``train_loss`` holds every step's loss (per data point
        with ``data``), ``valid_nll`` the validation losses.

    Raises:
        ValueError: for inconsistent arguments, data with NaN/inf, or (with ``data``) a model or
            guide that cannot take the ``size`` and ``subsample`` keywords.
        TrainingDiverged: when a loss is NaN or infinite; the param store is first restored to
            its last state whose loss was finite.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer.svi import fit_svi
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
    loss = Trace_ELBO() if loss is None else loss
    if not (hasattr(loss, "loss") and hasattr(loss, "loss_and_grads")):
        raise TypeError(
            f"loss: expected a Pyro ELBO (e.g. Trace_ELBO()); got {type(loss).__name__}"
        )
    if steps is not None and epochs is not None:
        raise ValueError("steps, epochs: give one of them, not both")
    for name, value in (
        ("batch_size", batch_size),
        ("steps", steps),
        ("epochs", epochs),
        ("eval_every", eval_every),
        ("patience", patience),
    ):
        _check_count(name, value)
    if not lr > 0:
        raise ValueError(f"lr: expected a positive number; got {lr!r}")
    if resume and checkpoint is None:
        raise ValueError("resume: needs the checkpoint folder to resume from")
    if data is None and epochs is not None:
        raise ValueError("epochs: needs data to iterate over; give steps for a model without data")
    if data is None and valid is not None:
        raise ValueError("valid: needs data (validation holds out rows of a data set)")
    if data is None and patience is not None:
        raise ValueError("patience: early stopping needs validation data (data and valid)")
    if data is not None:
        for what, fn in (("model", model), ("guide", guide)):
            if not _accepts(fn, BATCH_KEYWORDS):
                raise ValueError(
                    f"{what}: with data, fit_svi calls {what}(*batch, *args, size=N, "
                    f"subsample=idx, **kwargs); add the keywords (size=None, subsample=None) "
                    "and pass them to the data plate: pyro.plate('data', size, subsample=subsample)"
                )
    pyro_optim = _make_pyro_optimizer(optimizer, lr)
    device = torch.device(device) if device is not None else None

    if seed is not None:
        pyro.set_rng_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

    train = valid_set = None
    if data is not None:
        train = _as_rows("data", data)
        split = _split(train, valid, generator)
        if split is not None:
            train, valid_set = split
        if device is not None:
            size = sum(t.numel() * t.element_size() for t in train)
            if size <= DEVICE_DATA_BYTES:
                train = tuple(t.to(device) for t in train)
        n = len(train[0])
        steps_per_epoch = math.ceil(n / batch_size)
        total = epochs * steps_per_epoch if epochs is not None else (steps or DEFAULT_STEPS)
    else:
        args = tuple(_to(a, device) for a in args)
        kwargs = {k: _to(v, device) for k, v in kwargs.items()}
        n, steps_per_epoch = 1, 1
        total = steps or DEFAULT_STEPS
    eval_every = eval_every or max(1, total // 40)

    def batch_call(rows: tuple[torch.Tensor, ...], idx: torch.Tensor, size: int):
        batch = tuple(t[idx.to(t.device)] for t in rows)
        idx = idx if device is None else idx.to(device)
        batch = tuple(_to(t, device) for t in batch)
        return (*batch, *args), {**kwargs, "size": size, "subsample": idx}

    order = torch.randperm(n, generator=generator) if train is not None else None
    store = pyro.get_param_store()

    # Run the model and guide once without gradients so the store holds every parameter (with
    # its declared constraint) before the first step: the guard, and a resume, need them.
    if train is not None:
        first_args, first_kwargs = batch_call(train, order[:batch_size], n)
    else:
        first_args, first_kwargs = args, kwargs
    with torch.no_grad():
        loss.loss(model, guide, *first_args, **first_kwargs)

    history = History()
    start = 0
    saved = _load(Path(checkpoint)) if resume and checkpoint is not None else None
    if saved is not None:
        _load_store(store, saved["params"], saved["constraints"], "checkpoint")
        pyro_optim.set_state(saved["optimizer"])
        generator.set_state(saved["generator"])
        order = saved["order"]
        history = History(**saved["history"])
        history.seconds = 0.0
        start = history.steps
        if start >= total:
            raise ValueError(
                f"resume: the checkpoint in {checkpoint} has already run {start} of {total} steps"
            )
        _set_rng_state(saved["rng"])

    svi = SVI(model, guide, pyro_optim, loss)
    state = {"step": start, "order": order}

    def step() -> float:
        if train is None:
            return svi.step(*args, **kwargs)
        i = state["step"]
        position = i % steps_per_epoch
        if position == 0 and i > 0:
            state["order"] = torch.randperm(n, generator=generator)
        idx = state["order"][position * batch_size : (position + 1) * batch_size]
        call_args, call_kwargs = batch_call(train, idx, n)
        state["step"] = i + 1
        return svi.step(*call_args, **call_kwargs) / n

    def evaluate() -> float:
        rows = valid_set
        nv = len(rows[0])
        total_loss = 0.0
        with torch.no_grad():
            for begin in range(0, nv, batch_size):
                idx = torch.arange(begin, min(begin + batch_size, nv))
                call_args, call_kwargs = batch_call(rows, idx, nv)
                # each chunk's loss estimates the whole validation set's; average them by size
                total_loss += loss.loss(model, guide, *call_args, **call_kwargs) * len(idx) / nv
        return float(total_loss) / nv

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in store.named_parameters()}

    def restore(values: dict[str, torch.Tensor]) -> None:
        live = dict(store.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                if name in live:
                    live[name].copy_(value)

    loop = _Loop(
        "fit_svi",
        total,
        history,
        step=step,
        params=lambda: [p for _, p in store.named_parameters()],
        evaluate=evaluate if valid_set is not None else None,
        snapshot=snapshot,
        restore=restore,
        eval_every=eval_every,
        patience=patience,
        callback=callback,
        progress=progress,
        sync_every=1,  # SVI.step returns a float: every step synchronises anyway
        label=type(loss).__name__,
        what="the param store",
        advice="Try a lower lr, optimizer='clipped_adam', or a guide initialised with a small "
        "scale.",
    )
    if saved is not None:
        loop.best = saved["best"]
        loop.since_best = saved["since_best"]

    if checkpoint is not None:
        folder = Path(checkpoint)

        def save() -> None:
            _save(
                folder,
                {
                    "params": {k: p.detach().cpu() for k, p in store.named_parameters()},
                    "constraints": {
                        k: repr(store._constraints[k]) for k, _ in store.named_parameters()
                    },
                    "optimizer": pyro_optim.get_state(),
                    "rng": _rng_state(),
                    "generator": generator.get_state(),
                    "order": state["order"],
                    "history": asdict(history),
                    "best": None
                    if loop.best is None
                    else {k: v.cpu() for k, v in loop.best.items()},
                    "since_best": loop.since_best,
                },
            )

        loop.save = save
    return loop.run(start)


def _split(train: tuple[torch.Tensor, ...], valid: Any, generator: torch.Generator):
    """``(train, valid)`` from a fraction or held-out data; ``None`` without validation."""
    if valid is None:
        return None
    if isinstance(valid, (int, float)) and not isinstance(valid, bool):
        n = len(train[0])
        fraction = float(valid)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"valid: expected a fraction in [0, 1); got {valid!r}")
        n_valid = max(1, round(fraction * n)) if fraction > 0 else 0
        if n_valid == 0:
            return None
        if n_valid >= n:
            raise ValueError(
                f"valid: a fraction of {fraction} leaves no training data out of {n} rows"
            )
        order = torch.randperm(n, generator=generator)
        v_idx, t_idx = order[:n_valid], order[n_valid:]
        return tuple(t[t_idx] for t in train), tuple(t[v_idx] for t in train)
    held_out = _as_rows("valid", valid)
    if len(held_out) != len(train):
        raise ValueError(
            f"valid: expected the structure of data ({len(train)} tensors); got {len(held_out)}"
        )
    return train, held_out


def _load_store(store, params: dict, names: dict, where: str) -> None:
    """Copy saved unconstrained values into the live param store (see :func:`fit_svi`)."""
    live = dict(store.named_parameters())
    registry = None
    for name, value in params.items():
        if name in live:
            declared = repr(store._constraints[name])
            if declared != names[name]:
                raise ValueError(
                    f"resume: parameter {name!r} has constraint {names[name]} in the {where}; "
                    f"the model or guide now declares {declared}"
                )
            if live[name].shape != value.shape:
                raise ValueError(
                    f"resume: parameter {name!r} has shape {tuple(value.shape)} in the {where}; "
                    f"the model or guide now creates shape {tuple(live[name].shape)}"
                )
            with torch.no_grad():
                live[name].copy_(value)
            continue
        registry = registry if registry is not None else _constraint_registry()
        if names[name] not in registry:
            raise ValueError(
                f"resume: parameter {name!r} (constraint {names[name]}) is in the {where} but "
                "the model and guide did not create it, and its constraint cannot be rebuilt"
            )
        constraint = registry[names[name]]
        unconstrained = value.clone().requires_grad_(True)
        store.set_state({"params": {name: unconstrained}, "constraints": {name: constraint}})


# --------------------------------------------------------------------------------------------
# fit_target


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
            arguments give the same result as an uninterrupted run).
        seed: seeds torch's global generator.
        callback: called as ``callback(step, history)`` after every evaluation point;
            returning ``True`` stops training.

    Returns:
        A :class:`~pyroflows.History` whose ``train_loss`` holds each step's estimate of
        ``KL(q || p / Z) - log Z`` (nats).

    Raises:
        ValueError: for inconsistent arguments, a conditional flow, or a ``log_p`` that does not
            return one value per sample.
        TrainingDiverged: when a loss is NaN or infinite; the flow is first restored to its last
            state whose loss was finite.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.infer.svi import fit_target
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
    for name, value in (
        ("steps", steps),
        ("num_particles", num_particles),
        ("eval_particles", eval_particles),
        ("eval_every", eval_every),
        ("patience", patience),
    ):
        _check_count(name, value)
    if not lr > 0:
        raise ValueError(f"lr: expected a positive number; got {lr!r}")
    if scheduler not in ("cosine", None):
        raise ValueError(f"scheduler: expected 'cosine' or None; got {scheduler!r}")
    if patience is not None and eval_particles is None:
        raise ValueError("patience: early stopping needs evaluations; give eval_particles")
    if resume and checkpoint is None:
        raise ValueError("resume: needs the checkpoint folder to resume from")

    if seed is not None:
        torch.manual_seed(seed)
    params = list(flow.parameters())
    device = torch.device(device) if device is not None else (params[0].device if params else None)
    flow.to(device)
    params = list(flow.parameters())
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if scheduler == "cosine" else None
    )

    def reverse_kl(n: int) -> torch.Tensor:
        d = flow()
        z = d.rsample((n,))
        log_target = log_p(z)
        if not torch.is_tensor(log_target) or log_target.shape != (n,):
            shape = tuple(log_target.shape) if torch.is_tensor(log_target) else type(log_target)
            raise ValueError(
                f"log_p: expected log-densities of shape ({n},) for z of shape {tuple(z.shape)}; "
                f"got {shape}"
            )
        return (d.log_prob(z) - log_target).mean()

    # Check log_p before anything is trained.
    with torch.no_grad():
        reverse_kl(2)

    history = History()
    start = 0
    folder = Path(checkpoint) if checkpoint is not None else None
    saved = _load(folder) if resume else None
    if saved is not None:
        flow.load_state_dict(saved["flow"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None and saved["scheduler"] is not None:
            sched.load_state_dict(saved["scheduler"])
        history = History(**saved["history"])
        history.seconds = 0.0
        start = history.steps
        if start >= steps:
            raise ValueError(
                f"resume: the checkpoint in {folder} has already run {start} of {steps} steps"
            )
        _set_rng_state(saved["rng"])

    def step() -> torch.Tensor:
        loss = reverse_kl(num_particles)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        opt.step()
        if sched is not None:
            sched.step()
        return loss.detach()

    def evaluate() -> float:
        with torch.no_grad():
            return reverse_kl(eval_particles).item()

    loop = _Loop(
        "fit_target",
        steps,
        history,
        step=step,
        params=lambda: params,
        evaluate=evaluate if eval_particles is not None else None,
        snapshot=lambda: {k: v.detach().clone() for k, v in flow.state_dict().items()},
        restore=flow.load_state_dict,
        eval_every=eval_every or max(1, steps // 40),
        patience=patience,
        callback=callback,
        progress=progress,
        sync_every=1 if device is None or device.type == "cpu" else 25,
        label="loss",
        what="the flow",
        advice="Try a lower lr, more num_particles, or gradient clipping (clip_grad).",
    )
    if saved is not None:
        loop.best = saved["best"]
        loop.since_best = saved["since_best"]
    if folder is not None:

        def save() -> None:
            _save(
                folder,
                {
                    "flow": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
                    "optimizer": opt.state_dict(),
                    "scheduler": None if sched is None else sched.state_dict(),
                    "rng": _rng_state(),
                    "history": asdict(history),
                    "best": None
                    if loop.best is None
                    else {k: v.cpu() for k, v in loop.best.items()},
                    "since_best": loop.since_best,
                },
            )

        loop.save = save
    return loop.run(start)
