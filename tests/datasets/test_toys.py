"""Toy densities: normalisation, agreement with samples, seeding."""

import math

import numpy as np
import pytest
import torch

from pyroflows import datasets
from pyroflows.datasets import (
    TOYS,
    Toy,
    toy,
)

EXACT_2D = ("ring", "checkerboard")


@pytest.mark.parametrize("name", TOYS)
def test_toy_shapes_dtype_and_exactness(name):
    t = toy(name, 101, seed=3)
    assert isinstance(t, Toy) and t.name == name
    dim = 8 if name == "warped_gaussian" else 2
    assert t.dim == dim and t.samples.shape == (101, dim) and t.samples.dtype == torch.float32
    assert torch.isfinite(t.samples).all()
    assert (t.log_prob is None) == (name in ("moons", "spirals"))
    if t.log_prob is not None:
        for dtype in (torch.float32, torch.float64):
            x = t.samples[:7].to(dtype)
            lp = t.log_prob(x)
            assert lp.shape == (7,) and lp.dtype == dtype and torch.isfinite(lp).all()
            assert t.log_prob(x.reshape(7, 1, dim)).shape == (7, 1)
    assert f"name={name!r}" in repr(t) and "tensor(" not in repr(t)


def _trapezoid_mass(log_prob, half_width, step):
    grid = torch.arange(-half_width, half_width + step / 2, step, dtype=torch.float64)
    x, y = torch.meshgrid(grid, grid, indexing="ij")
    density = log_prob(torch.stack([x, y], -1)).exp()
    return torch.trapezoid(torch.trapezoid(density, grid), grid).item()


@pytest.mark.parametrize(
    ("name", "half_width", "step", "dim"),
    [
        ("ring", 4.5, 0.05, None),  # modes at radius 2, sd 0.2: the box edge is >= 12 sd away
        ("checkerboard", 5.0, 0.05, None),  # board [-4, 4]^2, sd 0.1: the edge is 10 sd away
        ("warped_gaussian", 14.0, 0.05, 2),  # its 2-D member: wider box for the tails
    ],
)
def test_exact_log_prob_integrates_to_one(name, half_width, step, dim):
    # The densities are smooth (analytic) and negligible at the box edge, so the trapezoid rule
    # converges spectrally (error ~ exp(-2 pi^2 sd^2 / h^2), about 1e-34 for the checkerboard's
    # sd = 2 h): 1e-6 leaves a wide margin over the <= 2e-14 seen, yet catches any slip in a
    # normalising constant (a missing 2, pi or cell area).
    mass = _trapezoid_mass(toy(name, 1, dim=dim).log_prob, half_width, step)
    assert mass == pytest.approx(1.0, abs=1e-6)


def _bin_quadrature(log_prob, edges, points=16):
    """Gauss-Legendre masses ``(bins, bins)`` of the square bins ``edges x edges``, and the
    second moments ``E[x_1^2], E[x_2^2]`` over the whole box."""
    nodes, weights = np.polynomial.legendre.leggauss(points)
    lo, hi = edges[:-1], edges[1:]
    x = torch.from_numpy((lo + hi)[:, None] / 2 + (hi - lo)[:, None] / 2 * nodes)  # (bins, pts)
    w = torch.from_numpy((hi - lo)[:, None] / 2 * weights)
    px = x[:, None, :, None].expand(-1, len(lo), -1, points)
    py = x[None, :, None, :].expand(len(lo), -1, points, -1)
    density = log_prob(torch.stack([px, py], -1)).exp()  # (bins, bins, pts, pts)
    mass = torch.einsum("ijab,ia,jb->ij", density, w, w)
    second = (
        torch.einsum("ijab,ia,jb->", density, w * x**2, w),
        torch.einsum("ijab,ia,jb->", density, w, w * x**2),
    )
    return mass, torch.stack(second)


@pytest.mark.parametrize("name", EXACT_2D)
def test_samples_agree_with_log_prob(name):
    # Histogram check: the frequency of 20,000 samples in each unit bin of [-5, 5]^2 against
    # the bin's mass under log_prob (Gauss-Legendre; 16 and 48 nodes agree to 2e-12). A
    # binomial frequency has sd sqrt(p (1 - p) / n); 5 sd per bin keeps the chance of a false
    # alarm below 1e-4 over 100 bins (and the seed is fixed), while e.g. a mode or cell that is
    # misplaced by one bin shifts a ~0.06-mass bin by ~30 sd.
    n = 20_000
    t = toy(name, n, seed=1)
    edges = np.arange(-5.0, 5.5, 1.0)
    mass, second = _bin_quadrature(t.log_prob, edges)
    assert mass.sum().item() == pytest.approx(1.0, abs=1e-9)  # nothing outside the box
    counts = torch.histogramdd(t.samples.double(), bins=[torch.from_numpy(edges)] * 2).hist
    freq = counts / n
    sd = (mass * (1 - mass) / n).sqrt()
    assert ((freq - mass).abs() <= 5 * sd + 1e-9).all(), (freq - mass).abs().max()
    # Moments, 5 standard errors: both toys are centred; E[x_d^2] against quadrature.
    x = t.samples.double()
    assert (x.mean(0).abs() <= 5 * (x.var(0) / n).sqrt()).all()
    se = ((x**2).var(0) / n).sqrt()
    assert ((x**2).mean(0) - second).abs().max() <= 5 * se.max()


def test_ring_matches_pyro_mixture():
    import pyro.distributions as dist

    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    centres = 2.0 * torch.stack([angles.cos(), angles.sin()], -1)
    mixture = dist.MixtureSameFamily(
        dist.Categorical(logits=torch.zeros(8, dtype=torch.float64)),
        dist.Normal(centres, 0.2).to_event(1),
    )
    x = 3 * torch.randn(50, 2, dtype=torch.float64)
    torch.testing.assert_close(toy("ring", 1).log_prob(x), mixture.log_prob(x))


def test_checkerboard_matches_direct_formula_near_the_board():
    x = 10 * torch.rand(500, 2, dtype=torch.float64) - 5
    edges = torch.linspace(-4, 4, 5, dtype=torch.float64)
    cdf = torch.special.ndtr
    m = cdf((edges[1:] - x[..., None]) / 0.1) - cdf((edges[:-1] - x[..., None]) / 0.1)
    even, odd = m[..., 0::2].sum(-1), m[..., 1::2].sum(-1)
    density = (even[:, 0] * even[:, 1] + odd[:, 0] * odd[:, 1]) / 32
    torch.testing.assert_close(toy("checkerboard", 1).log_prob(x).exp(), density)


@pytest.mark.parametrize("name", ("ring", "checkerboard", "warped_gaussian"))
def test_log_prob_finite_far_away(name):
    log_prob = toy(name, 1, dim=2 if name == "warped_gaussian" else None).log_prob
    far = torch.tensor([[50.0, 50.0], [-1e3, 1e3], [1e6, 0.0], [0.0, -1e8]], dtype=torch.float64)
    lp64 = log_prob(far)
    assert torch.isfinite(lp64).all() and (lp64[1:] < lp64[:-1]).all()  # decreasing outwards
    lp32 = log_prob(far[:2].float())
    assert torch.isfinite(lp32).all()
    torch.testing.assert_close(lp32.double(), lp64[:2], rtol=1e-5, atol=0)
    x = torch.tensor([[50.0, 50.0], [0.3, -1.7]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_prob(x).sum(), x)
    assert torch.isfinite(grad).all()


def test_checkerboard_far_value_and_float64_range():
    # Far out, the mass sits near the board's nearest black corner: log p ~ -r^2 / (2 sd^2).
    log_prob = toy("checkerboard", 1).log_prob
    for r in (50.0, 1e4, 1e17, 1e100):
        x = torch.tensor([r, r], dtype=torch.float64)
        lp = log_prob(x).item()
        assert math.isfinite(lp)
        expected = -2 * (r - 4) ** 2 / (2 * 0.1**2)
        assert lp == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("dim", [1, 3, 8])
def test_warped_gaussian_log_prob_is_change_of_variables(dim):
    # log p(x) = log N(z) - log|det dx/dz| with the Jacobian from autograd, in float64.
    z = torch.randn(5, dim, dtype=torch.float64)
    x = datasets.toys._warp_forward(z)
    log_prob = toy("warped_gaussian", 1, dim=dim).log_prob
    for zi, xi in zip(z, x, strict=True):
        jac = torch.autograd.functional.jacobian(datasets.toys._warp_forward, zi)
        log_normal = torch.distributions.Normal(0.0, 1.0).log_prob(zi).sum()
        expected = log_normal - torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(log_prob(xi), expected, rtol=1e-10, atol=1e-10)
    z_back, _ = datasets.toys._warp_inverse(x)
    torch.testing.assert_close(z_back, z)


def test_warped_gaussian_importance_weights_average_to_one():
    # E_q[p / q] = 1 for a proposal q covering p: a Gaussian with the samples' mean and twice
    # their covariance. With 20,000 draws the standard error is ~0.01 here; 5 of them.
    target = toy("warped_gaussian", 20_000, seed=5)
    x = target.samples.double()
    proposal = torch.distributions.MultivariateNormal(x.mean(0), 2 * x.T.cov())
    draws = proposal.sample((20_000,))
    weights = (target.log_prob(draws) - proposal.log_prob(draws)).exp()
    se = (weights.std() / math.sqrt(len(weights))).item()
    assert se < 0.03
    assert weights.mean().item() == pytest.approx(1.0, abs=5 * se)


def test_warped_gaussian_density_does_not_depend_on_seed():
    x = torch.randn(10, 8, dtype=torch.float64)
    a, b = toy("warped_gaussian", 5, seed=1), toy("warped_gaussian", 5, seed=2)
    assert not torch.equal(a.samples, b.samples)
    torch.testing.assert_close(a.log_prob(x), b.log_prob(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", TOYS)
def test_seeding_is_local(name):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again = toy(name, 64, seed=7), toy(name, 64, seed=7)
    assert torch.equal(first.samples, again.samples)
    assert not torch.equal(first.samples, toy(name, 64, seed=8).samples)
    assert not torch.equal(toy(name, 64, seed=None).samples, toy(name, 64, seed=None).samples)
    assert torch.equal(torch.get_rng_state(), state)


def test_moons_and_spirals_are_balanced_and_odd_n_works():
    for name in ("moons", "spirals"):
        x = toy(name, 1001, seed=0).samples
        assert x.shape == (1001, 2)
        assert x.abs().max() < 5  # documented ranges, plus noise
        assert x.mean(0).abs().max() < 0.3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "swiss"}, ValueError, r"expected a toy name in .*got 'swiss'"),
        ({"name": "ring", "dim": 3}, ValueError, r"expected dim=2 .* got dim=3"),
        ({"name": "ring", "n": 0}, ValueError, r"expected the number of samples n .*got 0"),
        ({"name": "ring", "n": 2.5}, ValueError, "positive integer; got 2.5"),
        ({"name": "warped_gaussian", "dim": 0}, ValueError, "expected dim to be a positive"),
        ({"name": "ring", "seed": 1.5}, TypeError, "expected an integer seed or None; got 1.5"),
    ],
)
def test_toy_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        toy(**kwargs)


def test_log_prob_validates_points():
    ring = toy("ring", 1)
    with pytest.raises(ValueError, match=r"expected points of shape \(\.\.\., 2\); got shape"):
        ring.log_prob(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="expected a floating-point tensor of points; got"):
        ring.log_prob(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"expected points of shape \(\.\.\., 8\); got shape \(3,\)"
    ):
        toy("warped_gaussian", 1).log_prob(torch.zeros(3))
