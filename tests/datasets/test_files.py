"""File loaders and load_data specs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pyroflows.datasets import (
    load_array,
    load_data,
    toy,
)


def test_npy_round_trip(tmp_path):
    data = np.arange(12, dtype=np.int64).reshape(4, 3)
    np.save(tmp_path / "a.npy", data)
    out = load_array(tmp_path / "a.npy")
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(data).float())
    np.save(tmp_path / "b.npy", np.linspace(0, 1, 5))
    assert load_array(str(tmp_path / "b.npy")).shape == (5, 1)  # 1-D becomes (N, 1)


def test_npz_round_trip_and_key_selection(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(6, 2)), np.ones(6)
    np.savez(tmp_path / "one.npz", data=x)
    torch.testing.assert_close(load_array(tmp_path / "one.npz"), torch.from_numpy(x).float())
    np.savez(tmp_path / "two.npz", x=x, y=y)
    assert load_array(tmp_path / "two.npz", key="y").shape == (6, 1)
    with pytest.raises(ValueError, match=r"expected key= to choose one of the arrays \['x', 'y'\]"):
        load_array(tmp_path / "two.npz")
    with pytest.raises(ValueError, match=r"expected key to be one of \['x', 'y'\].*got 'z'"):
        load_array(tmp_path / "two.npz", key="z")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="expected at least one array"):
        load_array(tmp_path / "none.npz")


@pytest.mark.parametrize(
    ("text", "suffix"),
    [
        ("1,2,3\n4,5,6\n", ".csv"),
        ("a,b,c\n1,2,3\n4,5,6\n", ".csv"),  # header skipped
        ('"x","y","z"\r\n1,2,3\r\n4,5,6\r\n', ".csv"),  # quoted header, CRLF
        ("# comment\n\n1 2 3\n4\t5  6\n", ".txt"),  # whitespace, comments, blank lines
        ("x y z\n1 2 3\n4 5 6\n", ".TXT"),
    ],
)
def test_text_round_trip(tmp_path, text, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(text, newline="")
    torch.testing.assert_close(load_array(path), torch.tensor([[1.0, 2, 3], [4, 5, 6]]))


def test_text_single_column(tmp_path):
    (tmp_path / "c.csv").write_text("value\n1.5\n2.5\n")
    assert torch.equal(load_array(tmp_path / "c.csv"), torch.tensor([[1.5], [2.5]]))


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        np.save(path, content, allow_pickle=True)
    return path


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("d.parquet", b"PAR1", ValueError, r"expected a file ending in .npy, .npz, .csv, .txt"),
        ("d.csv", "1,2\n3,x\n", ValueError, r"expected numbers in .*d\.csv"),
        ("d.csv", "1,2\n3,4,5\n", ValueError, r"expected numbers in .*d\.csv"),
        ("d.csv", "", ValueError, r"expected a non-empty array .*shape \(0, "),
        ("d.csv", "a,b\n", ValueError, r"expected a non-empty array"),
        ("d.txt", b"\xff\xfe\x00\x01binary", ValueError, "expected a text file of numbers"),
        ("d.csv", "1,2\nnan,4\n", ValueError, r"expected finite values .*first in row 1"),
        ("d.npy", np.zeros((0, 3)), ValueError, r"expected a non-empty array .*\(0, 3\)"),
        ("d.npy", np.zeros((2, 3, 4)), ValueError, r"got shape \(2, 3, 4\)\. Reshape it"),
        ("d.npy", np.float64(3.0), ValueError, r"expected a 1-D or 2-D array .*got shape \(\)"),
        ("d.npy", np.array(["a", "b"]), ValueError, "expected a numeric .* got dtype <U1"),
        ("d.npy", np.array([1j, 2j]), ValueError, "expected a numeric .* got dtype complex128"),
        ("d.npy", np.array([{}, None], dtype=object), ValueError, "pickled .* never loaded"),
        ("d.npy", b"not an npy file", ValueError, "expected a valid .npy file"),
        ("d.npz", b"not a zip file", ValueError, "expected a valid .npz .zip. file"),
        ("d.npz", b"PK\x03\x04 truncated", ValueError, "expected a valid .npz file; could not"),
        ("d.npy", np.array([1e39, 1.0]), ValueError, "expected finite values .*float32"),
    ],
)
def test_load_array_errors(tmp_path, name, content, error, match):
    path = _write(tmp_path / name, content)
    with pytest.raises(error, match=match):
        load_array(path)


def test_load_array_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected an existing data file; got .*nope\.npy"):
        load_array(tmp_path / "nope.npy")
    with pytest.raises(IsADirectoryError, match="expected a data file; got the folder"):
        load_array(tmp_path)
    np.save(tmp_path / "a.npy", np.ones(3))
    with pytest.raises(ValueError, match=r"expected key=None for a \.npy file .*got 'x'"):
        load_array(tmp_path / "a.npy", key="x")


def test_object_npz_is_refused_not_unpickled(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.array([{}, None], dtype=object))
    with pytest.raises(ValueError, match="never loaded"):
        load_array(tmp_path / "o.npz")


def test_load_data_builtin():
    x, truth = load_data("builtin:ring")
    assert x.shape == (10_000, 2) and truth.name == "ring" and truth.samples is x
    x, truth = load_data("builtin:warped_gaussian:3", n=50, seed=4)
    assert x.shape == (50, 3) and truth.dim == 3
    assert torch.equal(x, toy("warped_gaussian", 50, seed=4, dim=3).samples)
    assert load_data("builtin:moons", n=5)[1].log_prob is None


def test_load_data_file(tmp_path):
    data = np.arange(20.0).reshape(10, 2)
    np.save(tmp_path / "d.npy", data)
    x, truth = load_data(str(tmp_path / "d.npy"))
    assert truth is None and torch.equal(x, torch.from_numpy(data).float())
    sub, _ = load_data(tmp_path / "d.npy", n=4, seed=1)
    assert sub.shape == (4, 2) and torch.equal(sub, load_data(tmp_path / "d.npy", n=4, seed=1)[0])
    assert {tuple(r) for r in sub.tolist()} <= {tuple(r) for r in x.tolist()}
    np.savez(tmp_path / "e.npz", a=data, b=data[:3])
    assert load_data(f"{tmp_path / 'e.npz'}:b")[0].shape == (3, 2)


@pytest.mark.parametrize(
    ("spec", "n", "error", "match"),
    [
        (
            "builtin:swiss",
            None,
            ValueError,
            r"expected 'builtin:NAME' with NAME in .*'builtin:swiss'",
        ),
        ("builtin:warped_gaussian:x", None, ValueError, "with an integer DIM; got"),
        ("builtin:ring:3", None, ValueError, "expected dim=2"),
        ("builtin:ring", -1, ValueError, "positive integer"),
        ("missing.csv", None, FileNotFoundError, "expected an existing data file"),
    ],
)
def test_load_data_errors(spec, n, error, match):
    with pytest.raises(error, match=match):
        load_data(spec, n=n)


def test_load_data_n_larger_than_file(tmp_path):
    np.save(tmp_path / "d.npy", np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"expected n <= 3 .*got n=5"):
        load_data(tmp_path / "d.npy", n=5)
