"""The README's Python examples run as written."""

import pathlib
import re

import pyro
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    spaces = []
    for block in blocks:
        torch.manual_seed(0)
        pyro.clear_param_store()
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        spaces.append(namespace)
    # the amortised guide runs under a plate with one latent per data point
    flows = next(ns for ns in spaces if "encoder" in ns)
    trace = pyro.poutine.trace(flows["guide"]).get_trace(torch.randn(5, 2))
    assert trace.nodes["z"]["value"].shape == (5, 2)
    # the Bayesian example recovers the data's mean and scale, and its diagnostics are sane
    bayes = next(ns for ns in spaces if "exact" in ns)
    assert abs(bayes["draws"]["mu"].mean() - bayes["x"].mean()) < 0.2
    # (k-hat itself is not asserted: an ELBO-trained guide's Gaussian tails in log sigma are
    # lighter than the posterior's exponential one, which k-hat sees even at a gap of 0.002)
    assert abs(bayes["exact"].draws["sigma"].mean() - bayes["x"].std()) < 0.3
    assert bayes["exact"].ess > 0.5 * bayes["exact"].num_samples
