"""Data-parallel training speed: samples per second of ``pf.fit`` on one and two processes.

    python benchmarks/distributed.py [--steps 300] [--batch 512] [--flow maf] [--dim 16]

Every configuration trains the same flow (default: MAF, 5 layers, hidden (128, 128), 16-D
``warped_gaussian`` data, 100,000 rows, float32, no validation) for ``--steps`` steps in a
fresh process (or two, launched with ``torch.multiprocessing`` on gloo) and reports the training
loop's samples per second (``steps * global batch / history.seconds``, rank 0's clock):

* ``1 proc x 1 thread, batch b``: the baseline;
* ``1 proc x T threads, batch 2b``: one process on the cores two would use, the same global
  batch as two ranks (the fair comparison on a CPU);
* ``2 procs x 1 thread, batch b each``: data-parallel, global batch 2b (``torchrun`` would run
  the same thing);
* ``1 rank in a group (DDP), batch b``: ``distributed=True`` on a one-process group: the cost of
  the DistributedDataParallel wrapper and the reduced losses alone;
* with CUDA (``--cuda``, or when a GPU is present): one GPU, batch ``--gpu-batch``, with and
  without the one-rank DDP wrapper (NCCL). Multi-GPU scaling needs a multi-GPU machine.

Each configuration runs ``--repeats`` times (alternating) and the median is reported; the
machine (CPU model, cores, torch) is printed first.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyroflows as pf


def _flow(args: argparse.Namespace) -> pf.Flow:
    torch.manual_seed(0)
    build = {"maf": pf.MAF, "realnvp": pf.RealNVP, "nsf": pf.NSF}[args.flow]
    return build(dim=args.dim, layers=args.layers, hidden=(args.hidden, args.hidden))


def _data(args: argparse.Namespace) -> torch.Tensor:
    return pf.datasets.toy("warped_gaussian", args.rows, dim=args.dim, seed=0).samples.float()


def _train(args, batch: int, device: str, distributed: bool) -> float:
    """Samples per second of one run of pf.fit in this process (global batch / s)."""
    flow = _flow(args)
    history = pf.fit(
        flow,
        _data(args),
        steps=args.steps,
        batch_size=batch,
        valid=None,
        progress=False,
        seed=0,
        device=device,
        compile=args.compile,
        distributed=distributed,
    )
    world = dist.get_world_size() if distributed else 1
    return args.steps * batch * world / history.seconds


def _rank(rank: int, world: int, folder: str, args, batch: int, device: str) -> None:
    torch.set_num_threads(args.threads_per_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        speed = _train(args, batch, device, distributed=True)
        if rank == 0:
            Path(folder, "speed").write_text(repr(speed))
    finally:
        dist.destroy_process_group()


def _single(_: int, folder: str, args, batch: int, threads: int, device: str) -> None:
    torch.set_num_threads(threads)
    Path(folder, "speed").write_text(repr(_train(args, batch, device, distributed=False)))


def run(kind: str, args, batch: int, threads: int = 1, device: str = "cpu") -> float:
    """One configuration in fresh processes; its samples per second."""
    with tempfile.TemporaryDirectory() as folder:
        if kind == "single":
            mp.spawn(_single, args=(folder, args, batch, threads, device), nprocs=1)
        else:
            world = 2 if kind == "ddp2" else 1
            mp.spawn(_rank, args=(world, folder, args, batch, device), nprocs=world)
        return float(Path(folder, "speed").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flow", default="maf", choices=["maf", "realnvp", "nsf"])
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=512, help="rows per rank per step")
    p.add_argument("--gpu-batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda", action="store_true", help="also the GPU rows (default: if present)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    args.threads_per_rank = max(1, cores // 2)

    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores "
        f"({_cpu_model()}); torch {torch.__version__}, pyroflows {pf.__version__}"
    )
    print(
        f"flow: {args.flow.upper()} dim {args.dim}, {args.layers} layers, hidden "
        f"({args.hidden}, {args.hidden}), float32; data: warped_gaussian, {args.rows:,} rows; "
        f"{args.steps} steps per run, median of {args.repeats}"
        + ("; compiled steps" if args.compile else "")
    )
    b, t = args.batch, args.threads_per_rank
    rows = [
        (f"1 proc x {t} thread, batch {b}", "single", dict(batch=b, threads=t)),
        (f"1 proc x {2 * t} threads, batch {2 * b}", "single", dict(batch=2 * b, threads=2 * t)),
        (f"2 procs x {t} thread, batch {b} each (global {2 * b})", "ddp2", dict(batch=b)),
        (f"1 rank in a group (DDP wrapper), batch {b}", "ddp1", dict(batch=b)),
    ]
    if args.cuda or torch.cuda.is_available():
        g = args.gpu_batch
        rows += [
            (f"1 GPU, batch {g}", "single", dict(batch=g, threads=t, device="cuda")),
            (
                f"1 GPU in a group (DDP wrapper, NCCL), batch {g}",
                "ddp1",
                dict(batch=g, device="cuda"),
            ),
        ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for name, kind, options in rows:
            times[name].append(run(kind, args, **options))
    base = statistics.median(times[rows[0][0]])
    print()
    print("| configuration | samples/s | vs 1 proc x 1 thread |")
    print("|---|---:|---:|")
    for name, _, _ in rows:
        speed = statistics.median(times[name])
        print(f"| {name} | {speed:,.0f} | {speed / base:.2f} |")
    if not (args.cuda or torch.cuda.is_available()):
        print(
            "\nNo GPU here: the single-GPU rows (with and without the DDP wrapper) were not run, "
            "and multi-GPU scaling was not measured."
        )
    print(f"\n({time.perf_counter() - started:.0f} s)")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
