"""Built-in data: toy densities (normalisation, agreement with samples, seeding), file loaders,
``load_data``, and the image data sets (shared copies, and download failure / checksum paths)."""

import gzip
import hashlib
import io
import math
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pyroflows import datasets
from pyroflows.datasets import (
    TOYS,
    DataIntegrityError,
    DataUnavailableError,
    Toy,
    binarized_mnist,
    data_home,
    digits,
    load_array,
    load_data,
    mnist,
    toy,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_mnist = pytest.mark.skipif(
    not (SHARED_DATA / "mnist" / "mnist.npz").exists(),
    reason=f"shared MNIST files not found under {SHARED_DATA} (CI clones shared/ beside the repo)",
)
EXACT_2D = ("ring", "checkerboard")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test may reach the network; download tests serve their own responses."""

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------------------------------------
# toys
# ---------------------------------------------------------------------------------------------


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
    x = datasets._warp_forward(z)
    log_prob = toy("warped_gaussian", 1, dim=dim).log_prob
    for zi, xi in zip(z, x, strict=True):
        jac = torch.autograd.functional.jacobian(datasets._warp_forward, zi)
        log_normal = torch.distributions.Normal(0.0, 1.0).log_prob(zi).sum()
        expected = log_normal - torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(log_prob(xi), expected, rtol=1e-10, atol=1e-10)
    z_back, _ = datasets._warp_inverse(x)
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


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# load_data
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# image data
# ---------------------------------------------------------------------------------------------


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
    for name, (key, magic, shape, md5) in datasets._MNIST_FILES.items():
        array = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}[key]
        idx = np.array([magic, *shape], ">u4").tobytes() + array.numpy().tobytes()
        assert hashlib.md5(idx).hexdigest() == md5, name


@needs_shared_mnist
def test_binarized_mnist_from_shared_data(monkeypatch):
    monkeypatch.setenv("PYROFLOWS_DATA", str(SHARED_DATA))
    for split, (rows, md5) in datasets._BINARIZED.items():
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
    for name, (key, magic, _, _) in datasets._MNIST_FILES.items():
        files[name] = _idx(arrays[key], magic)
        md5 = hashlib.md5(gzip.decompress(files[name])).hexdigest()
        table[name] = (key, magic, arrays[key].shape, md5)
    monkeypatch.setattr(datasets, "_MNIST_FILES", table)
    return arrays, files


def test_mnist_download_converts_and_cleans_up(tmp_path, monkeypatch):
    arrays, files = _tiny_mnist(monkeypatch)
    asked = _serve(monkeypatch, files)
    images, labels = mnist("test", data_dir=tmp_path)
    assert torch.equal(images, torch.from_numpy(arrays["x_test"]))
    assert torch.equal(labels, torch.from_numpy(arrays["y_test"]))
    assert len(asked) == 4 and asked[0].startswith(datasets._MNIST_MIRRORS[0])
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == ["mnist.npz"]
    with np.load(tmp_path / "mnist" / "mnist.npz") as saved:
        assert sorted(saved.files) == ["x_test", "x_train", "y_test", "y_train"]
    mnist("train", data_dir=tmp_path)  # now offline: served from the npz
    assert len(asked) == 4


def test_mnist_falls_back_to_the_second_mirror(tmp_path, monkeypatch):
    _, files = _tiny_mnist(monkeypatch)
    first = datasets._MNIST_MIRRORS[0]

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
    monkeypatch.setattr(datasets, "_BINARIZED", table)
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
