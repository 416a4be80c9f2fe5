"""Discrete images for continuous flows: dequantisation and bits per dimension.

Pixels are integers (``0 … 255`` for 8-bit images), while a flow is a density on real numbers.
The usual bridge (Theis, van den Oord and Bethge, 2016; Dinh et al., 2017):

* :func:`dequantize` adds uniform noise to every integer and rescales,
  ``y = (x + u) / 2**bits`` with ``u ~ U[0, 1)``, so that ``y`` lies in ``[0, 1)^D``; a flow is
  trained on ``y``, typically with :class:`~pyroflows.transforms.ImageSigmoid` as its data-side
  end (the inverse of RealNVP's logit pre-processing, whose Jacobian is then part of the
  flow's density);
* :func:`bits_per_dim` reports ``-log2`` of the model's probability of the integer images per
  dimension, on the original ``2**bits``-level scale, which is the figure papers report
  (MNIST: MAF 1.89, RealNVP/Glow about 1.0-1.1).

The continuous density ``p(y)`` of a model on ``[0, 1]^D`` defines the discrete model
``P(x) = ∫ p((x + u) / 2**bits) 2**(-bits D) du`` over the unit cube of ``x``, and by Jensen's
inequality ``log P(x) >= E_u[log p((x + u) / 2**bits)] - D bits log 2``: bits/dim computed from
uniformly dequantised samples is an upper bound on the discrete model's code length, which is
the number the literature compares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution

from ._checks import check_positive_int

__all__ = ["bits_per_dim", "check_images", "dequantize"]

# Integer dtypes torch compares and adds reliably; others are widened to int64 first.
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_images(x: Any, bits: int = 8) -> torch.Tensor:
    """``x`` as a tensor, after checking that it holds integers in ``[0, 2**bits - 1]``.

    What :func:`dequantize` checks first; call it once on a data set that is then dequantised
    batch by batch with ``dequantize(batch, bits, check=False)`` (as :func:`pyroflows.fit`
    does with ``dequantize=8``).

    Args:
        x: a tensor or numpy array (integer, bool or float holding integers).
        bits: bits per number.

    Returns:
        ``x`` as a tensor (bool as ``uint8``; numpy arrays copied).

    Raises:
        ValueError: for values outside ``[0, 2**bits - 1]``, non-integers or NaN.
        TypeError: when ``x`` is neither a tensor nor a numeric numpy array.

    Example:
        >>> import torch
        >>> from pyroflows.images import check_images
        >>> check_images(torch.tensor([0.0, 255.0])).tolist()
        [0.0, 255.0]
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise TypeError(f"x: expected an integer or float array; got dtype {x.dtype}")
        x = torch.from_numpy(np.array(x))  # a writable copy, as torch requires
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor or a numpy array; got {type(x).__name__}")
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    elif x.is_complex():
        raise TypeError(f"x: expected integer or float values; got dtype {x.dtype}")
    elif not x.is_floating_point() and x.dtype not in _INTEGER_DTYPES:
        x = x.to(torch.int64)
    top = 2**bits - 1
    if x.numel() == 0:
        return x
    if x.is_floating_point():
        if torch.isnan(x).any():
            raise ValueError(f"x: expected integers in [0, {top}]; got NaN")
        fractional = x[torch.isfinite(x) & (x != x.round())]
        if fractional.numel():
            raise ValueError(
                f"x: expected integers in [0, {top}]; got non-integer values such as "
                f"{fractional[0].item()!r}"
            )
    low, high = x.min().item(), x.max().item()
    if low < 0 or high > top:
        raise ValueError(
            f"x: expected integers in [0, {top}] (bits={bits}); got values from {low} to {high}"
        )
    return x


def _noise(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    # Drawn where the generator lives, so that a CPU generator gives the same numbers whichever
    # device the model is on.
    where = device if generator is None else generator.device
    return torch.rand(shape, generator=generator, dtype=dtype, device=where).to(device)


def _scale(x: torch.Tensor, u: torch.Tensor, bits: int) -> torch.Tensor:
    # (x + u) / 2**bits rounds to exactly 1 for the top level when u is within an ulp of 1;
    # keep the result in [0, 1), where densities on the unit cube are positive.
    y = (x.to(u.dtype) + u) / 2.0**bits
    return y.clamp_max_(1.0 - torch.finfo(u.dtype).eps / 2)


def dequantize(
    x: torch.Tensor | np.ndarray,
    bits: int = 8,
    generator: torch.Generator | None = None,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Uniform dequantisation of integer images: ``y = (x + u) / 2**bits``, ``u ~ U[0, 1)``.

    Every number gets its own noise, so ``y`` covers the unit cube of ``x`` uniformly and lies in
    ``[0, 1)``. Train a flow on ``y`` (a fresh draw each epoch) and its log-likelihood bounds the
    discrete model's from below; see :func:`bits_per_dim`.

    Variational dequantisation (Flow++, Ho et al., 2019), which learns the noise distribution
    ``q(u | x)`` with a conditional flow and tightens that bound, is future work here: the uniform
    noise is its special case ``q = U[0, 1)^D``.

    Args:
        x: integer-valued data of any shape: a ``torch.uint8`` (or other integer, or bool) tensor,
            a float tensor holding integers, or a numpy array; values in ``[0, 2**bits - 1]``.
        bits: bits per number of the data (8 for 8-bit images), so ``2**bits`` levels.
        generator: a ``torch.Generator`` for reproducible noise (drawn on its device, then moved
            to ``x``'s); ``None`` uses torch's global generator.
        check: check ``x`` with :func:`check_images` first; ``False`` for batches of data
            checked once already.

    Returns:
        A float tensor shaped like ``x``, on ``x``'s device, with ``x``'s dtype when ``x`` is
        floating and torch's default dtype otherwise.

    Raises:
        ValueError: for values outside ``[0, 2**bits - 1]``, non-integers or NaN.
        TypeError: when ``x`` is neither a tensor nor a numeric numpy array.

    References:
        A note on the evaluation of generative models (Theis, van den Oord and Bethge, 2016);
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017); Flow++
        (Ho, Chen, Srinivas, Duan and Abbeel, 2019).

    Example:
        >>> import torch
        >>> from pyroflows.images import dequantize
        >>> x = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
        >>> y = dequantize(x, generator=torch.Generator().manual_seed(0))
        >>> y.dtype, bool(((y * 256).floor() == x).all())
        (torch.float32, True)
    """
    bits = check_positive_int("bits", bits)
    x = check_images(x, bits) if check else torch.as_tensor(x)
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return _scale(x, _noise(tuple(x.shape), dtype, x.device, generator), bits)


def _tensors_of(model: Any):
    """Tensors that tell where a model lives: a module's, or a distribution's (and its base's)."""
    if isinstance(model, nn.Module):
        yield from model.parameters()
        yield from model.buffers()
        return
    for _ in range(32):  # nested TransformedDistribution / Independent wrappers
        if not isinstance(model, Distribution):
            return
        for value in vars(model).values():
            if isinstance(value, torch.Tensor):
                yield value
        for transform in getattr(model, "transforms", ()):
            yield from _tensors_of(getattr(transform, "module", transform))
        model = getattr(model, "base_dist", None)


def _device_and_dtype(model: Any, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    device, dtype = None, None
    for value in _tensors_of(model):
        device = device or value.device
        if value.is_floating_point():
            return device, value.dtype
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return device or x.device, dtype


def bits_per_dim(
    flow_or_dist: Callable[[torch.Tensor | None], Distribution] | Distribution,
    x: torch.Tensor | np.ndarray,
    context: torch.Tensor | None = None,
    bits: int = 8,
    samples: int = 1,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    return_se: bool = False,
) -> float | tuple[float, float]:
    """Bits per dimension of integer images under a flow, on the original ``2**bits``-level scale.

    For each image ``x`` with ``D`` numbers, ``y = (x + u) / 2**bits`` is a uniform
    dequantisation (:func:`dequantize`) and

        ``bpd(x) = -(log p(y) - D log(2**bits)) / (D log 2) = bits - log p(y) / (D log 2)``,

    averaged over ``samples`` draws of ``u`` and over the images. ``D log(2**bits)`` is the
    Jacobian of the rescaling from ``[0, 2**bits)`` to ``[0, 1)``, so the figure is that of a
    density on the 8-bit scale, as the literature reports it (by Jensen's inequality, an upper
    bound on the discrete model's code length ``-log2 P(x) / D``). A model that is uniform on
    ``[0, 1]^D`` scores exactly ``bits``.

    The model must be a density over ``y ∈ [0, 1]^D``: a flow whose last transform is
    :class:`~pyroflows.transforms.ImageSigmoid` is one, and the Jacobian of its logit
    pre-processing (``z = logit(a + (1 - 2a) y)``) is then already inside ``log p(y)``, so no
    correction is needed here. A flow trained on logits computed outside the model is not such a
    density: add ``ImageSigmoid`` (or the logit's log-determinant) before comparing numbers.

    The model is evaluated under ``torch.no_grad()``, batch by batch on its own device and in its
    dtype (found from its parameters or tensors); switch off training-only behaviour (``eval()``)
    beforehand where the model has any. Any event shape works: ``(C, H, W)`` images or flattened
    ``(D,)`` vectors.

    Args:
        flow_or_dist: a distribution whose event shape is the image shape, or a callable such as
            a pyroflows ``Flow`` that returns one when called with ``context`` (``None`` for an
            unconditional model, once; a batch of contexts for a conditional one).
        x: integer images of shape ``(*batch, *event_shape)`` (see :func:`dequantize` for the
            accepted types and values).
        context: for a conditional ``flow_or_dist``, contexts of shape ``(*batch, context_dim)``,
            one per image; ``None`` otherwise.
        bits: bits per number of the data.
        samples: dequantisation draws per image.
        batch_size: dequantised images scored per call of ``log_prob``.
        generator: a ``torch.Generator`` for reproducible noise (drawn on its device). With
            ``samples=1`` the noise is that of ``dequantize(x, bits, generator)`` (on a CPU
            generator, whatever the batch size).
        return_se: also return the standard error of the mean over images.

    Returns:
        The mean bits/dim over the images, a float; with ``return_se=True`` the pair
        ``(mean, standard error)``, the standard error being the sample standard deviation of
        the per-image figures (each averaged over its draws) over the square root of their number
        (NaN for a single image).

    Raises:
        ValueError: for bad values (see :func:`dequantize`), images whose shape does not end with
            the model's event shape, a context given with a distribution or missing for a
            callable that needs one, or a model whose ``log_prob`` is not one number per image.

    References:
        A note on the evaluation of generative models (Theis, van den Oord and Bethge, 2016);
        Density estimation using Real NVP (Dinh, Sohl-Dickstein and Bengio, 2017).

    Example:
        >>> import torch
        >>> import pyro.distributions as dist
        >>> from pyroflows.images import bits_per_dim
        >>> uniform = dist.Uniform(0.0, 1.0).expand((1, 4, 4)).to_event(3)
        >>> x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
        >>> bits_per_dim(uniform, x)            # uniform on [0, 1]^D: exactly 8 bits per number
        8.0
    """
    bits = check_positive_int("bits", bits)
    samples = check_positive_int("samples", samples)
    batch_size = check_positive_int("batch_size", batch_size)
    x = check_images(x, bits)
    is_dist = isinstance(flow_or_dist, Distribution)
    if is_dist and context is not None:
        raise ValueError(
            "context: a distribution is already conditioned; pass the flow (a callable) to "
            "score with contexts"
        )
    if not is_dist and not callable(flow_or_dist):
        raise TypeError(
            "flow_or_dist: expected a distribution or a callable returning one; "
            f"got {type(flow_or_dist).__name__}"
        )
    if context is not None and not isinstance(context, torch.Tensor):
        raise TypeError(f"context: expected a tensor; got {type(context).__name__}")

    if context is not None and context.dim() == 0:
        raise ValueError("context: expected shape (*batch, context_dim); got a 0-d tensor")

    with torch.no_grad():
        if is_dist:
            d = probe = flow_or_dist
        elif context is None:
            d = probe = flow_or_dist(None)
        else:  # conditional: the event shape is known once a context has been bound
            d = None
            probe = flow_or_dist
            if not isinstance(flow_or_dist, nn.Module):  # a plain callable: ask a distribution
                probe = flow_or_dist(context.reshape(-1, context.shape[-1])[:1])
        device, dtype = _device_and_dtype(probe, x)
        if d is None:
            first = context.reshape(-1, context.shape[-1])[:1].to(device)
            event = _event_shape(flow_or_dist(first), x)
        else:
            event = _event_shape(d, x)
            if d.batch_shape != ():
                raise ValueError(
                    "flow_or_dist: expected a batch shape () for an unconditional model (one "
                    f"distribution over images); got {tuple(d.batch_shape)}"
                )
        batch = x.shape[: x.dim() - len(event)]
        images = x.reshape(-1, *event)
        n = images.shape[0]
        if n == 0:
            raise ValueError(f"x: expected at least one image of shape {tuple(event)}; got none")
        if context is not None:
            if context.shape[:-1] != batch:
                raise ValueError(
                    f"context: expected shape (*batch, context_dim) with the batch shape of x, "
                    f"{tuple(batch)}; got {tuple(context.shape)}"
                )
            context = context.reshape(n, context.shape[-1])
        dims = math.prod(event)
        per_image = torch.empty(n, dtype=torch.float64)
        step = max(1, batch_size // samples)
        for start in range(0, n, step):
            chunk = images[start : start + step].to(device)
            m = chunk.shape[0]
            # image-major noise: a CPU generator gives the same draws whatever the batch size
            u = _noise((m, samples, *event), dtype, device, generator)
            y = _scale(chunk.unsqueeze(1), u, bits).reshape(m * samples, *event)
            if context is not None:
                c = context[start : start + m].to(device)
                c = c.repeat_interleave(samples, dim=0)
                d = flow_or_dist(c)
            log_p = d.log_prob(y)
            if log_p.shape != (m * samples,):
                raise ValueError(
                    "flow_or_dist: expected log_prob to give one number per image, shape "
                    f"({m * samples},); got {tuple(log_p.shape)}"
                )
            log_p = log_p.double().reshape(m, samples).mean(1)
            per_image[start : start + m] = bits - log_p.cpu() / (dims * math.log(2.0))
    mean = per_image.mean().item()
    if not return_se:
        return mean
    se = per_image.std().item() / math.sqrt(n) if n > 1 else math.nan
    return mean, se


def _event_shape(d: Any, x: torch.Tensor) -> torch.Size:
    if not isinstance(d, Distribution):
        raise TypeError(
            f"flow_or_dist: expected the callable to return a distribution; got {type(d).__name__}"
        )
    event = d.event_shape
    if len(event) == 0:
        raise ValueError(
            "flow_or_dist: expected a distribution over images (a non-empty event shape, e.g. "
            "(C, H, W); use .to_event()); got event shape ()"
        )
    if x.dim() < len(event) or x.shape[x.dim() - len(event) :] != event:
        raise ValueError(
            f"x: expected images of shape (*batch, {', '.join(map(str, event))}), the model's "
            f"event shape; got {tuple(x.shape)}"
        )
    return event
