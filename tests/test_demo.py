import json
import math

from pyroflows import demo


def test_demo_runs_and_learns(tmp_path, capsys):
    untrained = demo.main(["--steps", "1", "--seed", "1", "--out", tmp_path / "a", "--no-plot"])
    trained = demo.main(["--steps", "300", "--seed", "1", "--out", tmp_path / "b", "--no-plot"])
    out = capsys.readouterr()
    assert "KL" in out.out + out.err and math.isfinite(trained)
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["kl_gap"] == trained
    assert (tmp_path / "b" / "model" / "config.json").is_file()
    # After one step the flow is still about the (standardised) base: KL ~1.8 nats from the
    # ring; 300 steps take it below 0.5 (0.17 measured), a margin far above run-to-run noise.
    assert untrained > 1.5
    assert trained < 0.5
