"""What the engine minimises: losses as objects.

A loss knows the parameters it trains and how one minibatch scores; the engine
(:func:`~pyroflows.engine.train`) knows everything else (steps, schedule, guards, validation,
checkpoints). A new way to train is a new loss, not a new loop:

* :class:`NegativeLogLikelihood`: maximum likelihood of data under a flow (forward KL);
* :class:`ReverseKL`: a flow fitted to an unnormalised log-density by the reverse KL divergence;
* :class:`SVILoss`: a Pyro ELBO on a model and a guide, whose parameters live in Pyro's param
  store;
* :class:`FlowMatching`: a continuous flow's velocity field regressed on straight paths from
  its base to the data (flow matching), validated by the exact log-likelihood.

The interface every loss keeps is written once, in :class:`Loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from torch import nn
from torch.distributions import constraints

from ..bases import StandardNormal
from ..transforms.continuous import CNF, continuous_transforms, exact_trace
from .checkpoint import name_of
from .sources import Batch, Batches, describe

__all__ = [
    "COUPLINGS",
    "FlowMatching",
    "Loss",
    "NegativeLogLikelihood",
    "ReverseKL",
    "SVILoss",
    "describe_module",
]

#: rows of the data that initialise data-dependent layers (ActNorm) before training
INIT_BATCH = 4096


def describe_module(module: nn.Module) -> dict[str, Any]:
    """A flow's identity for checkpoints: its builder configuration when it has one, and the
    names and shapes of its state (which any architecture change alters)."""
    config = getattr(module, "config", None)
    return {
        "class": type(module).__qualname__,
        "config": config,
        "state": {k: list(v.shape) for k, v in module.state_dict().items()},
    }


class Loss:
    """The interface of a loss, as the engine uses it.

    **What a subclass implements**

    * :meth:`parameters`: the live tensors trained (what the optimiser steps, gradients are
      clipped over and the divergence guard snapshots);
    * :meth:`inputs`: the arguments of one step made from the source's :class:`Batch` (or from
      ``None`` when there is no data);
    * :meth:`__call__`: the differentiable scalar loss of those inputs (the function a compiled
      step compiles); :meth:`backward` computes it and its gradients (the default calls
      ``.backward()`` on it; a loss computed by a library that accumulates gradients itself, as
      Pyro's ELBOs do, overrides it);
    * :meth:`validation`: ``(total, weight)`` of a validation chunk; the validation loss is the
      sum of the totals over the sum of the weights;
    * :meth:`state_dict`/:meth:`load_state_dict` (what a checkpoint holds, on the CPU) and
      :meth:`snapshot`/:meth:`restore` (the best state, kept on the device);
    * :meth:`setup`: work before the first step, e.g. data-dependent initialisation;
    * :meth:`fingerprint`: plain data that must be the same to resume a checkpoint;
    * :meth:`tensors`: the live state by name (what data-parallel training checks and
      broadcasts from rank 0), and :attr:`module`, the ``nn.Module`` computing the loss when
      there is one (data-parallel training wraps it in ``DistributedDataParallel``).

    Class attributes name it in messages: ``label`` (the progress bar's), ``what`` (what is
    restored when training diverges) and ``advice`` (what to try then); ``validation_cost`` is
    what validating one row costs against one training row (front-ends space validations by it).
    """

    label = "loss"
    validation_cost = 1.0
    #: why ``torch.compile`` cannot compile this loss's step, or ``None`` when it can
    not_compilable: str | None = None
    what = "the parameters"
    advice = "Try a lower lr or gradient clipping (clip_grad)."
    #: the module whose parameters the loss trains, when one module holds them all
    module: nn.Module | None = None

    def parameters(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def inputs(self, batch: Batch | None) -> tuple:
        raise NotImplementedError

    def __call__(self, *inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, *inputs: Any) -> torch.Tensor:
        """The loss of ``inputs`` (detached) after back-propagating it into the parameters."""
        value = self(*inputs)
        value.backward()
        return value.detach()

    def validation(self, batch: Batch | None) -> tuple[torch.Tensor | float, float]:
        raise NotImplementedError

    def setup(self, source: Batches | Any, fresh: bool) -> None:
        """Called once before training (``fresh``: not resuming from a checkpoint)."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def snapshot(self) -> Any:
        raise NotImplementedError

    def restore(self, snapshot: Any) -> None:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def solves_odes(module: nn.Module, hint: str = "") -> str | None:
    """Why a step through ``module`` cannot be compiled when it holds a continuous flow (the
    step then solves its ODE), or ``None``; ``hint`` is appended (what to do instead)."""
    if not continuous_transforms(module):
        return None
    return (
        "the step solves a continuous flow's ODE, which torch.compile cannot trace (the "
        "adaptive solver steers its steps from the host, and the trace needs a second "
        "backward pass, which compiled graphs do not support); use compile=False" + hint
    )


class _FlowLoss(Loss):
    """A loss whose parameters are a flow's (its ``state_dict`` is the state)."""

    what = "the flow"
    #: what to do instead of compiling a step that solves a continuous flow's ODE
    compile_hint = ""

    def __init__(self, flow: nn.Module) -> None:
        self.flow = self.module = flow
        # Listed once: the step clips over them and the guard checks them every step.
        self._params = [p for p in flow.parameters() if p.requires_grad]
        self.not_compilable = solves_odes(flow, self.compile_hint)

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.flow.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flow.load_state_dict(state)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.flow.state_dict().items()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        self.flow.load_state_dict(snapshot)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.flow.state_dict(keep_vars=True)


class NegativeLogLikelihood(_FlowLoss):
    """The mean negative log-likelihood of data under a flow: ``-mean(log q(x | c))``.

    Minimising it fits the flow by maximum likelihood (the forward KL divergence from the data
    distribution). A batch holds the data rows and, for a conditional flow, their contexts.

    Args:
        flow: a :class:`~pyroflows.Flow`.

    Shapes:
        ``x``: ``(batch, *flow.event_shape)``; ``context``: ``(batch, context_dim)``; the loss
        is a 0-d tensor (nats per row).

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.engine import NegativeLogLikelihood
        >>> flow = pf.RealNVP(dim=2, layers=1, hidden=(8,))
        >>> nll = NegativeLogLikelihood(flow)
        >>> round(float(nll(torch.zeros(4, 2)).detach()), 4)  # an untrained flow is N(0, I)
        1.8379
    """

    label = "train"
    advice = "Try a lower lr, gradient clipping (clip_grad) or standardised data."
    compile_hint = ", or train by flow matching (loss='flow_matching'), whose steps compile"

    @property
    def validation_cost(self) -> float:
        """1, except for a continuous flow trained with Hutchinson's estimate and validated
        with the exact trace: ``dim`` vector-Jacobian products per evaluation against one
        (and its backward), about ``dim / 4`` times a training row."""
        costs = [m.dim / 4 for m in continuous_transforms(self.flow) if not m.exact_trace]
        return max([1.0, *costs])

    def inputs(self, batch: Batch) -> tuple:
        return batch.rows[0], (batch.rows[1] if len(batch.rows) > 1 else None)

    def __call__(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # No value-by-value validation of the batch (the data are checked once, up front; a
        # non-finite batch gives a non-finite loss): the check waits for the device, which a
        # CUDA graph cannot record.
        d = self.flow(context)
        d._validate_args = False
        return -d.log_prob(x).mean()

    def validation(self, batch: Batch) -> tuple[torch.Tensor, float]:
        x, context = self.inputs(batch)
        with exact_trace(self.flow):  # continuous flows: not Hutchinson's estimate
            return -self.flow(context).log_prob(x).sum(), float(len(x))

    def setup(self, source: Batches, fresh: bool) -> None:
        # Data-dependent initialisation (ActNorm) from one large batch rather than the first
        # minibatch; a resumed run has its initialised state in the checkpoint.
        if fresh:
            with torch.no_grad():
                rows = source.first(INIT_BATCH)
                self.flow(rows[1] if len(rows) > 1 else None).log_prob(rows[0])

    def fingerprint(self) -> dict[str, Any]:
        return {"flow": describe_module(self.flow)}


class ReverseKL(_FlowLoss):
    """The reverse KL divergence from a flow to an unnormalised density, up to ``log Z``.

    ``E_q[log q(z) - log p(z)] = KL(q || p / Z) - log Z``, estimated with ``num_particles``
    reparameterised draws ``z ~ q`` per step; its negative is the ELBO, a lower bound on
    ``log Z``. Validation estimates it with ``eval_particles`` draws.

    Args:
        flow: an unconditional :class:`~pyroflows.Flow` over ``R^dim``.
        log_p: maps ``(n, dim)`` points to ``(n,)`` unnormalised log-densities, differentiably.
        num_particles: draws per step.
        eval_particles: draws per validation.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.engine import ReverseKL
        >>> flow = pf.LinearFlow(dim=2, layers=1, elementwise=None)
        >>> target = torch.distributions.Normal(0.0, 1.0)
        >>> loss = ReverseKL(flow, lambda z: target.log_prob(z).sum(-1), num_particles=8)
        >>> abs(float(loss())) < 1e-5  # the untrained flow is the target itself: KL = 0
        True
    """

    advice = "Try a lower lr, more num_particles, or gradient clipping (clip_grad)."

    def __init__(
        self,
        flow: nn.Module,
        log_p: Callable[[torch.Tensor], torch.Tensor],
        num_particles: int = 64,
        eval_particles: int | None = None,
    ) -> None:
        super().__init__(flow)
        self.log_p = log_p
        self.num_particles = num_particles
        self.eval_particles = eval_particles

    def inputs(self, batch: None) -> tuple:
        return ()

    def _estimate(self, n: int) -> torch.Tensor:
        d = self.flow()
        z = d.rsample((n,))
        log_target = self.log_p(z)
        if not torch.is_tensor(log_target) or log_target.shape != (n,):
            shape = tuple(log_target.shape) if torch.is_tensor(log_target) else type(log_target)
            raise ValueError(
                f"log_p: expected log-densities of shape ({n},) for z of shape {tuple(z.shape)}; "
                f"got {shape}"
            )
        return (d.log_prob(z) - log_target).mean()

    def __call__(self) -> torch.Tensor:
        return self._estimate(self.num_particles)

    def validation(self, batch: None) -> tuple[torch.Tensor, float]:
        return self._estimate(self.eval_particles or self.num_particles), 1.0

    def setup(self, source: Any, fresh: bool) -> None:
        with torch.no_grad():  # check log_p before anything is trained
            self._estimate(2)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "flow": describe_module(self.flow),
            "log_p": name_of(self.log_p),
            "num_particles": self.num_particles,
            "eval_particles": self.eval_particles,
        }


#: the couplings of base draws and data rows :class:`FlowMatching` offers
COUPLINGS = ("independent", "ot")


class FlowMatching(_FlowLoss):
    """Conditional flow matching: a continuous flow's velocity regressed on straight paths.

    For each data row ``x₁`` (with its context ``c``) a base draw ``x₀ ~ q₀(· | c)`` and a time
    ``t ~ U(0, 1)`` make the point ``x_t = (1 - (1 - σ) t) x₀ + t x₁`` of the conditional
    optimal-transport path, whose velocity is ``u = x₁ - (1 - σ) x₀``; the loss is
    ``mean ‖v(x_t, t, c) - u‖²`` (summed over features, averaged over rows). Its minimiser is the
    velocity whose flow carries the base to the data distribution (Lipman et al. 2023; with
    ``σ = 0``, rectified flow, Liu et al. 2023). No ODE is solved during training.

    ``coupling="ot"`` pairs the batch's base draws with its rows by an exact optimal assignment
    of squared distances (minibatch OT, Tong et al. 2024; Pooladian et al. 2023): straighter
    paths, which fixed-step solvers integrate with fewer steps. The assignment is solved on the
    CPU (``scipy.optimize.linear_sum_assignment``, a device synchronisation per step; about 8 ms
    for a batch of 256, so an OT step cost about 5x an independent one for a (256, 256) field
    on one CPU thread in the tutorial). It is refused for conditional flows, where it would pair
    rows of different contexts.

    The draws (base points, times) and the assignment are made by :meth:`inputs` (and
    :meth:`draw`), before the step, so that a compiled step (``compile=True``) holds the
    regression's arithmetic alone, which on CUDA is recorded as one CUDA graph.

    Validation is the exact negative log-likelihood (the ODE solved with the exact trace, even
    where the flow's own option is Hutchinson's estimate), so early stopping and the best state
    follow the quantity a density estimate is judged by, not the regression loss.

    Args:
        flow: a :class:`~pyroflows.CNF` (or a :class:`~pyroflows.Flow` whose only transform is a
            :class:`~pyroflows.transforms.CNF`); its base is the source ``q₀``, which must have
            no trainable parameters (flow matching does not train it).
        sigma_min: ``σ``, the width of the path's end (0 or a small positive number).
        coupling: ``"independent"`` or ``"ot"``.

    Shapes:
        ``x``: ``(batch, dim)``; ``context``: ``(batch, context_dim)``; the loss is a 0-d tensor.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.engine import FlowMatching
        >>> _ = torch.manual_seed(0)
        >>> flow = pf.CNF(dim=2, hidden=(16,))
        >>> loss = FlowMatching(flow)
        >>> x = torch.randn(256, 2) + 3.0
        >>> float(loss(x).detach()) > 0  # v = 0 at start: the loss is E‖u‖²
        True
    """

    label = "fm"
    advice = "Try a lower lr, or gradient clipping (clip_grad)."

    def __init__(self, flow: nn.Module, sigma_min: float = 0.0, coupling: str = "independent"):
        super().__init__(flow)
        chain = getattr(flow, "_chain", None)
        if chain is None or len(chain) != 1 or not isinstance(chain[0], CNF):
            raise ValueError(
                "FlowMatching: expected a continuous flow (pyroflows.CNF, or a Flow whose only "
                f"transform is a pyroflows.transforms.CNF); got {type(flow).__name__}"
                + ("" if chain is None else f" with transforms {[type(t).__name__ for t in chain]}")
                + ". Flows of other kinds train by maximum likelihood (loss='nll')"
            )
        number = isinstance(sigma_min, (int, float)) and not isinstance(sigma_min, bool)
        if not (number and 0 <= sigma_min < 1):
            raise ValueError(f"sigma_min: expected a number in [0, 1); got {sigma_min!r}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling: expected one of {COUPLINGS}; got {coupling!r}")
        trained = [name for name, p in flow.base.named_parameters() if p.requires_grad]
        if trained:
            raise ValueError(
                f"FlowMatching: the flow's base has trainable parameters ({', '.join(trained)}), "
                "which flow matching does not train (it regresses the field on paths that start "
                "at base draws): build the flow with base='normal' or a fixed base, or train by "
                "maximum likelihood (loss='nll')"
            )
        if coupling == "ot" and flow.context_dim:
            raise ValueError(
                "coupling='ot' pairs base draws with data rows across the batch, which for a "
                "conditional flow would pair rows of different contexts: use "
                "coupling='independent' for conditional flows"
            )
        self.transform: CNF = chain[0]
        self.sigma_min = float(sigma_min)
        self.coupling = coupling
        self.not_compilable = None  # a regression of the field: no ODE in the step
        self._standard = isinstance(flow.base, StandardNormal)

    @property
    def validation_cost(self) -> float:
        """A validation row is an ODE solve with the exact trace (tens of evaluations of the
        field, each with ``dim`` vector-Jacobian products); a training row is one pass and its
        backward. ``benchmarks/cnf_solvers.py`` measured the ratio at 82 for 2 features and
        1,300 for 64 (hidden (64, 64)): ``20 (dim + 2)``."""
        return 20.0 * (self.transform.dim + 2)

    def inputs(self, batch: Batch) -> tuple:
        """The rows, their contexts, and the step's draws: base points (paired by OT with
        ``coupling="ot"``) and times. They are drawn here, outside the step that a compiled
        run compiles: a compiled step then holds arithmetic alone (inductor's own random
        numbers made the CPU step 1.4-2.3x slower), and the OT assignment, solved on the host,
        does not keep the step from being recorded as a CUDA graph."""
        x = batch.rows[0]
        context = self.flow._check_context(batch.rows[1] if len(batch.rows) > 1 else None)
        x0, t = self.draw(x, context)
        return x, context, x0, t

    def draw(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Base draws ``x₀`` (one per row of ``x``, for its context; paired by an optimal
        assignment with ``coupling="ot"``) and times ``t ~ U(0, 1)``, shape ``x.shape[:-1]``."""
        if self.coupling == "ot" and x.dim() != 2:
            raise ValueError(
                f"FlowMatching(coupling='ot'): expected a batch of rows (n, dim); got shape "
                f"{tuple(x.shape)}"
            )
        with torch.no_grad():
            if self._standard:  # the usual base: no distribution built per step
                x0 = torch.randn_like(x)
            else:
                base = self.flow(context).base_dist
                x0 = base.sample(x.shape[: x.dim() - 1 - len(base.batch_shape)])
            if self.coupling == "ot":
                x0 = x0[_ot_assignment(x0, x)]
            t = torch.rand(x.shape[:-1], dtype=x.dtype, device=x.device)
        return x0, t

    def __call__(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of rows ``x`` (and contexts); ``x0`` and ``t`` as :meth:`draw` makes them,
        drawn here when not given."""
        if x0 is None or t is None:
            context = self.flow._check_context(context)
            x0, t = self.draw(x, context)
        s = t.unsqueeze(-1)
        xt = (1 - (1 - self.sigma_min) * s) * x0 + s * x
        target = x - (1 - self.sigma_min) * x0
        v = self.transform.field(xt, t, context)
        return (v - target).square().sum(-1).mean()

    def validation(self, batch: Batch) -> tuple[torch.Tensor, float]:
        x = batch.rows[0]
        context = batch.rows[1] if len(batch.rows) > 1 else None
        with exact_trace(self.flow):
            return -self.flow(context).log_prob(x).sum(), float(len(x))

    def fingerprint(self) -> dict[str, Any]:
        return {
            "flow": describe_module(self.flow),
            "loss": "flow_matching",
            "sigma_min": self.sigma_min,
            "coupling": self.coupling,
        }


def _ot_assignment(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` minimising ``sum_i ‖x0[p[i]] - x1[i]‖²`` (exact; on the CPU)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x1.detach(), x0.detach()).square().cpu().double().numpy()
    rows, columns = linear_sum_assignment(cost)
    return torch.as_tensor(columns[rows.argsort()], device=x0.device)


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


def load_store(store, params: dict, names: dict, where: str) -> None:
    """Copy saved unconstrained values into the live param store (see :class:`SVILoss`)."""
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


class SVILoss(Loss):
    """A Pyro ELBO of a model and a guide; the parameters are those of Pyro's param store.

    Without data, every step calls ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)``;
    with data (a :class:`~pyroflows.engine.Batches` source), ``model(*batch, *args, size=N,
    subsample=idx, **kwargs)`` (and the guide alike), and the recorded loss is per data point
    (the estimate divided by ``N``). Gradients come from the ELBO's own ``loss_and_grads``, as in
    ``pyro.infer.SVI.step``.

    **State.** The param store's own ``get_state()`` holds constraint objects, which
    ``torch.load(weights_only=True)`` refuses. The state therefore holds each parameter's
    *unconstrained* tensor with the ``repr`` of its constraint. Loading it copies the values
    *in place* into the live tensors (run the model and guide first, as :meth:`setup` does, so
    that the store holds every parameter with the constraint the code declares), which keeps
    ``pyro.module`` parameters shared with their modules; a parameter that the run does not
    create is rebuilt from a registry of the constraint singletons of
    ``torch.distributions.constraints`` and ``pyro.distributions.constraints`` (keyed by
    ``repr``); a constraint that differs from the saved one is an error. Module buffers (e.g.
    batch-norm statistics) are not in the param store and are not saved.

    Args:
        model: a Pyro model.
        guide: a Pyro guide.
        elbo: a Pyro ELBO (``loss``, ``loss_and_grads``).
        args: positional arguments of the model and guide (after the batch, with data).
        kwargs: keyword arguments of the model and guide.
    """

    what = "the param store"
    advice = "Try a lower lr, optimizer='clipped_adam', or a guide initialised with a small scale."

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        elbo: pyro.infer.ELBO,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> None:
        self.model, self.guide, self.elbo = model, guide, elbo
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        self.store = pyro.get_param_store()
        self.label = type(elbo).__name__

    def parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self.store.named_parameters()]

    def inputs(self, batch: Batch | None) -> tuple:
        return (batch,)

    def _call_args(self, batch: Batch | None) -> tuple[tuple, dict]:
        if batch is None:
            return self.args, self.kwargs
        keywords = {"size": batch.size, "subsample": batch.index}
        return (*batch.rows, *self.args), {**self.kwargs, **keywords}

    def backward(self, batch: Batch | None) -> torch.Tensor:
        args, kwargs = self._call_args(batch)
        value = self.elbo.loss_and_grads(self.model, self.guide, *args, **kwargs)
        per_row = float(value) / (1 if batch is None else batch.size)
        return torch.tensor(per_row, dtype=torch.float64)  # averaged over ranks in float64

    def validation(self, batch: Batch) -> tuple[float, float]:
        # Each chunk's loss estimates the whole validation set's: average them by chunk size.
        args, kwargs = self._call_args(batch)
        value = self.elbo.loss(self.model, self.guide, *args, **kwargs)
        return float(value) * len(batch.index) / batch.size, float(len(batch.index))

    def setup(self, source: Batches | Any, fresh: bool) -> None:
        # Run the model and guide once without gradients so that the store holds every
        # parameter (with its declared constraint) before the first step: the guard, and a
        # resume, need them.
        batch = source.batch(0) if isinstance(source, Batches) else None
        args, kwargs = self._call_args(batch)
        with torch.no_grad():
            self.elbo.loss(self.model, self.guide, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        named = list(self.store.named_parameters())
        return {
            "params": {k: p.detach().cpu() for k, p in named},
            "constraints": {k: repr(self.store._constraints[k]) for k, _ in named},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_store(self.store, state["params"], state["constraints"], "checkpoint")

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.store.named_parameters()}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        live = dict(self.store.named_parameters())
        with torch.no_grad():
            for name, value in snapshot.items():
                if name in live:
                    live[name].copy_(value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.store.named_parameters())

    def fingerprint(self) -> dict[str, Any]:
        tensors = [a for a in (*self.args, *self.kwargs.values()) if torch.is_tensor(a)]
        return {
            "model": name_of(self.model),
            "guide": name_of(self.guide),
            "loss": self.label,
            "num_particles": getattr(self.elbo, "num_particles", None),
            "arguments": describe([t.reshape(1, -1) for t in tensors]) if tensors else None,
        }
