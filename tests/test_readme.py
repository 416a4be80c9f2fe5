"""The README's Python examples run as written."""

import pathlib
import re

import pyro
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        torch.manual_seed(0)
        pyro.clear_param_store()
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    # the guide in the README runs under a plate
    x = torch.randn(5, 2)
    trace = pyro.poutine.trace(namespace["guide"]).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (5, 2)
