"""What a continuous flow's choices cost: solvers, trace, adjoint and compiled flow matching.

    python benchmarks/cnf_solvers.py [--threads 1] [--repeats 5] [--device cpu|cuda]

For ``pf.CNF(dim, hidden=(64, 64))`` with its field perturbed away from the identity (noise of
unit gain on the weights: a field of order one), batch 512:

1. ``log_prob`` of points (one solve with the trace) under dopri5 (atol = rtol = 1e-5) and rk4
   (32 steps), exact trace against Hutchinson's estimate, at dims 2, 8, 32, 64: ms per call and
   field evaluations per solve;
2. one maximum-likelihood step (log_prob, backward) with back-propagation through the solver
   against the adjoint method, at dim 2 and 8;
3. torchdiffeq's fixed-step rk4 against a minimal loop written here (the same arithmetic, the
   3/8 rule: four field evaluations per step, no error control) on sampling without the trace:
   is there overhead that would justify in-house solvers?
4. one flow-matching step (dim 2 and 64), eager against ``compile=True`` (through
   :class:`pyroflows.engine.Step` with the loss's ``inputs``, as ``pf.fit`` does: the base
   draws and times are made outside the compiled step; on CUDA that also records the step as a
   CUDA graph).

Times are medians of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import pyroflows as pf
from pyroflows.engine import Batch, FlowMatching, Step, make_optimizer

BATCH = 512
HIDDEN = (64, 64)


def perturbed(flow: pf.CNF, seed: int = 0) -> pf.CNF:
    """The flow with noise of unit gain on every weight (``N(0, 1 / fan_in)``; 0.1 on biases):
    a field of order one at every dimension, as a trained one, instead of the zero start."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            scale = 1 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1
            p.add_(scale * torch.randn_like(p))
    return flow


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def rk4_loop(field, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Runge-Kutta 4 over [0, 1] by the 3/8 rule: the arithmetic of torchdiffeq's ``rk4``."""
    h = 1.0 / steps
    t = torch.zeros((), dtype=x.dtype, device=x.device)
    for _ in range(steps):
        k1 = field(x, t)
        k2 = field(x + h * k1 / 3, t + h / 3)
        k3 = field(x + h * (k2 - k1 / 3), t + 2 * h / 3)
        k4 = field(x + h * (k1 - k2 + k3), t + h)
        x = x + h * (k1 + 3 * (k2 + k3) + k4) / 8
        t = t + h
    return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"python benchmarks/cnf_solvers.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}")
    print(f"pf.CNF(dim, hidden={HIDDEN}), batch {BATCH}, medians of {args.repeats}\n")

    print("1. log_prob of points (no gradients): ms per call, field evaluations per solve")
    print(f"{'dim':>4} {'solver':>8} {'trace':>11} {'ms':>9} {'evals':>6}")
    for dim in (2, 8, 32, 64):
        flow = perturbed(pf.CNF(dim, hidden=HIDDEN)).to(device)
        x = torch.randn(BATCH, dim, device=device)
        for solver in ("dopri5", "rk4"):
            for trace in ("exact", "hutchinson"):
                with flow.options(solver=solver, trace=trace), torch.no_grad():
                    ms = timed(lambda f=flow, x=x: f().log_prob(x), args.repeats, device)
                    evals = flow.transform.evaluations
                print(f"{dim:>4} {solver:>8} {trace:>11} {ms:>9.1f} {evals:>6}")

    print("\n2. one maximum-likelihood step (log_prob + backward), dopri5, exact trace")
    print(f"{'dim':>4} {'gradients':>16} {'ms':>9}")
    for dim in (2, 8):
        flow = perturbed(pf.CNF(dim, hidden=HIDDEN)).to(device)
        x = torch.randn(BATCH, dim, device=device)
        for adjoint in (False, True):

            def step(flow=flow, x=x):
                flow.zero_grad()
                (-flow().log_prob(x).mean()).backward()

            with flow.options(adjoint=adjoint):
                ms = timed(step, args.repeats, device)
            label = "adjoint" if adjoint else "back-propagation"
            print(f"{dim:>4} {label:>16} {ms:>9.1f}")

    print("\n3. sampling without the trace, rk4: torchdiffeq against a loop written here")
    print(f"{'dim':>4} {'steps':>6} {'torchdiffeq ms':>15} {'loop ms':>9} {'ratio':>6}")
    for dim in (2, 64):
        flow = perturbed(pf.CNF(dim, hidden=HIDDEN)).to(device)
        z = torch.randn(BATCH, dim, device=device)
        field = flow.transform.field
        for steps in (8, 32):
            with torch.no_grad(), flow.options(solver="rk4", steps=steps):
                ours = timed(lambda t=flow.transform, z=z: t.path(z, times=2), args.repeats, device)
                loop = timed(lambda v=field, z=z, n=steps: rk4_loop(v, z, n), args.repeats, device)
                same = flow.transform.path(z, times=2)[-1] - rk4_loop(field, z, steps)
                assert same.abs().max() < 1e-4, "not the same arithmetic"
            print(f"{dim:>4} {steps:>6} {ours:>15.2f} {loop:>9.2f} {ours / loop:>6.2f}")

    print("\n4. one flow-matching step, eager against compile=True (draws included)")
    print(f"{'dim':>4} {'eager ms':>9} {'compiled ms':>12} {'speed-up':>9}")
    for dim in (2, 64):
        results = []
        for compile in (False, True):
            flow = pf.CNF(dim, hidden=HIDDEN).to(device)
            loss = FlowMatching(flow)
            step = Step(loss, make_optimizer("adam", loss.parameters(), 1e-3), compile=compile)
            rows = torch.randn(BATCH, dim, device=device)
            batch = Batch((rows,), torch.arange(BATCH, device=device), BATCH)
            for _ in range(12):  # compiling (and, on CUDA, recording the graph) comes first
                step(*loss.inputs(batch))

            def one(step=step, loss=loss, batch=batch):  # as the engine's loop calls it
                return step(*loss.inputs(batch))

            results.append(timed(one, 10 * args.repeats, device))
        print(f"{dim:>4} {results[0]:>9.3f} {results[1]:>12.3f} {results[0] / results[1]:>8.2f}x")


if __name__ == "__main__":
    main()
