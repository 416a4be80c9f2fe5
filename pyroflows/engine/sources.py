"""Where the engine's minibatches come from, and the checks data pass before training.

* :class:`Batches`: epochs over a data set of tensors with ``N`` rows each, in minibatches,
  reshuffled every epoch from a seeded generator (saved in checkpoints, so a resumed run sees
  the same batches);
* :class:`Chunks`: a validation set, in fixed chunks (capped in size by the front-ends);
* :class:`NoData`: no data at all (reverse-KL training draws its own samples).

A minibatch is a :class:`Batch`: the rows of each tensor, their indices in the data set and the
data set's size (what a subsampled ``pyro.plate`` needs to scale a minibatch's log-density).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEVICE_DATA_BYTES",
    "VALID_ROWS",
    "Batch",
    "Batches",
    "Chunks",
    "NoData",
    "as_rows",
    "check_rows",
    "default_eval_every",
    "describe",
    "make_generator",
    "shard_of",
    "split",
    "validation_chunks",
]

#: Data larger than this stays where it is and moves to the device one batch at a time.
DEVICE_DATA_BYTES = 1 << 30
#: Validation uses at most this many rows by default (see :func:`validation_chunks`).
VALID_ROWS = 20_000
_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def as_rows(
    name: str, value: Any, dtype: torch.dtype | None = None, integers: bool = True
) -> tuple[torch.Tensor, ...]:
    """A tensor, an array or a tuple of them, as a tuple of detached tensors with as many rows.

    Floating tensors are converted to ``dtype`` (given) or, from numpy, to torch's default
    dtype; integer tensors are kept (converted to ``dtype`` when given) if ``integers``. Data
    that require grad are detached: training must not back-propagate into them.

    Raises:
        TypeError: for something that is not a tensor or an array, or of a non-numeric dtype.
        ValueError: for 0-d tensors, no rows, unequal numbers of rows, or NaN/inf (naming the
            rows).
    """
    parts = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not parts:
        raise ValueError(
            f"{name}: expected a tensor or a tuple of tensors; got an empty {type(value).__name__}"
        )
    out = []
    for part in parts:
        if isinstance(part, np.ndarray):
            part = torch.from_numpy(part)
            if part.is_floating_point() and dtype is None:
                part = part.to(torch.get_default_dtype())
        if not isinstance(part, torch.Tensor):
            raise TypeError(
                f"{name}: expected a tensor, a numpy array or a tuple of them; "
                f"got {type(part).__name__}"
            )
        if not (part.is_floating_point() or (integers and part.dtype in _INTEGER_DTYPES)):
            raise TypeError(f"{name}: expected real numbers; got dtype {part.dtype}")
        if part.dim() == 0:
            raise ValueError(f"{name}: expected one row per data point; got a 0-d tensor")
        if len(part) == 0:
            raise ValueError(f"{name}: expected at least one row; got none")
        part = part.detach()
        if dtype is not None:
            part = part.to(dtype)
        if part.is_floating_point():
            _check_finite(name, part)
        out.append(part)
    if len({len(p) for p in out}) != 1:
        raise ValueError(
            f"{name}: expected tensors with the same number of rows; got {[len(p) for p in out]}"
        )
    return tuple(out)


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = (~torch.isfinite(x.flatten(1) if x.dim() > 1 else x[:, None])).any(1).nonzero()[:, 0]
    if bad.numel():
        shown = bad[:10].tolist()
        more = f" and {bad.numel() - 10} more" if bad.numel() > 10 else ""
        raise ValueError(
            f"{name}: expected finite values; rows {shown}{more} contain NaN or inf "
            f"({bad.numel()} of {len(x)} rows)"
        )


def check_rows(name: str, x: torch.Tensor, width: int | Sequence[int], what: str) -> None:
    """Rows of ``width`` numbers, or of events of the shape ``width``: else a ``ValueError``."""
    shape = (width,) if isinstance(width, int) else tuple(width)
    if tuple(x.shape[1:]) != shape:
        expected = ", ".join(map(str, ("N", *shape)))
        raise ValueError(f"{name}: expected shape ({expected}) ({what}); got {tuple(x.shape)}")


def split(
    rows: tuple[torch.Tensor, ...], valid: Any, generator: torch.Generator
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """``(train, valid)`` from a held-out fraction of ``rows`` (``None``/``0``: no validation).

    The held-out rows are the first ``round(fraction * N)`` (at least 1) of a random
    permutation drawn from ``generator``. A ``valid`` that is not a number is returned as the
    validation set unchanged (the front-end checks it).
    """
    if valid is not None and not (isinstance(valid, (int, float)) and not isinstance(valid, bool)):
        return rows, valid
    fraction = 0.0 if valid is None else float(valid)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"valid: expected a fraction in [0, 1); got {valid!r}")
    n = len(rows[0])
    n_valid = max(1, round(fraction * n)) if fraction > 0 else 0
    if n_valid >= n:
        raise ValueError(f"valid: a fraction of {fraction} leaves no training data out of {n} rows")
    if n_valid == 0:
        return rows, None
    order = torch.randperm(n, generator=generator)
    v_idx, t_idx = order[:n_valid], order[n_valid:]
    return tuple(t[t_idx] for t in rows), tuple(t[v_idx] for t in rows)


def describe(rows: Sequence[torch.Tensor] | None) -> dict[str, Any] | None:
    """A fingerprint of a data set for checkpoints: shapes, dtypes and a digest of up to 1024
    evenly spaced rows (cheap for any size, and different data almost surely differ)."""
    if rows is None:
        return None
    parts = []
    for t in rows:
        n = len(t)
        sample = t[:: max(1, n // 1024)][:1024].detach().cpu().contiguous()
        digest = hashlib.sha1(sample.numpy().tobytes()).hexdigest()[:16]
        parts.append({"shape": list(t.shape), "dtype": str(t.dtype), "digest": digest})
    return {"tensors": parts}


@dataclass
class Batch:
    """A minibatch: ``rows`` of each data tensor (on the device), their ``index`` in the data
    set (on the device) and the data set's ``size``."""

    rows: tuple[torch.Tensor, ...]
    index: torch.Tensor
    size: int


def _place(rows: tuple[torch.Tensor, ...], device: torch.device | None) -> tuple:
    """Rows on ``device`` when they fit in :data:`DEVICE_DATA_BYTES`, else where they are."""
    if device is None or sum(t.numel() * t.element_size() for t in rows) > DEVICE_DATA_BYTES:
        return rows
    return tuple(t.to(device) for t in rows)


class Batches:
    """Epochs over a data set in shuffled minibatches of ``batch_size`` rows.

    Step ``s`` takes position ``s mod steps_per_epoch`` of the current epoch's permutation; a new
    permutation is drawn from ``generator`` at the start of every epoch but the first (whose
    permutation is drawn at construction). With ``drop_last`` every step takes a full batch (the
    rows left over are skipped in that epoch, a different few each epoch), so that one compiled
    graph serves the run.

    **Shards.** With ``shard=(rank, world)`` (data-parallel training, see
    :mod:`pyroflows.engine.distributed`) every rank holds the same data and a generator seeded
    alike; step ``s`` takes global batch ``s`` of ``world * batch_size`` rows of the shared
    permutation and this rank its ``rank``-th slice of ``batch_size`` rows. Only full global
    batches are taken (as with ``drop_last``), so ranks never overlap in an epoch and two ranks
    with ``batch_size`` b see, together, the batches of one process with ``2 b``. :meth:`first`
    (the rows of data-dependent initialisation) is the same on every rank.

    Args:
        rows: the data tensors, ``N`` rows each.
        batch_size: rows per step.
        generator: draws the permutations (seeded by the front-end).
        device: where batches go (``None``: where the data are). Data up to
            :data:`DEVICE_DATA_BYTES` move there once; larger data move batch by batch.
        drop_last: take full batches only (when ``N >= batch_size``).
        transform: applied to the first tensor of every batch (e.g. dequantisation).
        shard: ``(rank, world)`` of a data-parallel run; ``(0, 1)`` on one process.

    Raises:
        ValueError: with shards, for data with fewer rows than one global batch.
    """

    def __init__(
        self,
        rows: tuple[torch.Tensor, ...],
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | None = None,
        drop_last: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.rows = _place(rows, device)
        self.size = len(rows[0])
        self.batch_size = batch_size
        self.generator = generator
        self.device = device
        self.transform = transform
        self.rank, self.world = shard
        span = batch_size * self.world  # rows of one global batch
        if self.world > 1 and self.size < span:
            raise ValueError(
                f"batch_size: {self.world} ranks with batch_size={batch_size} take {span} rows "
                f"per step, more than the {self.size} rows of training data; lower batch_size"
            )
        full = (drop_last or self.world > 1) and self.size >= span
        self.steps_per_epoch = self.size // span if full else math.ceil(self.size / span)
        self.order = torch.randperm(self.size, generator=generator)

    def batch(self, step: int) -> Batch:
        """The minibatch of step ``step`` (steps are taken in order, from 0 or a resume point)."""
        position = step % self.steps_per_epoch
        if position == 0 and step > 0:
            self.order = torch.randperm(self.size, generator=self.generator)
        begin = (position * self.world + self.rank) * self.batch_size
        index = self.order[begin : begin + self.batch_size]
        rows = tuple(self._to_device(t[index.to(t.device)]) for t in self.rows)
        if self.transform is not None:
            rows = (self.transform(rows[0]), *rows[1:])
        return Batch(rows, self._to_device(index), self.size)

    def first(self, n: int) -> tuple[torch.Tensor, ...]:
        """The first ``n`` rows of the data (for data-dependent initialisation), on the device."""
        rows = tuple(self._to_device(t[:n]) for t in self.rows)
        if self.transform is not None:
            rows = (self.transform(rows[0]), *rows[1:])
        return rows

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device is None else t.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"]


class Chunks:
    """A validation set in consecutive chunks of ``chunk_size`` rows (on the device).

    With ``shard=(rank, world)`` this rank iterates over its share only: the consecutive
    ``world``-th part of the rows that starts at ``rank * size // world``; every
    :class:`Batch` keeps the rows' indices in the whole set and the whole set's ``size``.
    """

    def __init__(
        self,
        rows: tuple[torch.Tensor, ...],
        chunk_size: int,
        device: torch.device | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.size = len(rows[0])
        rank, world = shard
        self.begin, self.end = rank * self.size // world, (rank + 1) * self.size // world
        self.rows = _place(tuple(t[self.begin : self.end] for t in rows), device)
        self.chunk_size = chunk_size
        self.device = device

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, self.end - self.begin, self.chunk_size):
            begin = self.begin + start
            index = torch.arange(begin, min(begin + self.chunk_size, self.end))
            rows = tuple(t[start : start + self.chunk_size] for t in self.rows)
            if self.device is not None:
                rows = tuple(t.to(self.device, non_blocking=True) for t in rows)
                index = index.to(self.device)
            yield Batch(rows, index, self.size)


class NoData:
    """No data: every step's batch is ``None`` (the loss draws its own samples)."""

    steps_per_epoch = 1

    def batch(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def make_generator(
    seed: int | None, checkpoint: Any = None, distributed: Any = None
) -> torch.Generator:
    """The generator of a run's split and minibatches: seeded with ``seed``; without one, seed 0
    when the run has a checkpoint (so that a resumed run splits its data the same way), else a
    seed drawn from torch's global generator (rank 0's under a process group: every rank
    splits and shuffles alike and takes its own shard)."""
    if seed is None:
        seed = 0 if checkpoint is not None else int(torch.randint(2**62, ()).item())
        if distributed is not None:
            seed = distributed.shared(seed)
    return torch.Generator().manual_seed(seed)


def shard_of(distributed: Any) -> tuple[int, int]:
    """``(rank, world)`` of a run (``(0, 1)`` on one process)."""
    return (0, 1) if distributed is None else (distributed.rank, distributed.world)


def validation_chunks(
    rows: tuple[torch.Tensor, ...] | None,
    max_rows: int | None,
    chunk_size: int,
    device: torch.device | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Chunks | None:
    """The validation set in chunks, at most ``max_rows`` rows of it (evenly spaced, so that
    every part of an ordered validation set is represented; a held-out fraction is shuffled
    already); this rank's share of them with ``shard`` (see :class:`Chunks`). ``None`` for no
    validation."""
    if rows is None:
        return None
    n = len(rows[0])
    if max_rows is not None and n > max_rows:
        index = torch.linspace(0, n - 1, max_rows).round().long()
        rows = tuple(t[index] for t in rows)
    return Chunks(rows, chunk_size, device, shard)


def default_eval_every(total: int, valid: Chunks | None, batch_size: int, cost: float = 1.0) -> int:
    """About 40 validations per run, but never fewer training rows between two validations than
    validation rows: validation (a forward pass) then costs at most about a third of training.
    ``cost``: what validating one row costs against training on one (a loss's
    ``validation_cost``), which multiplies the validation rows in that rule; an expensive
    validation (``cost > 1``) still runs at least 5 times per run, so that early stopping and
    the best state have something to go on."""
    least = math.ceil(valid.size * cost / batch_size) if valid is not None else 1
    every = max(1, total // 40, least)
    return min(every, max(1, total // 5)) if cost > 1 else every
