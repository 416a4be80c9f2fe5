"""The documentation covers the public API, and every tutorial has a smoke mode.

These tests read the Sphinx sources and notebooks as text; they do not build the docs (CI does
that with ``sphinx-build -W``). A name added to a public module's ``__all__`` without an entry in
``docs/api/`` fails here, with the name in the message.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

import pyroflows

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
TUTORIALS = ROOT / "tutorials"

# ``.. autoclass:: NSF``, ``.. py:function:: pyroflows.fit``, ``.. currentmodule:: pyroflows``, ...
DIRECTIVE = re.compile(
    r"^\s*\.\.\s+(?:py:)?(?P<kind>auto\w+|module|currentmodule|class|function|exception|data|"
    r"attribute|method|property)::\s+(?P<name>[\w.]+)\s*$"
)
MODULE_DIRECTIVES = {"automodule", "module"}


def public_modules() -> list[str]:
    """``pyroflows`` and its top-level modules that declare ``__all__`` (the public surface)."""
    names = ["pyroflows"]
    for info in pkgutil.iter_modules(pyroflows.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"pyroflows.{info.name}")
        if hasattr(module, "__all__"):
            names.append(module.__name__)
    return names


def documented() -> tuple[list[str], set[str]]:
    """Fully qualified names of the objects the API pages describe, and the modules they cover."""
    objects: list[str] = []
    modules: set[str] = set()
    for page in sorted(API.glob("*.rst")):
        current = None
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            match = DIRECTIVE.match(line)
            if not match:
                continue
            kind, name = match["kind"], match["name"]
            if kind == "currentmodule":
                current = name
                continue
            if kind in MODULE_DIRECTIVES:
                current = name
                options = []
                for option in lines[i + 1 :]:
                    if not option.strip().startswith(":"):
                        break
                    options.append(option.strip())
                if ":no-index:" not in options:
                    modules.add(name)
                continue
            if not name.startswith("pyroflows"):
                assert current is not None, f"{page.name}: {name} documented outside a module"
                name = f"{current}.{name}"
            objects.append(name)
    return objects, modules


def resolve(name: str):
    """The object a documented name refers to (``pyroflows.transforms.ActNorm``)."""
    return pkgutil.resolve_name(name)


def test_documented_names_resolve_and_are_unique():
    objects, modules = documented()
    assert objects and modules, f"no autodoc entries found under {API}"
    for name in objects:
        resolve(name)  # a stale entry would also fail the Sphinx build
    duplicates = sorted({name for name in objects if objects.count(name) > 1})
    assert not duplicates, f"documented more than once: {duplicates}"


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_name_is_documented(module_name):
    objects, modules = documented()
    assert module_name in modules, f"no '.. automodule:: {module_name}' page under docs/api/"
    # A re-exported object is documented once, under one of its public names
    # (``pyroflows.NSF`` covers ``pyroflows.flows.NSF``): match by identity too.
    by_identity = {
        id(obj) for obj in map(resolve, objects) if not isinstance(obj, (str, int, float))
    }
    module = importlib.import_module(module_name)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            if obj.__name__ not in modules:
                missing.append(f"{name} (module {obj.__name__})")
        elif f"{module_name}.{name}" not in objects and (
            isinstance(obj, (str, int, float)) or id(obj) not in by_identity
        ):
            missing.append(name)
    assert not missing, f"{module_name}.__all__ names missing from docs/api/: {missing}"


@pytest.mark.parametrize("path", sorted(TUTORIALS.glob("*.ipynb")), ids=lambda p: p.name)
def test_tutorial_reads_smoke_flag(path):
    """``tutorials/execute.py`` runs every notebook in CI with ``PYROFLOWS_SMOKE=1``."""
    notebook = json.loads(path.read_text())
    code = "\n".join(
        "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
    )
    assert "PYROFLOWS_SMOKE" in code, f"{path.name} never reads PYROFLOWS_SMOKE"
