"""Loaders for data files (``.npy``, ``.npz``, ``.csv``, ``.txt``) and data specs."""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .toys import TOYS, Toy, _check_positive_int, _generator, toy

__all__ = ["load_array", "load_data"]

PathLike = str | os.PathLike

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
