"""Data-parallel training on ``torch.distributed``: the engine's one place for it.

Under ``torchrun`` (or after the user's own ``torch.distributed.init_process_group``) every
front-end (:func:`pyroflows.fit`, :func:`pyroflows.infer.fit_svi`,
:func:`pyroflows.infer.fit_target`, ``pyroflows fit``) runs data-parallel: one process per
device ("rank"), each holding the whole data set and the whole model, each step every rank
takes its own share of one global minibatch, and the gradients are averaged across ranks
before the optimiser steps, so that every rank holds the same parameters after every step.
:class:`Distributed` is how the engine talks to the process group; nothing here is a
communication layer of its own: it calls ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) and
:class:`~torch.nn.parallel.DistributedDataParallel`.

What each piece does under a group of ``W`` ranks:

* **Minibatches** (:class:`~pyroflows.engine.Batches` with ``shard``): every epoch is one
  permutation drawn from a generator seeded alike on every rank (the seed is rank 0's); step
  ``s`` takes global batch ``s`` of ``W * batch_size`` rows and rank ``r`` its ``r``-th slice,
  so ranks never overlap within an epoch. Only full global batches are taken (the rows left
  over are skipped, a different few each epoch), as ``DistributedSampler(drop_last=True)``.
* **Gradients**: a flow's loss (``fit``, ``fit_target``) runs through
  ``DistributedDataParallel``, which averages gradients while the backward pass runs; a Pyro
  ELBO computes its gradients itself (``loss_and_grads``) on the param store's tensors, which
  no module owns, so they are averaged after the backward pass by one ``all_reduce`` per
  dtype (the same arithmetic as DDP's). Two ranks with ``batch_size`` b therefore take the
  steps of one process with ``2 b`` on the same data order.
* **Start**: every rank's model must be built alike (a parameter checksum of names, shapes,
  dtypes and configuration is compared at start, and a difference is an error naming it), as
  must the data (their description is compared); the values then come from rank 0 (a
  broadcast), so unseeded initialisations agree. Data-dependent initialisation (ActNorm) uses
  the same global first rows on every rank, then rank 0's result is broadcast.
* **Recorded losses, validation, decisions**: losses are averaged across ranks before the
  divergence guard reads them, validation totals are summed across ranks (each validates its
  own shard), and a callback's request to stop counts if any rank makes it: every rank takes
  the same decisions (early stopping, best state, divergence) from the same numbers.
* **Files**: rank 0 alone writes checkpoints (holding every rank's random state), saved models
  and progress bars; every rank reads the checkpoint to resume, so the folder must be shared.
"""

from __future__ import annotations

import atexit
import inspect
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Distributed", "DistributedError", "init", "resolve"]

#: environment variables that ``torchrun`` sets in every process it launches
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ValueError):
    """A data-parallel set-up that cannot train: ranks that disagree on the model, the data or
    the checkpoint, or a process group that is missing."""


def _launched() -> bool:
    """Whether ``torchrun`` (or an equivalent launcher) started this process as one of several."""
    return all(v in os.environ for v in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def init(device: torch.device | None = None) -> None:
    """Join the process group that ``torchrun`` describes in the environment (NCCL when training
    on CUDA, gloo otherwise); destroyed again at exit. Nothing happens when a group exists."""
    if dist.is_initialized():
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(_local_device(device))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's own GPU (``LOCAL_RANK``) under a launcher."""
    if device.type != "cuda" or device.index is not None:
        return device
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))


def resolve(distributed: bool | None, device: torch.device | None = None) -> Distributed | None:
    """The data-parallel set-up of a run, from a front-end's ``distributed`` argument.

    ``None`` (the default): data-parallel when a process group of several ranks exists, or when
    ``torchrun`` launched this process as one of several (the group is then joined here);
    ``True``: the same, but an error without a group or a launcher; ``False``: never (each
    process trains on its own, e.g. an ensemble under one launcher).

    Returns:
        A :class:`Distributed`, or ``None`` for a run on one process.

    Raises:
        DistributedError: ``distributed=True`` without a process group or a launcher.
    """
    if distributed not in (None, True, False):
        raise ValueError(f"distributed: expected None (auto), True or False; got {distributed!r}")
    if distributed is False or not dist.is_available():
        if distributed:
            raise DistributedError("distributed=True: this torch build has no torch.distributed")
        return None
    if not dist.is_initialized() and _launched():
        init(device)
    if not dist.is_initialized():
        if distributed:
            raise DistributedError(
                "distributed=True: no process group; launch the script with torchrun "
                "(torchrun --nproc_per_node=N script.py) or call "
                "torch.distributed.init_process_group first"
            )
        return None
    if dist.get_world_size() == 1 and not distributed:
        return None
    return Distributed(device)


class Distributed:
    """The process group as the engine uses it: this rank, the number of ranks and the
    collectives a data-parallel run needs (each called by every rank at the same point).

    Args:
        device: where this rank trains (``None``: the CPU), which is where NCCL's tensors live.

    Attributes:
        rank: this process's rank, ``0 <= rank < world``.
        world: the number of ranks.
        main: whether this is rank 0 (which writes files and shows progress).

    Example:
        A group of one process (``torchrun`` starts several, each with its own rank):

        >>> import tempfile, torch, torch.distributed as dist
        >>> from pyroflows.engine import Distributed
        >>> folder = tempfile.mkdtemp()
        >>> dist.init_process_group(
        ...     "gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
        >>> group = Distributed()
        >>> group.rank, group.world, group.total([1.5, 2.0])
        (0, 1, [1.5, 2.0])
        >>> group.mean(torch.tensor([2.0, 4.0]))
        tensor([2., 4.])
        >>> dist.destroy_process_group()
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.main = self.rank == 0
        self.backend = dist.get_backend()
        self.device = _local_device(device) if device is not None else None

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world={self.world}, backend={self.backend!r})"

    # -- plain data ---------------------------------------------------------------------------
    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (small plain data), in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def shared(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether any rank's ``flag`` is true."""
        return any(self.gather(bool(flag)))

    def agree(self, what: str, value: Any, advice: str) -> None:
        """Refuse (on every rank) when ranks hold different ``value``\\ s, naming the first that
        differs from rank 0's: ``what`` names the value, ``advice`` says what to do."""
        values = self.gather(value)
        for rank, other in enumerate(values):
            if other != values[0]:
                ours, theirs = _first_difference(values[0], other)
                raise DistributedError(
                    f"distributed: {what} differs between ranks: rank 0 has {ours}, rank "
                    f"{rank} has {theirs}. {advice}"
                )

    # -- tensors ---------------------------------------------------------------------------------
    def _on_backend(self, t: torch.Tensor) -> torch.Tensor:
        if self.backend == "nccl" and t.device.type != "cuda":
            return t.to(self.device)
        if self.backend == "gloo" and t.device.type != "cpu":
            return t.cpu()
        return t

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The average over ranks of ``values`` (any shape), where ``values`` are."""
        moved = self._on_backend(values.detach().clone())
        dist.all_reduce(moved)
        return (moved / self.world).to(values.device)

    def total(self, values: Iterable[float]) -> list[float]:
        """Sums over ranks of a few numbers (float64)."""
        t = self._on_backend(torch.tensor(list(values), dtype=torch.float64))
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of ``tensors`` into every rank's, in place."""
        with torch.no_grad():
            for t in tensors:
                moved = self._on_backend(t.detach())
                dist.broadcast(moved, src=0)
                if moved is not t:
                    t.detach().copy_(moved)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Average ``.grad`` of ``params`` over ranks, in one ``all_reduce`` per device and dtype.

        A parameter gets a gradient where any rank computed one (those that none did stay
        without, as an optimiser then skips them, as it would on one process).
        """
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        for group in groups.values():
            flags = [float(p.grad is not None) for p in group]
            parts = [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group
            ]
            seen = torch.tensor(flags, dtype=group[0].dtype, device=group[0].device)
            flat = torch.cat([seen, *parts])
            flat = self._on_backend(flat)
            dist.all_reduce(flat)
            flat = flat.to(group[0].device)
            seen, offset = flat[: len(group)], len(group)
            for p, count in zip(group, seen.tolist(), strict=True):
                n = p.numel()
                if count > 0:
                    p.grad = (flat[offset : offset + n] / self.world).view_as(p).clone()
                offset += n

    # -- models --------------------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged
        during the backward pass; buffers are broadcast once at start, not at every step)."""
        device = None
        params = list(module.parameters())
        if params and params[0].device.type == "cuda":
            device = [params[0].device]
        ddp = torch.nn.parallel.DistributedDataParallel
        # Buffers (a base's loc/scale, permutations, ActNorm's flag) do not change in training:
        # synced at start, not at every step (the keyword's name changed in torch 2.13).
        # Gradients as views of DDP's buckets save a copy per step (12% of a two-rank CPU step
        # of a 5-layer MAF, benchmarks/distributed.py).
        options = {"device_ids": device, "gradient_as_bucket_view": True}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
            return ddp(module, forward_sync_buffers=False, **options)
        return ddp(module, broadcast_buffers=False, **options)


def structure(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Names, shapes and dtypes of a model's tensors: what every rank's copy must share."""
    return {name: [list(t.shape), str(t.dtype)] for name, t in tensors.items()}


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, str]:
    """A readable account of where two plain values first differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return (
                    (f"{where}" if key in a else f"no {where}"),
                    (f"{where}" if key in b else f"no {where}"),
                )
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], where)
    prefix = f"{path} = " if path else ""
    return f"{prefix}{_short(a)}", f"{prefix}{_short(b)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."
