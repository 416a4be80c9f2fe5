"""Toy distributions, with exact log-densities where they exist (see :func:`toy`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import torch

__all__ = ["TOYS", "Toy", "toy"]

TOYS: tuple[str, ...] = ("ring", "checkerboard", "moons", "spirals", "warped_gaussian")
"""The names :func:`toy` accepts."""

_TWO_D = ("ring", "checkerboard", "moons", "spirals")
_WARPED_DEFAULT_DIM = 8

_RING_MODES, _RING_RADIUS, _RING_STD = 8, 2.0, 0.2
_BOARD_HALF, _BOARD_CELLS, _BOARD_STD = 4.0, 4, 0.1


@dataclass(frozen=True, eq=False)
class Toy:
    """Samples from a toy distribution, with its exact log-density where one is known.

    Attributes:
        name: the toy's name (one of :data:`TOYS`).
        samples: float32 samples, shape ``(n, dim)``.
        log_prob: the exact, normalised log-density, mapping points ``(..., dim)`` of any
            floating dtype to ``(...)`` in the same dtype (computed internally in float64; it is
            differentiable), or ``None`` when no closed form is available ("moons", "spirals").
        dim: number of features.
    """

    name: str
    samples: torch.Tensor
    log_prob: Callable[[torch.Tensor], torch.Tensor] | None
    dim: int

    def __repr__(self) -> str:
        shape = tuple(self.samples.shape)
        exact = self.log_prob is not None
        return (
            f"Toy(name={self.name!r}, samples=<{shape} {self.samples.dtype}>, dim={self.dim}, "
            f"exact={exact})"
        )


def toy(name: str, n: int = 10_000, *, seed: int | None = 0, dim: int | None = None) -> Toy:
    """Draws ``n`` samples from a named toy distribution.

    =============== ===== ============================================================= =====
    name            dim   distribution                                                  exact
    =============== ===== ============================================================= =====
    ring            2     equal mixture of 8 Gaussians (sd 0.2) on a circle of radius 2 yes
    checkerboard    2     uniform on the 8 black cells of a 4x4 board on [-4, 4]^2      yes
                          (cell ``(i, j)`` is black when ``i + j`` is even, the bottom
                          left one included), convolved with N(0, 0.1^2 I)
    moons           2     two interleaving half circles, about [-3, 3] x [-1.5, 1.5],   no
                          noise sd 0.2
    spirals         2     two interleaved spiral arms, about [-3.2, 3.2]^2, noise sd    no
                          0.1
    warped_gaussian any   ``x = m + s * sinh((asinh(Q z) + eps) / delta)`` with         yes
                    (8)   ``z ~ N(0, I)``, a fixed rotation ``Q`` and fixed
                          per-coordinate skews ``eps`` in [-0.5, 0.5], tail weights
                          ``delta`` in [0.75, 1.25], scales ``s`` in [0.55, 1.8] and
                          shifts ``m`` in [-1, 1]
    =============== ===== ============================================================= =====

    The checkerboard's density is ``p(x) = 1/32 sum_black prod_d [Phi((b_d - x_d) / 0.1) -
    Phi((a_d - x_d) / 0.1)]`` over the black cells ``[a_1, b_1] x [a_2, b_2]``; it is evaluated
    as sums of log-differences of normal CDFs (``log_ndtr``), in float64, so it stays finite far
    from the board: about ``-1e5`` at ``(50, 50)``, finite in float64 for ``|x|`` up to about
    ``1e150``, and finite in float32 while the value itself fits (``|x|`` up to about ``1e18``);
    its gradient is accurate out to at least ``|x| ~ 1e16`` (a far-tail series replaces
    ``log_ndtr`` below ``-30``, whose own gradient breaks down there).

    The warped Gaussian's constants (``Q``, ``eps``, ``delta``, ``s``, ``m``) depend only on
    ``dim``, never on ``seed``: every seed samples the same density. Its log-density is the
    change of variables ``log N(z; 0, I) + log|det dz/dx|`` (``|det Q| = 1``).

    Args:
        name: one of :data:`TOYS`.
        n: number of samples.
        seed: seed of the local ``torch.Generator`` used for sampling; ``None`` for a
            nondeterministic draw. The global RNG is neither used nor changed.
        dim: number of features; only "warped_gaussian" accepts a value other than 2
            (default 8 there).

    Returns:
        A :class:`Toy` with float32 ``samples`` of shape ``(n, dim)``.

    Example:
        >>> import torch
        >>> from pyroflows.datasets import toy
        >>> ring = toy("ring", 1000, seed=0)
        >>> ring.samples.shape, ring.log_prob(torch.zeros(3, 2)).shape
        (torch.Size([1000, 2]), torch.Size([3]))
        >>> toy("warped_gaussian", 5, dim=3).samples.shape
        torch.Size([5, 3])
    """
    if name not in TOYS:
        raise ValueError(f"expected a toy name in {TOYS}; got {name!r}")
    _check_positive_int(n, "the number of samples n")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"expected an integer seed or None; got {seed!r}")
    if name in _TWO_D:
        if dim not in (None, 2):
            raise ValueError(f"expected dim=2 (or None) for the 2-D toy {name!r}; got dim={dim!r}")
        dim = 2
    else:
        dim = _WARPED_DEFAULT_DIM if dim is None else dim
        _check_positive_int(dim, "dim")
    samples = _SAMPLERS[name](n, dim, _generator(seed))
    log_prob = _LOG_PROBS[name]
    if name == "warped_gaussian":  # one density per dim: bind it, so points are checked
        log_prob = partial(_warped_log_prob, dim=dim)
    return Toy(name, samples.to(torch.float32).contiguous(), log_prob, dim)


def _generator(seed: int | None) -> torch.Generator:
    """A local generator: seeded, or from a nondeterministic source when ``seed`` is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _check_positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {what} to be a positive integer; got {value!r}")


def _points(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Validates points ``(..., dim)`` and returns them in float64."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"expected a floating-point tensor of points; got {got}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"expected points of shape (..., {dim}); got shape {tuple(x.shape)}")
    return x.to(torch.float64)


# ring ----------------------------------------------------------------------------------------


def _ring_centres(device: torch.device | None = None) -> torch.Tensor:
    angles = torch.arange(_RING_MODES, dtype=torch.float64, device=device)
    angles = angles * (2 * math.pi / _RING_MODES)
    return _RING_RADIUS * torch.stack([angles.cos(), angles.sin()], -1)


def _ring_sample(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    mode = torch.randint(_RING_MODES, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return _ring_centres()[mode] + _RING_STD * noise


def _ring_log_prob(x: torch.Tensor) -> torch.Tensor:
    x64 = _points(x, 2)
    sq = (x64.unsqueeze(-2) - _ring_centres(x.device)).square().sum(-1)  # (..., modes)
    log_norm = math.log(_RING_MODES) + math.log(2 * math.pi * _RING_STD**2)
    return (torch.logsumexp(-sq / (2 * _RING_STD**2), -1) - log_norm).to(x.dtype)


# checkerboard --------------------------------------------------------------------------------


def _board_cells() -> torch.Tensor:
    """Lower-left corners ``(8, 2)`` of the black cells (``i + j`` even)."""
    width = 2 * _BOARD_HALF / _BOARD_CELLS
    corners = [
        (-_BOARD_HALF + i * width, -_BOARD_HALF + j * width)
        for i in range(_BOARD_CELLS)
        for j in range(_BOARD_CELLS)
        if (i + j) % 2 == 0
    ]
    return torch.tensor(corners, dtype=torch.float64)


def _checkerboard_sample(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    cells = _board_cells()
    width = 2 * _BOARD_HALF / _BOARD_CELLS
    cell = torch.randint(len(cells), (n,), generator=generator)
    uniform = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return cells[cell] + width * uniform + _BOARD_STD * noise


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-a))`` for ``a > 0``, accurate for small and large ``a`` (Maechler 2012)."""
    small = a < math.log(2)
    # Each branch sees only inputs where it is finite, so gradients stay finite too.
    a_small = torch.where(small, a, math.log(2))
    a_large = torch.where(small, math.log(2), a)
    return torch.where(small, torch.log(-torch.expm1(-a_small)), torch.log1p(-torch.exp(-a_large)))


def _log_ndtr(z: torch.Tensor) -> torch.Tensor:
    """``log Phi(z)`` whose gradient is also accurate in the far left tail.

    ``torch.special.log_ndtr``'s values are fine there, but its gradient loses accuracy below
    ``z ~ -1e3`` (and overflows below ``~ -1e9``); the asymptotic series (Abramowitz & Stegun
    26.2.12) differentiates cleanly and is accurate to ~1e-12 below ``z = -30``.
    """
    tail = z < -30
    z_tail = torch.where(tail, z, -30.0)
    inv2 = z_tail.reciprocal().square()
    series = 1 + inv2 * (-1 + inv2 * (3 + inv2 * (-15 + inv2 * 105)))
    asymptotic = (
        -z_tail.square() / 2 - torch.log(-z_tail) - 0.5 * math.log(2 * math.pi) + series.log()
    )
    return torch.where(tail, asymptotic, torch.special.log_ndtr(torch.where(tail, -30.0, z)))


def _log_interval_mass(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log P(a < x + e < b)`` for ``e ~ N(0, sd^2)``, finite however far ``x`` is from ``[a, b]``.

    That is ``log(Phi(hi) - Phi(lo))`` with ``lo = (a - x) / sd``, ``hi = (b - x) / sd``.
    """
    lo, hi = (a - x) / _BOARD_STD, (b - x) / _BOARD_STD
    width = (b - a) / _BOARD_STD  # hi - lo, without the rounding of a subtraction at large |x|
    centre = (a + b - 2 * x) / _BOARD_STD  # lo + hi, likewise
    # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): work on the side where both CDFs are small.
    flip = centre > 0
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi = _log_ndtr(hi)
    gap = log_hi - _log_ndtr(lo)  # log Phi(hi) - log Phi(lo) > 0
    # Phi(z) exp(z^2 / 2) increases with z, so gap >= (lo^2 - hi^2) / 2 = width |centre| / 2.
    # The bound has no cancellation: it takes over where the subtraction above rounds away.
    gap = torch.maximum(gap, width * centre.abs() / 2)
    return log_hi + _log1mexp(gap)


def _checkerboard_log_prob(x: torch.Tensor) -> torch.Tensor:
    x64 = _points(x, 2).unsqueeze(-1)  # (..., 2, 1) against the cells' edges (cells,)
    edges = torch.linspace(
        -_BOARD_HALF, _BOARD_HALF, _BOARD_CELLS + 1, dtype=torch.float64, device=x.device
    )
    log_mass = _log_interval_mass(x64, edges[:-1], edges[1:])  # (..., 2, cells)
    even = torch.logsumexp(log_mass[..., 0::2], -1)  # (..., 2): cells 0, 2 of each coordinate
    odd = torch.logsumexp(log_mass[..., 1::2], -1)
    # Black cells: both indices even or both odd. Their total area is 8 * 2^2 = 32.
    both = torch.logaddexp(even[..., 0] + even[..., 1], odd[..., 0] + odd[..., 1])
    return (both - math.log(32.0)).to(x.dtype)


# moons and spirals ---------------------------------------------------------------------------


def _two_groups(n: int, generator: torch.Generator) -> torch.Tensor:
    """A shuffled boolean mask, true for ``ceil(n / 2)`` of ``n`` points."""
    return (torch.arange(n) < (n + 1) // 2)[torch.randperm(n, generator=generator)]


def _moons_sample(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    first = _two_groups(n, generator)
    t = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    upper = torch.stack([t.cos(), t.sin()], -1)
    lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], -1)
    moons = torch.where(first.unsqueeze(-1), upper, lower)
    moons = moons + 0.1 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return 2 * (moons - torch.tensor([0.5, 0.25], dtype=torch.float64))


def _spirals_sample(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    first = _two_groups(n, generator)
    # sqrt(U) makes the density along the arm roughly uniform per unit length.
    t = 3 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64).sqrt()
    arm = torch.stack([-t * t.cos(), t * t.sin()], -1) / 3
    arm = torch.where(first.unsqueeze(-1), arm, -arm)
    return arm + 0.1 * torch.randn(n, 2, generator=generator, dtype=torch.float64)


# warped Gaussian -----------------------------------------------------------------------------

_WARP_SEED = 20_240_917  # fixed: the density must not depend on the sampling seed


@lru_cache(maxsize=16)
def _warp_constants(dim: int) -> tuple[torch.Tensor, ...]:
    """Fixed ``(Q, eps, delta, scale, shift)`` of the warped Gaussian, in float64."""
    g = torch.Generator().manual_seed(_WARP_SEED + dim)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a unique Q for the draw
    eps = torch.rand(dim, generator=g, dtype=torch.float64) - 0.5
    delta = 0.75 + 0.5 * torch.rand(dim, generator=g, dtype=torch.float64)
    scale = torch.exp(1.2 * torch.rand(dim, generator=g, dtype=torch.float64) - 0.6)
    shift = 2 * torch.rand(dim, generator=g, dtype=torch.float64) - 1
    return q, eps, delta, scale, shift


def _warp_forward(z: torch.Tensor) -> torch.Tensor:
    """The warped Gaussian's bijection ``z -> x`` on ``(..., dim)`` (float64 inside)."""
    q, eps, delta, scale, shift = (c.to(z.device) for c in _warp_constants(z.shape[-1]))
    y = z.to(torch.float64) @ q.T
    return (shift + scale * torch.sinh((torch.asinh(y) + eps) / delta)).to(z.dtype)


def _warp_inverse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` and ``log|det dz/dx|`` (shape ``(...)``) for points ``x`` of shape ``(..., dim)``."""
    q, eps, delta, scale, shift = (c.to(x.device) for c in _warp_constants(x.shape[-1]))
    u = (x.to(torch.float64) - shift) / scale
    t = delta * torch.asinh(u) - eps
    z = torch.sinh(t) @ q
    # d/du sinh(delta asinh(u) - eps) = delta cosh(t) / sqrt(1 + u^2); log cosh stably.
    log_cosh = t.abs() + torch.nn.functional.softplus(-2 * t.abs()) - math.log(2)
    ladj = log_cosh + delta.log() - torch.hypot(torch.ones_like(u), u).log() - scale.log()
    return z, ladj.sum(-1)


def _warped_sample(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return _warp_forward(torch.randn(n, dim, generator=generator, dtype=torch.float64))


def _warped_log_prob(x: torch.Tensor, dim: int) -> torch.Tensor:
    x64 = _points(x, dim)
    z, ladj = _warp_inverse(x64)
    log_normal = -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
    return (log_normal + ladj).to(x.dtype)


_SAMPLERS: dict[str, Callable[[int, int, torch.Generator], torch.Tensor]] = {
    "ring": _ring_sample,
    "checkerboard": _checkerboard_sample,
    "moons": _moons_sample,
    "spirals": _spirals_sample,
    "warped_gaussian": _warped_sample,
}
_LOG_PROBS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "ring": _ring_log_prob,
    "checkerboard": _checkerboard_log_prob,
    "moons": None,
    "spirals": None,
    "warped_gaussian": _warped_log_prob,  # bound to its dim by toy()
}
