"""Speed of pyroflows next to Pyro's built-in transforms, zuko, nflows and normflows, in one run.

    python benchmarks/speed.py [--device cpu|cuda] [--threads 1] [--no-compile] [--quick]

For MAF, IAF, RealNVP and NSF at (dim 8, batch 512) and (dim 64, batch 256), 5 layers, hidden
widths (128, 128), float32, it measures per library:

* **train step**: samples per second of ``log_prob`` of a fresh batch, ``backward`` and an Adam
  step (for IAF, the flow's natural training, a reverse-KL step: ``rsample`` a batch and score
  it, which the fused/cached paths make one pass per layer);
* **log_prob**: samples per second of ``log_prob`` of a fresh batch without gradients (for IAF
  this inverts the flow, ``dim`` sequential passes per layer, in every library);
* **sample**: samples per second of ``sample`` without gradients (sequential for MAF);
* **memory**: the peak of memory allocated during one train step beyond what existed before it
  (activations, gradients, temporaries; parameters, data and optimiser state excluded). On the
  CPU it is counted by tracking the storage of every tensor the step creates (eager steps only);
  on CUDA it is ``torch.cuda.max_memory_allocated`` (compiled steps too).

Each figure is the median over repeats, the functions of one row timed in alternation so that
drifts in machine load hit all alike. The peers are built by ``benchmarks/peers.py`` with the
same architecture (its docstring lists the few differences that cannot be removed). pyroflows
trains through :class:`pyroflows.TrainStep`, as ``pf.fit`` does: Adam with its fused
implementation. The peers use ``torch.optim.Adam`` as their documentation shows
(``--peer-adam fused`` gives them the fused one too, which isolates the flows' own code).
"compiled" is ``TrainStep(compile=True)`` (``torch.compile``; on CUDA the whole step recorded
as one CUDA graph): its first steps, which compile and record, are excluded from the timing.
Ratios are pyroflows / peer: above 1, we are faster.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pyroflows as pf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

KINDS = ("MAF", "IAF", "RealNVP", "NSF")
CONFIGS = ((8, 512), (64, 256))
LAYERS, HIDDEN, BINS, BOUND = 5, (128, 128), 8, 5.0
LR = 1e-4


class Ours(peers.PeerFlow):
    """Our builder for ``kind``, behind the peers' interface."""

    library = "pyroflows"

    def __init__(self, kind: str, dim: int, device: str) -> None:
        common = {"layers": LAYERS, "hidden": HIDDEN}
        if kind == "MAF":
            flow = pf.MAF(dim, **common)
        elif kind == "IAF":
            flow = pf.IAF(dim, **common)
        elif kind == "RealNVP":
            flow = pf.RealNVP(dim, **common)
        elif kind == "NSF":
            # Reversal between layers, as the peers; no ActNorm (they have none).
            flow = pf.NSF(dim, bins=BINS, bound=BOUND, mixing="reverse", actnorm=False, **common)
        else:
            raise ValueError(kind)
        self.flow = self.module = flow.to(device)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(x)

    def sample(self, n: int) -> torch.Tensor:
        return self.flow().sample((n,))

    def rsample_and_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.flow()
        z = d.rsample((n,))
        return z, d.log_prob(z)


# -- train steps ----------------------------------------------------------------------------------
def _adam(params, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=LR, fused=True) if fused else torch.optim.Adam(params, lr=LR)


def peer_step(model: peers.PeerFlow, kind: str, x: torch.Tensor, fused: bool) -> Callable:
    """One training step of a peer, the way its users write it."""
    opt = _adam(model.module.parameters(), fused)
    batch = len(x)

    def step() -> None:
        if kind == "IAF":
            loss = model.rsample_and_log_prob(batch)[1].mean()
        else:
            loss = -model.log_prob(x.clone()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def our_step(model: Ours, kind: str, x: torch.Tensor, compile: bool) -> Callable:
    """Our training step: :class:`pyroflows.TrainStep` (a reverse-KL twin of it for IAF)."""
    if kind != "IAF":
        train = pf.TrainStep(model.flow, lr=LR, compile=compile)
        return lambda: train(x.clone())
    batch = len(x)
    opt = pf.engine.make_optimizer("adam", list(model.flow.parameters()), LR, 0.0)

    def loss() -> torch.Tensor:
        return model.rsample_and_log_prob(batch)[1].mean()

    compiled = torch.compile(loss, mode="reduce-overhead" if x.is_cuda else None)
    calls = 0

    def step() -> None:
        nonlocal calls
        if compile and calls and x.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        value = (compiled if compile and calls else loss)()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        calls += 1

    return step


# -- measurement ----------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_rates(fns: list[Callable], batch: int, repeats: int, device: str) -> list[float]:
    """Samples per second of each function, median over repeats, timed in alternation."""
    for fn in fns:
        for _ in range(3):
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - start)
    return [batch / statistics.median(ts) for ts in times]


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created under the mode and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(step: Callable, device: str, compiled: bool) -> float | None:
    """Peak memory of one step beyond what was allocated before it (``None``: not measured)."""
    step()  # optimiser state and compiled graphs exist before measuring
    if compiled:
        # On the CPU compiled kernels allocate outside the dispatcher; on CUDA a recorded
        # graph holds its memory in a pool allocated once, before the step.
        return None
    if device == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        _sync(device)
        return float(torch.cuda.max_memory_allocated() - base)
    with _LiveBytes() as counter:
        step()
    return float(counter.peak)


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


def _fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def _cell(ours: float | None, peer: float | None, fmt: Callable, higher_better: bool) -> str:
    if peer is None:
        return "-"
    if ours is None or not peer:
        return fmt(peer)
    ratio = ours / peer if higher_better else peer / ours
    return f"{fmt(peer)} ({ratio:.2f})"


def run_row(kind, dim, batch, libraries, args) -> dict:
    """All figures of one (kind, dim, batch) row."""
    device = args.device
    torch.manual_seed(0)
    x = torch.randn(batch, dim, device=device)
    models: dict[str, peers.PeerFlow] = {"pyroflows": Ours(kind, dim, device)}
    for library in libraries:
        model = peers.build(library, kind, dim, HIDDEN, LAYERS, BINS, BOUND, device=device)
        if model is not None:
            models[library] = model
    for model in models.values():
        peers.perturb(model.module)

    steps = {name: None for name in models}
    steps["pyroflows"] = our_step(models["pyroflows"], kind, x, compile=False)
    for name, model in models.items():
        if name != "pyroflows":
            steps[name] = peer_step(model, kind, x, args.peer_adam == "fused")
    if args.compile:
        compiled = Ours(kind, dim, device)
        compiled.flow.load_state_dict(models["pyroflows"].flow.state_dict())
        steps["compiled"] = our_step(compiled, kind, x, compile=True)
        start = time.perf_counter()
        for _ in range(pf.TrainStep.WARMUP + 3):  # eager, compile, warm up, record, replay
            steps["compiled"]()
        _sync(device)
        compile_s = time.perf_counter() - start
    else:
        compile_s = None

    names = list(steps)
    rates = median_rates([steps[n] for n in names], batch, args.repeats, device)
    result = {"train": dict(zip(names, rates, strict=True)), "compile_s": compile_s}
    result["memory"] = {n: peak_bytes(steps[n], device, n == "compiled") for n in names}

    names = list(models)
    with torch.no_grad():
        lp = [lambda m=models[n]: m.log_prob(x.clone()) for n in names]
        sm = [lambda m=models[n]: m.sample(batch) for n in names]
        slow_repeats = max(3, args.repeats // 3)
        lp_repeats = slow_repeats if kind == "IAF" else args.repeats
        sm_repeats = slow_repeats if kind == "MAF" else args.repeats
        lp_rates = median_rates(lp, batch, lp_repeats, device)
        sm_rates = median_rates(sm, batch, sm_repeats, device)
    result["log_prob"] = dict(zip(names, lp_rates, strict=True))
    result["sample"] = dict(zip(names, sm_rates, strict=True))
    return result


def print_table(title: str, rows: dict, libraries: list[str], key: str, fmt, higher_better=True):
    has_compiled = any("compiled" in r[key] for r in rows.values())
    columns = ["pyroflows", *(["compiled"] if has_compiled else []), *libraries]
    print(f"\n{title}")
    header = f"{'flow':<9}" + "".join(f"{c:>17}" for c in columns)
    print(header)
    for kind, r in rows.items():
        figures = r[key]
        ours = figures.get("pyroflows")
        cells = [fmt(ours)]
        if has_compiled:
            compiled = figures.get("compiled")
            if compiled is None or ours is None:
                cells.append(fmt(compiled))
            else:
                ratio = compiled / ours if higher_better else ours / compiled
                cells.append(f"{fmt(compiled)} ({ratio:.2f})")
        cells += [_cell(ours, figures.get(lib), fmt, higher_better) for lib in libraries]
        print(f"{kind:<9}" + "".join(f"{c:>17}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--configs", default=",".join(f"{d}x{b}" for d, b in CONFIGS))
    parser.add_argument("--libraries", default=None, help="comma-separated peers (default: all)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--peer-adam", choices=("default", "fused"), default="default")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    torch.set_num_threads(args.threads)
    libraries = peers.available() if args.libraries is None else args.libraries.split(",")
    versions = {"torch": torch.__version__, "pyro": pyro.__version__, "pyroflows": pf.__version__}
    for name in libraries[1:]:
        versions[name] = importlib.metadata.version(name)
    machine = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} CPU thread(s)"
    )
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"device {args.device} ({machine}), float32, {LAYERS} layers, hidden {HIDDEN}; "
        f"median of {args.repeats}; peers' Adam: {args.peer_adam}; ratio = pyroflows / peer "
        "(compiled column: compiled / pyroflows eager)"
    )
    for config in args.configs.split(","):
        dim, batch = (int(v) for v in config.split("x"))
        rows = {}
        for kind in args.kinds.split(","):
            rows[kind] = run_row(kind, dim, batch, libraries, args)
            if rows[kind]["compile_s"] is not None:
                print(f"  ({kind}, dim {dim}: compiling took {rows[kind]['compile_s']:.0f} s)")
        where = f"dim {dim}, batch {batch}"
        print_table(f"train step, samples/s ({where})", rows, libraries, "train", _fmt_rate)
        print_table(f"log_prob, samples/s ({where})", rows, libraries, "log_prob", _fmt_rate)
        print_table(f"sample, samples/s ({where})", rows, libraries, "sample", _fmt_rate)
        print_table(
            f"train-step peak memory, MiB ({where}; ratio = peer / pyroflows)",
            rows,
            libraries,
            "memory",
            _fmt_mib,
            higher_better=False,
        )


if __name__ == "__main__":
    main()
