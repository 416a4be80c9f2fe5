"""Smoke test of ``benchmarks/vae.py``: its main runs end to end on a tiny configuration.

Checks plumbing (data loading, the minibatch calling convention of ``fit_svi``, ELBO and
IWAE-DReG training of Gaussian, IAF and NSF posteriors, per-image ``log_evidence``, the table),
not fit quality. Skipped when the shared binarized MNIST file is absent.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "vae.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("benchmark_vae", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("benchmark_vae", module)
    spec.loader.exec_module(module)
    return module


V = _load_module()

pytestmark = pytest.mark.skipif(
    not V.data_available(), reason="shared binarized MNIST (mnist/binarized_mnist.npz) is absent"
)


def test_main_runs_every_configuration(capsys):
    argv = [
        "--quick",
        "--steps", "6",
        "--train-images", "300",
        "--valid-images", "50",
        "--eval-images", "4",
        "--eval-k", "16",
        "--flow-hidden", "40",
        "--z-dim", "4",
    ]  # fmt: skip
    results = V.main(argv)
    assert [r.config for r in results] == list(V.CONFIGS)
    for r in results:
        assert r.steps == 6
        assert r.log_px.shape == (4,)
        assert math.isfinite(r.mean) and r.mean < 0
        assert math.isfinite(r.se)
        assert r.best_valid is not None and math.isfinite(r.best_valid)
    out = capsys.readouterr().out
    assert "test log p(x)" in out and "nsf-iwae" in out and "Literature" in out


def test_unknown_config_is_an_error():
    with pytest.raises(SystemExit):
        V.parse_args(["--configs", "gauss-elbo,flow-magic"])
