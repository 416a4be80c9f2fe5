"""Checkpoints of the engine: one format, one version number, refused clearly when unusable.

A checkpoint is the file ``state.pt`` in a folder, written atomically (to a temporary name, then
renamed) by ``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses
anything but tensors, numbers, strings and plain containers. It holds:

* ``format`` (``"pyroflows.checkpoint"``), ``version`` (:data:`VERSION`) and ``kind`` (which
  front-end wrote it: ``"fit"``, ``"fit_svi"``, ``"fit_target"``);
* ``fingerprint``: plain data describing the run (the model's identity, the data, the settings
  that shape the result, but not the number of steps, which a resumed run may extend);
  resuming with a different one is refused, naming what differs;
* the run's state: the loss's state (the flow's ``state_dict``, or the param store), the
  optimiser's and the schedule's, the minibatch source's (its generator and permutation), every
  random generator Pyro and torch draw from, the history, the best state and the divergence
  guard's reference.

Version 1 was the three formats written by pyroflows 0.1.0's ``fit``, ``fit_svi`` and
``fit_target``; this version refuses them with a message that says so.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sources import describe

__all__ = [
    "FILE",
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "rng_state",
    "set_rng_state",
]

FORMAT = "pyroflows.checkpoint"
VERSION = 2
FILE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, of another format, or of another run."""


def name_of(value: Any) -> Any:
    """How a fingerprint names a setting: plain values as they are, a function or a module by
    its qualified name, any other object by its type's (never by ``repr``, which may hold a
    memory address that differs from run to run)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    target = getattr(value, "forward", value) if isinstance(value, torch.nn.Module) else value
    return getattr(target, "__qualname__", type(value).__qualname__)


def rng_state() -> dict[str, Any]:
    """Every generator Pyro and torch may draw from, in types ``torch.load(weights_only=True)``
    reads (numpy's state with its key array as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (pyro seeds it)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "random": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002


def _differences(saved: Any, now: Any, path: str = "") -> list[str]:
    """What differs between two fingerprints, as readable lines (``where: old ..., new ...``)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in now:
                out.append(f"{where}: only in the {'checkpoint' if key in saved else 'new run'}")
            else:
                out.extend(_differences(saved[key], now[key], where))
        return out
    nested = isinstance(saved, list) and any(isinstance(v, (dict, list)) for v in saved)
    if nested and isinstance(now, list) and len(saved) == len(now):
        pairs = enumerate(zip(saved, now, strict=True))
        return [d for i, (a, b) in pairs for d in _differences(a, b, f"{path}[{i}]")]
    if saved == now:
        return []
    return [f"{path or 'the run'}: {_short(saved)} in the checkpoint, {_short(now)} now"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _normal(value: Any) -> Any:
    """Fingerprints compare as plain data: tuples as lists, tensors and dtypes as text."""
    if isinstance(value, dict):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


class Checkpoint:
    """The checkpoint of one run in ``folder``.

    Args:
        folder: where ``state.pt`` lives (created on the first save).
        kind: the front-end (``"fit"``, ``"fit_svi"``, ``"fit_target"``).
        fingerprint: plain data that must be equal to resume (see the module notes).

    Example:
        >>> import tempfile
        >>> from pyroflows.engine import Checkpoint, CheckpointError
        >>> folder = tempfile.mkdtemp()
        >>> Checkpoint(folder, "fit", {"lr": 1e-3}).save({"step": 3})
        >>> Checkpoint(folder, "fit", {"lr": 1e-3}).load()["step"]
        3
        >>> try:
        ...     Checkpoint(folder, "fit", {"lr": 1e-2}).load()
        ... except CheckpointError as err:
        ...     print(str(err).split(": ", 2)[2])  # doctest: +ELLIPSIS
        lr: 0.001 in the checkpoint, 0.01 now. Resume with the same model, data and settings...
    """

    def __init__(self, folder: str | os.PathLike, kind: str, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.kind = kind
        self.fingerprint = _normal(fingerprint)

    @classmethod
    def for_run(
        cls,
        folder: str | os.PathLike | None,
        kind: str,
        loss: Any,
        data: Any = None,
        valid: Any = None,
        **settings: Any,
    ) -> Checkpoint | None:
        """The checkpoint of a front-end's run, or ``None`` without a folder (then nothing is
        described: describing the model and the data costs a walk of both).

        Args:
            folder: the checkpoint folder, or ``None``.
            kind: the front-end.
            loss: the run's :class:`~pyroflows.engine.Loss` (its ``fingerprint()``).
            data: the data tensors, described by :func:`~pyroflows.engine.sources.describe`.
            valid: the validation tensors, likewise.
            **settings: the settings that shape the result (named with :func:`name_of`).
        """
        if folder is None:
            return None
        fingerprint = {
            "loss": loss.fingerprint(),
            "data": describe(data),
            "valid": describe(valid),
            "settings": {k: name_of(v) for k, v in settings.items()},
        }
        return cls(folder, kind, fingerprint)

    @property
    def path(self) -> Path:
        return self.folder / FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (with the format, version, kind and fingerprint) atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        document = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            **state,
        }
        tmp = self.path.with_name(FILE + ".tmp")
        torch.save(document, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any]:
        """Read the checkpoint back, refusing one that this run cannot continue.

        Raises:
            CheckpointError: when the file cannot be read (empty, truncated, not a checkpoint),
                is of another format or version, was written by another front-end, or
                describes another run (the message names what differs).
        """
        where = f"the checkpoint in {self.folder}"
        try:
            document = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for empty, truncated or foreign files
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise CheckpointError(
                f"resume: cannot read {self.path} ({reason}); it is not a complete pyroflows "
                "checkpoint: delete it to start afresh, or resume from another folder"
            ) from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            if isinstance(document, dict) and "history" in document:
                raise CheckpointError(
                    f"resume: {where} was written by pyroflows 0.1.0 (checkpoint format 1); "
                    f"this version reads format {VERSION}: start the run afresh (delete the "
                    "folder or use another), or finish it with pyroflows 0.1.0"
                )
            raise CheckpointError(f"resume: {self.path} is not a pyroflows checkpoint")
        if document.get("version") != VERSION:
            raise CheckpointError(
                f"resume: {where} has format version {document.get('version')!r}; this "
                f"pyroflows reads version {VERSION}"
            )
        if document.get("kind") != self.kind:
            raise CheckpointError(
                f"resume: {where} was written by {document.get('kind')}, not {self.kind}"
            )
        differences = _differences(document.get("fingerprint"), self.fingerprint)
        if differences:
            shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
            raise CheckpointError(
                f"resume: {where} was made by another run: {shown}. Resume with the same "
                "model, data and settings, or start afresh in another folder"
            )
        return document
