"""Conditioner networks used by the flow transforms: :class:`MLP` and :class:`MADE`.

Every conditioner ends in a zero-initialised linear layer, so a freshly built transform is the
identity map and an untrained flow equals its base distribution (stable starts for variational
inference, see the design notes).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice, pairwise

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import broadcast_batch, check_nonnegative_int, check_positive_int

__all__ = ["MADE", "MLP"]


def _check_hidden(hidden: Sequence[int]) -> tuple[int, ...]:
    if isinstance(hidden, int):
        hidden = (hidden,)
    hidden = tuple(hidden)
    for h in hidden:
        check_positive_int("hidden", h)
    return hidden


class MLP(nn.Sequential):
    """Multi-layer perceptron whose last layer starts at zero.

    ``x -> Linear -> act -> ... -> Linear``; with ``zero_init=True`` (the default) the weight and
    bias of the last layer are zero, so the network outputs zeros until it is trained. The
    layers are called through their ``forward`` (hooks registered on the layers themselves are
    not run; hooks on the MLP are), which halves the Python overhead of a small network.

    Args:
        in_features: size of the last input dimension.
        out_features: size of the last output dimension.
        hidden: widths of the hidden layers (an empty tuple gives a single linear layer).
        activation: activation module class, instantiated between layers.
        zero_init: zero-initialise the last layer.

    Shapes:
        input ``(*batch, in_features)`` -> output ``(*batch, out_features)``.

    Example:
        >>> import torch
        >>> from pyroflows.nn import MLP
        >>> net = MLP(3, 4, hidden=(16, 16))
        >>> net(torch.randn(10, 3)).shape
        torch.Size([10, 4])
        >>> bool((net(torch.randn(2, 3)) == 0).all())
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.ReLU,
        zero_init: bool = True,
    ) -> None:
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        hidden = _check_hidden(hidden)
        sizes = (in_features, *hidden, out_features)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(sizes)):
            if i > 0:
                layers.append(activation())
            layers.append(nn.Linear(a, b))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features
        if zero_init:
            last = layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MLP: expected input with last dimension {self.in_features}; "
                f"got shape {tuple(x.shape)}"
            )
        # The layers' own forward, without nn.Module.__call__ (hooks) around each: that
        # dispatch costs as much as a small layer's arithmetic (see benchmarks/speed.py).
        for layer in self:
            x = layer.forward(x)
        return x


OrderLike = str | torch.Tensor | Sequence[int]


def _made_order(dim: int, order: OrderLike) -> torch.Tensor:
    """``order[i]`` = position of feature ``i`` in the autoregressive order (a permutation)."""
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(dim)
        if order == "reversed":
            return torch.arange(dim - 1, -1, -1)
        if order == "random":
            return torch.randperm(dim)
        raise ValueError(
            "order: expected 'natural', 'reversed', 'random' or a permutation of "
            f"0..{dim - 1}; got {order!r}"
        )
    try:
        perm = torch.as_tensor(order)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"order: expected a permutation of 0..{dim - 1} as integers; got {order!r}"
        ) from None
    if perm.dtype == torch.bool or perm.is_floating_point() or perm.is_complex():
        raise ValueError(f"order: expected integers; got dtype {perm.dtype}")
    if perm.shape != (dim,):
        raise ValueError(f"order: expected shape ({dim},); got shape {tuple(perm.shape)}")
    perm = perm.detach().cpu().long().clone()
    if not torch.equal(perm.sort().values, torch.arange(dim)):
        raise ValueError(f"order: expected a permutation of 0..{dim - 1}; got {perm.tolist()}")
    return perm


class _MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 mask (a buffer)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: an MLP with the autoregressive property.

    Output block ``i`` (the ``out_per_dim`` numbers that parametrise feature ``i``) depends only
    on the inputs ``j`` that come before ``i`` in the autoregressive order
    (``order[j] < order[i]``) and on all of the context, so the Jacobian of the output with
    respect to the input is strictly triangular in that order. The property comes from masking
    the weights (Germain et al., 2015): input ``j`` has degree ``order[j] + 1``, context inputs
    degree 0, hidden units get degrees ``1..dim-1`` (``0..dim-1`` with a context), assigned
    cyclically so that every degree is present in every layer; a hidden unit sees the units of
    the previous layer with degree ``<=`` its own, and output block ``i`` sees the last hidden
    units with degree ``< order[i] + 1``. Degree-0 units read the context alone; they are what
    lets the first feature in the order depend on the context (without them its output would
    be a constant). Each hidden layer must therefore have at least ``dim - 1`` units (``dim``
    with a context); narrower layers would silently cut some of the allowed dependencies, so
    they raise a ``ValueError``. With ``dim == 1`` the output depends on the context alone (or
    is a learnt constant without one).

    The output layer (weight and bias) is zero-initialised, so the network outputs exactly zero
    until trained. Masks and ``order`` are buffers: they are saved in the ``state_dict`` (a
    ``"random"`` order is restored by ``load_state_dict``) and move with ``.to()``.

    Args:
        dim: number of input features.
        hidden: widths of the hidden layers, each at least ``dim - 1`` (``dim`` with a context);
            an empty tuple gives a single masked linear layer.
        out_per_dim: number of outputs per input feature.
        context_dim: size of the context vector, 0 for none.
        order: ``"natural"`` (``0, 1, ..., dim - 1``), ``"reversed"``, ``"random"`` (drawn from
            torch's global random generator) or a permutation of ``0..dim-1`` (a sequence or 1-D
            integer tensor) where ``order[i]`` is the position of feature ``i``.
        activation: activation module class, instantiated between layers.
        param_major: return the output parameter by parameter, shape
            ``(*batch, out_per_dim, dim)`` (all features' first parameter, then all features'
            second, ...): an elementwise map that reads each parameter across the features
            (the affine one) then works on contiguous rows, and so does its backward.

    Shapes:
        ``x``: ``(*batch, dim)``; ``context``: ``(*batch', context_dim)`` with ``batch'``
        broadcastable with ``batch``; output: ``(*broadcast(batch, batch'), dim, out_per_dim)``
        (``(..., out_per_dim, dim)`` with ``param_major=True``).

    References:
        MADE: Masked Autoencoder for Distribution Estimation (Germain, Gregor, Murray and
        Larochelle, 2015).

    Example:
        >>> import torch
        >>> from pyroflows.nn import MADE
        >>> _ = torch.manual_seed(0)
        >>> net = MADE(3, hidden=(16, 16), out_per_dim=2, context_dim=4, order="reversed")
        >>> net(torch.randn(10, 3), torch.randn(10, 4)).shape
        torch.Size([10, 3, 2])
        >>> bool((net(torch.randn(3), torch.randn(4)) == 0).all())  # zero output layer
        True
        >>> net.order.tolist()
        [2, 1, 0]
    """

    order: torch.Tensor

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        out_per_dim: int = 2,
        context_dim: int = 0,
        order: OrderLike = "natural",
        activation: type[nn.Module] = nn.ReLU,
        *,
        param_major: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("out_per_dim", out_per_dim)
        check_nonnegative_int("context_dim", context_dim)
        hidden = _check_hidden(hidden)
        # Hidden degrees run over low..dim-1. Degree 0 (units that read the context only) is
        # what lets the first feature in the order depend on the context.
        low = 0 if context_dim or dim == 1 else 1
        if any(h < dim - low for h in hidden):
            need = f"dim = {dim}" if low == 0 else f"dim - 1 = {dim - 1}"
            raise ValueError(
                f"hidden: expected every hidden layer to have at least {need} units (dim - 1, "
                "or dim with a context), so that each output can depend on every input before "
                f"it and on the context; got {hidden}"
            )
        self.dim = dim
        self.hidden = hidden
        self.out_per_dim = out_per_dim
        self.context_dim = context_dim
        perm = _made_order(dim, order)
        self.register_buffer("order", perm)

        degrees = [perm + 1]
        degrees += [torch.arange(h) % (dim - low) + low for h in hidden]
        self.param_major = param_major
        # Output unit j parametrises feature j // out_per_dim (feature-major) or j % dim
        # (parameter-major); the returned shape is the same either way.
        out_degrees = (
            (perm + 1).repeat(out_per_dim)
            if param_major
            else (perm + 1).repeat_interleave(out_per_dim)
        )
        layers = []
        for i, (d_in, d_out) in enumerate(zip(degrees, [*degrees[1:], None], strict=True)):
            if d_out is None:
                mask = out_degrees[:, None] > d_in[None, :]
            else:
                mask = d_out[:, None] >= d_in[None, :]
            if i == 0 and context_dim:
                mask = torch.cat([mask, mask.new_ones(len(mask), context_dim)], 1)
            layers.append(_MaskedLinear(mask.shape[1], mask.shape[0], mask))
        self.layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(activation() for _ in hidden)
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Conditioner output of shape ``(*batch, dim, out_per_dim)``."""
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"MADE: expected input with last dimension {self.dim}; got shape {tuple(x.shape)}"
            )
        # Each layer's arithmetic is written out here rather than called through
        # nn.Module.__call__, whose dispatch costs as much as a small layer (hooks registered
        # on the layers themselves are therefore not run).
        first = self.layers[0]
        weight = first.weight * first.mask
        if self.context_dim:
            if context is None:
                raise ValueError(
                    f"MADE: expected a context of shape (*batch, {self.context_dim}) "
                    f"(context_dim={self.context_dim}); got None"
                )
            if context.dim() == 0 or context.shape[-1] != self.context_dim:
                raise ValueError(
                    f"MADE: expected a context with last dimension {self.context_dim}; "
                    f"got shape {tuple(context.shape)}"
                )
            broadcast_batch(x, context, "MADE")
            # Two products instead of a concatenation: x and context broadcast for free.
            h = F.linear(x, weight[:, : self.dim], first.bias)
            h = h + F.linear(context, weight[:, self.dim :])
        elif context is not None:
            raise ValueError(
                "MADE: expected no context (context_dim=0); "
                f"got a tensor of shape {tuple(context.shape)}"
            )
        else:
            h = F.linear(x, weight, first.bias)
        for activation, layer in zip(self.activations, islice(self.layers, 1, None), strict=True):
            h = F.linear(activation.forward(h), layer.weight * layer.mask, layer.bias)
        if self.param_major:
            return h.unflatten(-1, (self.out_per_dim, self.dim))
        return h.unflatten(-1, (self.dim, self.out_per_dim))

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"hidden={self.hidden}", f"out_per_dim={self.out_per_dim}"]
        if self.context_dim:
            parts.append(f"context_dim={self.context_dim}")
        return ", ".join(parts)
