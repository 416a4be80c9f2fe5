"""Optimisers and the learning-rate schedule of the engine.

:func:`make_optimizer` builds the torch optimiser a front-end asks for by name; :func:`schedule`
is the one learning-rate schedule (linear warmup, then cosine decay to 0); :class:`PyroOptimizer`
lets a ``pyro.optim`` optimiser (which keeps one torch optimiser per Pyro parameter and creates
them as parameters appear) stand where the engine expects a torch optimiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pyro
import pyro.optim
import torch

__all__ = ["OPTIMIZERS", "PyroOptimizer", "make_optimizer", "make_pyro_optimizer", "schedule"]

#: the optimisers :func:`make_optimizer` builds by name
OPTIMIZERS = ("adam", "adamw")


def _adam(cls: type[torch.optim.Optimizer], params: list, lr: float, weight_decay: float):
    """Adam(W) with the fused implementation (one kernel over every parameter) where this torch
    has it for these tensors (CPU and CUDA floating point since torch 2.4), else the default."""
    if params and all(p.dtype in (torch.float32, torch.float64) for p in params):
        try:
            return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(params, lr=lr, weight_decay=weight_decay)


def make_optimizer(
    optimizer: str | Callable[[list], torch.optim.Optimizer] | torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    lr: float = 1e-3,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """A torch optimiser over ``params``.

    Args:
        optimizer: ``"adam"`` or ``"adamw"`` (fused where torch has it), a callable
            ``params -> torch.optim.Optimizer``, or an optimiser already built (returned as is).
        params: the tensors to optimise.
        lr: learning rate of ``"adam"``/``"adamw"``.
        weight_decay: weight decay of ``"adam"``/``"adamw"``.

    Raises:
        ValueError: for another name.

    Example:
        >>> import torch
        >>> from pyroflows.engine import make_optimizer
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> type(make_optimizer("adamw", [w], lr=1e-2)).__name__
        'AdamW'
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    params = list(params)
    if optimizer == "adam":
        return _adam(torch.optim.Adam, params, lr, weight_decay)
    if optimizer == "adamw":
        return _adam(torch.optim.AdamW, params, lr, weight_decay)
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    raise ValueError(
        f"optimizer: expected 'adam', 'adamw' or a callable params -> optimizer; got {optimizer!r}"
    )


def schedule(
    optimizer: torch.optim.Optimizer, total: int, *, cosine: bool = True, warmup: int = 0
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The learning-rate schedule: linear warmup, then cosine decay to 0 over ``total`` steps.

    The factor on the optimiser's learning rate at step ``s`` (0-based) is
    ``min(1, (s + 1) / warmup)`` (1 without warmup) times ``(1 + cos(pi * s / total)) / 2``
    (1 without ``cosine``); one ``LambdaLR``, stepped once per optimiser step.

    Args:
        optimizer: the torch optimiser whose learning rate to drive.
        total: the number of steps of the run.
        cosine: decay by the cosine.
        warmup: steps of linear warmup (0: none).

    Returns:
        The scheduler, or ``None`` when the rate stays constant (no cosine, no warmup).

    Example:
        >>> import torch
        >>> from pyroflows.engine import schedule
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = schedule(opt, 4, warmup=2)
        >>> rates = []
        >>> for _ in range(4):
        ...     rates.append(round(opt.param_groups[0]["lr"], 4))
        ...     opt.step(); sched.step()
        >>> rates
        [0.5, 0.8536, 0.5, 0.1464]
    """
    if not cosine and not warmup:
        return None

    def factor(step: int) -> float:
        rise = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if cosine:
            return rise * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        return rise

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_pyro_optimizer(optimizer: str | pyro.optim.PyroOptim, lr: float) -> pyro.optim.PyroOptim:
    """``"adam"``, ``"clipped_adam"`` (Pyro's ``ClippedAdam``, gradients clamped to [-10, 10]) or
    a ``pyro.optim`` optimiser (returned as is)."""
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


class PyroOptimizer:
    """A ``pyro.optim`` optimiser behind the part of torch's optimiser interface the engine uses.

    ``step()`` updates the parameters that have a gradient (those the latest loss touched, as
    ``pyro.infer.SVI.step`` does with the parameters its trace captured), ``zero_grad()`` clears
    the gradients, ``state_dict()``/``load_state_dict()`` are Pyro's ``get_state()``/
    ``set_state()`` (tensors and numbers, keyed by parameter name).

    Args:
        optim: the Pyro optimiser.
        params: returns the parameters (unconstrained leaf tensors), e.g. the param store's.
    """

    def __init__(self, optim: pyro.optim.PyroOptim, params: Callable[[], list[torch.Tensor]]):
        self.optim = optim
        self.params = params
        self.param_groups: list[dict] = []  # no torch param groups: schedules do not apply

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params():
            p.grad = None

    def step(self) -> None:
        self.optim([p for p in self.params() if p.grad is not None])

    def state_dict(self) -> dict[str, Any]:
        return self.optim.get_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optim.set_state(state)
