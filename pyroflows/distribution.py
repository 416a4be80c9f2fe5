"""What calling a flow returns: :class:`FlowDistribution`, a Pyro ``TransformedDistribution``.

A distribution may be kept: ``d = flow()`` once, then ``loss = -d.log_prob(x).mean()``,
``loss.backward()`` and an optimiser step, as often as wanted, with the same ``x`` or fresh
minibatches, and ``d`` gives the values and gradients that a fresh ``flow()`` would. Three
things make that so:

* the base distribution is read at use, not at construction: the distribution keeps the flow's
  base module, the context and the temperature, and builds the base when it samples or scores
  (and for :attr:`~FlowDistribution.base_dist`). A base that carries no autograd graph (the
  standard Normal, or any base under ``torch.no_grad()``) is reused while its module and the
  context are unchanged (:class:`~pyroflows.transforms.base.ParameterState`); a base computed
  from parameters with gradients (``"diag_normal"``, ``"conditional_normal"``) is built afresh
  for each use, except that the base a sample was drawn from scores that sample (one pass of a
  conditional base's network for ``d.log_prob(d.rsample())``);
* the transforms' caches serve only the distribution's own samples, and only while the flow's
  parameters, the context and the grad mode are those the sample was drawn with: one
  :class:`~pyroflows.transforms.base.ParameterState` of the whole flow, taken when a sample has
  gone through every layer and checked once when it is scored (see
  :class:`~pyroflows.transforms.FlowTransform`, *Caching*); any other point is inverted afresh;
* a flow moved to another dtype or device after the distribution was made (``flow.double()``,
  ``flow.to("cuda")``) is refused with a message that says to call the flow again (the
  distribution's context, and what it has cached, are of the old dtype and device).
"""

from __future__ import annotations

import weakref

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from torch.distributions import Independent, Transform

from .bases import check_temperature, tempered
from .transforms.base import ConditionedTransform, FlowTransform, ParameterState, has_inverse

__all__ = ["FlowDistribution"]

_FUSED = (ConditionedTransform, FlowTransform)


class _LiveBase:
    """How to build the base distribution now: the flow's base module called on the context,
    tempered, then reshaped as ``TransformedDistribution`` reshaped it at construction."""

    __slots__ = ("context", "reinterpreted", "root", "shape", "temperature")

    def __init__(self, root, context, temperature) -> None:
        self.root = root  # the flow
        self.context = context
        self.temperature = temperature
        self.shape: torch.Size | None = None  # the batch shape to expand to, if any
        self.reinterpreted = torch.Size()  # trailing batch dims made event dims, if any

    @property
    def module(self):
        """The flow's base module, read at use (a base the flow was given since counts)."""
        return self.root.base

    def build(self) -> dist.Distribution:
        d = tempered(self.module(self.context), self.temperature)
        if self.shape is not None and d.batch_shape != self.shape:
            d = d.expand(self.shape)
        if self.reinterpreted:
            d = Independent(d, len(self.reinterpreted))
        return d

    def state(self) -> ParameterState:
        return ParameterState.of(self.module, self.context, closed=True)

    def holds(self, state: ParameterState) -> bool:
        return state.holds(self.module, self.context)

    def expanded(self, batch_shape: torch.Size) -> _LiveBase:
        """The same base, expanded to the batch shape ``batch_shape``."""
        new = _LiveBase(self.root, self.context, self.temperature)
        new.shape = torch.Size(batch_shape) + self.reinterpreted
        new.reinterpreted = self.reinterpreted
        return new


class _Built:
    """A base distribution built by :class:`_LiveBase`, with the state it was built in;
    ``fresh``: not handed out yet, so its graph (if any) is intact for one use."""

    __slots__ = ("dist", "fresh", "state")

    def __init__(self, d, state: ParameterState, fresh: bool = False) -> None:
        self.dist, self.state, self.fresh = d, state, fresh


class _Drawn:
    """The latest sample: its base-space draw ``x``, the sample ``y``, the base it was drawn
    from and the state of the whole flow it was pushed through."""

    __slots__ = ("base", "state", "x", "y")

    def __init__(self, x, y, base, state: ParameterState) -> None:
        self.x, self.y, self.base, self.state = x, y, base, state


_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reference(flow) -> torch.Tensor | None:
    """A floating tensor of the flow that tells its dtype and device: its first parameter
    (``.to()`` and ``.double()`` change parameters in place, where buffers are replaced), else
    a buffer. Found once per flow and kept with the path of dictionary slots that leads to it,
    which is checked on every use: a parameter or submodule replaced (``load_state_dict(...,
    assign=True)``, a swapped layer) is found afresh."""
    cached = _REFERENCES.get(flow)
    if cached is not None and all(slot.get(key) is obj for slot, key, obj in cached[1]):
        return cached[0]
    found = _first_floating(flow, "_parameters", []) or _first_floating(flow, "_buffers", [])
    found = found or (None, [])
    _REFERENCES[flow] = found
    return found[0]


def _first_floating(module, kind: str, path: list) -> tuple | None:
    """The first floating tensor among ``module``'s parameters (or buffers), in the order of
    ``module.parameters()``, with the slots on the way to it."""
    slots = getattr(module, kind)
    for key, t in slots.items():
        if t is not None and t.is_floating_point():
            return t, [*path, (slots, key, t)]
    for key, child in module._modules.items():
        if child is not None:
            found = _first_floating(child, kind, [*path, (module._modules, key, child)])
            if found is not None:
                return found
    return None


def _as_dtype(name: str, what: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in the flow's floating dtype (real dtypes are converted, as ``pf.fit`` does)."""
    if t.dtype == dtype:
        return t
    if t.is_complex():
        raise TypeError(f"{name}: expected a real {what} (the flow is {dtype}); got {t.dtype}")
    return t.to(dtype)


def _sum_rightmost(value: torch.Tensor | float, dim: int) -> torch.Tensor | float:
    if dim == 0 or not isinstance(value, torch.Tensor):
        return value
    return value.reshape((*value.shape[: value.dim() - dim], -1)).sum(-1)


class FlowDistribution(dist.TransformedDistribution):
    """What calling a :class:`~pyroflows.Flow` returns: a Pyro ``TransformedDistribution``.

    It is one in every respect (``isinstance``, ``.base_dist``, ``.transforms``, ``expand``,
    ``rsample``, use in ``pyro.sample``), and it is safe to keep: after any number of optimiser
    steps it gives the values and gradients of a fresh ``flow()`` (the module docstring says
    how). It scores its own samples (``d.log_prob(d.rsample())``) without inverting anything and
    without a second pass of any network. When every layer is a pyroflows transform on the
    flow's events (``simple=True``, decided by the flow), it is built without composing the
    transforms to work out shapes and ``log_prob`` takes each layer's inverse and
    log-determinant in one call, which removes Python overhead that is a sizeable share of a
    small batch's cost.

    ``log_prob`` converts a value of another real dtype to the flow's (as :func:`pyroflows.fit`
    converts data; a context is converted likewise) and refuses, with a ``ValueError`` naming
    both shapes, a value whose event shape is not the flow's or whose batch dimensions do not
    broadcast with the batch shape (the rows of the context).

    Args:
        base_distribution: the base distribution, used as given (:meth:`from_flow` instead
            builds it from the flow's base module at each use).
        transforms: the transforms, base side first.
        validate_args: as for any torch distribution.
        simple: every transform is a pyroflows transform that keeps the event shape.

    Example:
        >>> import torch
        >>> import pyroflows as pf
        >>> flow = pf.RealNVP(dim=2, layers=2, hidden=(8,), base="diag_normal")
        >>> d = flow()  # kept across optimiser steps
        >>> x = torch.randn(16, 2)
        >>> opt = torch.optim.Adam(flow.parameters(), lr=0.1)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = -d.log_prob(x).mean()
        ...     loss.backward()
        ...     opt.step()
        >>> torch.allclose(d.log_prob(x), flow().log_prob(x))
        True
    """

    def __init__(
        self,
        base_distribution: dist.Distribution,
        transforms: list[Transform],
        validate_args: bool | None = None,
        simple: bool = False,
    ) -> None:
        self._setup(simple, transforms, len(base_distribution.event_shape), None)
        if not simple:
            super().__init__(base_distribution, transforms, validate_args=validate_args)
        else:
            self.base_dist = base_distribution
            torch.distributions.Distribution.__init__(
                self,
                base_distribution.batch_shape,
                base_distribution.event_shape,
                validate_args=validate_args,
            )
        self._base_event_ndims = len(self._fixed.event_shape)
        self._has_rsample = self._fixed.has_rsample

    def _setup(self, simple: bool, transforms, base_event_ndims: int, has_rsample) -> None:
        """The state every instance has, however it was made."""
        self._simple = simple
        self.transforms = transforms
        self._fixed: dist.Distribution | None = None
        self._live: _LiveBase | None = None
        self._built: _Built | None = None
        self._drawn: _Drawn | None = None
        self._dtype: torch.dtype | None = None
        self._where: tuple | None = None  # (dtype, device) of the flow when made
        self._name = type(self).__name__
        self._base_event_ndims = base_event_ndims
        self._has_rsample = has_rsample

    @classmethod
    def from_flow(
        cls, flow, context: torch.Tensor | None, temperature: float = 1.0
    ) -> FlowDistribution:
        """The distribution of ``flow`` for a checked ``context`` (``None`` if unconditional).

        A context of another real dtype than the flow's is converted to the flow's. The base is
        built at use, as the module docstring says; a base module that cannot say its shapes
        without being called (one without ``shapes(context)``), or a flow with layers that are
        not ours, has it built once here too, for the shapes.
        """
        name = type(flow).__name__
        # Inside torch.compile (whose callers, as fit, pass data in the flow's dtype) the flow
        # is not searched for its dtype: walking its modules would break the graph.
        ref = None if torch.compiler.is_compiling() else _reference(flow)
        dtype = None if ref is None else ref.dtype
        if context is not None and dtype is not None:
            context = _as_dtype(name, "context", context, dtype)
        parts = [
            t.condition(context) if isinstance(t, ConditionalTransform) else t for t in flow._chain
        ]
        live = _LiveBase(flow, context, temperature)
        module = flow.base
        shapes = getattr(module, "shapes", None)
        if flow._simple and shapes is not None and getattr(module, "has_rsample", False):
            # A base that says its shapes (the bases of pyroflows.bases) is built at first use.
            check_temperature(temperature)
            batch_shape, event_shape = shapes(context)
            if tuple(event_shape) == flow.event_shape:
                d = cls.__new__(cls)
                d._setup(True, parts, len(event_shape), True)
                torch.distributions.Distribution.__init__(d, batch_shape, event_shape)
                d._live = live
                d._dtype = dtype
                d._where = None if ref is None else (ref.dtype, ref.device)
                d._name = name
                return d
        raw = live.build()
        simple = flow._simple and raw.event_shape == flow.event_shape
        d = cls(raw, parts, simple=simple)
        adapted = d._fixed
        if adapted is not raw:
            # What TransformedDistribution did to the base (expand it, make batch dims event
            # dims), so that every later build matches it.
            n = len(adapted.event_shape) - len(raw.event_shape)
            full = adapted.batch_shape + adapted.event_shape
            shape = full[: len(full) - len(raw.event_shape)]
            live.shape = None if shape == raw.batch_shape else shape
            live.reinterpreted = adapted.event_shape[:n]
        d._live, d._fixed = live, None
        d._built = _Built(adapted, live.state(), fresh=True)
        d._dtype = dtype
        d._where = None if ref is None else (ref.dtype, ref.device)
        d._name = name
        return d

    # -- the base, read at use ------------------------------------------------------------------
    @property
    def base_dist(self) -> dist.Distribution:
        """The base distribution as it is now (built from the flow's base module)."""
        self._check_moved()
        return self._base()

    @base_dist.setter
    def base_dist(self, value: dist.Distribution) -> None:
        self._fixed = value

    def _base(self) -> dist.Distribution:
        live = self._live
        if live is None:
            return self._fixed
        built = self._built
        if (
            built is not None
            and (built.fresh or not built.state.graph)
            and built.state.holds(live.module, live.context)
        ):
            built.fresh = False
            return built.dist
        d = live.build()
        self._built = _Built(d, live.state())
        return d

    @property
    def has_rsample(self) -> bool:
        return self._has_rsample

    def _check_moved(self) -> None:
        where = self._where
        if where is None:
            return
        ref = _reference(self._live.root)  # the flow's tensors now (they may have been replaced)
        if ref is not None and (ref.dtype, ref.device) != where:
            raise ValueError(
                f"{self._name}: expected the flow in {where[0]} on {where[1]}, as when this "
                f"distribution was made; got a flow moved to {ref.dtype} on "
                f"{ref.device}: call the flow again for a distribution of the moved flow"
            )

    # -- sampling and scoring -------------------------------------------------------------------
    def _push(self, x: torch.Tensor, base: dist.Distribution) -> torch.Tensor:
        """Push a base draw through the layers. From a flow, the layers keep their pairs
        under one state of the whole flow, taken once the draw has gone through them all."""
        live = self._live
        if live is None:
            for transform in self.transforms:
                x = transform(x)
            return x
        state = ParameterState.pending()
        root, context = live.root, live.context
        x0 = x
        if self._simple:  # every layer ours
            for transform in self.transforms:
                x = transform.draw(x, state, root, context)
        else:
            for transform in self.transforms:
                if isinstance(transform, _FUSED):
                    x = transform.draw(x, state, root, context)
                else:
                    x = transform(x)
        state.take(root, context)
        self._drawn = _Drawn(x0, x, base, state)
        return x

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        self._check_moved()
        base = self._base()
        return self._push(base.rsample(sample_shape), base)

    def sample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        self._check_moved()
        with torch.no_grad():
            base = self._base()
            return self._push(base.sample(sample_shape), base)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        self._check_moved()
        value = self._checked(value)
        if self._validate_args:
            self._validate_sample(value)
        # The distribution's latest sample: one check of the flow's state for all its layers.
        drawn, trusted = self._drawn, None
        if drawn is not None and drawn.y is value:
            if drawn.state.holds(self._live.root, self._live.context):
                trusted = drawn.state
            elif not self._simple:
                self._forget_foreign()
        log_prob: torch.Tensor | float = 0.0
        y = value
        if self._simple:  # every layer fused, on the flow's events: no shape bookkeeping
            for transform in reversed(self.transforms):
                y, ladj = transform.inverse_pair(y, trusted)
                log_prob = log_prob - ladj
            base = drawn.base if trusted is not None and y is drawn.x else self._base()
            return log_prob + base.log_prob(y)
        event_dim = len(self.event_shape)
        for transform in reversed(self.transforms):
            if isinstance(transform, _FUSED):
                x, ladj = transform.inverse_pair(y, trusted)
            else:
                x = transform.inv(y)
                ladj = transform.log_abs_det_jacobian(x, y)
            event_dim += transform.domain.event_dim - transform.codomain.event_dim
            log_prob = log_prob - _sum_rightmost(ladj, event_dim - transform.domain.event_dim)
            y = x
        base = drawn.base if trusted is not None and y is drawn.x else self._base()
        return log_prob + _sum_rightmost(base.log_prob(y), event_dim - len(base.event_shape))

    def _forget_foreign(self) -> None:
        """The latest sample is scored after the flow (or the grad mode) changed: drop what
        layers that are not ours cached of it (torch's one-pair cache, keyed on the input
        alone, would answer with the old pass), or say why it cannot be scored."""
        for transform in self.transforms:
            if isinstance(transform, _FUSED) or not getattr(transform, "_cache_size", 0):
                continue
            if not has_inverse(transform):
                raise NotImplementedError(
                    f"{self._name}: {type(transform).__name__} has no inverse, and the flow's "
                    "parameters (or the grad mode) changed since this sample was drawn, so its "
                    "cached pass no longer applies: call the flow again and score samples "
                    "drawn from that distribution"
                )
            transform._cached_x_y = None, None

    def _checked(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` in the flow's dtype, its shape checked against the batch and event shapes."""
        name = self._name
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected the value to score as a tensor; got {type(value)}")
        if self._dtype is not None and value.dtype != self._dtype:
            value = _as_dtype(name, "value", value, self._dtype)
        event, batch = self.event_shape, self.batch_shape
        shape = value.shape
        n = len(event)
        if shape[len(shape) - n :] != event or len(shape) < n:
            why = f"(event shape {tuple(event)})"
        elif batch and any(
            a != b and a != 1 and b != 1
            for a, b in zip(reversed(shape[: len(shape) - n]), reversed(batch), strict=False)
        ):
            why = (
                f"whose batch dimensions broadcast with the batch shape {tuple(batch)} (the "
                "rows of the context)"
            )
        else:
            return value
        expected = ", ".join(["*sample", *map(str, batch), *map(str, event)])
        raise ValueError(
            f"{name}: expected a value of shape ({expected}) {why}; got shape {tuple(shape)}"
        )

    # -- shapes ---------------------------------------------------------------------------------
    def expand(self, batch_shape, _instance=None) -> FlowDistribution:
        new = self._get_checked_instance(FlowDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.event_shape
        for t in reversed(self.transforms):
            shape = t.inverse_shape(shape)
        base_batch_shape = shape[: len(shape) - self._base_event_ndims]
        for attr in ("_simple", "_dtype", "_where", "_name", "_base_event_ndims", "_has_rsample"):
            setattr(new, attr, getattr(self, attr))
        new._built = new._drawn = None
        if self._live is None:
            new._live = None
            new._fixed = self._fixed.expand(base_batch_shape)
        else:
            new._live = self._live.expanded(base_batch_shape)
            new._fixed = None
        new.transforms = self.transforms
        torch.distributions.Distribution.__init__(
            new, batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def __getstate__(self) -> dict:
        # Cached draws and bases carry autograd graphs that can be neither pickled nor copied.
        state = self.__dict__.copy()
        state["_built"] = state["_drawn"] = None
        return state
