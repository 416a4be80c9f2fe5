"""Multi-scale structure for image flows, kept inside one transform over the whole image.

RealNVP and Glow process an image at several scales: squeeze it (space to depth), transform,
*factor out* half of the channels (they go straight to the base distribution), and continue
with the other half at the next, coarser scale. Written as transforms from the base side to
the data side (Pyro's convention), that structure is two wrappers:

* :class:`Squeezed` runs transforms on the squeezed image and unsqueezes the result, so that
  the image keeps its shape ``(C, H, W)`` outside;
* :class:`FactorOut` runs transforms on the first ``kept`` channels only; the other channels
  pass through untouched, i.e. they are exactly the base's noise at this scale.

Nested, they make the whole multi-scale model one bijection of ``(C, H, W)`` tensors, so a
flow stays one Pyro ``TransformedDistribution`` over the full image whose base is a standard
Normal of the image's shape: the factored-out parts are scored by the base, and a learned prior
for them (Glow's split prior) is an :class:`~pyroflows.transforms.ImageAffineCoupling` with a
channel mask placed right after the :class:`FactorOut` (it reads the kept channels and moves and
scales the factored-out ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import constraints

from .base import FlowTransform
from .image import Squeeze, _check_shape

__all__ = ["FactorOut", "Squeezed"]

_IMAGE = constraints.independent(constraints.real, 3)


class _Chain(FlowTransform):
    """Runs an inner chain of image transforms (base side first), passing on the context."""

    domain = _IMAGE
    codomain = _IMAGE

    def _setup(self, inner_shape: tuple[int, int, int], transforms: Sequence[FlowTransform]):
        for t in transforms:
            if not isinstance(t, FlowTransform) or t.domain.event_dim != 3:
                raise TypeError(
                    f"{type(self).__name__}: expected pyroflows image transforms (event_dim 3); "
                    f"got {type(t).__name__}"
                )
            if t.context_dim and t.context_dim != self.context_dim:
                raise ValueError(
                    f"{type(self).__name__}: an inner transform has context_dim={t.context_dim}, "
                    f"the wrapper {self.context_dim}"
                )
        shape = inner_shape
        for t in transforms:
            shape = tuple(t.forward_shape(shape))
        if shape != inner_shape:
            raise ValueError(
                f"{type(self).__name__}: the inner transforms map {inner_shape} to {shape}; "
                "they must keep the shape"
            )
        self.inner = nn.ModuleList(transforms)

    def _map(self, v: torch.Tensor, context, inverse: bool):
        raise NotImplementedError

    def _forward_and_log_det(self, x, context):
        return self._map(x, context, inverse=False)

    def _inverse_and_log_det(self, y, context):
        return self._map(y, context, inverse=True)

    def _run(self, v: torch.Tensor, context, inverse: bool):
        total = v.new_zeros(())
        layers = reversed(self.inner) if inverse else self.inner
        for t in layers:
            c = context if t.context_dim else None
            v, ladj = t.inverse_and_log_det(v, c) if inverse else t.forward_and_log_det(v, c)
            total = total + ladj
        return v, total


class Squeezed(_Chain):
    """Transforms applied to the squeezed image, unsqueezed again afterwards.

    * map: ``y = S⁻¹(g(S(x)))`` with ``S`` the 2x2 :class:`~pyroflows.transforms.Squeeze`
      ``(C, H, W) -> (4C, H/2, W/2)`` and ``g`` the inner transforms (base side first)
    * inverse: ``x = S⁻¹(g⁻¹(S(y)))``
    * log|det J|: the inner transforms' (the squeeze is a permutation of entries)

    Args:
        shape: ``(C, H, W)`` of the events (``H`` and ``W`` even).
        transforms: image transforms acting on ``(4C, H/2, W/2)`` and keeping that shape.
        context_dim: the context size of the conditional inner transforms (0: none).

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, C, H, W)``.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ActNorm2d, Squeezed
        >>> t = Squeezed((1, 4, 4), [ActNorm2d(4)])
        >>> x = torch.randn(3, 1, 4, 4)
        >>> y, ladj = t.forward_and_log_det(x)
        >>> y.shape, ladj.shape
        (torch.Size([3, 1, 4, 4]), torch.Size([3]))
    """

    def __init__(
        self, shape: Sequence[int], transforms: Sequence[FlowTransform], context_dim: int = 0
    ) -> None:
        shape = _check_shape(shape)
        super().__init__(event_shape=shape, context_dim=context_dim)
        self.squeeze = Squeeze(shape)
        self._setup(self.squeeze.output_shape, transforms)

    def _map(self, v, context, inverse: bool):
        v = self.squeeze.forward_and_log_det(v)[0]
        v, ladj = self._run(v, context, inverse)
        return self.squeeze.inverse_and_log_det(v)[0], ladj.expand(v.shape[:-3])


class FactorOut(_Chain):
    """Transforms applied to the first ``kept`` channels; the others pass through (factor-out).

    * map: ``y[:kept] = g(x[:kept])``, ``y[kept:] = x[kept:]``
    * inverse: ``x[:kept] = g⁻¹(y[:kept])``, ``x[kept:] = y[kept:]``
    * log|det J|: the inner transforms'

    In a flow whose base is a standard Normal, the channels ``kept:`` reach the base from here
    unchanged: they are the part of the image factored out at this scale, and the inner
    transforms (usually a :class:`Squeezed` block: the next scale) model the rest.

    Args:
        shape: ``(C, H, W)`` of the events.
        kept: number of leading channels the inner transforms act on (``0 < kept < C``).
        transforms: image transforms acting on ``(kept, H, W)`` and keeping that shape.
        context_dim: the context size of the conditional inner transforms (0: none).

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, C, H, W)``.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017), section 3.6.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ActNorm2d, FactorOut
        >>> t = FactorOut((4, 2, 2), kept=2, transforms=[ActNorm2d(2)])
        >>> x = torch.randn(3, 4, 2, 2)
        >>> y, _ = t.forward_and_log_det(x)
        >>> torch.equal(y[:, 2:], x[:, 2:])
        True
    """

    def __init__(
        self,
        shape: Sequence[int],
        kept: int,
        transforms: Sequence[FlowTransform],
        context_dim: int = 0,
    ) -> None:
        shape = _check_shape(shape)
        if isinstance(kept, bool) or not isinstance(kept, int) or not 0 < kept < shape[0]:
            raise ValueError(f"kept: expected an integer in (0, {shape[0]}); got {kept!r}")
        super().__init__(event_shape=shape, context_dim=context_dim)
        self.kept = kept
        self._setup((kept, *shape[1:]), transforms)

    def _map(self, v, context, inverse: bool):
        a, b = v.split([self.kept, v.shape[-3] - self.kept], dim=-3)
        a, ladj = self._run(a, context, inverse)
        b = b.expand(*a.shape[:-3], *b.shape[-3:])
        return torch.cat([a, b], dim=-3), ladj.expand(a.shape[:-3])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept={self.kept}"
