"""Convolutional conditioner networks for image transforms (events of shape ``(C, H, W)``).

Like the vector conditioners in :mod:`pyroflows.nn`, every network here ends in a zero-initialised
layer, so a freshly built transform is the identity map.
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import broadcast_batch, check_nonnegative_int, check_positive_int

__all__ = ["ConvResNet"]


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class _ResidualBlock(nn.Module):
    """``h + conv(act(conv(act(h))))``: a pre-activation residual block of two 3x3 convolutions."""

    def __init__(self, channels: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.act1 = activation()
        self.conv1 = _conv3x3(channels, channels)
        self.act2 = activation()
        self.conv2 = _conv3x3(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(self.act2(self.conv1(self.act1(h))))


class ConvResNet(nn.Module):
    """A small residual convolutional network whose output convolution starts at zero.

    ``x -> conv3x3 -> [block] * blocks -> act -> conv3x3``, where each block is the pre-activation
    residual block ``h + conv3x3(act(conv3x3(act(h))))``. All convolutions are 3x3 with zero
    padding, so the spatial size is kept. With ``zero_init=True`` (the default) the weight and
    bias of the output convolution are zero, so the network outputs zeros until it is trained.

    A context vector, when given, is broadcast over the image as ``context_dim`` extra constant
    input channels (class- or context-conditional conditioners, as in conditional Glow).

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image.
        channels: hidden channels.
        blocks: number of residual blocks (0 gives ``conv3x3 -> act -> conv3x3``).
        context_dim: size of the context vector, 0 for none.
        activation: activation module class.
        zero_init: zero-initialise the output convolution.

    Shapes:
        ``x``: ``(*batch, in_channels, H, W)``; ``context``: ``(*batch', context_dim)`` with
        ``batch'`` broadcastable with ``batch``; output:
        ``(*broadcast(batch, batch'), out_channels, H, W)``.

    References:
        Deep Residual Learning for Image Recognition (He, Zhang, Ren and Sun, 2016); Identity
        Mappings in Deep Residual Networks (He, Zhang, Ren and Sun, 2016).

    Example:
        >>> import torch
        >>> from pyroflows.nn_image import ConvResNet
        >>> _ = torch.manual_seed(0)
        >>> net = ConvResNet(3, 6, channels=8, blocks=1, context_dim=2)
        >>> out = net(torch.randn(5, 3, 4, 4), torch.randn(5, 2))
        >>> out.shape, bool((out == 0).all())
        (torch.Size([5, 6, 4, 4]), True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: int = 64,
        blocks: int = 2,
        context_dim: int = 0,
        activation: type[nn.Module] = nn.ReLU,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_positive_int("channels", channels)
        check_nonnegative_int("blocks", blocks)
        check_nonnegative_int("context_dim", context_dim)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.context_dim = context_dim
        self.stem = _conv3x3(in_channels + context_dim, channels)
        self.blocks = nn.ModuleList(_ResidualBlock(channels, activation) for _ in range(blocks))
        self.act = activation()
        self.head = _conv3x3(channels, out_channels)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"ConvResNet: expected an input of shape (*batch, {self.in_channels}, H, W); "
                f"got shape {tuple(x.shape)}"
            )
        if self.context_dim:
            if context is None or context.dim() == 0 or context.shape[-1] != self.context_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(
                    f"ConvResNet: expected a context of shape (*batch, {self.context_dim}); "
                    f"got {got}"
                )
            batch = broadcast_batch(x, context, "ConvResNet", event_dim=3)
            height, width = x.shape[-2:]
            planes = context[..., None, None].expand(*batch, self.context_dim, height, width)
            x = torch.cat([x.expand(*batch, *x.shape[-3:]), planes], dim=-3)
        # Convolutions take one batch dimension: flatten the batch shape and restore it after.
        batch = x.shape[:-3]
        h = self.stem(x.reshape(-1, *x.shape[-3:]))
        for block in self.blocks:
            h = block(h)
        out = self.head(self.act(h))
        return out.reshape(*batch, *out.shape[-3:])

    def extra_repr(self) -> str:
        return f"context_dim={self.context_dim}" if self.context_dim else ""
