"""The ``pyroflows`` command: fit / sample / eval / demo, outputs, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyroflows as pf
from pyroflows.cli import main
from pyroflows.datasets import load_array

# Tiny flows and few steps: these tests check plumbing, not fit quality (benchmarks do that).
TINY = ["--flow", "realnvp", "--layers", "2", "--hidden", "8", "--steps", "10", "--no-progress"]

try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def run(argv, capsys):
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyroflows") and "error:" in lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One small in-process fit on builtin:ring (with the density plot) shared by several tests."""
    out = tmp_path_factory.mktemp("fit")
    code = main(["fit", "builtin:ring", "-n", "600", *TINY, "--out", str(out)])
    assert code == 0
    return out


# --- fit ------------------------------------------------------------------------------------


def test_fit_a_continuous_flow_by_flow_matching(tmp_path, capsys):
    argv = ["fit", "builtin:ring", "-n", "600", "--flow", "cnf", "--hidden", "8", "--loss"]
    argv += ["flow_matching", "--steps", "20", "--no-progress", "--no-plot", "--out", tmp_path]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "CNF" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["flow"]["builder"] == "cnf" and metrics["flow"]["kwargs"]["hidden"] == [8]
    assert metrics["loss"] == "flow_matching"
    assert isinstance(pf.load(tmp_path / "model"), pf.CNF)


def test_subprocess_fit_then_sample_and_eval(tmp_path, capsys):
    """The real command line (``python -m pyroflows.cli fit``) on builtin:ring, then sample and
    eval (in-process, to keep the module fast) on what it wrote."""
    out = tmp_path / "run"
    tiny_nsf = ["--flow", "nsf", "--layers", "1", "--hidden", "8", "--bins", "4", "--steps", "5"]
    tiny_nsf += ["--no-plot", "--out", str(out)]
    fit = subprocess.run(
        [sys.executable, "-m", "pyroflows.cli", "fit", "builtin:ring", "-n", "400", *tiny_nsf],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fit.returncode == 0, fit.stderr
    assert "KL(p||q) gap" in fit.stdout and (out / "metrics.json").is_file()
    code, _, err = run(["sample", out, "-n", "50", "--out", tmp_path / "s.csv"], capsys)
    assert code == 0, err
    assert load_array(tmp_path / "s.csv").shape == (50, 2)
    code, stdout, err = run(["eval", out, "builtin:ring", "-n", "200", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["n"] == 200 and np.isfinite(result["nll"]) and result["nll_se"] > 0


def test_fit_writes_model_metrics_and_plot(fitted):
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"]) == (480, 60, 60)
    assert metrics["steps"] == 10 and metrics["steps_per_second"] > 0
    for key in ("train_nll", "valid_nll", "test_nll", "test_nll_se", "entropy", "kl_gap"):
        assert np.isfinite(metrics[key]), key
    # KL gap = test NLL - entropy, both on the same test points
    assert metrics["kl_gap"] == pytest.approx(metrics["test_nll"] - metrics["entropy"], abs=1e-6)
    assert metrics["kl_gap_se"] > 0
    assert metrics["flow"]["builder"] == "realnvp"  # its name in pyroflows.flows.BUILDERS
    assert metrics["flow"]["kwargs"]["hidden"] == [8]
    flow = pf.load(fitted / "model")
    assert isinstance(flow, pf.RealNVP) and flow.dim == 2
    assert (fitted / "density.png").is_file() == HAS_MPL


def test_fit_is_reproducible_with_a_seed(tmp_path, capsys):
    for name in ("a", "b"):
        code, _, _ = run(
            ["fit", "builtin:ring", "-n", "300", *TINY, "--no-plot", "--out", tmp_path / name],
            capsys,
        )
        assert code == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["test_nll"] == b["test_nll"]


def test_fit_without_matplotlib_skips_the_plot_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    code, out, err = run(["fit", "builtin:ring", "-n", "200", *TINY, "--out", tmp_path], capsys)
    assert code == 0, err
    assert "density.png skipped: matplotlib is not installed" in out
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / "density.png").exists()


def test_fit_file_data_with_test_file_and_more_than_two_dims(tmp_path, capsys):
    g = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", g.normal(size=(300, 3)).astype(np.float32))
    np.savetxt(tmp_path / "test.csv", g.normal(size=(40, 3)), delimiter=",")
    argv = ["fit", tmp_path / "train.npy", "--test", tmp_path / "test.csv", "--valid", "0.2"]
    argv += ["--flow", "maf", "--layers", "1", "--hidden", "8", "--epochs", "1", "--no-progress"]
    code, out, err = run([*argv, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"]) == (240, 60, 40)
    assert metrics["kl_gap"] is None  # no known density for a file
    assert metrics["steps"] == 1  # one epoch of 240 rows in batches of 256
    assert "density.png skipped: the plot is for 2-D data; these are 3-D" in out


def test_fit_builtin_test_set_is_a_fresh_draw_with_a_kl_gap(tmp_path, capsys):
    argv = ["fit", "builtin:ring", "-n", "300", *TINY, "--no-plot", "--test", "builtin:ring"]
    code, _, err = run([*argv, "--out", tmp_path], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"]) == (270, 30, 10_000)
    assert np.isfinite(metrics["kl_gap"])


def test_fit_one_feature_uses_autoregressive_splines(tmp_path, capsys):
    np.savetxt(tmp_path / "x.txt", np.random.default_rng(0).gamma(2.0, size=200))
    argv = ["fit", tmp_path / "x.txt", "--layers", "1", "--hidden", "8", "--steps", "3"]
    code, _, err = run([*argv, "--no-progress", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert pf.load(tmp_path / "out" / "model").config["kwargs"]["autoregressive"] is True


def test_checkpoint_and_resume_continue_a_run(tmp_path, capsys):
    base = ["fit", "builtin:ring", "-n", "300", *TINY[:-3], "--no-progress", "--no-plot"]
    base += ["--out", tmp_path / "out", "--checkpoint", tmp_path / "ckpt"]
    assert run([*base, "--steps", "6"], capsys)[0] == 0
    assert (tmp_path / "ckpt" / "state.pt").is_file()
    code, out, err = run([*base, "--steps", "12", "--resume"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 12
    # the speed counts the 6 steps of this call only
    assert metrics["steps_per_second"] == pytest.approx(6 / metrics["seconds"])
    assert "trained 12 steps" in out


@pytest.mark.parametrize("damage", ["random bytes", "empty", "truncated"])
def test_resume_from_a_corrupt_checkpoint_is_a_one_line_error(tmp_path, capsys, damage):
    base = ["fit", "builtin:ring", "-n", "300", *TINY[:-3], "--no-progress", "--no-plot"]
    base += ["--out", tmp_path / "out", "--checkpoint", tmp_path / "ckpt"]
    assert run([*base, "--steps", "6"], capsys)[0] == 0
    state = tmp_path / "ckpt" / "state.pt"
    intact = state.read_bytes()
    state.write_bytes(
        {
            "random bytes": np.random.default_rng(0).bytes(len(intact)),
            "empty": b"",
            "truncated": intact[: len(intact) // 2],
        }[damage]
    )
    code, _, err = run([*base, "--steps", "12", "--resume"], capsys)
    assert_one_line_error(code, err, "checkpoint")


# --- sample and eval ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv", ".txt"])
def test_sample_formats(fitted, tmp_path, capsys, suffix):
    target = tmp_path / f"samples{suffix}"
    code, out, err = run(["sample", fitted, "-n", "123", "--out", target], capsys)
    assert code == 0, err
    samples = load_array(target, "samples" if suffix == ".npz" else None)
    assert samples.shape == (123, 2) and torch.isfinite(samples).all()
    assert "wrote 123 samples" in out


def test_sample_to_stdout_and_from_the_model_folder(fitted, capsys):
    code, out, _ = run(["sample", fitted / "model", "-n", "5", "--out", "-", "--seed", "3"], capsys)
    assert code == 0
    rows = [[float(v) for v in line.split(",")] for line in out.strip().splitlines()]
    assert np.array(rows).shape == (5, 2)
    # the same seed gives the same samples
    assert run(["sample", fitted, "-n", "5", "--out", "-", "--seed", "3"], capsys)[1] == out


def test_eval_prints_nll_with_standard_error_and_json(fitted, tmp_path, capsys):
    code, out, _ = run(["eval", fitted, "builtin:ring", "-n", "300"], capsys)
    assert code == 0
    assert "mean NLL" in out and "±" in out and "KL(p||q) gap" in out
    x = np.random.default_rng(0).normal(size=(50, 2))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", header="a,b", comments="")
    code, out, _ = run(["eval", fitted, tmp_path / "x.csv", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["n"] == 50 and "kl_gap" not in result
    with torch.no_grad():
        expected = -pf.load(fitted / "model")().log_prob(torch.tensor(x, dtype=torch.float32))
    assert result["nll"] == pytest.approx(expected.mean().item(), abs=1e-4)
    assert result["nll_se"] == pytest.approx(expected.std().item() / np.sqrt(50), rel=1e-3)


# --- demo, help ------------------------------------------------------------------------------


def test_demo_writes_the_three_outputs(tmp_path, capsys):
    code, out, err = run(
        ["demo", "--steps", "3", "-n", "500", "--no-progress", "--out", tmp_path], capsys
    )
    assert code == 0, err
    assert "KL(p||q) gap" in out
    assert (tmp_path / "model" / "config.json").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data"] == "builtin:ring" and metrics["steps"] == 3
    assert metrics["flow"]["builder"] == "nsf"
    assert (tmp_path / "density.png").is_file() == HAS_MPL


def test_demo_functions_return_the_metrics(tmp_path, capsys):
    """``run_demo`` (for ``python -m pyroflows.demo``) and ``demo`` return what they write."""
    from pyroflows.cli import demo, run_demo

    metrics = run_demo(
        ["--steps", "2", "-n", "300", "--no-progress", "--no-plot", "--out", tmp_path]
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["kl_gap"] == metrics["kl_gap"] and written["steps"] == metrics["steps"] == 2
    again = demo(tmp_path / "b", steps=2, n=300, progress=False, plot=False)
    assert again["kl_gap"] == pytest.approx(metrics["kl_gap"])  # same seed, same run
    capsys.readouterr()


@pytest.mark.parametrize("command", [[], ["fit"], ["sample"], ["eval"], ["demo"]])
def test_help(command, capsys):
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0 and out.startswith("usage: pyroflows")


# --- user errors: one line on stderr, exit status 2 ---------------------------------------------


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "words.csv").write_text("a,b\n1,2\nthree,4\n")
    np.savetxt(tmp_path / "wide.csv", np.zeros((20, 3)), delimiter=",")
    np.save(tmp_path / "narrow.npy", np.zeros((20, 2), dtype=np.float32))
    return tmp_path


ERRORS = {
    "no command": ([], "required"),
    "missing data file": (["fit", "{d}/missing.csv", "--out", "{d}/o"], "not found"),
    "bad flow name": (["fit", "builtin:ring", "--flow", "glowish", "--out", "{d}/o"], "glowish"),
    "image flow name": (["fit", "builtin:ring", "--flow", "glow", "--out", "{d}/o"], "'glow'"),
    "bad builtin name": (["fit", "builtin:donut", "--out", "{d}/o"], "donut"),
    "non-numeric csv": (["fit", "{d}/words.csv", "--out", "{d}/o"], "expected numbers"),
    "bad hidden": (["fit", "builtin:ring", "--hidden", "64,x", "--out", "{d}/o"], "--hidden"),
    "bins for maf": (["fit", "builtin:ring", "--flow", "maf", "--bins", "4", "--out", "{d}/o"],
                     "--bins"),
    "hidden for bnaf": (["fit", "builtin:ring", "--flow", "bnaf", "--hidden", "8",
                         "--out", "{d}/o"], "--hidden: --flow bnaf (BNAF) has no 'hidden'"),
    "flow matching for nsf": (["fit", "builtin:ring", "--flow", "nsf", "--loss", "flow_matching",
                               "--out", "{d}/o"], "--loss flow_matching: trains continuous"),
    "bad fraction": (["fit", "builtin:ring", "--test", "1.5", "--out", "{d}/o"], "--test"),
    "no training data left": (
        ["fit", "builtin:ring", "-n", "10", "--valid", "0.5", "--test", "0.5", "--out", "{d}/o"],
        "nothing left to train on",
    ),
    "test file of the wrong width": (
        ["fit", "builtin:ring", "--test", "{d}/wide.csv", "--out", "{d}/o"], "expected 2 columns"
    ),
    "steps and epochs": (["fit", "builtin:ring", "--steps", "3", "--epochs", "1"], "not allowed"),
    "zero steps": (["fit", "builtin:ring", "--steps", "0", "--out", "{d}/o"], "positive integer"),
    "bad device": (["fit", "builtin:ring", "--device", "tpu9", "--out", "{d}/o"], "--device"),
    "missing model": (["eval", "{d}/nomodel", "builtin:ring"], "no saved flow"),
    "eval data of the wrong width": (["eval", "{model}", "{d}/wide.csv"], "expected 2 columns"),
    "eval non-numeric csv": (["eval", "{model}", "{d}/words.csv"], "expected numbers"),
    "sample bad format": (["sample", "{model}", "--out", "{d}/s.parquet"], ".parquet"),
    "sample missing model": (["sample", "{d}/nomodel", "--out", "{d}/s.npy"], "no saved flow"),
    "sample into a missing folder": (["sample", "{model}", "--out", "{d}/no/s.npy"], "no"),
}  # fmt: skip


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_user_errors_are_one_line_with_status_2(case, fitted, bad_files, capsys):
    argv, fragment = ERRORS[case]
    argv = [a.format(d=bad_files, model=fitted) for a in argv]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_a_user_error(tmp_path, capsys):
    code, _, err = run(["fit", "builtin:ring", "--device", "cuda", "--out", tmp_path], capsys)
    assert_one_line_error(code, err, "CUDA is not available")
