"""Image transforms: bijections of ``(C, H, W)`` tensors (event_dim 3), as in RealNVP and Glow.

* :class:`Squeeze` trades space for channels (space-to-depth 2x2) and changes the event shape;
* :class:`ActNorm2d` and :class:`InvConv1x1` act on the channels of every pixel alike;
* :class:`ImageCoupling` transforms half of the entries (a spatial checkerboard or half of the
  channels, see :func:`image_mask`) by an elementwise map given as an argument (any
  :class:`~pyroflows.transforms.ElementwiseMap`), whose parameters a convolutional conditioner
  (:class:`~pyroflows.nn_image.ConvResNet`) reads from the other half;
  :class:`ImageAffineCoupling` and :class:`ImageAdditiveCoupling` are ``ImageCoupling`` with
  the affine and additive maps;
* :class:`ImageSigmoid` is the data-side end of an image flow: it maps the real line onto pixel
  intensities, the inverse of RealNVP's logit pre-processing.

Every transform accepts inputs of shape ``(*batch, C, H, W)`` and returns log-determinants of
shape ``batch``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints
from torch.linalg import solve_triangular

from .._checks import broadcast_batch, check_positive_int
from ..nn_image import ConvResNet
from .base import FlowTransform
from .elementwise import _clamp_open_unit, _standardise
from .linear import _init_lu, _lu_factors, random_rotation
from .maps import Additive, Affine, ElementwiseMap, check_map

__all__ = [
    "ActNorm2d",
    "ImageAdditiveCoupling",
    "ImageAffineCoupling",
    "ImageCoupling",
    "ImageSigmoid",
    "InvConv1x1",
    "Squeeze",
    "image_mask",
]

IMAGE = constraints.independent(constraints.real, 3)
_EVENT_DIMS = (-3, -2, -1)


def _batch(x: torch.Tensor) -> torch.Size:
    return x.shape[: x.dim() - 3]


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"shape: expected (channels, height, width); got {shape!r}") from None
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) for s in shape):
        raise ValueError(f"shape: expected three integers (channels, height, width); got {shape}")
    if min(shape) < 1:
        raise ValueError(f"shape: expected positive sizes; got {shape}")
    return shape


class _ImageTransform(FlowTransform):
    """Transforms of ``(C, H, W)`` events.

    Those built for one image size pass ``event_shape=(C, H, W)``; those that act on every pixel
    alike (:class:`ActNorm2d`, :class:`InvConv1x1`) accept any ``H, W`` and check the channels.
    """

    domain = IMAGE
    codomain = IMAGE
    channels: int

    def _check_event(self, x: torch.Tensor, what: str) -> None:
        super()._check_event(x, what)
        if self.event_shape is None and x.shape[-3] != self.channels:
            raise ValueError(
                f"{type(self).__name__}: expected an {what} with {self.channels} channels, "
                f"shape (*batch, {self.channels}, H, W); got shape {tuple(x.shape)}"
            )


class Squeeze(_ImageTransform):
    """Space-to-depth: each 2x2 block of pixels becomes 4 channels of one pixel.

    * map: ``y[4c + 2i + j, h, w] = x[c, 2h + i, 2w + j]`` for ``i, j ∈ {0, 1}``, from
      ``(C, H, W)`` to ``(4C, H/2, W/2)`` (``torch.nn.functional.pixel_unshuffle``)
    * inverse: depth-to-space, ``x[c, 2h + i, 2w + j] = y[4c + 2i + j, h, w]``
      (``pixel_shuffle``); use ``Squeeze(shape).inv`` for the unsqueezing layer
    * log|det J|: ``0`` (a permutation of the entries)

    Both directions are one strided copy. The transform changes the event shape, which Pyro
    reads through :meth:`forward_shape` / :meth:`inverse_shape`: a
    ``TransformedDistribution`` over a base of shape ``(C, H, W)`` has event shape
    ``(4C, H/2, W/2)``. Inputs of the forward map must have event shape ``shape``, inputs of the
    inverse event shape :attr:`output_shape`.

    Args:
        shape: ``(C, H, W)`` of the input, with ``H`` and ``W`` even.

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, 4C, H/2, W/2)``.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Squeeze
        >>> t = Squeeze((1, 4, 4))
        >>> x = torch.arange(16.0).reshape(1, 4, 4)
        >>> t(x).shape, t(x)[:, 0, 0].tolist()
        (torch.Size([4, 2, 2]), [0.0, 1.0, 4.0, 5.0])
        >>> torch.equal(t.inv(t(x)), x)
        True
    """

    def __init__(self, shape: Sequence[int]) -> None:
        channels, height, width = _check_shape(shape)
        if height % 2 or width % 2:
            raise ValueError(
                f"Squeeze: expected an even height and width; got shape {(channels, height, width)}"
            )
        super().__init__(event_shape=(channels, height, width))
        self.channels = channels
        self.output_shape = (4 * channels, height // 2, width // 2)

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        shape = torch.Size(shape)
        if tuple(shape[-3:]) != self.event_shape:
            raise ValueError(f"Squeeze: expected event shape {self.event_shape}; got {shape}")
        return shape[:-3] + self.output_shape

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        shape = torch.Size(shape)
        if tuple(shape[-3:]) != self.output_shape:
            raise ValueError(f"Squeeze: expected event shape {self.output_shape}; got {shape}")
        return shape[:-3] + self.event_shape

    def inverse_and_log_det(
        self, y: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The inverse's input has the output's shape, not the event shape the base class checks.
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"Squeeze: expected the input of the inverse as a tensor; got {type(y)}"
            )
        if y.dim() < 3:
            raise ValueError(
                "Squeeze: expected an input of the inverse with at least 3 dimension(s); "
                f"got shape {tuple(y.shape)}"
            )
        if tuple(y.shape[-3:]) != self.output_shape:
            raise ValueError(
                f"Squeeze: expected an input of the inverse with event shape {self.output_shape}; "
                f"got shape {tuple(y.shape)}"
            )
        return self._inverse_and_log_det(y, self._resolve_context(context))

    def _forward_and_log_det(self, x, context):
        return F.pixel_unshuffle(x, 2), x.new_zeros(_batch(x))

    def _inverse_and_log_det(self, y, context):
        return F.pixel_shuffle(y, 2), y.new_zeros(_batch(y))

    def _log_abs_det(self, x, y, context):
        return x.new_zeros(_batch(x))

    def extra_repr(self) -> str:
        return f"shape={self.event_shape} -> {self.output_shape}"


class ActNorm2d(_ImageTransform):
    """Activation normalisation over channels (Glow): a per-channel scale and shift from data.

    * map: ``y[c, h, w] = exp(s_c) * x[c, h, w] + t_c``
    * inverse: ``x[c, h, w] = (y[c, h, w] - t_c) * exp(-s_c)``
    * log|det J|: ``H * W * sum_c(s_c)`` (independent of ``x``)

    Both directions cost one elementwise pass; any height and width is accepted. As
    :class:`~pyroflows.transforms.ActNorm` does for vectors, the first batch that passes through
    (in either direction, with at least two numbers per channel) sets ``s`` and ``t`` so that it
    comes out with zero mean and unit variance per channel, over the batch and all pixels; data
    scored through the inverse is standardised on the base side, base samples pushed forward on
    the data side. Afterwards ``s`` and ``t`` are ordinary learnable parameters. Per-channel
    standard deviations are floored at ``min_std``. Whether initialisation has happened is kept
    in the ``initialized`` buffer, so a flow restored with ``load_state_dict`` is not
    re-initialised.

    Args:
        channels: number of channels ``C``.
        min_std: floor on the standard deviations used for initialisation.

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, C, H, W)``.

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal, 2018).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ActNorm2d
        >>> _ = torch.manual_seed(0)
        >>> t = ActNorm2d(3)
        >>> data = 2.0 + 4.0 * torch.randn(64, 3, 8, 8)
        >>> z = t.inv(data)            # the first batch initialises s and t
        >>> mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3), correction=0)
        >>> bool(mean.abs().max() < 1e-4), bool((std - 1).abs().max() < 1e-4)
        (True, True)
    """

    def __init__(self, channels: int, min_std: float = 1e-3) -> None:
        super().__init__()
        if not (isinstance(min_std, (int, float)) and min_std > 0):
            raise ValueError(f"min_std: expected a positive number; got {min_std!r}")
        self.channels = check_positive_int("channels", channels)
        self.min_std = float(min_std)
        self.shift = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # a Python mirror, so the hot path never syncs with a GPU

    def _initialize(self, v: torch.Tensor, inverse: bool) -> None:
        if v.numel() // self.channels < 2:
            return
        v = v.detach()
        dims = (*range(v.dim() - 3), -2, -1)
        std = v.std(dims, correction=0).clamp_min(self.min_std)
        _standardise(self, v.mean(dims), std, inverse)

    def _ladj(self, v: torch.Tensor) -> torch.Tensor:
        return (v.shape[-2] * v.shape[-1] * self.log_scale.sum()).expand(_batch(v))

    def _forward_and_log_det(self, x, context):
        if not self._initialized:
            self._initialize(x, inverse=False)
        scale, shift = self.log_scale.exp()[:, None, None], self.shift[:, None, None]
        return torch.addcmul(shift, x, scale), self._ladj(x)

    def _inverse_and_log_det(self, y, context):
        if not self._initialized:
            self._initialize(y, inverse=True)
        inv_scale = torch.exp(-self.log_scale)[:, None, None]
        return (y - self.shift[:, None, None]) * inv_scale, -self._ladj(y)

    def _log_abs_det(self, x, y, context):
        return self._ladj(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, initialized={self._initialized}"


PARAMETRIZATIONS = ("lu", "matrix")


class InvConv1x1(_ImageTransform):
    """Invertible 1x1 convolution (Glow): the same learnable ``C × C`` matrix at every pixel.

    * map: ``y[:, h, w] = W x[:, h, w]``
    * inverse: ``x[:, h, w] = W⁻¹ y[:, h, w]``
    * log|det J|: ``H * W * log|det W|``, independent of ``x``

    ``parametrization="lu"`` (the default) writes ``W = P L U`` with a fixed permutation ``P``,
    a unit lower triangular ``L`` and an upper triangular ``U`` with diagonal
    ``sign * exp(log_diag)`` (fixed signs): log|det W| ``= sum(log_diag)`` costs O(C), and
    ``W⁻¹ = U⁻¹ L⁻¹ Pᵀ`` comes from two triangular solves. ``parametrization="matrix"`` learns
    ``W`` itself, with log|det W| from ``slogdet`` and ``W⁻¹`` from ``torch.linalg.inv``
    (O(C³) per call, and nothing keeps ``W`` away from singular matrices); it is there for
    comparison, as in the Glow paper. Both start at the same kind of random rotation
    (log|det W| = 0), drawn from torch's global generator.

    Both directions cost one ``C × C`` matrix product per pixel, plus O(C³) per call to form
    ``W`` or ``W⁻¹``; any height and width is accepted.

    Args:
        channels: number of channels ``C``.
        parametrization: ``"lu"`` or ``"matrix"``.

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, C, H, W)``.

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal, 2018).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import InvConv1x1
        >>> _ = torch.manual_seed(0)
        >>> t = InvConv1x1(4)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> y, ladj = t.forward_and_log_det(x)
        >>> torch.allclose(t.inv(y), x, atol=1e-5), ladj.shape
        (True, torch.Size([2]))
    """

    def __init__(self, channels: int, parametrization: str = "lu") -> None:
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        if parametrization == "lu":
            _init_lu(self, channels, "rotation")
        elif parametrization == "matrix":
            self.matrix = nn.Parameter(random_rotation(channels))
        else:
            raise ValueError(
                f"parametrization: expected one of {PARAMETRIZATIONS}; got {parametrization!r}"
            )
        self.parametrization = parametrization

    def weight(self) -> torch.Tensor:
        """The matrix ``W`` (shape ``(C, C)``)."""
        if self.parametrization == "matrix":
            return self.matrix
        lower, upper = _lu_factors(self)
        return (lower @ upper)[self.perm]

    def inverse_weight(self) -> torch.Tensor:
        """The matrix ``W⁻¹`` (shape ``(C, C)``), by triangular solves for the LU form."""
        if self.parametrization == "matrix":
            return torch.linalg.inv(self.matrix)
        lower, upper = _lu_factors(self)
        eye = torch.eye(self.channels, dtype=lower.dtype, device=lower.device)
        p_inv = eye[self.inv_perm]  # Pᵀ as a matrix
        w = solve_triangular(lower, p_inv, upper=False, unitriangular=True)
        return solve_triangular(upper, w, upper=True)

    def log_abs_det_weight(self) -> torch.Tensor:
        """``log|det W|`` (a 0-d tensor)."""
        if self.parametrization == "matrix":
            return torch.linalg.slogdet(self.matrix)[1]
        return self.log_diag.sum()

    def _ladj(self, v: torch.Tensor) -> torch.Tensor:
        return (v.shape[-2] * v.shape[-1] * self.log_abs_det_weight()).expand(_batch(v))

    @staticmethod
    def _mix(matrix: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(matrix, v.flatten(-2)).unflatten(-1, v.shape[-2:])

    def _forward_and_log_det(self, x, context):
        return self._mix(self.weight(), x), self._ladj(x)

    def _inverse_and_log_det(self, y, context):
        return self._mix(self.inverse_weight(), y), -self._ladj(y)

    def _log_abs_det(self, x, y, context):
        return self._ladj(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, parametrization={self.parametrization!r}"


MASKS = ("checkerboard", "channel")


def image_mask(
    shape: Sequence[int], kind: str = "checkerboard", flip: bool = False
) -> torch.Tensor:
    """Boolean mask of the entries of a ``(C, H, W)`` image that pass through a coupling (``True``).

    Args:
        shape: ``(C, H, W)``.
        kind: ``"checkerboard"`` (pixel ``(h, w)`` passes through, in every channel, when
            ``h + w`` is even) or ``"channel"`` (the first ``C // 2`` channels pass through, at
            every pixel).
        flip: complement the mask, as alternate layers of a coupling stack do.

    Returns:
        A ``torch.bool`` tensor of shape ``(C, H, W)`` with at least one ``True`` and one
        ``False``.

    Example:
        >>> from pyroflows.transforms import image_mask
        >>> image_mask((1, 2, 3), "checkerboard")[0].int().tolist()
        [[1, 0, 1], [0, 1, 0]]
        >>> image_mask((3, 1, 1), "channel", flip=True).flatten().tolist()
        [False, True, True]
    """
    channels, height, width = shape = _check_shape(shape)
    if kind == "checkerboard":
        if height * width < 2:
            raise ValueError(f"mask: a checkerboard needs at least 2 pixels; got shape {shape}")
        pixels = (torch.arange(height)[:, None] + torch.arange(width)) % 2 == 0
        mask = pixels.expand(channels, height, width)
    elif kind == "channel":
        if channels < 2:
            raise ValueError(f"mask: a channel mask needs at least 2 channels; got shape {shape}")
        mask = (torch.arange(channels) < channels // 2)[:, None, None].expand(shape)
    else:
        raise ValueError(f"mask: expected one of {MASKS}; got {kind!r}")
    return (~mask if flip else mask).contiguous()


class ImageCoupling(_ImageTransform):
    """Coupling for images with any elementwise map: half of the entries parametrise the rest.

    With ``m`` the mask of :func:`image_mask` (``x_a = x[m]`` pass through, ``x_b = x[~m]`` are
    transformed) and ``g`` the elementwise monotone ``map``:

    * map: ``y_a = x_a``, ``y_b = g(x_b; h(x_a, c))``
    * inverse: ``x_a = y_a``, ``x_b = g⁻¹(y_b; h(y_a, c))``
    * log|det J|: ``sum_b log g'(x_b; h(x_a, c))`` over the transformed entries

    Both directions cost one pass of the conditioner ``h``, a
    :class:`~pyroflows.nn_image.ConvResNet` emitting ``map.params_per_feature`` channels per
    transformed channel (parameter by parameter: the first block of channels is every entry's
    first parameter). With ``mask="checkerboard"`` it reads the masked image ``x * m`` (all
    channels, zeros where entries are transformed) and its outputs are used where ``m`` is
    ``False``; with ``mask="channel"`` it reads the kept channels and outputs the parameters of
    the others. The map sees the transformed entries as one flat vector per image. The output
    convolution starts at zero, so the layer starts at the identity (the map's promise at zero
    parameters); entries that pass through are copied exactly, whatever the map. Unlike
    :class:`~pyroflows.transforms.Coupling`, the conditioner reads the kept entries unclamped:
    image flows end in :class:`ImageSigmoid`, so their data side is bounded and has no far
    tails to keep in order.

    Args:
        shape: ``(C, H, W)`` of the events.
        map: the elementwise map ``g`` (an :class:`~pyroflows.transforms.ElementwiseMap`).
        channels: hidden channels of the conditioner.
        blocks: residual blocks of the conditioner.
        mask: ``"checkerboard"`` or ``"channel"``, see :func:`image_mask`.
        flip: complement the mask (alternate layers flip it).
        context_dim: size of the context, 0 for an unconditional transform; with a context
            the conditioner sees it as ``context_dim`` constant extra channels and the transform
            is used through ``condition(c)``.
        activation: activation class of the conditioner.

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, C, H, W)``; context ``(*batch', context_dim)``
        broadcastable with ``batch``.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ImageCoupling, RationalLinearSpline
        >>> _ = torch.manual_seed(0)
        >>> t = ImageCoupling((2, 4, 4), RationalLinearSpline(bins=4), channels=8, blocks=1)
        >>> x = torch.randn(5, 2, 4, 4)
        >>> y, ladj = t.forward_and_log_det(x)
        >>> torch.allclose(y, x, atol=1e-5), ladj.shape   # the identity at first
        (True, torch.Size([5]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        map: ElementwiseMap,
        channels: int = 64,
        blocks: int = 2,
        mask: str = "checkerboard",
        flip: bool = False,
        context_dim: int = 0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        map = check_map(map)
        shape = _check_shape(shape)
        keep = image_mask(shape, mask, flip)
        super().__init__(event_shape=shape, context_dim=context_dim)
        self.channels = shape[0]
        self.kind = mask
        self.flip = bool(flip)
        self.register_buffer("mask", keep)
        if mask == "checkerboard":
            self._split = None
            read, changed = shape[0], shape[0]
            # Where the transformed entries sit in the flattened image: derived from the mask,
            # so not saved (state_dicts keep the keys they had).
            index = torch.nonzero(~keep.flatten()).squeeze(-1)
            self.register_buffer("_change_idx", index, persistent=False)
        else:  # two blocks of channels: (size of the first block, whether it is kept)
            self._split = (shape[0] // 2, bool(keep[0, 0, 0]))
            read = int(keep[:, 0, 0].sum())
            changed = shape[0] - read
        self.map = map
        self.conditioner = ConvResNet(
            read,
            changed * map.params_per_feature,
            channels=channels,
            blocks=blocks,
            context_dim=context_dim,
            activation=activation,
        )

    @property
    def params_per_feature(self) -> int:
        """Conditioner channels per transformed channel (the map's ``params_per_feature``)."""
        return self.map.params_per_feature

    def _params(self, v_a: torch.Tensor, context, select: torch.Tensor | None) -> torch.Tensor:
        """The map's parameters ``(*batch, P, n)`` (``(*batch, n, P)`` for a feature-major
        map) of the ``n`` transformed entries, flattened; ``select`` picks them out of the
        conditioner's full image."""
        if context is not None:
            broadcast_batch(v_a, context, type(self).__name__, event_dim=3)
        h = self.conditioner(v_a, context)
        h = h.unflatten(-3, (self.map.params_per_feature, -1)).flatten(-3)
        if select is not None:
            h = h.index_select(-1, select)
        return h if self.map.param_major else h.transpose(-1, -2)

    def _couple(self, v: torch.Tensor, context, fn):
        if self._split is None:
            select = self._change_idx
            h = self._params(v * self.mask, context, select)
            flat = v.flatten(-3)
            w_b, ladj = fn(flat.index_select(-1, select), h)
            # The kept entries are copied as they are, the transformed ones written over.
            flat = flat.expand(*w_b.shape[:-1], flat.shape[-1])
            return flat.index_copy(-1, select, w_b).unflatten(-1, v.shape[-3:]), ladj
        first, kept_first = self._split
        a, b = v.split([first, v.shape[-3] - first], dim=-3)
        v_a, v_b = (a, b) if kept_first else (b, a)
        w_b, ladj = fn(v_b.flatten(-3), self._params(v_a, context, None))
        w_b = w_b.unflatten(-1, v_b.shape[-3:])
        v_a = v_a.expand(*w_b.shape[:-3], *v_a.shape[-3:])
        return torch.cat([v_a, w_b] if kept_first else [w_b, v_a], dim=-3), ladj

    def _forward_and_log_det(self, x, context):
        return self._couple(x, context, self.map.forward)

    def _inverse_and_log_det(self, y, context):
        return self._couple(y, context, self.map.inverse)

    def _log_abs_det(self, x, y, context):
        if self.map.volume_preserving:
            batch = _batch(x) if context is None else broadcast_batch(x, context, "", event_dim=3)
            return x.new_zeros(batch)
        return self._forward_and_log_det(x, context)[1]

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"mask={self.kind!r}"]
        if self.flip:
            parts.append("flip=True")
        return ", ".join(parts)


class ImageAffineCoupling(ImageCoupling):
    """Affine coupling for images (RealNVP, Glow): a scale and shift of half of the entries.

    With ``m`` the mask of :func:`image_mask` (``x_a = x[m]`` pass through, ``x_b = x[~m]`` are
    transformed):

    * map: ``y_a = x_a``, ``y_b = x_b * exp(s(x_a, c)) + t(x_a, c)``
    * inverse: ``x_a = y_a``, ``x_b = (y_b - t(y_a, c)) * exp(-s(y_a, c))``
    * log|det J|: ``sum(s(x_a, c))`` over the transformed entries

    Both directions cost one conditioner pass. ``s`` and ``t`` come from a
    :class:`~pyroflows.nn_image.ConvResNet`: with ``mask="checkerboard"`` it reads the masked
    image ``x * m`` (all channels, zeros where entries are transformed) and its outputs are used
    where ``m`` is ``False``; with ``mask="channel"`` it reads the kept channels and outputs the
    parameters of the others. The log-scale is soft-clamped, ``s = B * tanh(raw / B)`` with
    ``B = log_scale_bound``, as in :class:`~pyroflows.transforms.AffineCoupling`. The output
    convolution starts at zero, so the layer starts at the identity. This is
    :class:`ImageCoupling` with the :class:`~pyroflows.transforms.Affine` map.

    Args:
        shape: ``(C, H, W)`` of the events.
        channels: hidden channels of the conditioner.
        blocks: residual blocks of the conditioner.
        mask: ``"checkerboard"`` or ``"channel"``, see :func:`image_mask`.
        flip: complement the mask (alternate layers flip it).
        context_dim: size of the context, 0 for an unconditional transform; with a context
            the conditioner sees it as ``context_dim`` constant extra channels and the transform
            is used through ``condition(c)``.
        log_scale_bound: the soft bound ``B`` on ``|s|`` per layer.
        activation: activation class of the conditioner.

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, C, H, W)``; context ``(*batch', context_dim)``
        broadcastable with ``batch``.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017); Glow:
        Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal, 2018).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ImageAffineCoupling
        >>> _ = torch.manual_seed(0)
        >>> t = ImageAffineCoupling((2, 4, 4), channels=8, blocks=1, context_dim=3)
        >>> tc = t.condition(torch.randn(5, 3))
        >>> x = torch.randn(5, 2, 4, 4)
        >>> y = tc(x)
        >>> torch.equal(y, x), tc.log_abs_det_jacobian(x, y).shape   # the identity at first
        (True, torch.Size([5]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 64,
        blocks: int = 2,
        mask: str = "checkerboard",
        flip: bool = False,
        context_dim: int = 0,
        log_scale_bound: float = 3.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        affine = Affine(log_scale_bound)
        super().__init__(shape, affine, channels, blocks, mask, flip, context_dim, activation)

    @property
    def log_scale_bound(self) -> float:
        """The soft bound ``B`` on ``|s|`` (the map's)."""
        return self.map.log_scale_bound


class ImageAdditiveCoupling(ImageCoupling):
    """Additive coupling for images (NICE): a shift of half of the entries, volume preserving.

    With ``m`` the mask of :func:`image_mask` (``x_a = x[m]`` pass through):

    * map: ``y_a = x_a``, ``y_b = x_b + t(x_a, c)``
    * inverse: ``x_a = y_a``, ``x_b = y_b - t(y_a, c)``
    * log|det J|: ``0``

    Both directions cost one conditioner pass; the conditioner and masks are those of
    :class:`ImageAffineCoupling`. Starts at the identity. This is :class:`ImageCoupling` with
    the :class:`~pyroflows.transforms.Additive` map.

    Args:
        shape: ``(C, H, W)`` of the events.
        channels: hidden channels of the conditioner.
        blocks: residual blocks of the conditioner.
        mask: ``"checkerboard"`` or ``"channel"``, see :func:`image_mask`.
        flip: complement the mask (alternate layers flip it).
        context_dim: size of the context, 0 for an unconditional transform.
        activation: activation class of the conditioner.

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, C, H, W)``; context ``(*batch', context_dim)``
        broadcastable with ``batch``.

    References:
        NICE: Non-linear Independent Components Estimation (Dinh, Krueger and Bengio, 2014).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ImageAdditiveCoupling
        >>> t = ImageAdditiveCoupling((4, 2, 2), channels=8, mask="channel", flip=True)
        >>> t.mask[:, 0, 0].tolist()
        [False, False, True, True]
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 64,
        blocks: int = 2,
        mask: str = "checkerboard",
        flip: bool = False,
        context_dim: int = 0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        additive = Additive()
        super().__init__(shape, additive, channels, blocks, mask, flip, context_dim, activation)


class ImageSigmoid(_ImageTransform):
    """Squashed sigmoid at the data end of an image flow: the inverse of RealNVP's logit step.

    With ``a = alpha``, entry by entry over the ``(C, H, W)`` event (``D = C * H * W`` entries):

    * map: ``y = (sigmoid(z) - a) / (1 - 2a)``, from the real line onto
      ``(-a / (1 - 2a), (1 - a) / (1 - 2a))``, an interval a little wider than ``[0, 1]``
    * inverse: ``z = logit(a + (1 - 2a) y)``, RealNVP's pre-processing of pixels ``y ∈ [0, 1]``
    * log|det ∂y/∂z|: ``sum(log sigmoid(z) + log sigmoid(-z)) - D log(1 - 2a)``, computed as
      ``-sum(softplus(-z) + softplus(z)) - D log(1 - 2a)``

    Both directions cost one elementwise pass. In Pyro's convention the forward map goes from the
    base towards the data, so this is the last transform of an image flow, and the density a
    flow assigns to pixels ``y`` includes the Jacobian of the logit pre-processing: scores and
    bits/dim (:func:`pyroflows.images.bits_per_dim`) are then on the scale of ``y ∈ [0, 1]^D``,
    as the literature reports them. With ``a > 0`` the logit's argument stays in ``[a, 1 - a]``
    for every ``y ∈ [0, 1]`` (the endpoints included), so dequantised pixels of 0 and 1 have
    finite images and log-determinants; ``a = 0`` gives the plain sigmoid, with its argument
    clamped to ``[tiny, 1 - eps]`` of the dtype as :class:`~pyroflows.transforms.Sigmoid` does.
    Parameter-free.

    Args:
        shape: ``(C, H, W)`` of the events.
        alpha: the squashing ``a``, in ``[0, 0.5)``; RealNVP uses 0.05.

    Shapes:
        ``(*batch, C, H, W)`` -> ``(*batch, C, H, W)``.

    References:
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017), section 4.1.

    Example:
        >>> import torch
        >>> import pyro.distributions as dist
        >>> from pyroflows.transforms import ImageSigmoid
        >>> t = ImageSigmoid((1, 2, 2), alpha=0.05)
        >>> pixels = torch.tensor([[[0.0, 0.25], [0.75, 1.0]]])
        >>> z = t.inv(pixels)                  # logit(0.05 + 0.9 * pixels)
        >>> [round(v, 4) for v in z.flatten().tolist()]
        [-2.9444, -0.9694, 0.9694, 2.9444]
        >>> torch.allclose(t(z), pixels, atol=1e-6)
        True
        >>> base = dist.Normal(torch.zeros(1, 2, 2), 1.0).to_event(3)
        >>> d = dist.TransformedDistribution(base, [t])   # a density over pixels in [0, 1]
        >>> bool(torch.isfinite(d.log_prob(pixels)))
        True
    """

    def __init__(self, shape: Sequence[int], alpha: float = 0.05) -> None:
        shape = _check_shape(shape)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 0.5:
            raise ValueError(f"alpha: expected a number in [0, 0.5); got {alpha!r}")
        super().__init__(event_shape=shape)
        self.channels = shape[0]
        self.alpha = float(alpha)
        self._width = 1.0 - 2.0 * self.alpha
        self._log_width = math.log(self._width)
        self._bounds = (-self.alpha / self._width, (1.0 - self.alpha) / self._width)
        self.codomain = constraints.independent(constraints.interval(*self._bounds), 3)

    def _ladj(self, z: torch.Tensor) -> torch.Tensor:
        size = z.shape[-3] * z.shape[-2] * z.shape[-1]
        return -(F.softplus(-z) + F.softplus(z)).sum(_EVENT_DIMS) - size * self._log_width

    def _forward_and_log_det(self, x, context):
        s = _clamp_open_unit(torch.sigmoid(x))
        # Rounding can put (s - a) / (1 - 2a) one ulp outside the codomain where s saturates.
        y = ((s - self.alpha) / self._width).clamp(*self._bounds)
        return y, self._ladj(x)

    def _inverse_and_log_det(self, y, context):
        u = _clamp_open_unit(self.alpha + self._width * y)
        log_u, log_1mu = u.log(), torch.log1p(-u)
        size = y.shape[-3] * y.shape[-2] * y.shape[-1]
        return log_u - log_1mu, -(log_u + log_1mu).sum(_EVENT_DIMS) + size * self._log_width

    def _log_abs_det(self, x, y, context):
        return self._ladj(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
