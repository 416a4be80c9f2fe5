"""The contract every pyroflows transform keeps, written down once.

A transform is an invertible map ``y = f(x)`` with a tractable ``log|det ∂y/∂x|``. In Pyro's
convention the forward direction goes from the base distribution (``x``) to the data (``y``):
``TransformedDistribution(base, [f]).log_prob(y) = base.log_prob(f⁻¹(y)) - log|det ∂y/∂x|``.
"""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import Transform, _InverseTransform

from .._checks import check_nonnegative_int

__all__ = ["ConditionedTransform", "FlowTransform", "check_context"]


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


class _FusedCalls:
    """The ``Transform`` interface over a module's fused maths and a bound context.

    Shared by :class:`FlowTransform` (context ``None``) and :class:`ConditionedTransform`. When
    the transform caches (``cache_size=1``), the log|det J| computed together with the latest
    ``(x, y)`` pair is kept beside Pyro's cached pair, so that
    ``TransformedDistribution.log_prob`` does not run the conditioner a second time.
    """

    _cache_size: int
    _kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    def _target(self) -> tuple[FlowTransform, torch.Tensor | None]:
        raise NotImplementedError

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        module, context = self._target()
        y, ladj = module.forward_and_log_det(x, context)
        if self._cache_size:
            self._kept = (x, y, ladj)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        module, context = self._target()
        x, inverse_ladj = module.inverse_and_log_det(y, context)
        if self._cache_size:
            self._kept = (x, y, -inverse_ladj)
        return x

    def _inverse_pair(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x = f⁻¹(y)`` and ``log|det ∂y/∂x|`` through the caches: what
        ``TransformedDistribution.log_prob`` needs of each layer, in one call."""
        x = self._inv_call(y)
        kept = self._kept
        if kept is not None and kept[0] is x and kept[1] is y:
            return x, kept[2]
        return x, self.log_abs_det_jacobian(x, y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kept = self._kept
        if kept is not None and kept[0] is x and kept[1] is y:
            return kept[2]
        module, context = self._target()
        module._check_event(x, "input")
        return module._log_abs_det(x, y, module._resolve_context(context))

    def __getstate__(self) -> dict:
        # Cached tensors carry autograd graphs that can be neither pickled nor deep-copied.
        state = Transform.__getstate__(self)
        state["_kept"] = None
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
    * ``_inverse_and_log_det(y, context) -> (x, ladj_inv)`` with ``ladj_inv = log|det ∂x/∂y|``;
    * optionally ``_log_abs_det(x, y, context)`` when log|det J| is cheaper than a full pass
      (the default recomputes the forward pass);
    * class attributes ``domain`` / ``codomain`` (their ``event_dim`` is the transform's) and an
      ``extra_repr``.

    Both log-determinants have shape ``batch_shape`` (summed over the event dimensions) and the
    inputs arrive already checked: the event shape matches :attr:`event_shape` and ``context`` is
    ``None`` for an unconditional transform or a tensor of shape ``(*batch, context_dim)``.

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
    * Caching: modules default to ``cache_size=0``, so nothing stale survives an optimiser step.
      Short-lived views from :meth:`condition` / :meth:`with_cache` cache the latest pair and its
      log|det J| (so ``log_prob(rsample())`` needs no inversion and no second conditioner pass).

    Args:
        event_shape: the event shape the transform acts on (e.g. ``(dim,)``), or ``None`` when
            any size is accepted (parameter-free elementwise maps).
        context_dim: size of the context vector, 0 for an unconditional transform.
        cache_size: Pyro's cache size, 0 or 1.
    """

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

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
        raise NotImplementedError

    def _inverse_and_log_det(self, y, context):
        raise NotImplementedError

    def _log_abs_det(self, x: torch.Tensor, y: torch.Tensor, context) -> torch.Tensor:
        return self._forward_and_log_det(x, context)[1]

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
        """Return ``x = f⁻¹(y)`` and ``log|det ∂x/∂y|`` (shape ``batch_shape``) in one pass."""
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
    belong, on the module (which is what ``pyro.module`` and optimisers should be given).

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
