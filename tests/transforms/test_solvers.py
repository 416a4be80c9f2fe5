"""The numerical inverses of pyroflows.transforms.solvers: accuracy, stopping rules, gradients."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from pyroflows.transforms.solvers import (
    TOLERANCE,
    InverseNotConverged,
    fixed_point_inverse,
    monotone_inverse,
)


def _saturating(x, a):
    """Increasing, with a slope falling to 1% far from 0: Newton's last steps are sub-ulp."""
    return x * (1 - 0.99 * a / (a + x.abs()))


def test_monotone_inverse_in_float32_is_as_accurate_as_float32_allows():
    """A Newton step below one ulp lands on a bracket end; it used to be bisected away, which
    left roots 1e-5 off (the tolerance) instead of a few ulps."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1000, generator=g) * 5 + 0.1
    y = torch.randn(1000, generator=g) * 3
    x32 = monotone_inverse(_saturating, y, (a,))
    x64 = monotone_inverse(_saturating, y.double(), (a.double(),))
    error = ((x32.double() - x64).abs() / x64.abs().clamp_min(1.0)).max()
    assert error < 1e-6


def test_fixed_point_inverse_stops_vector_by_vector():
    """A row of small values next to a row of large ones is solved to its own scale, not to an
    absolute tolerance scaled by the other row's magnitude."""
    w = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)

    def g(x, w):
        return 0.9 * torch.tanh(x @ w)

    y = torch.tensor([[1e-3, -2e-3], [1e6, -3e6]], dtype=torch.float64)
    x = fixed_point_inverse(g, y, (w,))
    residual = (x + g(x, w) - y).abs()
    assert residual[0].max() < 10 * TOLERANCE[torch.float64]
    alone = fixed_point_inverse(g, y[:1], (w,))
    torch.testing.assert_close(x[:1], alone, atol=1e-12, rtol=0)


def test_gradients_by_the_implicit_function_theorem():
    torch.manual_seed(0)
    a = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    y = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda y, a: monotone_inverse(_saturating, y, (a,)), (y, a))
    w = (0.3 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()
    v = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(
        lambda v, w: fixed_point_inverse(lambda x, w: torch.tanh(x @ w) / 2, v, (w,)), (v, w)
    )


def test_failures_are_clear():
    with pytest.raises(InverseNotConverged, match="Tanh: no bracket holds the root"):
        monotone_inverse(lambda x: torch.tanh(x), torch.tensor([2.0]), what="Tanh")
    with pytest.raises(
        InverseNotConverged, match="Block: the fixed-point inverse did not converge"
    ):
        fixed_point_inverse(lambda x: 0.99 * x, torch.ones(3), max_iter=5, what="Block")
