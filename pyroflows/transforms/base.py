"""The contract every pyroflows transform keeps, written down once.

A transform is an invertible map ``y = f(x)`` with a tractable ``log|det ∂y/∂x|``. In Pyro's
convention the forward direction goes from the base distribution (``x``) to the data (``y``):
``TransformedDistribution(base, [f]).log_prob(y) = base.log_prob(f⁻¹(y)) - log|det ∂y/∂x|``.

Besides the contract (:class:`FlowTransform`) and a module bound to a context
(:class:`ConditionedTransform`), this module says when a cached value is still right
(:class:`ParameterState`) and whether any torch or Pyro transform can invert points it did not
produce (:func:`has_inverse`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pyro.distributions.conditional import ConditionalTransform, ConstantConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms.block_autoregressive import BlockAutoregressive
from pyro.distributions.transforms.neural_autoregressive import (
    ConditionalNeuralAutoregressive,
    NeuralAutoregressive,
)
from pyro.distributions.transforms.planar import ConditionalPlanar, ConditionedPlanar
from pyro.distributions.transforms.polynomial import Polynomial
from pyro.distributions.transforms.radial import ConditionalRadial, ConditionedRadial
from pyro.distributions.transforms.sylvester import Sylvester
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import (
    CatTransform,
    ComposeTransform,
    IndependentTransform,
    StackTransform,
    Transform,
    _InverseTransform,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._checks import check_nonnegative_int

__all__ = [
    "ConditionedTransform",
    "FlowTransform",
    "ParameterState",
    "check_context",
    "has_inverse",
]


def check_context(
    name: str, context: torch.Tensor | None, context_dim: int, how: str
) -> torch.Tensor:
    """Check a context for something built with ``context_dim > 0``; ``how`` says how to pass it.

    Raises:
        ValueError: when the context is missing or its last dimension is not ``context_dim``.
        TypeError: when it is not a tensor.
    """
    if context is None:
        raise ValueError(
            f"{name} was built with context_dim={context_dim} and needs a context: "
            f"{how} with a context of shape (*batch, {context_dim})"
        )
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"{name}: expected the context as a tensor; got {type(context)}")
    if context.dim() == 0 or context.shape[-1] != context_dim:
        raise ValueError(
            f"{name}: expected a context with last dimension {context_dim}; "
            f"got shape {tuple(context.shape)}"
        )
    return context


# -- when is a cached value still right? ---------------------------------------------------------
class _OptimiserSteps:
    """Counts the ``step()`` calls of every torch optimiser, once something cached needs it.

    Fused optimisers (``torch.optim.Adam(fused=True)``, which :func:`pyroflows.fit` uses) write
    the parameters in place without bumping their version counters; this count is how a cached
    value notices their steps. The hook (torch's ``register_optimizer_step_post_hook``) only
    counts; it is registered when a value is first cached, not on import.
    """

    count = 0
    handle = None

    @classmethod
    def watch(cls) -> None:
        if cls.handle is None:
            cls.handle = register_optimizer_step_post_hook(cls._count)

    @staticmethod
    def _count(optimizer, args, kwargs) -> None:
        _OptimiserSteps.count += 1


class _Slots:
    """Where a module and its submodules keep their submodules and tensors, and what was there.

    Reading the objects through these dictionary slots takes about a microsecond, where
    ``module.parameters()`` walks the module tree (about 10 µs for a coupling layer).
    """

    __slots__ = ("module_objects", "modules", "tensor_objects", "tensors")

    def __init__(self, module: nn.Module) -> None:
        subs = list(module.modules())
        self.modules = [
            (m._modules, k) for m in subs for k, v in m._modules.items() if v is not None
        ]
        self.tensors = [
            (m._parameters, k) for m in subs for k, v in m._parameters.items() if v is not None
        ]
        self.tensors += [
            (m._buffers, k) for m in subs for k, v in m._buffers.items() if v is not None
        ]
        self.module_objects = [d[k] for d, k in self.modules]
        self.tensor_objects = [d[k] for d, k in self.tensors]

    def current(self) -> bool:
        """Whether every slot still holds the object it held when the slots were made."""
        try:
            return all(
                map(operator.is_, [d[k] for d, k in self.tensors], self.tensor_objects)
            ) and all(map(operator.is_, [d[k] for d, k in self.modules], self.module_objects))
        except KeyError:
            return False


# Kept on the module itself (not in a global table, which would keep alive any module one of
# whose submodules refers back to it); FlowTransform.__getstate__ leaves it out.
_SLOTS = "_pyroflows_slots"


def _slots(module: nn.Module) -> _Slots:
    slots = vars(module).get(_SLOTS)
    if slots is None:
        slots = _Slots(module)
        setattr(module, _SLOTS, slots)
    return slots


class ParameterState:
    """What a value computed by a module depends on besides its input, to tell when it is stale.

    A snapshot (:meth:`of`) of

    * whether gradients were being recorded: a value computed under ``torch.no_grad()`` carries
      no graph and must not serve a computation that needs gradients, and the other way round;
    * which objects the module's submodules, parameters and buffers and the ``context`` are,
      with each tensor's version counter (bumped by every in-place change: optimiser steps,
      ``load_state_dict``, ``p.add_(...)`` or ``p.copy_(...)`` under ``torch.no_grad()``) and,
      where gradients are recorded, its ``requires_grad`` flag;
    * the number of torch optimiser steps taken so far (fused optimisers do not bump version
      counters; see ``_OptimiserSteps``).

    :meth:`holds` is true while none of these has changed. Not seen: writes through ``.data``
    (``p.data.add_(1)``, ``p.data = t``), which bypass the version counter, and parameters,
    buffers or submodules added to a module after it was first watched; after those, call the
    flow again. Inside ``torch.compile`` no snapshot is taken (reading version counters
    would recompile every step): a state taken while compiling holds while compiling, i.e.
    within the compiled computation, where the distribution lives.

    Attributes:
        graph: whether values computed in this state may carry an autograd graph (gradients
            recorded and some tensor requiring grad; ``True`` when unknown).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import AffineCoupling
        >>> from pyroflows.transforms.base import ParameterState
        >>> t = AffineCoupling(4, hidden=(8,))
        >>> state = ParameterState.of(t)
        >>> state.holds(t)
        True
        >>> with torch.no_grad():
        ...     _ = next(t.parameters()).add_(1.0)
        >>> state.holds(t)
        False
    """

    __slots__ = (
        "_closed",
        "_context",
        "_flags",
        "_grad",
        "_slots",
        "_steps",
        "_taken",
        "_versions",
        "graph",
    )

    @classmethod
    def pending(cls, *, closed: bool = False) -> ParameterState:
        """A state to :meth:`take` once a computation over several modules has run (a flow
        pushing a sample through its layers, which share one state); it holds nothing before.

        Args:
            closed: the value depends on the module and the context only (as a base
                distribution built from them), not also on an input (as a transform's output):
                then a change of grad mode matters only when none of their tensors requires
                grad; otherwise any change of grad mode is a change of state.
        """
        state = cls.__new__(cls)
        state._grad = torch.is_grad_enabled()
        state._closed = closed
        state._taken = False
        state.graph = True
        return state

    @classmethod
    def of(
        cls, module: nn.Module, context: torch.Tensor | None = None, *, closed: bool = False
    ) -> ParameterState:
        """The state of ``module`` (and ``context``) now.

        Args:
            module: the module whose parameters and buffers computed the value.
            context: the context it was computed for, or ``None``.
            closed: see :meth:`pending`.
        """
        state = cls.__new__(cls)
        state._grad = torch.is_grad_enabled()
        state._closed = closed
        state._taken = False
        state.graph = True
        state.take(module, context)
        return state

    def take(self, module: nn.Module, context: torch.Tensor | None = None) -> None:
        """Record ``module`` (and ``context``) as they are now (after the computation, which
        may initialise parameters, as ActNorm does)."""
        if torch.compiler.is_compiling():
            return
        if _OptimiserSteps.handle is None:
            _OptimiserSteps.watch()
        self._steps = _OptimiserSteps.count
        slots = vars(module).get(_SLOTS) or _slots(module)
        self._slots = slots
        tensors = slots.tensor_objects
        self._versions = [t._version for t in tensors]
        self._flags = [t.requires_grad for t in tensors] if self._grad or self._closed else None
        self._context = (
            None if context is None else (id(context), context._version, context.requires_grad)
        )
        if self._closed:
            needs_grad = any(self._flags) or bool(self._context and self._context[2])
            self.graph = self._grad and needs_grad
            self._closed = not needs_grad  # grad mode irrelevant: nothing requires grad
        self._taken = True

    def holds(self, module: nn.Module, context: torch.Tensor | None = None) -> bool:
        """Whether ``module`` (and ``context``) are still as they were in :meth:`take`."""
        if not self._taken:
            return torch.compiler.is_compiling()
        if self._steps != _OptimiserSteps.count:
            return False
        grad = torch.is_grad_enabled()
        if self._grad != grad and not self._closed:
            return False
        slots = self._slots
        if vars(module).get(_SLOTS) is not slots:
            return False
        if not slots.current():
            delattr(module, _SLOTS)  # a tensor or submodule was replaced: find them afresh
            return False
        tensors = slots.tensor_objects
        if [t._version for t in tensors] != self._versions:
            return False
        flags = self._flags
        if flags is not None and [t.requires_grad for t in tensors] != flags:
            return False
        if context is None:
            return self._context is None
        return (id(context), context._version, context.requires_grad) == self._context


# -- caching --------------------------------------------------------------------------------------
class _Pair:
    """A cached ``(x, y, log|det ∂y/∂x|)``, the state it was computed in and what that state
    is of (``root``, ``context``: the transform's module, or the whole flow that drew it).

    ``drawn``: ``y`` was computed from ``x`` (a sample pushed forward), rather than ``x`` from a
    given ``y``. Only drawn pairs answer ``inv(y)``: a point handed in by the caller is inverted
    afresh on every call, as by a fresh distribution.
    """

    __slots__ = ("context", "drawn", "ladj", "root", "state", "x", "y")

    def __init__(self, x, y, ladj, drawn: bool, state: ParameterState, root, context) -> None:
        self.x, self.y, self.ladj, self.drawn = x, y, ladj, drawn
        self.state, self.root, self.context = state, root, context

    def holds(self) -> bool:
        return self.state.holds(self.root, self.context)

    def log_det(self) -> torch.Tensor:
        """``log|det ∂y/∂x|``, computed now when the draw deferred it (see
        :attr:`FlowTransform.deferred_log_det`; the draw was made without gradients)."""
        ladj = self.ladj
        if callable(ladj):
            with torch.no_grad():
                ladj = self.ladj = ladj()
        return ladj


def _drawn(module: FlowTransform, x: torch.Tensor, context) -> tuple:
    """``y`` and ``log|det ∂y/∂x|`` of a sample pushed through ``module``; for a transform whose
    log-determinant costs far more than its map (:attr:`FlowTransform.deferred_log_det`) drawn
    without gradients, the map alone and a function that computes the log-determinant."""
    if module.deferred_log_det and not torch.is_grad_enabled():
        module._check_event(x, "input")
        resolved = module._resolve_context(context)
        return module._forward_values(x, resolved), module._deferred_log_det(x, resolved)
    return module.forward_and_log_det(x, context)


class _FusedCalls:
    """The ``Transform`` interface over a module's fused maths and a bound context.

    Shared by :class:`FlowTransform` (context ``None``) and :class:`ConditionedTransform`. When
    the transform caches (``cache_size=1``) it keeps the latest ``(x, y)`` pair with the
    log|det J| computed together with it and the :class:`ParameterState` it was computed in; a
    pair is used only while that state holds (see :class:`FlowTransform`, *Caching*).
    """

    _cache_size: int
    _kept: _Pair | None

    def _target(self) -> tuple[FlowTransform, torch.Tensor | None]:
        raise NotImplementedError

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        module, context = self._target()
        return module.forward_and_log_det(x, context)[0]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        module, context = self._target()
        return module.inverse_and_log_det(y, context)[0]

    def _keep(self, x, y, ladj, drawn: bool) -> None:
        module, context = self._target()
        state = ParameterState.of(module, context)
        self._kept = _Pair(x, y, ladj, drawn, state, module, context)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._cache_size:
            return self._call(x)
        kept = self._kept
        if kept is not None and kept.x is x and kept.holds():
            return kept.y
        module, context = self._target()
        y, ladj = module.forward_and_log_det(x, context)
        self._keep(x, y, ladj, drawn=True)
        return y

    def draw(
        self, x: torch.Tensor, state: ParameterState, root: nn.Module, context=None
    ) -> torch.Tensor:
        """``y = f(x)`` for a sample ``x`` being pushed through a flow, its pair kept under
        ``state``: one :class:`ParameterState` of the whole flow (``root``, ``context``),
        shared by all its layers and taken once the sample has gone through them all, which
        is cheaper than one state per layer (:class:`~pyroflows.distribution.FlowDistribution`
        uses it; any caller of ``t(x)`` gets the same pair with a state of its own)."""
        module, own_context = self._target()
        y, ladj = _drawn(module, x, own_context)
        if self._cache_size:
            self._kept = _Pair(x, y, ladj, True, state, root, context)
        return y

    def _drawn_from(self, y: torch.Tensor, trusted: ParameterState | None = None) -> _Pair | None:
        kept = self._kept
        if (
            kept is not None
            and kept.drawn
            and kept.y is y
            and ((trusted is not None and kept.state is trusted) or kept.holds())
        ):
            return kept
        return None

    def _invert(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        module, context = self._target()
        if module.inverse_kind == "none":
            kept = self._kept
            stale = kept is not None and kept.drawn and kept.y is y
            raise NotImplementedError(module._one_way_message(stale))
        return module.inverse_and_log_det(y, context)

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        if not self._cache_size:
            return self._invert(y)[0]
        kept = self._drawn_from(y)
        if kept is not None:
            return kept.x
        x, inverse_ladj = self._invert(y)
        self._keep(x, y, -inverse_ladj, drawn=False)
        return x

    def inverse_pair(
        self, y: torch.Tensor, trusted: ParameterState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = f⁻¹(y)`` and ``log|det ∂y/∂x|`` in one call: what ``log_prob`` needs of each
        layer. A sample this transform drew is answered from the cache while its state holds
        (a caller that has checked a shared state passes it as ``trusted``); any other point is
        inverted afresh, and nothing is kept."""
        kept = self._kept
        if (
            kept is not None
            and kept.y is y
            and kept.drawn
            and ((trusted is not None and kept.state is trusted) or kept.holds())
        ):
            return kept.x, kept.log_det()
        x, inverse_ladj = self._invert(y)
        return x, -inverse_ladj

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kept = self._kept
        if kept is not None and kept.x is x and kept.y is y and kept.holds():
            return kept.log_det()
        module, context = self._target()
        module._check_event(x, "input")
        return module._log_abs_det(x, y, module._resolve_context(context))

    def __getstate__(self) -> dict:
        # Cached tensors carry autograd graphs that can be neither pickled nor deep-copied.
        state = Transform.__getstate__(self)
        state["_kept"] = None
        state.pop(_SLOTS, None)
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
        return state


class _FlowInverse(_InverseTransform, ConditionalTransform):
    """``t.inv`` for a pyroflows transform; ``t.inv.condition(c)`` is ``t.condition(c).inv``."""

    def condition(self, context: torch.Tensor | None) -> Transform:
        return self._inv.condition(context).inv


class FlowTransform(_FusedCalls, TransformModule, ConditionalTransform):
    """Base class of every pyroflows transform: a Pyro ``TransformModule`` with fused maths.

    **What a subclass implements**

    * ``_forward_and_log_det(x, context) -> (y, ladj)`` with ``ladj = log|det ∂y/∂x|``;
    * ``_inverse_and_log_det(y, context) -> (x, ladj_inv)`` with ``ladj_inv = log|det ∂x/∂y|``,
      unless the transform is one-way (below);
    * optionally ``_log_abs_det(x, y, context)`` when log|det J| is cheaper than a full pass
      (the default recomputes the forward pass), and ``_forward_values(x, context)`` with
      ``deferred_log_det = True`` when the map alone is much cheaper than with log|det J|:
      samples drawn without gradients (``d.sample()``) then compute the map alone, and the
      log-determinant (a second pass) only if ``log_prob`` of the sample is asked for;
    * class attributes ``domain`` / ``codomain`` (their ``event_dim`` is the transform's),
      ``inverse_kind`` when it is not ``"exact"``, ``sign`` when the sign of ``det J`` is
      known, and an ``extra_repr``.

    Both log-determinants have shape ``batch_shape`` (summed over the event dimensions) and the
    inputs arrive already checked: the event shape matches :attr:`event_shape` and ``context`` is
    ``None`` for an unconditional transform or a tensor of shape ``(*batch, context_dim)``.

    **One-way transforms.** ``inverse_kind`` says how ``f⁻¹`` is computed: ``"exact"`` (closed
    form, the default), ``"numerical"`` (an iterative solve to a tolerance) or ``"none"``: the
    transform can sample, and score the samples it drew itself (from the cached pair, while the
    parameters that drew them are unchanged), but cannot map any other point back (as Pyro's
    planar, radial, Sylvester, polynomial and block neural autoregressive transforms). A one-way
    subclass sets ``inverse_kind = "none"`` and does not implement ``_inverse_and_log_det``;
    every inverse then raises a ``NotImplementedError`` naming the transform and what to do
    instead. Whatever needs inverses refuses such transforms up front through
    :func:`has_inverse`: :class:`~pyroflows.infer.STL_ELBO` and
    ``IWAE(estimator="dreg")`` (they score the guide's samples with stopped parameters, i.e.
    by inverting) name the objective and the transform.

    **What the base class provides**

    * Pyro's ``Transform`` interface (``t(x)``, ``t.inv(y)``, ``t.log_abs_det_jacobian(x, y)``),
      with ``bijective = True``; the public fused methods :meth:`forward_and_log_det` and
      :meth:`inverse_and_log_det`; clear ``ValueError``\\ s for inputs of the wrong event shape and
      for a missing or mis-sized context.
    * Conditioning: a transform built with ``context_dim > 0`` is applied through
      :meth:`condition` (Pyro's conditional convention), which returns a short-lived
      :class:`ConditionedTransform` sharing this module's parameters; applying the module itself
      raises a ``ValueError`` that says so. An unconditional transform ignores the context in
      :meth:`condition`, so it can sit in a conditional stack (as Pyro's
      ``ConstantConditionalTransform`` does).
    * ``sign``: a subclass whose ``det J`` has a known sign sets ``sign`` (``+1`` or ``-1``);
      otherwise the attribute is absent (``hasattr(t, "sign")`` is ``False``, where torch's
      ``Transform.sign`` raises ``NotImplementedError``, which broke ``torch.jit.trace`` of any
      module holding a transform).

    **Caching.** Modules default to ``cache_size=0`` and keep nothing. Views from
    :meth:`condition` / :meth:`with_cache` keep the latest ``(x, y)`` pair, its log|det J| and
    the :class:`ParameterState` it was computed in. A pair is used only while that state holds
    (the same parameter, buffer and context tensors, unchanged since, no optimiser step since,
    the same grad mode), and only for the input object it was computed from: ``t(x)`` for the
    same ``x``; ``t.inv(y)`` and :meth:`inverse_pair` for a ``y`` the view drew itself (so
    ``d.log_prob(d.rsample())`` needs no inversion and no second conditioner pass); a point
    handed in is inverted afresh on every call. So a distribution kept across optimiser steps
    gives the values and gradients a fresh one would. A flow's distribution pushes its samples
    with :meth:`draw`, which stamps every layer's pair with one state of the whole flow (taken
    once, checked once when the sample is scored), and scores with :meth:`inverse_pair`, one
    call per layer for ``x`` and log|det J|.

    Args:
        event_shape: the event shape the transform acts on (e.g. ``(dim,)``), or ``None`` when
            any size is accepted (parameter-free elementwise maps).
        context_dim: size of the context vector, 0 for an unconditional transform.
        cache_size: Pyro's cache size, 0 or 1.
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector
    #: how the inverse is computed: ``"exact"``, ``"numerical"`` or ``"none"`` (one-way)
    inverse_kind: ClassVar[Literal["exact", "numerical", "none"]] = "exact"
    #: whether a sample drawn without gradients computes only the map, and its log|det J| the
    #: first time it is asked for (a continuous flow, whose trace costs several times its map)
    deferred_log_det: ClassVar[bool] = False

    def __init__(
        self,
        event_shape: tuple[int, ...] | None = None,
        context_dim: int = 0,
        cache_size: int = 0,
    ) -> None:
        super().__init__(cache_size=cache_size)
        check_nonnegative_int("context_dim", context_dim)
        if event_shape is not None:
            event_shape = tuple(int(s) for s in event_shape)
            if len(event_shape) != self.domain.event_dim:
                raise ValueError(
                    f"{type(self).__name__}: expected an event shape of {self.domain.event_dim} "
                    f"dimension(s); got {event_shape}"
                )
        self.event_shape = event_shape
        self.context_dim = context_dim
        self._kept = None

    # -- subclass interface -------------------------------------------------------------------
    def _forward_and_log_det(self, x, context):
        raise NotImplementedError(f"{type(self).__name__} implements no _forward_and_log_det")

    def _inverse_and_log_det(self, y, context):
        raise NotImplementedError(
            f"{type(self).__name__} implements no _inverse_and_log_det: a transform without an "
            "inverse sets inverse_kind = 'none'"
        )

    def _log_abs_det(self, x: torch.Tensor, y: torch.Tensor, context) -> torch.Tensor:
        return self._forward_and_log_det(x, context)[1]

    def _forward_values(self, x: torch.Tensor, context) -> torch.Tensor:
        """``y = f(x)`` alone (what a transform with :attr:`deferred_log_det` implements)."""
        return self._forward_and_log_det(x, context)[0]

    def _deferred_log_det(self, x: torch.Tensor, context) -> Callable[[], torch.Tensor]:
        """A function computing ``log|det ∂y/∂x|`` of a drawn ``x`` later (a transform with
        options that matter, such as a solver's, captures them now)."""
        return lambda: self._forward_and_log_det(x, context)[1]

    @property
    def sign(self) -> int:
        # An AttributeError (not torch's NotImplementedError): hasattr() and torch.jit.trace,
        # which probes every attribute of a module, must see an attribute that is absent.
        raise AttributeError(f"{type(self).__name__} declares no sign of det J")

    def _one_way_message(self, stale: bool) -> str:
        name = type(self).__name__
        if stale:
            return (
                f"{name} has no inverse (inverse_kind='none') and the parameters, the grad mode "
                "or the context changed since it drew this point, so its cached pair no longer "
                "applies: call the flow again and score samples drawn from that distribution"
            )
        return (
            f"{name} has no inverse (inverse_kind='none'): it scores only the samples it drew "
            "itself (d.log_prob(d.rsample()) on one distribution d), not other points; for "
            "densities of data, use a flow whose transforms have inverses"
        )

    # -- public fused maths -------------------------------------------------------------------
    def forward_and_log_det(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``y = f(x)`` and ``log|det ∂y/∂x|`` (shape ``batch_shape``) in one pass."""
        self._check_event(x, "input")
        return self._forward_and_log_det(x, self._resolve_context(context))

    def inverse_and_log_det(
        self, y: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``x = f⁻¹(y)`` and ``log|det ∂x/∂y|`` (shape ``batch_shape``) in one pass.

        Raises:
            NotImplementedError: for a one-way transform (``inverse_kind == "none"``).
        """
        if self.inverse_kind == "none":
            raise NotImplementedError(self._one_way_message(False))
        self._check_event(y, "input of the inverse")
        return self._inverse_and_log_det(y, self._resolve_context(context))

    # -- conditioning and caching -------------------------------------------------------------
    def condition(self, context: torch.Tensor | None) -> ConditionedTransform:
        """Bind a context; returns a transform sharing this module's parameters.

        Args:
            context: tensor of shape ``(*batch, context_dim)``; ignored by an unconditional
                transform.
        """
        if self.context_dim == 0:
            return ConditionedTransform(self, None)
        return ConditionedTransform(self, self._resolve_context(context))

    def with_cache(self, cache_size: int = 1) -> Transform:
        if cache_size == self._cache_size:
            return self
        if self.context_dim:
            raise ValueError(
                f"{type(self).__name__} is conditional: use t.condition(context), which caches"
            )
        return ConditionedTransform(self, None, cache_size=cache_size)

    @property
    def inv(self) -> Transform:
        inv = self._inv
        if inv is None:
            inv = _FlowInverse(self)
            self._inv = inv
        return inv

    # -- validation -----------------------------------------------------------------------------
    def _target(self) -> tuple[FlowTransform, None]:
        return self, None

    def _resolve_context(self, context: torch.Tensor | None) -> torch.Tensor | None:
        if self.context_dim == 0:
            return None
        return check_context(
            type(self).__name__, context, self.context_dim, "use t.condition(context)"
        )

    def _check_event(self, x: torch.Tensor, what: str) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected the {what} as a tensor; got {type(x)}")
        n = self.domain.event_dim
        if x.dim() < n:
            raise ValueError(
                f"{name}: expected an {what} with at least {n} dimension(s); "
                f"got shape {tuple(x.shape)}"
            )
        shape = self.event_shape
        if shape is not None and tuple(x.shape[x.dim() - n :]) != shape:
            detail = f"last dimension {shape[0]}" if n == 1 else f"event shape {shape}"
            raise ValueError(
                f"{name}: expected an {what} with {detail}; got shape {tuple(x.shape)}"
            )

    def __hash__(self) -> int:
        return nn.Module.__hash__(self)

    __repr__ = nn.Module.__repr__

    def extra_repr(self) -> str:
        parts = []
        if self.event_shape is not None:
            parts.append(f"event_shape={self.event_shape}")
        if self.context_dim:
            parts.append(f"context_dim={self.context_dim}")
        return ", ".join(parts)


class ConditionedTransform(_FusedCalls, Transform):
    """A :class:`FlowTransform` bound to one context (or to none), with its own cache.

    Returned by :meth:`FlowTransform.condition` and :meth:`FlowTransform.with_cache`; it computes
    with the parameters of the module it was made from (``view.module``) and lives as long as
    the distribution that uses it. It is a plain, cheap ``Transform`` rather than a module: a
    flow makes one per layer on every call, and the parameters stay registered where they
    belong, on the module (which is what ``pyro.module`` and optimisers should be given). Its
    cache follows :class:`FlowTransform`'s rules (*Caching*): it may be kept across optimiser
    steps.

    Args:
        module: the transform to bind.
        context: a context of shape ``(*batch, context_dim)``, or ``None``.
        cache_size: 1 (the default) keeps the latest ``(x, y, log|det J|)``.
    """

    bijective = True

    def __init__(
        self, module: FlowTransform, context: torch.Tensor | None, cache_size: int = 1
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.module = module
        self.context = context
        self.domain = module.domain
        self.codomain = module.codomain
        self._kept = None

    def _target(self) -> tuple[FlowTransform, torch.Tensor | None]:
        return self.module, self.context

    def draw(
        self, x: torch.Tensor, state: ParameterState, root: nn.Module, context=None
    ) -> torch.Tensor:
        """As :meth:`FlowTransform.draw` (the hot path of sampling, without the indirection)."""
        y, ladj = _drawn(self.module, x, self.context)
        if self._cache_size:
            self._kept = _Pair(x, y, ladj, True, state, root, context)
        return y

    def with_cache(self, cache_size: int = 1) -> Transform:
        if cache_size == self._cache_size:
            return self
        return ConditionedTransform(self.module, self.context, cache_size=cache_size)

    def forward_shape(self, shape):
        return self.module.forward_shape(shape)

    def inverse_shape(self, shape):
        return self.module.inverse_shape(shape)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        context = "None" if self.context is None else f"<context {tuple(self.context.shape)}>"
        return f"{type(self).__name__}({type(self.module).__name__}, context={context})"


# Pyro's transforms that cannot invert a point they did not produce (they raise KeyError or
# NotImplementedError on a cache miss), and the conditional forms that give them.
_ONE_WAY = (
    BlockAutoregressive,
    ConditionalNeuralAutoregressive,
    ConditionalPlanar,
    ConditionalRadial,
    ConditionedPlanar,
    ConditionedRadial,
    NeuralAutoregressive,
    Polynomial,
    Sylvester,
)


def has_inverse(t: Transform | ConditionalTransform) -> bool:
    """Whether ``t`` can map back points it did not produce (``t.inv(y)`` for any ``y``).

    ``False`` for a pyroflows transform with ``inverse_kind == "none"`` (or holding one, as a
    multi-scale wrapper may), for Pyro's one-way transforms (``Planar``, ``Radial``,
    ``Sylvester``, ``Polynomial``, ``BlockAutoregressive``, ``NeuralAutoregressive`` and their
    conditional forms) and for a torch transform that does not implement ``_inverse``;
    compositions (``ComposeTransform``, ``IndependentTransform``, ``CatTransform``,
    ``StackTransform``, bound contexts) are invertible when all their parts are. An inverse
    ``t.inv`` is invertible (its inverse is ``t``'s forward map).

    Args:
        t: a torch or Pyro transform, or a conditional transform.

    Raises:
        TypeError: when ``t`` is neither.

    Example:
        >>> import pyro.distributions as dist
        >>> from pyroflows.transforms import AffineCoupling
        >>> from pyroflows.transforms.base import has_inverse
        >>> has_inverse(AffineCoupling(2)), has_inverse(dist.transforms.Planar(2))
        (True, False)
    """
    if isinstance(t, FlowTransform):
        return all(m.inverse_kind != "none" for m in t.modules() if isinstance(m, FlowTransform))
    if isinstance(t, ConditionedTransform):
        return has_inverse(t.module)
    if isinstance(t, _InverseTransform):
        return True
    if isinstance(t, ComposeTransform):
        return all(has_inverse(p) for p in t.parts)
    if isinstance(t, IndependentTransform):
        return has_inverse(t.base_transform)
    if isinstance(t, (CatTransform, StackTransform)):
        return all(has_inverse(p) for p in t.transforms)
    if isinstance(t, ConstantConditionalTransform):
        return has_inverse(t.transform)
    if isinstance(t, _ONE_WAY):
        return False
    if isinstance(t, Transform):
        return type(t)._inverse is not Transform._inverse
    if isinstance(t, ConditionalTransform):
        return True
    raise TypeError(f"has_inverse: expected a torch or Pyro transform; got {type(t).__name__}")
