"""Sphinx configuration for the pyroflows documentation.

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The tutorial notebooks live in ``tutorials/`` at the repository root; Sphinx only reads sources
under ``docs/``, so they are copied into the git-ignored ``docs/tutorials/`` at the start of
every build and rendered with their committed outputs (myst-nb, never executed here).
"""

from __future__ import annotations

import logging
import os
import pkgutil
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import pyroflows  # noqa: E402


def sync_tutorials(source: Path = ROOT / "tutorials", target: Path = DOCS / "tutorials") -> None:
    """Mirror ``tutorials/*.ipynb`` (and any images beside them) into ``docs/tutorials/``.

    Unchanged files are left alone (``copy2`` keeps modification times, so incremental builds
    do not re-read them) and files whose source is gone are removed.
    """
    patterns = ("*.ipynb", "*.png", "*.svg", "*.jpg", "*.gif")
    wanted = {p.name: p for pattern in patterns for p in source.glob(pattern)}
    target.mkdir(exist_ok=True)
    for path in target.iterdir():
        if path.is_file() and path.name not in wanted:
            path.unlink()
    for name, path in wanted.items():
        copy = target / name
        stat = path.stat()
        if copy.exists():
            copied = copy.stat()
            if copied.st_size == stat.st_size and copied.st_mtime == stat.st_mtime:
                continue
        shutil.copy2(path, copy)


sync_tutorials()


class _TutorialWarnings(logging.Filter):
    """Drop the few warnings the tutorial notebooks may cause that are not ours to fix here.

    The notebooks are written and committed elsewhere (``tutorials/``) and rendered as they are:

    * ``tutorials.md`` lists them by name patterns in reading order, then ``tutorials/*`` for
      any others, so a notebook that is missing or renamed must not fail the build (Sphinx
      gives that warning no type, so ``suppress_warnings`` cannot silence it);
    * inside a notebook, a heading that skips a level (``myst.header``) or a link to a file
      outside ``tutorials/`` (``myst.xref_missing``, e.g. ``../benchmarks/README.md``) is
      rendered as it stands.

    Every other warning, and these ones anywhere else, still fails a ``-W`` build.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        subtype = getattr(record, "subtype", None)
        if subtype == "empty_glob":
            args = record.args if isinstance(record.args, tuple) else ()
            return not (args and str(args[0]).startswith("tutorials/"))
        if getattr(record, "type", None) == "myst" and subtype in ("header", "xref_missing"):
            return not _in_tutorials(getattr(record, "location", None))
        return True


def _in_tutorials(location) -> bool:
    """Whether a warning's location (a docname, a path, a node) is a copied notebook."""
    from sphinx.util.logging import get_node_location

    if isinstance(location, tuple):
        location = location[0]
    if location is not None and not isinstance(location, str):
        location = get_node_location(location)
    if not location:
        return False
    location = str(location)
    folder = str(DOCS / "tutorials")
    return location.startswith(("tutorials/", folder + "/", folder + os.sep))


# -- Project -------------------------------------------------------------------------------------

project = "pyroflows"
author = "pyroflows developers"
copyright = "pyroflows developers"
version = pyroflows.__version__
release = pyroflows.__version__

# -- General -------------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
default_role = "code"
pygments_style = "sphinx"

# -- autodoc and napoleon ------------------------------------------------------------------------

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
# Methods that override torch/Pyro ones without a docstring of their own stay out of the pages,
# rather than inheriting docstrings written for another library's conventions.
autodoc_inherit_docstrings = False
autodoc_preserve_defaults = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# ``Attributes:`` as fields of the class, not as separate attribute entries (which would
# duplicate the fields autodoc finds on dataclasses and named tuples).
napoleon_use_ivar = True
napoleon_use_rtype = False
napoleon_preprocess_types = False
napoleon_attr_annotations = True
napoleon_custom_sections = ["Shapes"]  # input and output shapes, a heading like "Example"

# -- myst-nb -------------------------------------------------------------------------------------

nb_execution_mode = "off"  # notebooks are committed with their outputs
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- HTML ----------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"pyroflows {release}"


# -- Re-exported names ---------------------------------------------------------------------------
# Each public object is documented once, under its shortest public path (``pyroflows.NSF``,
# ``pyroflows.transforms.AffineCoupling``). Docstrings also refer to objects by other paths
# (``pyroflows.flows.NSF``, ``pyroflows.infer.objectives.IWAE``); this resolves such a reference
# to the documented entry for the same Python object.


_DOCUMENTED: dict[int, str] = {}  # id(object) -> the name it is documented under


def _import(name: str):
    """The object a dotted name refers to, or None."""
    try:
        return pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError):
        return None


def _resolve_alias(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target.startswith("pyroflows."):
        candidates = [f"{node.get('py:module')}.{target}"] if node.get("py:module") else []
    else:
        candidates = [target]
    domain = env.get_domain("py")
    cache = _DOCUMENTED
    if not cache:
        for name, _dispname, _type, _doc, _anchor, _prio in domain.get_objects():
            obj = _import(name) if name.startswith("pyroflows") else None
            if obj is not None and not isinstance(obj, (str, int, float, tuple)):
                cache.setdefault(id(obj), name)
    for candidate in candidates:
        obj = _import(candidate)
        if obj is not None and id(obj) in cache:
            return _resolve(app, env, node, contnode, cache[id(obj)])
    # A bare name used outside its module's docstrings (``TrainingDiverged`` in pyroflows.infer):
    # resolve it when exactly one documented pyroflows object has that name.
    if node["reftype"] in ("class", "exc", "func", "meth") and not target.startswith("_"):
        names = {name for name in cache.values() if name.endswith("." + target)}
        if len(names) == 1:
            return _resolve(app, env, node, contnode, names.pop())
    return None


def _resolve(app, env, node, contnode, name: str):
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], name, node, contnode
    )


def _public_bases(app, name, obj, options, bases):
    """Show a private base class (``_FusedCalls``) as the public classes it derives from."""

    def public(cls):
        if not cls.__name__.startswith("_"):
            return [cls]
        return [b for parent in cls.__bases__ if parent is not object for b in public(parent)]

    found = [b for base in bases for b in public(base)]
    bases[:] = [b for i, b in enumerate(found) if b not in found[:i]] or [object]


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """Named tuples document their fields under ``Attributes:``; skip the generated aliases."""
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


def setup(app):
    from sphinx.util.logging import NAMESPACE, WarningStreamHandler

    # First among the warning handler's filters: Sphinx's own count the warnings that -W fails on.
    for handler in logging.getLogger(NAMESPACE).handlers:
        if isinstance(handler, WarningStreamHandler):
            handler.filters.insert(0, _TutorialWarnings())
    app.connect("missing-reference", _resolve_alias)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
