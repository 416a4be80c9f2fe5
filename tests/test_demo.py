import math

from pyroflows import demo


def test_demo_runs_and_learns(capsys):
    untrained = demo.main(["--steps", "1", "--seed", "1"])
    trained = demo.main(["--steps", "300", "--seed", "1"])
    out = capsys.readouterr().out
    assert "KL(p||q)" in out and math.isfinite(trained)
    # After one step the flow is still about the (standardised) base: KL ~1.8 nats from the
    # ring; 300 steps take it below 0.5 (0.17 measured), a margin far above run-to-run noise.
    assert untrained > 1.5
    assert trained < 0.5
