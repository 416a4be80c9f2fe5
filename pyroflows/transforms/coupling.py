"""Coupling transforms: part of the features pass through and parametrise a map of the rest.

With a mask ``m`` (``True`` = passes through unchanged), a coupling transform computes
``y[m] = x[m]`` and ``y[~m] = g(x[~m]; θ(x[m], context))`` where ``g`` is an elementwise monotone
map and ``θ`` a conditioner network. Both directions cost one conditioner pass, and log|det J| is
the log|det| of ``g`` alone (the Jacobian is block triangular).

:class:`Coupling` takes ``g`` as an argument, any :class:`~pyroflows.transforms.ElementwiseMap`
(:class:`~pyroflows.transforms.Affine`, :class:`~pyroflows.transforms.Additive`,
:class:`~pyroflows.transforms.RationalQuadraticSpline`,
:class:`~pyroflows.transforms.RationalLinearSpline`, or a map of your own); it owns the mask and
the conditioner. :class:`AdditiveCoupling` (NICE) and :class:`AffineCoupling` (RealNVP) are
``Coupling`` with a fixed map and their own documented constructors, as is
:class:`~pyroflows.transforms.SplineCoupling` (in :mod:`~pyroflows.transforms.splines`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import broadcast_batch, check_positive_int
from ..nn import MLP, _check_hidden
from .base import FlowTransform
from .maps import (
    CONDITIONER_BOUND,
    Additive,
    Affine,
    ElementwiseMap,
    check_conditioner_bound,
    check_map,
)

__all__ = ["AdditiveCoupling", "AffineCoupling", "Coupling", "coupling_mask"]

MaskLike = str | torch.Tensor | Sequence[bool]


def coupling_mask(dim: int, kind: MaskLike = "half", flip: bool = False) -> torch.Tensor:
    """Boolean mask of the features that pass through a coupling layer (``True``).

    Args:
        dim: number of features (at least 2).
        kind: ``"half"`` (the first ``dim // 2`` features pass through), ``"alternate"`` (the
            even-indexed features pass through, the checkerboard of vectors) or an explicit
            boolean mask of shape ``(dim,)``.
        flip: complement the mask (what passed through is now transformed), as alternate layers
            of a coupling stack do.

    Returns:
        A ``torch.bool`` tensor of shape ``(dim,)`` with at least one ``True`` and one ``False``.

    Example:
        >>> from pyroflows.transforms import coupling_mask
        >>> coupling_mask(5, "alternate").tolist()
        [True, False, True, False, True]
        >>> coupling_mask(4, "half", flip=True).tolist()
        [False, False, True, True]
    """
    check_positive_int("dim", dim)
    if dim < 2:
        raise ValueError(f"dim: a coupling layer needs at least 2 features; got {dim}")
    if isinstance(kind, str):
        if kind == "half":
            mask = torch.arange(dim) < dim // 2
        elif kind == "alternate":
            mask = torch.arange(dim) % 2 == 0
        else:
            raise ValueError(
                f"mask: expected 'half', 'alternate' or a boolean tensor; got {kind!r}"
            )
    else:
        mask = torch.as_tensor(kind)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a boolean tensor; got dtype {mask.dtype}")
        if mask.shape != (dim,):
            raise ValueError(f"mask: expected shape ({dim},); got shape {tuple(mask.shape)}")
        mask = mask.detach().cpu().clone()
    if flip:
        mask = ~mask
    if mask.all() or not mask.any():
        raise ValueError(
            "mask: expected at least one feature passing through and one transformed; "
            f"got {mask.tolist()}"
        )
    return mask


class Coupling(FlowTransform):
    """Coupling transform with any elementwise map: part of the features parametrise the rest.

    With the mask ``m`` of :func:`coupling_mask` (``x_a = x[m]`` pass through, ``x_b = x[~m]``
    are transformed) and ``g`` the elementwise monotone ``map``:

    * map: ``y_a = x_a``, ``y_b = g(x_b; h(x_a, c))``
    * inverse: ``x_a = y_a``, ``x_b = g⁻¹(y_b; h(y_a, c))``
    * log|det J|: ``sum_b log g'(x_b; h(x_a, c))`` (the Jacobian is block triangular)

    Both directions cost one pass of the :class:`~pyroflows.nn.MLP` conditioner ``h``, which
    emits ``map.params_per_feature`` numbers per transformed feature and ends in a zero layer,
    so the transform starts at the identity (the map's promise at zero parameters).

    **Far from the data.** The conditioner reads the passed-through features clamped to
    ``[-b, b]`` (``b = conditioner_bound``; the context is never clamped). Inside that box
    nothing changes; beyond it the map's parameters stop changing, so the layer is one fixed
    elementwise map there: with an affine map the tails are Gaussian and the log-density keeps
    decreasing, as a density's should. (Unclamped, a ReLU conditioner's output grows linearly
    along a ray, and a soft-clamped log-scale then sweeps across its whole range at a radius
    set by the weights, however far out; during the sweep ``|f⁻¹(y)|`` can shrink while ``|y|``
    grows.) The price is a kink of the log-density (a jump of its gradient) where a read
    feature crosses ``±b``. ``conditioner_bound=None`` reads the features unclamped.

    Args:
        dim: number of features (at least 2).
        map: the elementwise map ``g`` (an :class:`~pyroflows.transforms.ElementwiseMap`).
        hidden: hidden widths of the conditioner.
        mask: ``"half"``, ``"alternate"`` or a boolean tensor (``True`` = passes through), see
            :func:`coupling_mask`.
        context_dim: size of the context, 0 for an unconditional transform; with a context the
            conditioner sees ``[x_a, c]`` and the transform is used through ``condition(c)``.
        activation: activation class of the conditioner.
        conditioner_bound: the bound ``b`` of the features the conditioner reads, or ``None``
            (keyword only).

    Shapes:
        ``(*batch, dim)`` -> ``(*batch, dim)``; context ``(*batch', context_dim)``
        broadcastable with ``batch``.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Coupling, RationalLinearSpline
        >>> t = Coupling(4, RationalLinearSpline(bins=4), hidden=(16,), mask="alternate")
        >>> x = torch.randn(10, 4)
        >>> y, ladj = t.forward_and_log_det(x)
        >>> y.shape, ladj.shape, torch.allclose(y, x, atol=1e-5)   # the identity at first
        (torch.Size([10, 4]), torch.Size([10]), True)
    """

    def __init__(
        self,
        dim: int,
        map: ElementwiseMap,
        hidden: Sequence[int] = (64, 64),
        mask: MaskLike = "half",
        context_dim: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        *,
        conditioner_bound: float | None = CONDITIONER_BOUND,
    ) -> None:
        map = check_map(map)
        mask = coupling_mask(dim, mask)
        super().__init__(event_shape=(dim,), context_dim=context_dim)
        self.hidden = _check_hidden(hidden)
        self.conditioner_bound = check_conditioner_bound(conditioner_bound)
        keep = torch.nonzero(mask).squeeze(-1)
        change = torch.nonzero(~mask).squeeze(-1)
        self.register_buffer("mask", mask)
        self.register_buffer("keep_idx", keep)
        self.register_buffer("change_idx", change)
        self.register_buffer("merge_idx", torch.argsort(torch.cat([keep, change])))
        # Masks that keep one contiguous block (the "half" masks) split with views and merge
        # with one concatenation, no gathers: (size of the first block, whether it is kept).
        changes = torch.nonzero(mask[1:] != mask[:-1]).squeeze(-1)
        self._blocks = (int(changes[0]) + 1, bool(mask[0])) if len(changes) == 1 else None
        per = map.params_per_feature
        # The conditioner's output units are interchangeable: a param-major map reads them
        # parameter by parameter, so that it works on contiguous rows.
        self._layout = (per, len(change)) if map.param_major else (len(change), per)
        self.map = map
        self.conditioner = MLP(
            len(keep) + context_dim, len(change) * per, hidden=self.hidden, activation=activation
        )

    @property
    def params_per_feature(self) -> int:
        """Conditioner outputs per transformed feature (the map's ``params_per_feature``)."""
        return self.map.params_per_feature

    def _conditioner_output(self, x_a: torch.Tensor, context) -> torch.Tensor:
        """The map's parameters ``h`` for the transformed features, laid out as the map asks."""
        bound = self.conditioner_bound
        if bound is not None:
            # A clamp; hardtanh's backward is one fused kernel where clamp's is several.
            x_a = F.hardtanh(x_a, -bound, bound)
        if context is None:
            h = self.conditioner(x_a)
        else:
            batch = broadcast_batch(x_a, context, type(self).__name__)
            x_a = x_a.expand(*batch, x_a.shape[-1])
            h = self.conditioner(torch.cat([x_a, context.expand(*batch, self.context_dim)], -1))
        return h.unflatten(-1, self._layout)

    def _split_and_apply(self, v, context, fn):
        blocks = self._blocks
        if blocks is None:
            v_a, v_b = v.index_select(-1, self.keep_idx), v.index_select(-1, self.change_idx)
        else:
            first, rest = v.split([blocks[0], v.shape[-1] - blocks[0]], -1)
            v_a, v_b = (first, rest) if blocks[1] else (rest, first)
        w_b, ladj = fn(v_b, self._conditioner_output(v_a, context))
        v_a = v_a.expand(*w_b.shape[:-1], v_a.shape[-1])
        if blocks is None:
            return torch.cat([v_a, w_b], -1).index_select(-1, self.merge_idx), ladj
        return torch.cat([v_a, w_b] if blocks[1] else [w_b, v_a], -1), ladj

    def _forward_and_log_det(self, x, context):
        return self._split_and_apply(x, context, self.map.forward)

    def _inverse_and_log_det(self, y, context):
        return self._split_and_apply(y, context, self.map.inverse)

    def _log_abs_det(self, x, y, context):
        if self.map.volume_preserving:
            batch = x.shape[:-1] if context is None else broadcast_batch(x, context, "")
            return x.new_zeros(batch)
        return self._forward_and_log_det(x, context)[1]

    def extra_repr(self) -> str:
        parts = [
            super().extra_repr(),
            f"passes_through={self.keep_idx.numel()}",
            f"transformed={self.change_idx.numel()}",
        ]
        if self.conditioner_bound != CONDITIONER_BOUND:
            parts.append(f"conditioner_bound={self.conditioner_bound}")
        return ", ".join(parts)


class AdditiveCoupling(Coupling):
    """Additive coupling (NICE): a shift of the transformed features, volume preserving.

    * map: ``y_a = x_a``, ``y_b = x_b + t(x_a, c)``
    * inverse: ``x_a = y_a``, ``x_b = y_b - t(y_a, c)``
    * log|det J|: ``0``

    Both directions cost one conditioner pass. Starts at the identity (``t`` has a zero last
    layer). This is :class:`Coupling` with the :class:`~pyroflows.transforms.Additive` map; the
    conditioner reads the passed-through features clamped to ``[-10, 10]`` (see
    :class:`Coupling`).

    Args:
        dim: number of features (at least 2).
        hidden: hidden widths of the :class:`~pyroflows.nn.MLP` conditioner.
        mask: ``"half"``, ``"alternate"`` or a boolean tensor (``True`` = passes through), see
            :func:`coupling_mask`.
        context_dim: size of the context, 0 for an unconditional transform; with a context the
            conditioner sees ``[x_a, c]`` and the transform is used through ``condition(c)``.
        activation: activation class of the conditioner.

    References:
        NICE: Non-linear Independent Components Estimation (Dinh, Krueger and Bengio, 2014).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import AdditiveCoupling
        >>> t = AdditiveCoupling(4, hidden=(16,), mask="alternate", context_dim=2)
        >>> tc = t.condition(torch.randn(10, 2))
        >>> x = torch.randn(10, 4)
        >>> tc(x).shape, tc.log_abs_det_jacobian(x, tc(x)).shape
        (torch.Size([10, 4]), torch.Size([10]))
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        mask: MaskLike = "half",
        context_dim: int = 0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(dim, Additive(), hidden, mask, context_dim, activation)


class AffineCoupling(Coupling):
    """Affine coupling (RealNVP): a scale and shift of the transformed features.

    * map: ``y_a = x_a``, ``y_b = x_b * exp(s(x_a, c)) + t(x_a, c)``
    * inverse: ``x_a = y_a``, ``x_b = (y_b - t(y_a, c)) * exp(-s(y_a, c))``
    * log|det J|: ``sum(s(x_a, c))``

    Both directions cost one conditioner pass. The log-scale is soft-clamped,
    ``s = B * tanh(raw / B)`` with ``B = log_scale_bound``: each layer scales a feature by at
    most ``exp(±B)``, which keeps deep stacks free of overflow (NaN/inf) far from the data while
    leaving ``s ≈ raw`` near zero, where training starts. Starts at the identity. This is
    :class:`Coupling` with the :class:`~pyroflows.transforms.Affine` map; the conditioner reads
    the passed-through features clamped to ``[-10, 10]``, which keeps the log-density
    decreasing far in the tails (see :class:`Coupling`).

    Args:
        dim: number of features (at least 2).
        hidden: hidden widths of the :class:`~pyroflows.nn.MLP` conditioner.
        mask: ``"half"``, ``"alternate"`` or a boolean tensor (``True`` = passes through), see
            :func:`coupling_mask`.
        context_dim: size of the context, 0 for an unconditional transform; with a context the
            conditioner sees ``[x_a, c]`` and the transform is used through ``condition(c)``.
        log_scale_bound: the soft bound ``B`` on ``|s|`` per layer.
        activation: activation class of the conditioner.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import AffineCoupling
        >>> t = AffineCoupling(4, hidden=(16, 16))
        >>> x = torch.randn(10, 4)
        >>> y, ladj = t.forward_and_log_det(x)
        >>> y.shape, ladj.shape
        (torch.Size([10, 4]), torch.Size([10]))
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        mask: MaskLike = "half",
        context_dim: int = 0,
        log_scale_bound: float = 3.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(dim, Affine(log_scale_bound), hidden, mask, context_dim, activation)

    @property
    def log_scale_bound(self) -> float:
        """The soft bound ``B`` on ``|s|`` (the map's)."""
        return self.map.log_scale_bound
