"""How well a flow fits data: mean negative log-likelihood, and the KL gap to a known density.

:func:`evaluate` scores data in batches without gradients and accumulates in float64. Given the
true log-density of the distribution the data were drawn from, it also estimates the KL gap
``KL(p || q) = E_p[log p(x) - log q(x)]`` (zero for a perfect fit), the figure ``pyroflows fit``,
``pyroflows eval`` and the demo report for built-in data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ._checks import check_positive_int
from .datasets import Toy
from .flows import Flow
from .transforms.continuous import exact_trace

__all__ = ["Evaluation", "evaluate"]

#: Points scored per batch by default.
BATCH_SIZE = 8192


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` found, in nats per point.

    Attributes:
        n: number of points.
        nll: mean negative log-likelihood ``-mean(log q(x))`` under the flow ``q``.
        nll_se: its standard error, ``std / sqrt(n)`` (``None`` for one point).
        entropy: ``-mean(log p(x))`` under the true density ``p`` (an estimate of the entropy of
            ``p`` when the points are drawn from it); ``None`` without a true density.
        entropy_se: its standard error.
        kl_gap: ``mean(log p(x) - log q(x)) = nll - entropy``, an estimate of ``KL(p || q)``
            when the points are drawn from ``p``; ``None`` without a true density.
        kl_gap_se: its standard error, from the paired differences (the noise of the points,
            shared by ``log p`` and ``log q``, cancels: it is far smaller than ``nll_se``).
    """

    n: int
    nll: float
    nll_se: float | None
    entropy: float | None = None
    entropy_se: float | None = None
    kl_gap: float | None = None
    kl_gap_se: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (JSON-ready: numbers and ``None``)."""
        return asdict(self)


def _mean_se(values: torch.Tensor) -> tuple[float, float | None]:
    mean = values.mean().item()
    se = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else None
    return mean, se


def _flow_dtype_device(flow: Flow) -> tuple[torch.dtype, torch.device]:
    for tensor in (*flow.parameters(), *flow.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _true_log_prob(
    truth: Toy | Callable[..., torch.Tensor], x: torch.Tensor, context: torch.Tensor | None
) -> torch.Tensor:
    fn = truth.log_prob if isinstance(truth, Toy) else truth
    with torch.no_grad():
        values = fn(x) if context is None else fn(x, context)
    if not isinstance(values, torch.Tensor) or values.shape != x.shape[:1]:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(
            f"truth: expected log-densities of shape ({len(x)},) for {len(x)} points; got {shape}"
        )
    return values.double().cpu()


def evaluate(
    flow: Flow,
    data: torch.Tensor,
    context: torch.Tensor | None = None,
    *,
    truth: Toy | Callable[..., torch.Tensor] | None = None,
    batch_size: int = BATCH_SIZE,
) -> Evaluation:
    """Mean negative log-likelihood of ``data`` under ``flow``, and the KL gap to ``truth``.

    Scores ``batch_size`` points at a time under ``torch.no_grad()`` on the flow's device and in
    its dtype (float64 data are converted, as :func:`pyroflows.fit` does), and accumulates the
    per-point values in float64 on the CPU. Continuous flows (:class:`~pyroflows.CNF`) are
    scored with the exact trace, whatever their ``trace`` option. The flow is not changed
    (call it on a fitted flow: an ActNorm layer that has never seen data initialises itself
    from the first batch).

    With ``truth``, the exact log-density ``log p`` of the distribution ``data`` were drawn from,
    it also returns ``entropy = -mean(log p(x))`` and the KL gap
    ``mean(log p(x) - log q(x))``, an unbiased estimate of ``KL(p || q)`` (0 for a perfect fit)
    with a paired standard error. Use points the flow was not trained on.

    Args:
        flow: the flow ``q``.
        data: points, shape ``(n, *flow.event_shape)`` (``(n, dim)`` for vector flows).
        context: for a conditional flow, the context of each point, shape
            ``(n, context_dim)``, or one context for all, shape ``(context_dim,)``.
        truth: the true log-density: a callable mapping float64 points ``(b, *event_shape)``
            (and, for a conditional flow, their contexts ``(b, context_dim)``, as a second
            argument) to ``(b,)`` values, or a :class:`pyroflows.datasets.Toy` with a known
            ``log_prob``.
        batch_size: points per batch.

    Returns:
        An :class:`Evaluation` (``nll``, ``nll_se``, and with ``truth`` also ``entropy``,
        ``kl_gap`` and their standard errors).

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.evaluation import evaluate
        >>> flow = pf.RealNVP(2, layers=2, hidden=(8,))  # untrained: the standard Normal base
        >>> x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
        >>> normal = torch.distributions.Normal(0.0, 1.0)
        >>> result = evaluate(flow, x, truth=lambda x: normal.log_prob(x).sum(-1))
        >>> result.n, round(result.nll, 2), abs(result.kl_gap) < 1e-5
        (1000, 2.88, True)
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow: expected a pyroflows Flow; got {type(flow).__name__}")
    check_positive_int("batch_size", batch_size)
    data = torch.as_tensor(data)
    shape = tuple(flow.event_shape)
    if data.dim() != len(shape) + 1 or tuple(data.shape[1:]) != shape or len(data) == 0:
        expected = ", ".join(["N", *map(str, shape)])
        raise ValueError(
            f"data: expected a tensor of shape ({expected}) with N >= 1; got {tuple(data.shape)}"
        )
    if truth is not None:
        if isinstance(truth, Toy):
            if truth.log_prob is None:
                raise ValueError(
                    f"truth: expected a known log-density; the toy {truth.name!r} has none"
                )
        elif not callable(truth):
            raise TypeError(
                f"truth: expected a callable log-density or a Toy; got {type(truth).__name__}"
            )
    if context is not None:
        context = torch.as_tensor(context)
        if context.dim() == 2 and len(context) != len(data):
            raise ValueError(
                f"context: expected {len(data)} rows, one per point (or a single context of "
                f"shape ({flow.context_dim},)); got shape {tuple(context.shape)}"
            )
    dtype, device = _flow_dtype_device(flow)
    nll, log_p = [], []
    with torch.no_grad(), exact_trace(flow):
        for start in range(0, len(data), batch_size):
            x = data[start : start + batch_size]
            c = context
            if context is not None and context.dim() == 2:
                c = context[start : start + batch_size]
            c_flow = None if c is None else c.to(device=device, dtype=dtype)
            log_q = flow(c_flow).log_prob(x.to(device=device, dtype=dtype))
            nll.append(-log_q.double().cpu().reshape(-1))
            if truth is not None:
                c_true = None if c is None else c.double().expand(len(x), -1)
                log_p.append(_true_log_prob(truth, x.double(), c_true))
    values = torch.cat(nll)
    mean, se = _mean_se(values)
    if truth is None:
        return Evaluation(len(values), mean, se)
    true = torch.cat(log_p)
    entropy, entropy_se = _mean_se(-true)
    gap, gap_se = _mean_se(values + true)  # paired: the shared noise cancels
    return Evaluation(len(values), mean, se, entropy, entropy_se, gap, gap_se)
