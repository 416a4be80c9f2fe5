"""Image data: shared copies, download failure and checksum paths."""

import gzip
import hashlib
import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pyroflows import datasets
from pyroflows.datasets import (
    DataIntegrityError,
    DataUnavailableError,
    binarized_mnist,
    data_home,
    digits,
    mnist,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared_mnist = pytest.mark.skipif(
    not (SHARED_DATA / "mnist" / "mnist.npz").exists(),
    reason=f"shared MNIST files not found under {SHARED_DATA} (CI clones shared/ beside the repo)",
)


def test_digits():
    pytest.importorskip("sklearn")
    x = digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 16


def test_digits_without_scikit_learn(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits()


def test_data_home(monkeypatch, tmp_path):
    assert data_home(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("PYROFLOWS_DATA", str(tmp_path / "env"))
    assert data_home() == tmp_path / "env"
    monkeypatch.delenv("PYROFLOWS_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_home() == tmp_path / "cache" / "pyroflows"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_home() == tmp_path / "home" / ".cache" / "pyroflows"


@needs_shared_mnist
def test_mnist_from_shared_data(monkeypatch):
    monkeypatch.setenv("PYROFLOWS_DATA", str(SHARED_DATA))
    x_train, y_train = mnist("train", download=False)
    x_test, y_test = mnist("test")
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == y_train.dtype == torch.uint8 and y_test.shape == (10000,)
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(y_test.long()).tolist() == counts
    assert torch.bincount(y_train.long()).tolist()[:3] == [5923, 6742, 5958]
    # The official files' MD5s, which a download is checked against, hold for these arrays.
    for name, (key, magic, shape, md5) in datasets.images._MNIST_FILES.items():
        array = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}[key]
        idx = np.array([magic, *shape], ">u4").tobytes() + array.numpy().tobytes()
        assert hashlib.md5(idx).hexdigest() == md5, name


@needs_shared_mnist
def test_binarized_mnist_from_shared_data(monkeypatch):
    monkeypatch.setenv("PYROFLOWS_DATA", str(SHARED_DATA))
    for split, (rows, md5) in datasets.images._BINARIZED.items():
        x = binarized_mnist(split, download=False)
        assert x.shape == (rows, 784) and x.dtype == torch.uint8 and x.max() == 1
        assert hashlib.md5(x.numpy().tobytes()).hexdigest() == md5
    assert binarized_mnist("test").float().mean().item() == pytest.approx(0.1325, abs=1e-4)


def test_split_validation(tmp_path):
    with pytest.raises(ValueError, match=r"expected split 'train' or 'test' .*got 'valid'"):
        mnist("valid", data_dir=tmp_path)
    with pytest.raises(ValueError, match="expected split 'train', 'valid' or 'test'; got 'dev'"):
        binarized_mnist("dev", data_dir=tmp_path)


@pytest.mark.parametrize("load", [mnist, binarized_mnist], ids=["mnist", "binarized"])
def test_offline_failure_is_one_clear_error(load, tmp_path, monkeypatch):
    monkeypatch.delenv("PYROFLOWS_DATA", raising=False)
    folder = str(tmp_path / "mnist")
    with pytest.raises(DataUnavailableError) as info:
        load("test", data_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert folder in message and "PYROFLOWS_DATA" in message and "network disabled" in message
    needed = "t10k-images-idx3-ubyte.gz" if load is mnist else "binarized_mnist_train.amat"
    assert needed in message
    assert not list((tmp_path / "mnist").glob("*.part"))  # no half-written leftovers
    with pytest.raises(DataUnavailableError, match="download=False") as info:
        load("test", data_dir=tmp_path, download=False)
    assert folder in str(info.value) and "PYROFLOWS_DATA" in str(info.value)


class _Response(io.BytesIO):
    """What ``urlopen`` returns, enough for the fetch helper."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def _serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """Makes ``urlopen`` serve ``files`` by base name (404 otherwise); returns the URLs asked."""
    asked = []

    def urlopen(url, *args, **kwargs):
        asked.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return _Response(files[name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


def _idx(array: np.ndarray, magic: int) -> bytes:
    return gzip.compress(np.array([magic, *array.shape], ">u4").tobytes() + array.tobytes())


def _tiny_mnist(monkeypatch):
    """Shrinks the expected MNIST files to tiny fakes (with their MD5s); returns the arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 6, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "y_test": np.array([3, 1, 3, 0], dtype=np.uint8),
    }
    table, files = {}, {}
    for name, (key, magic, _, _) in datasets.images._MNIST_FILES.items():
        files[name] = _idx(arrays[key], magic)
        md5 = hashlib.md5(gzip.decompress(files[name])).hexdigest()
        table[name] = (key, magic, arrays[key].shape, md5)
    monkeypatch.setattr(datasets.images, "_MNIST_FILES", table)
    return arrays, files


def test_mnist_download_converts_and_cleans_up(tmp_path, monkeypatch):
    arrays, files = _tiny_mnist(monkeypatch)
    asked = _serve(monkeypatch, files)
    images, labels = mnist("test", data_dir=tmp_path)
    assert torch.equal(images, torch.from_numpy(arrays["x_test"]))
    assert torch.equal(labels, torch.from_numpy(arrays["y_test"]))
    assert len(asked) == 4 and asked[0].startswith(datasets.images._MNIST_MIRRORS[0])
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == ["mnist.npz"]
    with np.load(tmp_path / "mnist" / "mnist.npz") as saved:
        assert sorted(saved.files) == ["x_test", "x_train", "y_test", "y_train"]
    mnist("train", data_dir=tmp_path)  # now offline: served from the npz
    assert len(asked) == 4


def test_mnist_falls_back_to_the_second_mirror(tmp_path, monkeypatch):
    _, files = _tiny_mnist(monkeypatch)
    first = datasets.images._MNIST_MIRRORS[0]

    def urlopen(url, *args, **kwargs):
        if url.startswith(first):
            raise urllib.error.URLError("mirror down")
        return _Response(files[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert mnist("train", data_dir=tmp_path)[0].shape == (6, 28, 28)


def test_mnist_uses_raw_files_put_in_the_folder(tmp_path, monkeypatch):
    arrays, files = _tiny_mnist(monkeypatch)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, data in files.items():  # one decompressed, as a user might leave it
        if name.startswith("t10k-labels"):
            (folder / name.removesuffix(".gz")).write_bytes(gzip.decompress(data))
        else:
            (folder / name).write_bytes(data)
    assert torch.equal(mnist("test", data_dir=tmp_path)[1], torch.from_numpy(arrays["y_test"]))
    assert (folder / "train-images-idx3-ubyte.gz").exists()  # the user's files are kept


def test_mnist_checksum_mismatch(tmp_path, monkeypatch):
    _, files = _tiny_mnist(monkeypatch)
    files["t10k-images-idx3-ubyte.gz"] = _idx(np.zeros((4, 28, 28), np.uint8), 2051)
    _serve(monkeypatch, files)
    with pytest.raises(DataIntegrityError, match=r"t10k-images-idx3-ubyte\.gz failed its check"):
        mnist("test", data_dir=tmp_path)
    folder = tmp_path / "mnist"
    assert not (folder / "t10k-images-idx3-ubyte.gz").exists()  # the bad download is removed
    assert not (folder / "mnist.npz").exists() and not list(folder.glob("*.part"))
    files["t10k-images-idx3-ubyte.gz"] = b"not gzip at all"
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken gzip")
    with pytest.raises(
        DataIntegrityError, match=r"failed its check \(replace or delete it\).*gzip"
    ):
        mnist("test", data_dir=tmp_path)
    assert (folder / "t10k-images-idx3-ubyte.gz").exists()  # a user's file is never deleted


def _amat(array: np.ndarray) -> bytes:
    return "".join(" ".join(map(str, row)) + "\n" for row in array).encode()


def test_binarized_download_converts(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    splits = {
        s: rng.integers(0, 2, (n, 784), dtype=np.uint8)
        for s, n in [("train", 5), ("valid", 3), ("test", 4)]
    }
    table = {s: (len(a), hashlib.md5(a.tobytes()).hexdigest()) for s, a in splits.items()}
    monkeypatch.setattr(datasets.images, "_BINARIZED", table)
    _, mnist_files = _tiny_mnist(monkeypatch)
    files = {f"binarized_mnist_{s}.amat": _amat(a) for s, a in splits.items()}
    files["t10k-labels-idx1-ubyte.gz"] = mnist_files["t10k-labels-idx1-ubyte.gz"]
    files["binarized_mnist_valid.amat"] = files["binarized_mnist_valid.amat"].replace(b"\n", b" \n")
    _serve(monkeypatch, files)
    for split, array in splits.items():
        assert torch.equal(binarized_mnist(split, data_dir=tmp_path), torch.from_numpy(array))
    folder = tmp_path / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == ["binarized_mnist.npz"]
    with np.load(folder / "binarized_mnist.npz") as saved:
        assert saved["test_source_index"].tolist() == [3, 1, 0, 2]  # stable sort of [3, 1, 3, 0]
        assert saved["test_labels"].tolist() == [0, 1, 3, 3]


def test_binarized_rejects_a_wrong_file(tmp_path, monkeypatch):
    _serve(monkeypatch, {"binarized_mnist_train.amat": b"0 1 0\n1 1 0\n"})
    with pytest.raises(DataIntegrityError, match=r"binarized_mnist_train\.amat failed its check"):
        binarized_mnist("train", data_dir=tmp_path)
    _serve(monkeypatch, {"binarized_mnist_train.amat": b"0 2 0\n"})
    with pytest.raises(DataIntegrityError, match="not a table of 0s and 1s"):
        binarized_mnist("train", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (None, "expected a readable .npz file"),
        ({"x_train": np.zeros(3, np.uint8)}, r"missing \['x_test', 'y_test'\]"),
        (
            {"x_test": np.zeros((10000, 28, 28), np.float32), "y_test": np.zeros(10000, np.uint8)},
            r"to be uint8 \(10000, 28, 28\); got float32",
        ),
        (
            {"x_test": np.zeros((10000, 28, 28), np.uint8), "y_test": np.full(10000, 10, np.uint8)},
            "expected labels 0..9",
        ),
    ],
)
def test_corrupt_or_mismatched_mnist_file(tmp_path, arrays, match):
    folder = tmp_path / "mnist"
    folder.mkdir()
    if arrays is None:
        (folder / "mnist.npz").write_bytes(b"garbage")
    else:
        np.savez(folder / "mnist.npz", **arrays)
    with pytest.raises(DataIntegrityError, match=match):
        mnist("test", data_dir=tmp_path)


def test_binarized_file_with_values_above_one(tmp_path):
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "binarized_mnist.npz", valid=np.full((10000, 784), 2, np.uint8))
    with pytest.raises(DataIntegrityError, match="expected values 0 and 1"):
        binarized_mnist("valid", data_dir=tmp_path)
