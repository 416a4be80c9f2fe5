"""Standard image data: scikit-learn's digits, MNIST and the fixed binarized MNIST."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataIntegrityError",
    "DataUnavailableError",
    "binarized_mnist",
    "data_home",
    "digits",
    "mnist",
]

PathLike = str | os.PathLike


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
