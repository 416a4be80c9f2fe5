"""Continuous normalizing flows: the transform is the solution of an ODE ``dx/dt = v(x, t)``.

A continuous flow (Chen et al. 2018; FFJORD, Grathwohl et al. 2019) moves a base sample
``x(0)`` along the learned velocity field ``v`` to ``y = x(1)``. The log-density changes by the
instantaneous change of variables, ``d log p(x(t)) / dt = -tr(∂v/∂x)``, so
``log|det ∂y/∂x| = ∫₀¹ tr(∂v/∂x)(x(t), t) dt`` is integrated alongside ``x``. Both directions are
ODE solves (the inverse integrates from ``t = 1`` back to ``t = 0``), so the inverse is numerical:
exact up to the solver's tolerance.

The ODE is solved by `torchdiffeq <https://github.com/rtqichen/torchdiffeq>`_ (adaptive
Dormand-Prince by default, its fixed-step Euler, midpoint and Runge-Kutta 4 on request; the
adjoint method on request, which trades a second, backward solve for memory that does not grow
with the number of steps). The trace is exact (``dim`` vector-Jacobian products, batched into one
call) or Hutchinson's unbiased estimate ``εᵀ (∂v/∂x) ε`` with one Rademacher ``ε`` per point and
per solve, held fixed along the path: one vector-Jacobian product, but then ``log|det J|`` (and
``log_prob``) is a stochastic estimate whose mean is the exact value.

:class:`VelocityField` is the default network ``v(x, t[, context])``; :class:`CNF` is the
transform. :class:`pyroflows.CNF` builds a flow around it, and
:class:`pyroflows.engine.FlowMatching` trains ``v`` by flow matching without solving any ODE.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_nonnegative_int, check_positive, check_positive_int, expand_to_context
from ..nn import MLP, _check_hidden
from .base import FlowTransform

__all__ = [
    "ADAPTIVE_SOLVERS",
    "CNF",
    "EXACT_TRACE_MAX_DIM",
    "FIXED_SOLVERS",
    "TRACES",
    "VelocityField",
    "continuous_transforms",
    "exact_trace",
]

#: ``trace="auto"`` computes the exact trace up to this dimension, Hutchinson's estimate above
EXACT_TRACE_MAX_DIM = 16
#: the ``trace`` options
TRACES = ("auto", "exact", "hutchinson")
#: torchdiffeq's adaptive solvers (``atol``/``rtol`` apply)
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "adaptive_heun", "dopri8", "fehlberg2")
#: torchdiffeq's fixed-step solvers (``steps`` per unit of time apply)
FIXED_SOLVERS = ("euler", "midpoint", "rk4")
_OPTIONS = ("solver", "atol", "rtol", "steps", "trace", "adjoint")
_ACTIVATIONS = {"silu": nn.SiLU, "tanh": nn.Tanh, "softplus": nn.Softplus}


class VelocityField(nn.Module):
    """The velocity ``v(x, t[, context])`` of a continuous flow: a smooth MLP.

    The network reads ``x``, time features ``(t, cos(πkt), sin(πkt))`` for ``k = 1..frequencies``
    and the context, and its last layer starts at zero (``v = 0``: the flow starts at the
    identity). Activations are smooth (SiLU by default), as adaptive solvers and the trace need.

    Args:
        dim: number of features.
        hidden: hidden widths.
        context_dim: size of the context (0: unconditional).
        activation: ``"silu"``, ``"tanh"`` or ``"softplus"``.
        frequencies: number of Fourier frequencies of the time features.

    Shapes:
        ``x``: ``(*batch, dim)``; ``t``: a scalar or a tensor of shape ``batch`` (one time per
        point, as flow matching draws); ``context``: ``(*batch, context_dim)``; the velocity has
        the shape of ``x``.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import VelocityField
        >>> v = VelocityField(2, hidden=(16,))
        >>> v(torch.randn(5, 2), torch.tensor(0.5)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        activation: str = "silu",
        frequencies: int = 4,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_nonnegative_int("context_dim", context_dim)
        check_nonnegative_int("frequencies", frequencies)
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {tuple(_ACTIVATIONS)}; got {activation!r}"
            )
        self.dim, self.context_dim, self.frequencies = dim, context_dim, frequencies
        features = dim + 1 + 2 * frequencies + context_dim
        self.net = MLP(features, dim, _check_hidden(hidden), _ACTIVATIONS[activation])
        self.register_buffer(
            "omega", math.pi * torch.arange(1, frequencies + 1, dtype=torch.get_default_dtype())
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch = x.shape[:-1]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(batch).unsqueeze(-1)
        parts = [x, t]
        if self.frequencies:
            angles = t * self.omega
            parts += [torch.cos(angles), torch.sin(angles)]
        if self.context_dim:
            parts.append(context.expand(*batch, self.context_dim))
        return self.net(torch.cat(parts, dim=-1))

    def extra_repr(self) -> str:
        extra = f"dim={self.dim}, frequencies={self.frequencies}"
        return extra + (f", context_dim={self.context_dim}" if self.context_dim else "")


def _trace(
    v: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None, create_graph: bool
) -> torch.Tensor:
    """``tr(∂v/∂x)`` per point: exact (``noise is None``) or Hutchinson's ``εᵀ (∂v/∂x) ε``."""
    # A field that does not read x (a pure drift) has a zero Jacobian.
    zero = x.new_zeros(x.shape[:-1])
    if not v.requires_grad:
        return zero
    if noise is not None:
        (vjp,) = torch.autograd.grad(v, x, noise, create_graph=create_graph, allow_unused=True)
        return zero if vjp is None else (vjp * noise).sum(-1)
    dim = x.shape[-1]
    # One batched call computes the dim rows eᵢᵀ ∂v/∂x (vmap over the backward pass).
    basis = torch.eye(dim, dtype=x.dtype, device=x.device)
    basis = basis.reshape(dim, *([1] * (x.dim() - 1)), dim).expand(dim, *x.shape)
    (rows,) = torch.autograd.grad(
        v, x, basis, create_graph=create_graph, is_grads_batched=True, allow_unused=True
    )
    return zero if rows is None else rows.diagonal(dim1=0, dim2=-1).sum(-1)


class _Dynamics(nn.Module):
    """``d/dt (x, ℓ) = (v(x, t), tr ∂v/∂x)`` for one solve (a module, as the adjoint needs)."""

    def __init__(self, field: nn.Module, context, noise, with_trace: bool) -> None:
        super().__init__()
        self.field = field
        self.context, self.noise, self.with_trace = context, noise, with_trace
        self.evaluations = 0

    def forward(self, t: torch.Tensor, state):
        x = state[0]
        if not self.with_trace:
            self.evaluations += 1
            return (self.field(x, t, self.context),)
        if torch.is_inference_mode_enabled():
            # The trace needs autograd, which inference mode switches off: step out of it for
            # this evaluation, at a copy of the point (inference tensors cannot be recorded).
            with torch.inference_mode(False), torch.no_grad():
                return self.forward(t.clone(), tuple(s.clone() for s in state))
        # Graphs are kept when gradients are recorded: training without the adjoint, and the
        # adjoint's backward solve (which differentiates these outputs again).
        create_graph = torch.is_grad_enabled()
        self.evaluations += 1
        with torch.enable_grad():
            # Without gradients recorded (evaluation, or the adjoint's forward solve, whose
            # state may still claim requires_grad), differentiate at a detached copy.
            if not (create_graph and x.requires_grad):
                x = x.detach().requires_grad_(True)
            v = self.field(x, t, self.context)
            div = _trace(v, x, self.noise, create_graph)
        if not create_graph:
            v, div = v.detach(), div.detach()
        return v, div


class CNF(FlowTransform):
    """A continuous normalizing flow: ``y = x(1)`` where ``dx/dt = v(x, t[, context])`` and
    ``x(0) = x``.

    **Map and log-determinant.** ``y`` solves the ODE from ``t = 0`` to ``1``;
    ``log|det ∂y/∂x| = ∫₀¹ tr(∂v/∂x) dt`` is integrated alongside (the instantaneous change of
    variables). The inverse integrates from ``t = 1`` back to ``0``: a numerical inverse, exact to
    the solver's tolerance (``inverse_kind = "numerical"``). Neither direction is faster: both
    are one solve. ``det J > 0`` (``sign = +1``).

    **Trace.** ``"exact"``: ``dim`` vector-Jacobian products per evaluation of ``v`` (one batched
    call); ``"hutchinson"``: one, with a Rademacher vector ``ε`` per point drawn once per solve,
    which makes ``log|det J|`` (and so ``log_prob``) an unbiased *stochastic* estimate;
    ``"auto"`` (default) is exact up to :data:`EXACT_TRACE_MAX_DIM` features. Use
    :meth:`options` for an exact evaluation of a flow trained with the estimate.

    **Solver.** ``solver`` is one of torchdiffeq's adaptive methods (:data:`ADAPTIVE_SOLVERS`,
    default ``"dopri5"`` with ``atol = rtol = 1e-5``, FFJORD's training tolerances) or fixed-step
    methods (:data:`FIXED_SOLVERS`, ``steps`` steps over ``[0, 1]``, 32 by default). With
    ``adjoint=True``, gradients come from torchdiffeq's adjoint method (a second ODE solved
    backwards, memory independent of the number of steps) instead of back-propagation through
    the solver's steps (faster for small problems, memory growing with the steps).

    **Start.** The field's last layer is zero: the flow is the identity when built.

    Args:
        dim: number of features.
        hidden: hidden widths of the :class:`VelocityField` (ignored when ``field`` is given).
        context_dim: size of the context (0: unconditional).
        field: a module ``v(x, t, context)`` to use instead of the default network.
        activation: the default field's activation (``"silu"``, ``"tanh"``, ``"softplus"``).
        solver: an adaptive or a fixed-step method (see above).
        atol: absolute tolerance of adaptive solvers.
        rtol: relative tolerance of adaptive solvers.
        steps: number of steps of fixed-step solvers over ``[0, 1]``.
        trace: ``"auto"``, ``"exact"`` or ``"hutchinson"``.
        adjoint: gradients by the adjoint method.

    Shapes:
        ``x``: ``(*batch, dim)``; ``context``: ``(*batch, context_dim)`` (broadcast against the
        batch shape of ``x``); ``log|det J|``: ``batch``.

    References:
        Neural Ordinary Differential Equations (Chen, Rubanova, Bettencourt and Duvenaud, 2018);
        FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
        (Grathwohl, Chen, Bettencourt, Sutskever and Duvenaud, 2019).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import CNF
        >>> t = CNF(2, hidden=(16,))
        >>> x = torch.randn(5, 2)
        >>> y, ladj = t.forward_and_log_det(x)  # the identity when built
        >>> bool(torch.allclose(y, x)), ladj.shape
        (True, torch.Size([5]))
    """

    inverse_kind = "numerical"
    deferred_log_det = True  # d.sample(): the path alone; the trace only if log_prob is asked

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        context_dim: int = 0,
        *,
        field: nn.Module | None = None,
        activation: str = "silu",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        steps: int = 32,
        trace: str = "auto",
        adjoint: bool = False,
    ) -> None:
        check_positive_int("dim", dim)
        super().__init__((dim,), context_dim)
        if field is None:
            field = VelocityField(dim, hidden, context_dim, activation)
        self.field = field
        self.dim = dim
        self._set_options(solver=solver, atol=atol, rtol=rtol, steps=steps, trace=trace)
        self._set_options(adjoint=adjoint)
        #: evaluations of the field in the latest solve (both directions count)
        self.evaluations = 0

    # -- options --------------------------------------------------------------------------------
    def _set_options(self, **options: Any) -> None:
        for name, value in options.items():
            if name == "solver":
                if value not in ADAPTIVE_SOLVERS + FIXED_SOLVERS:
                    raise ValueError(
                        f"solver: expected one of {ADAPTIVE_SOLVERS + FIXED_SOLVERS}; got {value!r}"
                    )
            elif name in ("atol", "rtol"):
                check_positive(name, value)
            elif name == "steps":
                check_positive_int("steps", value)
            elif name == "trace":
                if value not in TRACES:
                    raise ValueError(f"trace: expected one of {TRACES}; got {value!r}")
            elif name == "adjoint":
                if not isinstance(value, bool):
                    raise ValueError(f"adjoint: expected True or False; got {value!r}")
            else:
                raise TypeError(f"CNF.options: unexpected option {name!r}")
            setattr(self, name, value)

    @contextlib.contextmanager
    def options(self, **options: Any) -> Iterator[CNF]:
        """Change ``solver``, ``atol``, ``rtol``, ``steps``, ``trace`` or ``adjoint`` for a block.

        The options are the module's attributes: inside the block, every use of the module
        (from any thread) sees the changed ones. A sample drawn inside the block keeps them for
        its deferred log-determinant.

        Example:
            >>> import torch
            >>> from pyroflows.transforms import CNF
            >>> t = CNF(32, hidden=(16,))  # Hutchinson's estimate above 16 features
            >>> with t.options(trace="exact", solver="rk4", steps=8):
            ...     _ = t.forward_and_log_det(torch.randn(3, 32))
            >>> t.trace, t.solver
            ('auto', 'dopri5')
        """
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"CNF.options: unexpected option {unknown[0]!r}; expected {_OPTIONS}")
        saved = {name: getattr(self, name) for name in options}
        try:  # restored even when a later option is refused
            self._set_options(**options)
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    @property
    def exact_trace(self) -> bool:
        """Whether the trace is computed exactly under the current options."""
        return self.trace == "exact" or (self.trace == "auto" and self.dim <= EXACT_TRACE_MAX_DIM)

    @property
    def sign(self) -> int:
        return 1

    # -- solving --------------------------------------------------------------------------------
    def velocity(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``v(x, t[, context])``; ``t`` a scalar or one time per point (shape ``x.shape[:-1]``).

        Example:
            >>> import torch
            >>> from pyroflows.transforms import CNF
            >>> CNF(2).velocity(torch.randn(4, 2), torch.rand(4)).shape
            torch.Size([4, 2])
        """
        self._check_event(x, "input")
        x, context = self._bind(x, self._resolve_context(context))
        return self.field(x, t, context)

    def _odeint(self, dynamics: _Dynamics, state: tuple, times: torch.Tensor) -> tuple:
        from torchdiffeq import odeint, odeint_adjoint

        kwargs: dict[str, Any] = {"method": self.solver}
        if self.solver in FIXED_SOLVERS:
            # steps + 1 grid points over the span, exactly (a step size of 1 / steps rounds to
            # an extra, tiny step for some counts)
            n = self.steps + 1

            def grid(func, y0, t):
                return torch.linspace(t[0], t[-1], n, dtype=t.dtype, device=t.device)

            kwargs["options"] = {"grid_constructor": grid}
        else:
            kwargs.update(atol=self.atol, rtol=self.rtol)
        if self.adjoint and torch.is_grad_enabled():
            params = [p for p in dynamics.parameters() if p.requires_grad]
            context = dynamics.context
            if context is not None and context.requires_grad:
                params.append(context)
            return odeint_adjoint(dynamics, state, times, adjoint_params=tuple(params), **kwargs)
        return odeint(dynamics, state, times, **kwargs)

    def _bind(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple:
        """``x`` and the context expanded to their common batch shape (one context per point)."""
        x = expand_to_context(x, context, type(self).__name__)
        if context is not None:
            context = context.expand(*x.shape[:-1], self.context_dim)
        return x, context

    def _solve(self, x: torch.Tensor, context, reverse: bool):
        """``(x(1), ∫ tr)`` from ``x(0) = x``, or ``(x(0), -∫ tr)`` from ``x(1) = x``."""
        x, context = self._bind(x, context)
        noise = None
        if not self.exact_trace:  # Rademacher probes, one per point, fixed along the path
            noise = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
        dynamics = _Dynamics(self.field, context, noise, with_trace=True)
        times = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=x.dtype, device=x.device)
        y, ladj = self._odeint(dynamics, (x, x.new_zeros(x.shape[:-1])), times)
        self.evaluations = dynamics.evaluations
        return y[-1], ladj[-1]

    def _forward_and_log_det(self, x, context):
        return self._solve(x, context, reverse=False)

    def _deferred_log_det(self, x, context):
        options = {name: getattr(self, name) for name in _OPTIONS}

        def log_det() -> torch.Tensor:  # with the options the sample was drawn with
            with self.options(**options):
                return self._forward_and_log_det(x, context)[1]

        return log_det

    def _forward_values(self, x, context):
        x, context = self._bind(x, context)
        ends = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        return self._values(x, context, ends)[-1]

    def _values(self, x: torch.Tensor, context, times: torch.Tensor) -> torch.Tensor:
        """The points ``x(t)`` at ``times`` (bound ``x`` and context), without the trace."""
        dynamics = _Dynamics(self.field, context, None, with_trace=False)
        (points,) = self._odeint(dynamics, (x,), times)
        self.evaluations = dynamics.evaluations
        return points

    def _inverse_and_log_det(self, y, context):
        return self._solve(y, context, reverse=True)

    def path(
        self,
        x: torch.Tensor,
        times: torch.Tensor | Sequence[float] | int = 33,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The points ``x(t)`` along the flow, without the log-determinant.

        ``x`` is the point at ``t = 0`` (base side) when ``times`` increase, and at ``t = 1``
        (data side) when they decrease; ``times`` need not include that end.

        Args:
            x: starting points ``(*batch, dim)``: base samples (increasing times), to see
                samples being made, or data (decreasing times), to see them carried to the base.
            times: the times to report, increasing or decreasing in ``[0, 1]``, or a number of
                evenly spaced times from 0 to 1.
            context: ``(*batch, context_dim)`` for a conditional flow.

        Returns:
            ``(len(times), *batch, dim)``; with increasing times ending at 1, the last entry is
            ``f(x)``.

        Example:
            >>> import torch
            >>> from pyroflows.transforms import CNF
            >>> CNF(2).path(torch.randn(10, 2), times=5).shape
            torch.Size([5, 10, 2])
        """
        self._check_event(x, "input")
        x, context = self._bind(x, self._resolve_context(context))
        if isinstance(times, int):
            check_positive_int("times", times)
            times = torch.linspace(0.0, 1.0, max(times, 2))
        times = torch.as_tensor(times, dtype=x.dtype, device=x.device)
        if times.dim() != 1 or len(times) < 2 or times.min() < 0 or times.max() > 1:
            raise ValueError(f"times: expected at least two times in [0, 1]; got {times.tolist()}")
        steps = times.diff()
        if not ((steps > 0).all() or (steps < 0).all()):
            raise ValueError(
                f"times: expected strictly increasing or decreasing times; got {times.tolist()}"
            )
        start = 0.0 if steps[0] > 0 else 1.0
        if times[0] == start:
            return self._values(x, context, times)
        return self._values(x, context, torch.cat([times.new_tensor([start]), times]))[1:]

    def extra_repr(self) -> str:
        extra = f"dim={self.dim}, solver={self.solver!r}, trace={self.trace!r}"
        if self.solver in FIXED_SOLVERS:
            extra += f", steps={self.steps}"
        else:
            extra += f", atol={self.atol}, rtol={self.rtol}"
        extra += ", adjoint=True" if self.adjoint else ""
        return extra + (f", context_dim={self.context_dim}" if self.context_dim else "")


@contextlib.contextmanager
def exact_trace(module: nn.Module) -> Iterator[None]:
    """Compute every continuous flow's trace exactly inside the block (``trace="exact"`` on each
    :class:`CNF` in ``module``): exact log-likelihoods of a flow trained with Hutchinson's
    estimate, as validation needs. Costs ``dim`` vector-Jacobian products per evaluation of the
    field. Does nothing for a module without continuous flows.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.transforms.continuous import exact_trace
        >>> flow = pf.CNF(dim=20, hidden=(16,))  # Hutchinson's estimate above 16 features
        >>> with exact_trace(flow):
        ...     flow.transform.trace
        'exact'
    """
    with contextlib.ExitStack() as stack:
        for m in continuous_transforms(module):
            stack.enter_context(m.options(trace="exact"))
        yield


def continuous_transforms(module: nn.Module) -> list[CNF]:
    """The continuous flows (:class:`CNF` transforms) inside ``module``, in module order.

    Example:
        >>> import pyroflows as pf
        >>> from pyroflows.transforms.continuous import continuous_transforms
        >>> len(continuous_transforms(pf.CNF(dim=2))), len(continuous_transforms(pf.MAF(2)))
        (1, 0)
    """
    return [m for m in module.modules() if isinstance(m, CNF)]
