"""Smoke test of ``benchmarks/vae.py``: its main runs end to end on a tiny configuration.

Checks plumbing (data loading, the minibatch calling convention of ``fit_svi``, ELBO and
IWAE-DReG training of Gaussian, IAF and NSF posteriors, ELBO training of the planar and
Sylvester posteriors, per-image importance sampling, the table), not fit quality. Skipped when
the shared binarized MNIST file is absent.
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
        "--configs", "all",
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
        assert r.elbo.shape == (4,) and r.elbo_mean <= r.mean + 1e-9  # ELBO <= log p(x) per image
        assert r.best_valid is not None and math.isfinite(r.best_valid)
    out = capsys.readouterr().out
    assert "test -log p(x)" in out and "nsf-iwae" in out and "t-snf-elbo" in out
    assert "Literature" in out and "van den Berg" in out


def test_config_groups():
    assert V.parse_args([]).configs == list(V.DEFAULT_CONFIGS)
    assert V.parse_args(["--configs", "table1"]).configs == list(V.TABLE1)
    assert V.parse_args(["--configs", "gauss-elbo,table1"]).configs == list(V.TABLE1)
    assert V.parse_args(["--configs", "all"]).configs == list(V.CONFIGS)
    assert V.TABLE1 == (
        "gauss-elbo", "iaf-elbo", "planar-elbo", "o-snf-elbo", "h-snf-elbo", "t-snf-elbo"
    )  # fmt: skip


def test_sylvester_posteriors_follow_the_paper():
    import pyroflows as pf

    z = 40
    for kind, columns in (("planar", None), ("o-snf", 32), ("h-snf", z), ("t-snf", z)):
        flow = V.posterior_flow(kind, z, V.FLOW_HIDDEN)
        assert isinstance(flow, pf.SylvesterFlow) and len(flow.transforms) == 16
        assert flow.context_dim == V.HIDDEN
        if columns is not None:
            assert all(t.columns == columns for t in flow.transforms)
    flow = V.posterior_flow("h-snf", z, V.FLOW_HIDDEN)
    assert all(t.reflections == 8 for t in flow.transforms)
    flow = V.posterior_flow("o-snf", 4, V.FLOW_HIDDEN)  # M = z_dim when z_dim < 32
    assert all(t.columns == 4 for t in flow.transforms)


def test_unknown_config_is_an_error():
    with pytest.raises(SystemExit):
        V.parse_args(["--configs", "gauss-elbo,flow-magic"])
    with pytest.raises(SystemExit):
        V.parse_args(["--configs", "o-snf-iwae"])  # the Sylvester posteriors: ELBO only
