import pyro
import pytest
import torch


def pytest_configure(config):
    # The tests run many small tensor operations, for which extra intra-op threads only add
    # contention (CI and developer machines have 2 cores); one thread makes them fast and stable.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _pyro_state():
    """Fresh param store, validation on and a fixed seed for every test (as Pyro's conftest)."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
