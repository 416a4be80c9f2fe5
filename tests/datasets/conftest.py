"""No dataset test may reach the network."""

import urllib.error
import urllib.request

import pytest


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test may reach the network; download tests serve their own responses."""

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
