"""What calling a flow returns: :class:`FlowDistribution`, a Pyro ``TransformedDistribution``."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from torch.distributions import Transform

from .bases import tempered

__all__ = ["FlowDistribution"]


class FlowDistribution(dist.TransformedDistribution):
    """What calling a :class:`Flow` returns: a Pyro ``TransformedDistribution``.

    It is one in every respect (``isinstance``, ``.base_dist``, ``.transforms``, ``expand``,
    ``rsample``, use in ``pyro.sample``); when every layer is a pyroflows transform on the flow's
    vectors (``simple=True``, decided by the flow), it is built without composing the
    transforms to work out shapes (they keep the event shape ``(dim,)``) and ``log_prob`` takes
    each layer's inverse and log-determinant in one call, through the layers' caches. That
    removes Python overhead that is a sizeable share of a small batch's cost.
    """

    def __init__(
        self,
        base_distribution: dist.Distribution,
        transforms: list[Transform],
        validate_args: bool | None = None,
        simple: bool = False,
    ) -> None:
        self._simple = simple
        if not simple:
            super().__init__(base_distribution, transforms, validate_args=validate_args)
            return
        self.transforms = transforms
        self.base_dist = base_distribution
        torch.distributions.Distribution.__init__(
            self,
            base_distribution.batch_shape,
            base_distribution.event_shape,
            validate_args=validate_args,
        )

    @classmethod
    def from_flow(
        cls, flow, context: torch.Tensor | None, temperature: float = 1.0
    ) -> FlowDistribution:
        """The distribution of ``flow`` for a checked ``context`` (``None`` if unconditional)."""
        parts = [
            t.condition(context) if isinstance(t, ConditionalTransform) else t for t in flow._chain
        ]
        base = tempered(flow.base(context), temperature)
        simple = flow._simple and base.event_shape == flow.event_shape
        return cls(base, parts, simple=simple)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FlowDistribution, _instance)
        new._simple = self._simple
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if not self._simple:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        log_prob: torch.Tensor | float = 0.0
        y = value
        for transform in reversed(self.transforms):
            y, ladj = transform._inverse_pair(y)
            log_prob = log_prob - ladj
        return log_prob + self.base_dist.log_prob(y)
