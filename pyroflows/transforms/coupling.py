"""Coupling transforms: part of the features pass through and parametrise a map of the rest.

With a mask ``m`` (``True`` = passes through unchanged), a coupling transform computes
``y[m] = x[m]`` and ``y[~m] = g(x[~m]; θ(x[m], context))`` where ``g`` is an invertible
elementwise map and ``θ`` a conditioner network. Both directions cost one conditioner pass, and
log|det J| is the log|det| of ``g`` alone (the Jacobian is block triangular).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import broadcast_batch, check_positive_int
from ..nn import MLP, _check_hidden
from .base import FlowTransform
from .elementwise import AffineParams

__all__ = ["AdditiveCoupling", "AffineCoupling", "coupling_mask"]

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


class _Coupling(FlowTransform):
    """Shared machinery: masks, the conditioner and the split/merge of features.

    A subclass (usually through a mixin from :mod:`.elementwise`, shared with the autoregressive
    families) sets ``params_per_feature`` (conditioner outputs per transformed feature) and
    implements ``_elementwise(x_b, h) -> (y_b, ladj)`` and
    ``_elementwise_inverse(y_b, h) -> (x_b, ladj_inv)``, where ``h`` has shape
    ``(*batch, n_transformed, params_per_feature)`` (``(*batch, params_per_feature,
    n_transformed)`` when the class sets ``param_major``).
    """

    params_per_feature: int
    param_major: bool = False

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        mask: MaskLike = "half",
        context_dim: int = 0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        mask = coupling_mask(dim, mask)
        super().__init__(event_shape=(dim,), context_dim=context_dim)
        self.hidden = _check_hidden(hidden)
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
        self.conditioner = MLP(
            len(keep) + context_dim,
            len(change) * self.params_per_feature,
            hidden=self.hidden,
            activation=activation,
        )

    def _conditioner_output(self, x_a: torch.Tensor, context) -> torch.Tensor:
        if context is None:
            h = self.conditioner(x_a)
        else:
            batch = broadcast_batch(x_a, context, type(self).__name__)
            x_a = x_a.expand(*batch, x_a.shape[-1])
            h = self.conditioner(torch.cat([x_a, context.expand(*batch, self.context_dim)], -1))
        if self.param_major:
            # The conditioner's output units are interchangeable: read them parameter-major,
            # so that an affine map works on contiguous rows (see MADE's ``param_major``).
            return h.unflatten(-1, (self.params_per_feature, len(self.change_idx)))
        return h.unflatten(-1, (len(self.change_idx), self.params_per_feature))

    def _split_and_apply(self, v, context, fn):
        blocks = self._blocks
        if blocks is None:
            v_a, v_b = v.index_select(-1, self.keep_idx), v.index_select(-1, self.change_idx)
        else:
            first, rest = v.split([blocks[0], v.shape[-1] - blocks[0]], -1)
            v_a, v_b = (first, rest) if blocks[1] else (rest, first)
        h = self._conditioner_output(v_a, context)
        w_b, ladj = fn(v_b, h)
        v_a = v_a.expand(*w_b.shape[:-1], v_a.shape[-1])
        if blocks is None:
            return torch.cat([v_a, w_b], -1).index_select(-1, self.merge_idx), ladj
        return torch.cat([v_a, w_b] if blocks[1] else [w_b, v_a], -1), ladj

    def _forward_and_log_det(self, x, context):
        return self._split_and_apply(x, context, self._elementwise)

    def _inverse_and_log_det(self, y, context):
        return self._split_and_apply(y, context, self._elementwise_inverse)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, passes_through={self.keep_idx.numel()}, "
            f"transformed={self.change_idx.numel()}"
        )


class AdditiveCoupling(_Coupling):
    """Additive coupling (NICE): a shift of the transformed features, volume preserving.

    * map: ``y_a = x_a``, ``y_b = x_b + t(x_a, c)``
    * inverse: ``x_a = y_a``, ``x_b = y_b - t(y_a, c)``
    * log|det J|: ``0``

    Both directions cost one conditioner pass. Starts at the identity (``t`` has a zero last
    layer).

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

    params_per_feature = 1

    def _elementwise(self, x_b, h):
        return x_b + h[..., 0], x_b.new_zeros(()).expand(h.shape[:-2])

    def _elementwise_inverse(self, y_b, h):
        return y_b - h[..., 0], y_b.new_zeros(()).expand(h.shape[:-2])

    def _log_abs_det(self, x, y, context):
        batch = x.shape[:-1] if context is None else broadcast_batch(x, context, "")
        return x.new_zeros(batch)


class AffineCoupling(AffineParams, _Coupling):
    """Affine coupling (RealNVP): a scale and shift of the transformed features.

    * map: ``y_a = x_a``, ``y_b = x_b * exp(s(x_a, c)) + t(x_a, c)``
    * inverse: ``x_a = y_a``, ``x_b = (y_b - t(y_a, c)) * exp(-s(y_a, c))``
    * log|det J|: ``sum(s(x_a, c))``

    Both directions cost one conditioner pass. The log-scale is soft-clamped,
    ``s = B * tanh(raw / B)`` with ``B = log_scale_bound``: each layer scales a feature by at
    most ``exp(±B)``, which keeps deep stacks free of overflow (NaN/inf) far from the data while
    leaving ``s ≈ raw`` near zero, where training starts. Starts at the identity.

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
        self._set_log_scale_bound(log_scale_bound)
        super().__init__(dim, hidden, mask, context_dim, activation)
