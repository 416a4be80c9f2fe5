"""Built-in data: toy densities with exact log-densities, loaders for local files, image data.

* :func:`toy` draws samples from a named toy distribution (:data:`TOYS`) and, where the density is
  known in closed form, returns its exact log-density too, so a fitted flow can be scored by
  ``KL(p || q) = E_p[log p - log q]`` rather than by eye.
* :func:`load_array` reads a data matrix ``(N, D)`` from ``.npy``, ``.npz``, ``.csv`` or ``.txt``;
  :func:`load_data` resolves the strings the command line takes (``"builtin:ring"`` or a path).
* :func:`digits` (scikit-learn's bundled 8x8 digits, offline), :func:`mnist` and
  :func:`binarized_mnist` give standard image data. The MNIST files live under a data folder
  (:func:`data_home`) and are downloaded once, with checksums, when missing.

Sampling never touches the global RNG: each call uses its own ``torch.Generator``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "TOYS",
    "DataIntegrityError",
    "DataUnavailableError",
    "Toy",
    "binarized_mnist",
    "data_home",
    "digits",
    "load_array",
    "load_data",
    "mnist",
    "toy",
]

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------------------------
# Toy distributions
# ---------------------------------------------------------------------------------------------

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

# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------

_EXTENSIONS = (".npy", ".npz", ".csv", ".txt")


def load_array(path: PathLike, key: str | None = None) -> torch.Tensor:
    """Reads a data matrix from a ``.npy``, ``.npz``, ``.csv`` or ``.txt`` file.

    * ``.npy``: one array. ``.npz``: ``key`` names the array; it may be left out when the file
      holds exactly one. Both are read with ``allow_pickle=False``: pickled (object) arrays are
      refused, never unpickled.
    * ``.csv`` / ``.txt``: numbers separated by commas (when the first data line has a comma) or
      whitespace; lines starting with ``#`` are comments, and a first line that is not numeric
      (a header) is skipped.

    Args:
        path: the file.
        key: the array to read from a ``.npz`` file.

    Returns:
        A float32 tensor of shape ``(N, D)``; a 1-D array of length ``N`` becomes ``(N, 1)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, unreadable or non-numeric content, an array that is
            empty, not 1-D or 2-D, or holds NaN/inf, or a ``key`` that does not fit.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from pyroflows.datasets import load_array
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "data.csv")
        ...     with open(path, "w") as f:
        ...         _ = f.write("x,y\\n1,2\\n3,4\\n5,6\\n")
        ...     load_array(path)
        tensor([[1., 2.],
                [3., 4.],
                [5., 6.]])
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"expected an existing data file; got {str(path)!r} (not found)")
    if path.is_dir():
        raise IsADirectoryError(f"expected a data file; got the folder {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(
            f"expected a file ending in {', '.join(_EXTENSIONS)}; got {str(path)!r} "
            f"(extension {suffix or 'none'!r})"
        )
    if key is not None and suffix != ".npz":
        raise ValueError(
            f"expected key=None for a {suffix} file (key selects a .npz array); got {key!r}"
        )
    if suffix == ".npy":
        array = _read_npy(path)
    elif suffix == ".npz":
        array = _read_npz(path, key)
    else:
        array = _read_text(path)
    return _to_matrix(array, path)


def _check_magic(path: Path, magic: bytes, kind: str) -> None:
    # Without this, NumPy reads a file of another kind as a pickle and refuses that.
    with open(path, "rb") as f:
        if f.read(len(magic)) != magic:
            raise ValueError(f"expected a valid {kind} file; {str(path)!r} is not one")


def _read_npy(path: Path) -> np.ndarray:
    _check_magic(path, b"\x93NUMPY", ".npy")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(
                f"expected a numeric array in {str(path)!r}; got pickled (object) data, "
                "which is never loaded"
            ) from e
        raise ValueError(f"expected a valid .npy file; could not read {str(path)!r}: {e}") from e
    except (OSError, EOFError) as e:
        raise ValueError(f"expected a valid .npy file; could not read {str(path)!r}: {e}") from e


def _read_npz(path: Path, key: str | None) -> np.ndarray:
    _check_magic(path, b"PK", ".npz (zip)")
    invalid = f"expected a valid .npz file; could not read {str(path)!r}"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{invalid}: {e}") from e
    with archive:
        keys = list(archive.files)
        if not keys:
            raise ValueError(f"expected at least one array in {str(path)!r}; got an empty .npz")
        if key is None and len(keys) > 1:
            raise ValueError(
                f"expected key= to choose one of the arrays {keys} in {str(path)!r}; got key=None"
            )
        key = keys[0] if key is None else key
        if key not in keys:
            raise ValueError(f"expected key to be one of {keys} in {str(path)!r}; got {key!r}")
        try:
            return archive[key]
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ValueError(
                    f"expected a numeric array in {str(path)!r}; got pickled (object) data, "
                    "which is never loaded"
                ) from e
            raise ValueError(f"{invalid}: {e}") from e
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{invalid}: {e}") from e


def _read_text(path: Path) -> np.ndarray:
    """Numbers from a comma- or whitespace-separated file, skipping a non-numeric header."""
    skiprows, delimiter, header = 0, None, False
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = []
            for number, line in enumerate(f):
                stripped = line.strip()
                if stripped and not stripped.startswith("#"):
                    lines.append((number, stripped))
                    if len(lines) == 2:
                        break
    except UnicodeDecodeError as e:
        raise ValueError(
            f"expected a text file of numbers; got binary data in {str(path)!r}"
        ) from e
    if lines:
        number, first = lines[0]
        delimiter = "," if "," in first else None
        try:
            [float(field) for field in first.split(delimiter)]
        except ValueError:
            header, skiprows = True, number + 1
            if len(lines) > 1:
                delimiter = "," if "," in lines[1][1] else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": ours below
            return np.loadtxt(
                path,
                delimiter=delimiter,
                skiprows=skiprows,
                ndmin=2,
                dtype=np.float64,
                encoding="utf-8-sig",
            )
    except ValueError as e:
        what = "after the header line" if header else "(no header line was found)"
        raise ValueError(f"expected numbers in {str(path)!r} {what}; got: {e}") from e


def _to_matrix(array: np.ndarray, path: Path) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"expected a numeric (bool, integer or float) array in {str(path)!r}; "
            f"got dtype {array.dtype}"
        )
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(
            f"expected a 1-D or 2-D array (N, D) in {str(path)!r}; got shape {array.shape}. "
            "Reshape it to (N, D) first, e.g. x.reshape(len(x), -1)"
        )
    if array.size == 0:
        raise ValueError(f"expected a non-empty array in {str(path)!r}; got shape {array.shape}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
        matrix = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    bad = ~torch.isfinite(matrix)
    if bad.any():
        row = int(bad.any(-1).nonzero()[0, 0])
        raise ValueError(
            f"expected finite values in {str(path)!r}; got {int(bad.sum())} NaN or infinite "
            f"entries in float32 (first in row {row})"
        )
    return matrix


def load_data(
    spec: PathLike, n: int | None = None, seed: int | None = 0
) -> tuple[torch.Tensor, Toy | None]:
    """Resolves a data specification, as the command line takes it, to a data matrix.

    * ``"builtin:NAME"`` or ``"builtin:NAME:DIM"``: ``n`` samples (default 10,000) of
      :func:`toy` ``NAME`` (``DIM`` sets its dimension) drawn with ``seed``; the :class:`Toy` is
      returned too, for its exact ``log_prob``.
    * a path: :func:`load_array`; ``"file.npz:KEY"`` selects an array of an ``.npz`` file. With
      ``n``, ``n`` rows are drawn at random without replacement (with ``seed``), so sorted files
      give a representative subset.

    Args:
        spec: ``"builtin:NAME[:DIM]"`` or a path.
        n: number of samples or rows; ``None`` for 10,000 toy samples or the whole file.
        seed: seed for sampling or for choosing rows.

    Returns:
        ``(data, toy)``: float32 data ``(N, D)`` and the :class:`Toy`, or ``None`` for a file.

    Example:
        >>> from pyroflows.datasets import load_data
        >>> x, truth = load_data("builtin:checkerboard", n=500)
        >>> x.shape, truth.name
        (torch.Size([500, 2]), 'checkerboard')
        >>> load_data("builtin:warped_gaussian:4", n=10)[0].shape
        torch.Size([10, 4])
    """
    text = os.fspath(spec)
    if isinstance(text, str) and text.startswith("builtin:"):
        name, _, dim_text = text[len("builtin:") :].partition(":")
        dim = None
        if dim_text:
            try:
                dim = int(dim_text)
            except ValueError:
                raise ValueError(
                    "expected 'builtin:NAME' or 'builtin:NAME:DIM' with an integer DIM; "
                    f"got {text!r}"
                ) from None
        if name not in TOYS:
            raise ValueError(f"expected 'builtin:NAME' with NAME in {TOYS}; got {text!r}")
        result = toy(name, 10_000 if n is None else n, seed=seed, dim=dim)
        return result.samples, result
    path, key = Path(text), None
    if not path.exists() and isinstance(text, str):
        head, sep, tail = text.rpartition(":")
        if sep and head.lower().endswith(".npz") and tail:
            path, key = Path(head), tail
    data = load_array(path, key)
    if n is not None:
        _check_positive_int(n, "the number of rows n")
        if n > len(data):
            raise ValueError(f"expected n <= {len(data)} (the rows in {str(path)!r}); got n={n}")
        data = data[torch.randperm(len(data), generator=_generator(seed))[:n]]
    return data, None


# ---------------------------------------------------------------------------------------------
# Image data
# ---------------------------------------------------------------------------------------------


def digits() -> torch.Tensor:
    """scikit-learn's bundled 8x8 handwritten digits (offline; needs scikit-learn).

    Returns:
        float32 tensor ``(1797, 64)`` with values 0..16 (images flattened row-major).

    Example:
        >>> from pyroflows.datasets import digits
        >>> digits().shape  # doctest: +SKIP
        torch.Size([1797, 64])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("digits() needs scikit-learn: pip install scikit-learn") from e
    return torch.as_tensor(load_digits().data, dtype=torch.float32)


class DataUnavailableError(FileNotFoundError):
    """A data set is not on disk and could not be downloaded; the message says where to put it."""


class DataIntegrityError(RuntimeError):
    """A data file failed its checks (checksum, shape, dtype, keys, or it is not readable)."""


def data_home(data_dir: PathLike | None = None) -> Path:
    """The folder that holds downloaded data sets.

    ``data_dir`` when given, else the environment variable ``PYROFLOWS_DATA``, else
    ``$XDG_CACHE_HOME/pyroflows``, else ``~/.cache/pyroflows``. The folder need not exist.

    Example:
        >>> from pyroflows.datasets import data_home
        >>> str(data_home("/data/sets"))
        '/data/sets'
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("PYROFLOWS_DATA"):
        return Path(os.environ["PYROFLOWS_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return base / "pyroflows"


# MNIST: the original IDX files. The MD5s are those of the decompressed, official files, so a
# copy re-compressed by any mirror (or already decompressed) is accepted too.
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirror
    "http://yann.lecun.com/exdb/mnist/",  # the original site (often refuses downloads now)
)
_MNIST_FILES = {  # file: (npz key, IDX magic number, shape, MD5 of the uncompressed bytes)
    "train-images-idx3-ubyte.gz": (
        "x_train",
        2051,
        (60000, 28, 28),
        "6bbc9ace898e44ae57da46a324031adb",
    ),
    "train-labels-idx1-ubyte.gz": ("y_train", 2049, (60000,), "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte.gz": (
        "x_test",
        2051,
        (10000, 28, 28),
        "2646ac647ad5339dbf082846283269ea",
    ),
    "t10k-labels-idx1-ubyte.gz": ("y_test", 2049, (10000,), "27ae3e4e09519cfbb04c329615203637"),
}
_BINARIZED_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_BINARIZED = {  # split: (rows, MD5 of the bytes of the uint8 (rows, 784) array)
    "train": (50000, "8d4f0427d6c2572b5e9994e08bad66de"),
    "valid": (10000, "3e33becd40c694040e5e6c812e2f4b50"),
    "test": (10000, "fc34623e13bd64fed2f8b61365198339"),
}


def mnist(
    split: str = "train", data_dir: PathLike | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST (LeCun, Cortes & Burges, 1998): 60,000 training and 10,000 test digits.

    Read from ``<data_dir>/mnist/mnist.npz`` (uint8 arrays ``x_train``, ``y_train``, ``x_test``,
    ``y_test``, laid out as Keras' ``mnist.npz``), with the folder as :func:`data_home` resolves
    ``data_dir``. When the file is missing and ``download`` is true, the four original IDX files
    are downloaded (from torchvision's ``ossci-datasets`` mirror, else ``yann.lecun.com``),
    checked against the MD5s of the official files, and converted; IDX files already in
    ``<data_dir>/mnist/`` (``.gz`` or not) are used instead of downloading them.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: the data folder (see :func:`data_home`).
        download: download the data when it is missing.

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` with values 0..255 (0 is background), and
        uint8 ``(N,)`` with values 0..9; ``N`` is 60,000 (train) or 10,000 (test).

    Raises:
        DataUnavailableError: the data is missing and could not be downloaded (the message says
            which files to put in which folder).
        DataIntegrityError: a file failed its checksum, shape or dtype checks.

    References:
        Gradient-Based Learning Applied to Document Recognition (LeCun, Bottou, Bengio &
        Haffner, 1998).

    Example:
        >>> from pyroflows.datasets import mnist
        >>> images, labels = mnist("test")  # doctest: +SKIP
        >>> images.shape, images.dtype, labels.shape  # doctest: +SKIP
        (torch.Size([10000, 28, 28]), torch.uint8, torch.Size([10000]))
    """
    if split not in ("train", "test"):
        raise ValueError(
            "expected split 'train' or 'test' (MNIST has no validation split; "
            f"binarized_mnist has one); got {split!r}"
        )
    folder = data_home(data_dir) / "mnist"
    path = folder / "mnist.npz"
    if not path.exists():
        if not download:
            raise DataUnavailableError(_mnist_help(folder, f"{path} is missing and download=False"))
        _build_mnist(folder)
    keys = (f"x_{split}", f"y_{split}")
    shapes = {key: shape for key, _, shape, _ in _MNIST_FILES.values()}
    images, labels = _load_checked(path, {key: shapes[key] for key in keys})
    if labels.max() > 9:
        raise DataIntegrityError(
            f"expected labels 0..9 in {path}[{keys[1]!r}]; got a maximum of {labels.max()}. {_FIX}"
        )
    return torch.from_numpy(images), torch.from_numpy(labels)


def binarized_mnist(
    split: str = "train", data_dir: PathLike | None = None, download: bool = True
) -> torch.Tensor:
    """The fixed binarization of MNIST (Salakhutdinov & Murray, 2008), 50k/10k/10k.

    The standard benchmark for log-likelihoods of binary-image models (NADE, VAE, IWAE). Read
    from ``<data_dir>/mnist/binarized_mnist.npz`` (uint8 arrays ``train``, ``valid``, ``test``,
    and ``test_labels``, ``test_source_index``). When missing and ``download`` is true,
    Larochelle's ``binarized_mnist_{train,valid,test}.amat`` are downloaded, checked against the
    MD5s of the arrays and converted; the test labels come from MNIST's
    ``t10k-labels-idx1-ubyte.gz`` (or an existing ``mnist.npz``). The ``test`` rows are sorted by
    label: shuffle them before taking subsets or mini-batches.

    Args:
        split: ``"train"``, ``"valid"`` or ``"test"``.
        data_dir: the data folder (see :func:`data_home`).
        download: download the data when it is missing.

    Returns:
        uint8 tensor ``(N, 784)`` of 0s and 1s (28x28 images flattened row-major); ``N`` is
        50,000 (train) or 10,000 (valid, test).

    Raises:
        DataUnavailableError: the data is missing and could not be downloaded (the message says
            which files to put in which folder).
        DataIntegrityError: a file failed its checksum, shape or dtype checks.

    References:
        On the Quantitative Analysis of Deep Belief Networks (Salakhutdinov & Murray, 2008).
        The Neural Autoregressive Distribution Estimator (Larochelle & Murray, 2011).

    Example:
        >>> from pyroflows.datasets import binarized_mnist
        >>> binarized_mnist("valid").shape  # doctest: +SKIP
        torch.Size([10000, 784])
    """
    if split not in _BINARIZED:
        raise ValueError(f"expected split 'train', 'valid' or 'test'; got {split!r}")
    folder = data_home(data_dir) / "mnist"
    path = folder / "binarized_mnist.npz"
    if not path.exists():
        if not download:
            raise DataUnavailableError(
                _binarized_help(folder, f"{path} is missing and download=False")
            )
        _build_binarized(folder)
    (array,) = _load_checked(path, {split: (_BINARIZED[split][0], 784)})
    if array.max() > 1:
        raise DataIntegrityError(
            f"expected values 0 and 1 in {path}[{split!r}]; got a maximum of {array.max()}. {_FIX}"
        )
    return torch.from_numpy(array)


_FIX = "Delete the file to download it again, or replace it."


def _load_checked(path: Path, shapes: dict[str, tuple[int, ...]]) -> list[np.ndarray]:
    """The arrays named in ``shapes`` from an ``.npz`` file, checked to be uint8 of that shape."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in shapes if key not in archive.files]
            if missing:
                raise DataIntegrityError(
                    f"expected arrays {list(shapes)} in {path}; got {archive.files} "
                    f"(missing {missing}). {_FIX}"
                )
            arrays = [archive[key] for key in shapes]
    except DataIntegrityError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataIntegrityError(
            f"expected a readable .npz file at {path}; got: {e}. {_FIX}"
        ) from e
    for (key, shape), array in zip(shapes.items(), arrays, strict=True):
        if array.dtype != np.uint8 or array.shape != shape:
            raise DataIntegrityError(
                f"expected {path}[{key!r}] to be uint8 {shape}; got {array.dtype} {array.shape}. "
                f"{_FIX}"
            )
    return arrays


# downloading ---------------------------------------------------------------------------------


def _mnist_help(folder: Path, reason: str) -> str:
    return (
        f"MNIST is not available: {reason}.\n"
        "To use it offline, put either mnist.npz (uint8 arrays x_train (60000, 28, 28), y_train "
        "(60000,), x_test (10000, 28, 28), y_test (10000,), as Keras' mnist.npz) or the four "
        f"original files\n    {', '.join(_MNIST_FILES)}\n"
        f"(from {' or '.join(_MNIST_MIRRORS)}) into the folder\n    {folder}\n"
        "or set the environment variable PYROFLOWS_DATA to a folder whose mnist/ subfolder holds "
        "them (or pass data_dir=...)."
    )


def _binarized_help(folder: Path, reason: str) -> str:
    files = ", ".join(f"binarized_mnist_{split}.amat" for split in _BINARIZED)
    return (
        f"Binarized MNIST is not available: {reason}.\n"
        "To use it offline, put either binarized_mnist.npz (uint8 arrays train (50000, 784), "
        "valid (10000, 784), test (10000, 784)), or Larochelle's files\n"
        f"    {files}\n(from {_BINARIZED_URL}) together with t10k-labels-idx1-ubyte.gz or "
        f"mnist.npz (for the test labels), into the folder\n    {folder}\n"
        "or set the environment variable PYROFLOWS_DATA to a folder whose mnist/ subfolder holds "
        "them (or pass data_dir=...)."
    )


class _DownloadFailed(Exception):
    """Internal: every URL for a file failed; the message gives the reasons."""


def _fetch(url: str, dest: Path) -> None:
    """Downloads ``url`` to ``dest`` with a progress bar; ``dest`` appears only when complete."""
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _obtain(folder: Path, name: str, urls: list[str]) -> tuple[bytes, Path, bool]:
    """The bytes of ``folder/name`` (downloaded first when absent), its path, and whether we
    downloaded it. For a ``.gz`` name an uncompressed copy in the folder is accepted too."""
    for path in dict.fromkeys([folder / name, folder / name.removesuffix(".gz")]):
        if path.is_file():
            return path.read_bytes(), path, False
    reasons = []
    for url in urls:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _fetch(url, folder / name)
            return (folder / name).read_bytes(), folder / name, True
        except (OSError, http.client.HTTPException, ValueError) as e:
            reasons.append(f"{url}: {type(e).__name__}: {e}")
    raise _DownloadFailed("; ".join(reasons))


def _reject(path: Path, downloaded: bool, problem: str, help_text: str) -> DataIntegrityError:
    """The error for a file that failed its check; a file we downloaded is removed first."""
    if downloaded:
        path.unlink(missing_ok=True)
        where = f"the downloaded file {path.name} failed its check and was removed"
    else:
        where = f"the file {path} failed its check (replace or delete it)"
    return DataIntegrityError(f"{where}: {problem}.\n{help_text}")


def _read_idx(
    folder: Path, name: str, help_for: Callable[[str], str]
) -> tuple[np.ndarray, Path | None]:
    """One MNIST IDX file as an array, downloaded if needed and verified by MD5; also the path
    of the file when we downloaded it (to remove once converted)."""
    _, magic, shape, md5 = _MNIST_FILES[name]
    try:
        raw, path, downloaded = _obtain(folder, name, [mirror + name for mirror in _MNIST_MIRRORS])
    except _DownloadFailed as e:
        raise DataUnavailableError(help_for(f"downloading {name} failed ({e})")) from None
    try:
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        problem = f"not a valid gzip file ({e})"
        raise _reject(path, downloaded, problem, help_for("corrupt file")) from e
    got = hashlib.md5(data).hexdigest()
    if got != md5:
        problem = f"expected MD5 {md5} of the uncompressed IDX bytes; got {got}"
        raise _reject(path, downloaded, problem, help_for("corrupt file"))
    header = 4 * (1 + len(shape))
    head = np.frombuffer(data[:header], dtype=">u4")
    if head[0] != magic or tuple(head[1:]) != shape:  # cannot happen once the MD5 matched
        raise DataIntegrityError(f"unexpected IDX header {head.tolist()} in {path}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    return array, path if downloaded else None


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Writes a compressed ``.npz`` atomically (no reader sees a half-written file)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.part", delete=False) as f:
        tmp = Path(f.name)
        np.savez_compressed(f, **arrays)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build_mnist(folder: Path) -> None:
    arrays, downloaded = {}, []
    for name, (key, *_) in _MNIST_FILES.items():
        arrays[key], path = _read_idx(folder, name, lambda r: _mnist_help(folder, r))
        downloaded += [path] if path else []
    _write_npz(folder / "mnist.npz", **arrays)
    for path in downloaded:  # keep files the user put there; drop our raw downloads
        path.unlink(missing_ok=True)


def _parse_amat(raw: bytes) -> np.ndarray:
    """Larochelle's ``.amat``: one image a line, 784 whitespace-separated 0s and 1s."""
    codes = np.frombuffer(raw, dtype=np.uint8)
    if codes.size % 2 == 0:  # the fast path: "d d d ... d\n" with d in {0, 1}
        values, separators = codes[0::2], codes[1::2]
        newline = separators == ord("\n")
        if ((values | 1) == ord("1")).all() and (newline | (separators == ord(" "))).all():
            rows = int(np.count_nonzero(newline))
            if values.size == 784 * rows:
                return (values - ord("0")).reshape(rows, 784)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an empty file: caught by the shape check
        values = np.loadtxt(io.BytesIO(raw), ndmin=2)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("expected only 0s and 1s")
    return values.astype(np.uint8)


def _build_binarized(folder: Path) -> None:
    def help_for(reason: str) -> str:
        return _binarized_help(folder, reason)

    arrays, downloaded = {}, []
    for split, (rows, md5) in _BINARIZED.items():
        name = f"binarized_mnist_{split}.amat"
        try:
            raw, path, fresh = _obtain(folder, name, [_BINARIZED_URL + name])
        except _DownloadFailed as e:
            raise DataUnavailableError(help_for(f"downloading {name} failed ({e})")) from None
        try:
            array = _parse_amat(raw)
        except (ValueError, UnicodeDecodeError) as e:
            problem = f"not a table of 0s and 1s ({e})"
            raise _reject(path, fresh, problem, help_for("corrupt file")) from e
        if array.shape != (rows, 784):
            problem = f"expected a {rows} x 784 table; got {array.shape[0]} x {array.shape[1]}"
            raise _reject(path, fresh, problem, help_for("corrupt file"))
        got = hashlib.md5(array.tobytes()).hexdigest()
        if got != md5:
            problem = f"expected MD5 {md5} of the uint8 array; got {got}"
            raise _reject(path, fresh, problem, help_for("corrupt file"))
        arrays[split] = array
        downloaded += [path] if fresh else []
    if (folder / "mnist.npz").exists():
        shape = _MNIST_FILES["t10k-labels-idx1-ubyte.gz"][2]
        (y_test,) = _load_checked(folder / "mnist.npz", {"y_test": shape})
    else:
        y_test, path = _read_idx(folder, "t10k-labels-idx1-ubyte.gz", help_for)
        downloaded += [path] if path else []
    order = np.argsort(y_test, kind="stable").astype(np.int32)
    _write_npz(
        folder / "binarized_mnist.npz",
        **arrays,
        test_labels=y_test[order],
        test_source_index=order,
    )
    for path in downloaded:
        path.unlink(missing_ok=True)
