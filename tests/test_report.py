"""pyroflows.report: the run folder of ``pyroflows fit`` / ``demo`` and the density plot."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import pyroflows as pf
from pyroflows.datasets import toy
from pyroflows.report import describe, fit_and_report, plot_density

pytest.importorskip("matplotlib")


def test_plot_density_panels_and_the_global_rng(tmp_path):
    ring = toy("ring", 400, seed=0)
    flow = pf.RealNVP(2, layers=2, hidden=(8,))
    state = torch.random.get_rng_state()
    figure = plot_density(flow, ring.samples, tmp_path / "d.png", truth=ring, title="t")
    assert torch.equal(state, torch.random.get_rng_state())  # samples used their own stream
    assert (tmp_path / "d.png").stat().st_size > 0
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[1:] == ["true density", "learned density", "flow samples (400)"]
    assert len(plot_density(flow, ring.samples, truth=toy("moons", 10)).axes) == 3  # no density
    with pytest.raises(ValueError, match="flow: expected an unconditional flow over 2-D data"):
        plot_density(pf.RealNVP(3), torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"data: expected a tensor of shape \(n, 2\)"):
        plot_density(flow, torch.randn(10))


def test_plot_density_without_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install pyroflows\[plot\]"):
        plot_density(pf.RealNVP(2), torch.randn(10, 2))


def test_fit_and_report_writes_the_run_folder_quietly(tmp_path, capsys):
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    flow = pf.MAF(3, layers=1, hidden=(8,))
    metrics = fit_and_report(
        flow, x[:200], tmp_path, valid=x[200:250], test=x[250:], verbose=False, steps=5,
        progress=False, seed=0,
    )  # fmt: skip
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"], metrics["steps"]) == (
        200, 50, 50, 5
    )  # fmt: skip
    assert metrics["kl_gap"] is None and not (tmp_path / "density.png").exists()
    assert type(pf.load(tmp_path / "model")) is pf.MAF
    fit_and_report(flow, x[:200], tmp_path / "b", steps=1, progress=False, command="mine")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"mine: {describe(flow)} on data (3-D): 200 train, 0 valid, 0 test"
    assert lines[-2] == "density.png skipped: the plot is for 2-D data; these are 3-D"
