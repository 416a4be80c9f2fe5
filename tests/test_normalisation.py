"""A TransformedDistribution built from our transforms is a normalised density."""

import pyro.distributions as dist
import pytest
import torch

from pyroflows.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ElementwiseAffine,
    LeakyReLU,
    LULinear,
    Permutation,
    QRLinear,
    SinhArcsinh,
    coupling_mask,
)


def nice():
    return [
        AdditiveCoupling(2, hidden=(16, 16), mask=coupling_mask(2, flip=i % 2)) for i in range(4)
    ] + [ElementwiseAffine(2)]


def realnvp():
    layers = [ActNorm(2)]
    for i in range(4):
        layers += [AffineCoupling(2, hidden=(16, 16), mask=coupling_mask(2, flip=i % 2))]
        layers += [Permutation(2)]
    return layers


def linear():
    return [LULinear(2, init="rotation"), SinhArcsinh(2), QRLinear(2), LeakyReLU(0.5)]


@pytest.mark.parametrize("make", [nice, realnvp, linear], ids=["NICE", "RealNVP", "linear"])
def test_density_integrates_to_one_on_a_grid(make):
    torch.manual_seed(0)
    layers = make()
    torch.nn.ModuleList(layers).double()
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, ActNorm):  # initialise from a batch first
                layer.inv(0.5 + 0.8 * torch.randn(256, 2, dtype=torch.float64))
            for p in layer.parameters():
                p.add_(0.2 * torch.randn_like(p))
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, layers)
    # Most mass must lie inside the grid for the check to mean something.
    with torch.no_grad():
        samples = d.sample((20_000,))
    half_width = 12.0
    assert (samples.abs() < half_width).all(-1).double().mean() > 0.999
    # An even count keeps grid points off the axes, where LeakyReLU's density jumps (a grid
    # point on the jump costs the trapezoid rule ~1e-2).
    n = 600
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = d.log_prob(grid).exp().reshape(n, n)
    total = torch.trapezoid(torch.trapezoid(density, axis), axis).item()
    # Tolerance 1e-2: the quadrature error on this grid is ~1e-4, the mass outside it < 1e-3.
    assert total == pytest.approx(1.0, abs=1e-2)
