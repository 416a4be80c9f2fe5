"""Saving and loading flows without pickles: weights as tensors, the architecture as JSON.

A saved flow is a folder holding ``config.json`` (the builder's name in
:data:`pyroflows.flows.BUILDERS` and its arguments, readable and editable by people) and
``weights.pt`` (the ``state_dict``, written by ``torch.save`` and read back with
``weights_only=True``, which refuses anything but tensors and plain containers). :func:`load`
rebuilds the flow from the configuration, so nobody re-states the architecture, and treats the
folder as untrusted: it only ever builds classes registered in
:data:`~pyroflows.flows.BUILDERS` (a config file cannot make it import or run anything else), it
refuses a configuration that would allocate more than ``max_parameters`` numbers before
allocating them, and it refuses non-finite weights.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from . import __version__
from .flows import _BUILTIN, BUILDERS, Flow, _qualified_name

__all__ = ["MAX_PARAMETERS", "MAX_TENSORS", "can_save", "load", "read_config", "save"]

FORMAT = "pyroflows.flow"
#: Version 2 names builders by their key in ``BUILDERS`` ("nsf"); version 1 (pyroflows 0.1)
#: named them by qualified class name ("pyroflows.flows.NSF"), which :func:`load` still reads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
#: :func:`load`'s default bound on the numbers (tensor entries) a configuration may allocate:
#: 10**8, 400 MB in float32, about three times the largest model in ``benchmarks/`` (a Glow
#: with 256 hidden channels).
MAX_PARAMETERS = 100_000_000
#: Bound on the number of tensors a configuration may create (so that ``"layers": 10**9`` stops
#: within a second or two): a Glow with 3 levels of 32 steps creates about 1,700.
MAX_TENSORS = 10_000
#: A ``config.json`` is a few hundred bytes; anything above this is not one.
MAX_CONFIG_BYTES = 1_000_000


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"the non-finite number {value}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(type(value).__name__)


def _document(flow: Flow) -> dict[str, Any]:
    """The ``config.json`` of ``flow``; raises the error :func:`save` reports."""
    if not isinstance(flow, Flow):
        raise TypeError(f"save: expected a pyroflows Flow; got {type(flow).__name__}")
    config = flow.config
    cls = type(flow)
    keep_weights = "or save its weights alone with torch.save(flow.state_dict(), file)"
    if config is None:
        raise ValueError(
            "save: this Flow was assembled by hand, so there is no builder configuration to "
            "save; use torch.save(flow.state_dict(), file) and rebuild the flow yourself"
        )
    if config["builder"] is None:
        raise ValueError(
            f"save: {cls.__qualname__} is not a registered builder: register it with "
            f"pyroflows.flows.register_builder('a_name', {cls.__qualname__}) in the module that "
            f"defines it (and import that module before loading), {keep_weights}"
        )
    kwargs = config["kwargs"]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError:
        raise ValueError(
            f"save: {cls.__qualname__}'s constructor {inspect.signature(cls)} does not take the "
            f"recorded configuration {sorted(kwargs)} (a subclass with its own constructor): "
            f"call self.set_config(...) with its own arguments at the end of "
            f"{cls.__qualname__}.__init__, {keep_weights}"
        ) from None
    try:
        kwargs = _jsonable(kwargs)
    except TypeError as err:
        raise ValueError(
            f"save: {cls.__qualname__} was built with an argument that JSON cannot hold "
            f"({err}); only finite numbers, strings, booleans and lists can be saved, "
            f"{keep_weights}"
        ) from None
    dtypes = {p.dtype for p in flow.parameters()} or {torch.get_default_dtype()}
    if len(dtypes) != 1:
        raise ValueError(f"save: expected parameters of one dtype; got {sorted(map(str, dtypes))}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pyroflows_version": __version__,
        "builder": config["builder"],
        "kwargs": kwargs,
        "dtype": str(dtypes.pop()).removeprefix("torch."),
    }


def can_save(flow: Flow) -> bool:
    """Whether :func:`save` can save ``flow``: it was made by a registered builder (see
    :func:`pyroflows.flows.register_builder`) from arguments JSON can hold.

    Example:
        >>> import pyroflows as pf
        >>> from pyroflows.io import can_save
        >>> can_save(pf.NSF(2)), can_save(pf.NSF(2, base=pf.bases.DiagNormal(2)))
        (True, False)
    """
    try:
        _document(flow)
    except (TypeError, ValueError):
        return False
    return True


def save(flow: Flow, path: str | os.PathLike) -> Path:
    """Save a flow built by a builder (``NSF``, ``MAF``, ...) to the folder ``path``.

    Writes ``path/config.json`` and ``path/weights.pt`` (the folder is created if needed,
    existing files are replaced). Parameters are saved on the CPU, in the flow's dtype.

    Args:
        flow: a flow made by a builder registered in :data:`pyroflows.flows.BUILDERS` (the
            built-in ones, or a subclass added with
            :func:`~pyroflows.flows.register_builder`), whose constructor arguments are plain
            values (numbers, strings, lists).
        path: the folder to write.

    Returns:
        The folder, as a ``Path``.

    Raises:
        ValueError: for a hand-built ``Flow`` (no configuration to save: use
            ``torch.save(flow.state_dict(), ...)`` and rebuild it yourself), a subclass of a
            builder that is not registered or whose constructor does not take the recorded
            arguments (the message says how to fix it), or arguments that are not plain values
            (e.g. a custom base module).

    Example:
        >>> import tempfile, torch, pyroflows as pf
        >>> flow = pf.RealNVP(dim=2, layers=2, hidden=(8,))
        >>> folder = pf.save(flow, tempfile.mkdtemp())
        >>> x = torch.randn(3, 2)
        >>> torch.equal(pf.load(folder)().log_prob(x), flow().log_prob(x))
        True
    """
    document = _document(flow)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in flow.state_dict().items()}
    # Write to temporary names first, so that a crash never leaves half a model behind.
    weights_tmp = folder / (WEIGHTS_FILE + ".tmp")
    config_tmp = folder / (CONFIG_FILE + ".tmp")
    torch.save(state, weights_tmp)
    config_tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(weights_tmp, folder / WEIGHTS_FILE)
    os.replace(config_tmp, folder / CONFIG_FILE)
    return folder


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``config.json`` of a saved flow; raises a clear error if it is unusable.

    Args:
        path: the folder written by :func:`save`.

    Returns:
        The document: ``format``, ``format_version``, ``builder`` (a name of
        :data:`~pyroflows.flows.BUILDERS`, or a qualified class name in format version 1),
        ``kwargs`` and ``dtype``.

    Raises:
        FileNotFoundError: when the folder or its config is missing.
        ValueError: for a file that is not a pyroflows configuration of a readable version.
    """
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir() or not config_path.is_file():
        raise FileNotFoundError(
            f"load: no saved flow at {folder}: expected a folder holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (as written by pyroflows.save)"
        )
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"load: {config_path} is not a flow configuration: expected at most "
            f"{MAX_CONFIG_BYTES:,} bytes; got {size:,}"
        )
    try:
        document = json.loads(config_path.read_text(), parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"load: {config_path} is not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(
            f"load: {config_path} is not a pyroflows flow configuration "
            f'(expected "format": "{FORMAT}")'
        )
    if document.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"load: {config_path} has format_version {document.get('format_version')!r}; "
            f"this pyroflows ({__version__}) reads versions {list(READABLE_VERSIONS)}"
        )
    for key, kind in (("builder", str), ("kwargs", dict), ("dtype", str)):
        if not isinstance(document.get(key), kind):
            raise ValueError(
                f"load: {config_path} needs a {kind.__name__} under {key!r}; "
                f"got {document.get(key)!r}"
            )
    return document


def _resolve(document: dict[str, Any], where: Path) -> tuple[type[Flow], dict[str, Any]]:
    """The registered builder and its arguments for a checked config document."""
    name, kwargs = document["builder"], dict(document["kwargs"])
    if document["format_version"] == 1:
        # Qualified class names, resolved among the registered builders only. The image RealNVP
        # was RealNVP(shape=...), with the vector arguments beside the image ones.
        by_qualified_name = {_qualified_name(cls): cls for cls in BUILDERS.values()}
        cls = by_qualified_name.get(name)
        if cls is BUILDERS["realnvp"]:
            image = kwargs.get("shape") is not None
            cls = BUILDERS["image_realnvp"] if image else cls
            keep = inspect.signature(cls).parameters
            kwargs = {k: v for k, v in kwargs.items() if k in keep}
    else:
        cls = BUILDERS.get(name)
    if cls is None:
        custom = sorted(set(BUILDERS) - set(_BUILTIN))
        raise ValueError(
            f"load: unknown builder {name!r} in {where}; known: {sorted(_BUILTIN)}"
            + (f" and the registered {custom}" if custom else "")
            + " (a custom builder must be registered with pyroflows.flows.register_builder, "
            "in the module that defines it, imported before loading)"
        )
    return cls, kwargs


class _BudgetExceeded(Exception):
    """Raised inside a builder's constructor; not a ValueError, so that nothing swallows it."""


def _numel(size: Any) -> int | None:
    """Entries of a tensor of ``size`` (ints, a tuple of ints or a ``torch.Size``)."""
    if isinstance(size, (tuple, list, torch.Size)) and len(size) == 1:
        size = size[0]
    dims = size if isinstance(size, (tuple, list, torch.Size)) else (size,)
    try:
        return math.prod(max(int(d), 0) for d in dims)
    except (TypeError, ValueError, RuntimeError):
        return None


def _arange_length(*args: Any) -> int | None:
    try:
        values = [float(a) for a in args]
    except (TypeError, ValueError, RuntimeError):
        return None
    start, end, step = (0.0, values[0], 1.0) if len(values) == 1 else (*values, 1.0)[:3]
    if step == 0 or not all(map(math.isfinite, (start, end, step))):
        return None
    return max(math.ceil((end - start) / step), 0)


def _sized(args: tuple, kwargs: dict) -> int | None:
    return _numel(kwargs["size"] if "size" in kwargs else args)


#: How many entries each factory function is about to allocate, from its arguments.
_FACTORIES: dict[Callable, Callable[[tuple, dict], int | None]] = {
    **dict.fromkeys((torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn), _sized),
    torch.full: lambda a, k: _numel(k.get("size", a[0] if a else ())),
    torch.randint: lambda a, k: _numel(
        k.get("size", next((v for v in a if isinstance(v, (tuple, list, torch.Size))), ()))
    ),
    torch.eye: lambda a, k: _numel((a[0], a[1] if len(a) > 1 else k.get("m", a[0]))),
    torch.randperm: lambda a, k: _numel(a[0] if a else k.get("n")),
    torch.arange: lambda a, k: _arange_length(*a),
    torch.linspace: lambda a, k: _numel(a[2] if len(a) > 2 else k.get("steps")),
    **dict.fromkeys(
        (torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones),
        lambda a, k: _sized(a[1:], k),
    ),
    torch.Tensor.new_full: lambda a, k: _numel(k.get("size", a[1] if len(a) > 1 else ())),
    torch.Tensor.repeat: lambda a, k: None if (n := _numel(a[1:])) is None else n * a[0].numel(),
    **dict.fromkeys(
        (torch.empty_like, torch.zeros_like, torch.ones_like, torch.randn_like, torch.rand_like),
        lambda a, k: a[0].numel(),
    ),
}


class _AllocationBudget(TorchFunctionMode):
    """Counts the entries of the tensors that factory functions are asked for, before they are
    allocated, and stops the construction beyond ``max_entries`` of them or ``max_tensors``
    tensors. Torch function modes are per thread: other threads are not affected."""

    def __init__(self, max_entries: int, max_tensors: int) -> None:
        super().__init__()
        self.max_entries, self.max_tensors = max_entries, max_tensors
        self.entries = self.tensors = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        count = _FACTORIES.get(func)
        if count is not None:
            entries = count(args, kwargs) or 0
            self.entries += entries
            self.tensors += 1
            if self.entries > self.max_entries:
                raise _BudgetExceeded(
                    f"it asks for more than max_parameters={self.max_entries:,} numbers (a "
                    f"tensor of {entries:,} entries brought the total to {self.entries:,})"
                )
            if self.tensors > self.max_tensors:
                raise _BudgetExceeded(f"it creates more than {self.max_tensors:,} tensors")
        return func(*args, **kwargs)


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    max_parameters: int | None = MAX_PARAMETERS,
) -> Flow:
    """Rebuild a flow saved by :func:`save` and load its weights.

    The folder is treated as untrusted input: the configuration can only name a builder of
    :data:`pyroflows.flows.BUILDERS`; while the builder runs, every tensor it asks for
    (parameters, buffers and the constructor's temporaries) is counted before it is allocated,
    and the construction stops with an error beyond ``max_parameters`` numbers or
    :data:`MAX_TENSORS` tensors, so that a hand-edited ``"hidden": [1000000, 1000000]`` or
    ``"layers": 1000000000`` cannot exhaust memory or time; the weights are memory-mapped,
    checked against the built architecture, and refused if any is NaN or infinite. Folders
    written by pyroflows 0.1 (format version 1, ``"builder": "pyroflows.flows.NSF"``) load too.

    Args:
        path: the folder written by :func:`save`.
        device: where to put the flow (default: the CPU).
        max_parameters: the most numbers building the flow may allocate (default
            :data:`MAX_PARAMETERS` = 10**8, 400 MB in float32); ``None`` for no bound (on
            numbers or tensors), for folders you trust.

    Returns:
        The flow, in the dtype it was saved in.

    Raises:
        FileNotFoundError: when the folder, its config or its weights are missing.
        ValueError: for a configuration that is not valid JSON, names an unknown builder, asks
            for too much memory, or whose arguments the builder rejects, and for weights that
            do not fit the configured architecture (missing or unexpected entries, other
            shapes) or are not finite.

    Example:
        >>> import tempfile, pyroflows as pf
        >>> folder = pf.save(pf.NSF(2, layers=2, hidden=(8,)), tempfile.mkdtemp())
        >>> pf.load(folder).config["builder"]
        'nsf'
        >>> try:
        ...     pf.load(folder, max_parameters=10)
        ... except ValueError as err:
        ...     print("refused:", "max_parameters=10 numbers" in str(err))
        refused: True
    """
    if max_parameters is not None and (
        isinstance(max_parameters, bool) or not isinstance(max_parameters, int)
    ):
        raise TypeError(f"max_parameters: expected an integer or None; got {max_parameters!r}")
    document = read_config(path)
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    cls, kwargs = _resolve(document, config_path)
    dtype = getattr(torch, document["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load: unknown floating dtype {document['dtype']!r} in the config")
    try:
        if max_parameters is None:
            flow = cls(**kwargs)
        else:
            with _AllocationBudget(max_parameters, MAX_TENSORS):
                flow = cls(**kwargs)
    except _BudgetExceeded as err:
        raise ValueError(
            f"load: the configuration in {config_path} is refused: {err}; pass a larger "
            "max_parameters (or None) to pyroflows.load if you trust this folder"
        ) from None
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"load: the configuration in {config_path} does not rebuild {cls.__name__}: {err}"
        ) from None
    flow.to(dtype)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"load: {weights_path} is missing")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"load: cannot read {weights_path} as weights: {err}") from None
    _load_state(flow, state, weights_path)
    return flow.to(device) if device is not None else flow


def _load_state(flow: Flow, state: Any, where: Path) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"load: {where} does not hold a state_dict")
    own = flow.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: saved {tuple(state[k].shape)}, built {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            problems.append(f"other shapes {mismatched[:5]}")
        raise ValueError(
            f"load: the weights in {where} do not fit the configured architecture: "
            + "; ".join(problems)
        )
    not_finite = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if not_finite:
        raise ValueError(
            f"load: the weights in {where} are not all finite: NaN or infinite values in "
            f"{not_finite[:5]}{' ...' if len(not_finite) > 5 else ''}"
        )
    flow.load_state_dict(state)
