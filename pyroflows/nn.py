"""Conditioner networks used by the flow transforms.

Every conditioner ends in a zero-initialised linear layer, so a freshly built transform is the
identity map and an untrained flow equals its base distribution (stable starts for variational
inference, see the design notes).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

__all__ = ["MLP"]


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer; got {value!r}")
    return value


def _check_hidden(hidden: Sequence[int]) -> tuple[int, ...]:
    if isinstance(hidden, int):
        hidden = (hidden,)
    hidden = tuple(hidden)
    for h in hidden:
        _check_positive_int("hidden", h)
    return hidden


class MLP(nn.Sequential):
    """Multi-layer perceptron whose last layer starts at zero.

    ``x -> Linear -> act -> ... -> Linear``; with ``zero_init=True`` (the default) the weight and
    bias of the last layer are zero, so the network outputs zeros until it is trained.

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
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
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
        return super().forward(x)
