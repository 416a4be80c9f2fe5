"""Saving and loading flows without pickles: weights as tensors, the architecture as JSON.

A saved flow is a folder holding ``config.json`` (the builder and its arguments, readable and
editable by people) and ``weights.pt`` (the ``state_dict``, written by ``torch.save`` and read
back with ``weights_only=True``, which refuses anything but tensors and plain containers).
:func:`load` rebuilds the flow from the configuration, so nobody re-states the architecture, and
it only ever builds classes registered as :class:`~pyroflows.flows.Flow` subclasses: a config
file cannot make it import or run anything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .flows import REGISTRY, Flow

__all__ = ["load", "save"]

FORMAT = "pyroflows.flow"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(type(value).__name__)


def save(flow: Flow, path: str | os.PathLike) -> Path:
    """Save a flow built by a builder (``NSF``, ``MAF``, ...) to the folder ``path``.

    Writes ``path/config.json`` and ``path/weights.pt`` (the folder is created if needed,
    existing files are replaced). Parameters are saved on the CPU, in the flow's dtype.

    Args:
        flow: a flow made by a :class:`~pyroflows.flows.Flow` subclass whose constructor
            arguments are plain values (numbers, strings, lists).
        path: the folder to write.

    Returns:
        The folder, as a ``Path``.

    Raises:
        ValueError: for a hand-built ``Flow`` (no configuration to save: use
            ``torch.save(flow.state_dict(), ...)`` and rebuild it yourself) or arguments that are
            not plain values (e.g. a custom base module).

    Example:
        >>> import tempfile, torch, pyroflows as pf
        >>> flow = pf.RealNVP(dim=2, layers=2, hidden=(8,))
        >>> folder = pf.save(flow, tempfile.mkdtemp())
        >>> x = torch.randn(3, 2)
        >>> torch.equal(pf.load(folder)().log_prob(x), flow().log_prob(x))
        True
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"save: expected a pyroflows Flow; got {type(flow).__name__}")
    config = flow.config
    if config is None:
        raise ValueError(
            "save: this Flow was assembled by hand, so there is no builder configuration to "
            "save; use torch.save(flow.state_dict(), file) and rebuild the flow yourself"
        )
    try:
        kwargs = _jsonable(config["kwargs"])
    except TypeError as err:
        raise ValueError(
            f"save: {config['builder']} was built with an argument that JSON cannot hold "
            f"({err}); only numbers, strings, booleans and lists can be saved"
        ) from None
    dtypes = {p.dtype for p in flow.parameters()} or {torch.get_default_dtype()}
    if len(dtypes) != 1:
        raise ValueError(f"save: expected parameters of one dtype; got {sorted(map(str, dtypes))}")
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pyroflows_version": __version__,
        "builder": config["builder"],
        "kwargs": kwargs,
        "dtype": str(dtypes.pop()).removeprefix("torch."),
    }
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


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``config.json`` of a saved flow; raises a clear error if it is unusable."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir() or not config_path.is_file():
        raise FileNotFoundError(
            f"load: no saved flow at {folder}: expected a folder holding {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (as written by pyroflows.save)"
        )
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load: {config_path} is not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(
            f"load: {config_path} is not a pyroflows flow configuration "
            f'(expected "format": "{FORMAT}")'
        )
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load: {config_path} has format_version {document.get('format_version')!r}; "
            f"this pyroflows ({__version__}) reads version {FORMAT_VERSION}"
        )
    for key, kind in (("builder", str), ("kwargs", dict), ("dtype", str)):
        if not isinstance(document.get(key), kind):
            raise ValueError(
                f"load: {config_path} needs a {kind.__name__} under {key!r}; "
                f"got {document.get(key)!r}"
            )
    return document


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> Flow:
    """Rebuild a flow saved by :func:`save` and load its weights.

    Args:
        path: the folder written by :func:`save`.
        device: where to put the flow (default: the CPU).

    Returns:
        The flow, in the dtype it was saved in.

    Raises:
        FileNotFoundError: when the folder, its config or its weights are missing.
        ValueError: for a configuration that is not valid JSON, names an unknown builder, or
            whose arguments the builder rejects, and for weights that do not fit the
            configured architecture (missing or unexpected entries, other shapes).
    """
    document = read_config(path)
    folder = Path(path)
    name = document["builder"]
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(
            f"load: unknown builder {name!r} in {folder / CONFIG_FILE}; known: "
            f"{sorted(REGISTRY)} (import the module defining a custom Flow before loading)"
        )
    dtype = getattr(torch, document["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load: unknown floating dtype {document['dtype']!r} in the config")
    try:
        flow = cls(**document["kwargs"])
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"load: the configuration in {folder / CONFIG_FILE} does not rebuild "
            f"{cls.__name__}: {err}"
        ) from None
    flow.to(dtype)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"load: {weights_path} is missing")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"load: cannot read {weights_path} as weights: {err}") from None
    _load_state(flow, state, weights_path)
    return flow.to(device) if device is not None else flow


def _load_state(flow: Flow, state: Any, where: Path) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"load: {where} does not hold a state_dict")
    own = flow.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: saved {tuple(state[k].shape)}, built {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
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
    flow.load_state_dict(state)
