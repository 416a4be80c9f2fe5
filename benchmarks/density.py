"""Density estimation: test NLL, KL gap and speed of our flows next to Pyro's built-ins.

    python benchmarks/density.py [--steps 1500] [--seed 0] [--threads N] [--lr 1e-3]
                                 [--flows NSF BNAF ...] [--no-pyro] [--no-nsf-defaults]

On two 2-D data sets with exact densities (``pyroflows.datasets.toy``: "ring", eight Gaussians
on a circle, and "checkerboard"), each of our builders and Pyro's closest built-in stack is
trained in the same run with the same budget: the same training loop (:func:`pyroflows.fit`,
Pyro's transforms wrapped in a :class:`pyroflows.Flow`), the same steps, batch size (256),
Adam learning rate (``--lr``, by default ``pf.fit``'s, 1e-3) with cosine decay, the same 10%
validation split (the best validation state is kept) and the same data. Architecture on both
sides: 5 layers, conditioners with hidden widths (128, 128), splines with 8 bins.

* ours: ``pf.MAF``, ``pf.RealNVP``, ``pf.NSF`` with those sizes and otherwise the builders'
  defaults (ActNorm after each layer; reversed order between MAF layers, LU-linear mixing
  between NSF layers, alternating masks for RealNVP).
* Pyro: ``affine_autoregressive(...).inv`` (MAF orientation: one pass for the density),
  ``affine_coupling`` and ``spline_coupling`` (``bound=5``, ours' default: Pyro's default of 3
  would leave the checkerboard's edges in the identity tails), with ``Permute`` (reversal)
  between layers, on a standard Normal base.

The flows with numerical inverses (issue 17), in the density-fast orientation (the builders'
default: ``log_prob`` is one network pass per layer, sampling solves), sized to the parameter
count of the rows above (MAF 87k, NSF 99k; counts are ``numel`` of every parameter, masked
weights included, as for the MADEs):

* ``NAF``: ``pf.NAF(2, layers=5, hidden=(112, 112))``, the deep sigmoidal transformer (DSF)
  with 8 units (92k).
* ``BNAF``: ``pf.BNAF(2, layers=5, hidden_factor=64, depth=2)`` (87k); Pyro's peer is
  ``block_autoregressive(2, hidden_factors=[64, 64]).inv`` with ``Permute`` between the 5
  layers (87k; Pyro's BNAF has no inverse, so it cannot sample in this orientation).
* ``ResFlow``: ``pf.ResidualFlow(2, layers=5, hidden=(128, 128), actnorm=True)``, the same
  layers and widths as the rows above (86k; log|det J| exact at d = 2).
* ``ResFlow20``: ``pf.ResidualFlow(2, layers=20, hidden=(62, 62), actnorm=True)``: the same
  parameters (84k) in 20 thinner blocks (a block's log|det J| is bounded by its Lipschitz
  constant, so residual flows need depth).

Pyro has no DSF or residual flow: those rows have no Pyro cells.

The KL gap is ``KL(p || q) = E_p[log p - log q]``, estimated on held-out samples with the exact
``log p`` (paired, so the standard error shown is that of the difference). Speed (second
table): training milliseconds per step (the whole ``pf.fit`` time, validation included, over
the steps), ``log_prob`` throughput on the test points and sampling throughput (``--n-sample``
points per call), in points per second, each call repeated for at least ``TIMING_S`` seconds
after one warm-up call, under ``torch.no_grad()``. A last line reports ``pf.NSF(dim=2)``
trained with ``pf.fit``'s defaults for 3000 steps on the ring.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import pyro
import pyro.distributions.transforms as T
import torch

import pyroflows as pf
from pyroflows.datasets import toy

LAYERS, HIDDEN, BINS, BATCH = 5, (128, 128), 8, 256
PYRO_BOUND = 5.0
DATASETS = ("ring", "checkerboard")
FLOWS = ("MAF", "RealNVP", "NSF", "NAF", "BNAF", "ResFlow", "ResFlow20")
PYRO_FLOWS = ("MAF", "RealNVP", "NSF", "BNAF")  # the others have no Pyro built-in
TIMING_S = 0.5


def ours(kind: str) -> pf.Flow:
    if kind == "MAF":
        return pf.MAF(2, layers=LAYERS, hidden=HIDDEN)
    if kind == "RealNVP":
        return pf.RealNVP(2, layers=LAYERS, hidden=HIDDEN)
    if kind == "NSF":
        return pf.NSF(2, layers=LAYERS, hidden=HIDDEN, bins=BINS)
    if kind == "NAF":
        return pf.NAF(2, layers=LAYERS, hidden=(112, 112), transformer="dsf", units=8)
    if kind == "BNAF":
        return pf.BNAF(2, layers=LAYERS, hidden_factor=64, depth=2)
    if kind == "ResFlow":
        return pf.ResidualFlow(2, layers=LAYERS, hidden=HIDDEN, actnorm=True)
    if kind == "ResFlow20":
        return pf.ResidualFlow(2, layers=20, hidden=(62, 62), actnorm=True)
    raise ValueError(kind)


def pyros(kind: str, dim: int = 2) -> pf.Flow:
    """Pyro's built-in stack for ``kind``, wrapped in a Flow so that pf.fit trains it."""
    modules, parts = [], []
    for i in range(LAYERS):
        if i > 0:
            parts.append(T.Permute(torch.arange(dim - 1, -1, -1)))
        if kind == "MAF":
            t = T.affine_autoregressive(dim, hidden_dims=list(HIDDEN))
        elif kind == "RealNVP":
            t = T.affine_coupling(dim, hidden_dims=list(HIDDEN))
        elif kind == "NSF":
            t = T.spline_coupling(dim, hidden_dims=list(HIDDEN), count_bins=BINS, bound=PYRO_BOUND)
        elif kind == "BNAF":
            t = T.block_autoregressive(dim, hidden_factors=[64, 64])
        else:
            raise ValueError(kind)
        modules.append(t)
        # MAF, BNAF: the network pass in the density direction (data -> base)
        parts.append(t.inv if kind in ("MAF", "BNAF") else t)
    flow = pf.Flow(parts, dim=dim)
    # ``t.inv`` is not an nn.Module, so Flow cannot register it: keep the modules ourselves so
    # that .parameters() (and so the optimiser) reaches them.
    flow.pyro_modules = torch.nn.ModuleList(modules)
    return flow


def kl_gap(flow: pf.Flow, truth, test: torch.Tensor) -> tuple[float, float, float, float]:
    """(test NLL, its standard error, KL gap, its standard error), in nats."""
    with torch.no_grad():
        # a fresh tensor: Pyro's transforms cache their last input by identity
        nll = -flow().log_prob(test.clone()).double()
        log_p = truth.log_prob(test.double())
    n = len(test)
    diff = nll + log_p
    return (
        nll.mean().item(),
        nll.std().item() / math.sqrt(n),
        diff.mean().item(),
        diff.std().item() / math.sqrt(n),
    )


def n_params(flow: torch.nn.Module) -> int:
    return sum(p.numel() for p in flow.parameters())


def throughput(call, n: int) -> float | str:
    """Points per second of ``call()`` (``n`` points per call) under no_grad, or the reason it
    fails (Pyro's BNAF cannot sample in the density-fast orientation)."""
    try:
        with torch.no_grad():
            call()  # warm-up
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < TIMING_S or calls == 0:
                call()
                calls += 1
    except Exception as err:  # a flow that cannot do it is a result
        return type(err).__name__
    return calls * n / elapsed


def speed(flow: pf.Flow, test: torch.Tensor, n_sample: int) -> tuple[float | str, float | str]:
    """(log_prob points/s on ``test``, sampling points/s of ``n_sample`` points)."""
    # a fresh tensor per call: Pyro's transforms cache their last input by identity
    log_prob = throughput(lambda: flow().log_prob(test.clone()), len(test))
    sample = throughput(lambda: flow().sample((n_sample,)), n_sample)
    return log_prob, sample


def _rate(value: float | str) -> str:
    return f"{value:>12,.0f}" if isinstance(value, float) else f"{value:>12}"


def train(
    flow: pf.Flow, data: torch.Tensor, steps: int, seed: int, lr: float = 1e-3
) -> tuple[float, str]:
    """pf.fit with the shared budget; returns (seconds, note)."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    note = ""
    try:
        pf.fit(flow, data, steps=steps, batch_size=BATCH, lr=lr, progress=False, seed=seed)
    except pf.TrainingDiverged as err:
        note = f"diverged at step {err.step}"
    return time.perf_counter() - start, note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's (default 1e-3, pf.fit's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--n-train", type=int, default=20_000, help="training points")
    parser.add_argument("--n-test", type=int, default=10_000, help="test points")
    parser.add_argument(
        "--n-sample", type=int, default=1000, help="points per sampling call (throughput)"
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument(
        "--flows",
        nargs="*",
        default=list(FLOWS),
        choices=FLOWS,
        help="default: all; none: only the last line",
    )
    parser.add_argument("--no-pyro", action="store_true", help="skip Pyro's built-ins")
    parser.add_argument(
        "--no-nsf-defaults", action="store_true", help="skip the NSF(dim=2), 3000-step line"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"python benchmarks/density.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, pyroflows {pf.__version__}, "
        f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}"
    )
    print(
        f"budget per flow: {args.steps} steps, batch {BATCH}, Adam lr {args.lr:g} with cosine "
        f"decay, 10% of {args.n_train:,} training points for validation; {LAYERS} layers, hidden "
        f"{HIDDEN}, {BINS} bins; test: {args.n_test:,} fresh points; seed {args.seed}"
    )
    print(
        "new flows (NAF, BNAF, ResFlow*): density-fast orientation (log_prob one pass, sampling "
        "solves numerically); sizes in the docstring"
    )
    print("NLL and KL(p||q) in nats per point (± one standard error); s: training seconds\n")
    header = f"{'dataset':<13}{'flow':<10}{'params':>7}{'ours NLL':>17}{'ours KL':>17}{'s':>6}"
    if not args.no_pyro:
        header += f"   {'params':>7}{'Pyro NLL':>17}{'Pyro KL':>17}{'s':>6}"
    if args.flows:
        print(header)
        print("-" * len(header))
    notes, speeds = [], []
    for name in args.datasets if args.flows else ():
        truth = toy(name, args.n_train + args.n_test, seed=args.seed)
        data, test = truth.samples[: args.n_train], truth.samples[args.n_train :]
        for kind in args.flows:
            cells, rates = [], []
            sides = [("ours", ours)]
            if kind in PYRO_FLOWS and not args.no_pyro:
                sides.append(("Pyro", pyros))
            for side, build in sides:
                torch.manual_seed(args.seed)
                flow = build(kind)
                seconds, note = train(flow, data, args.steps, args.seed, args.lr)
                nll, nll_se, gap, gap_se = kl_gap(flow, truth, test)
                mark = ""
                if note:
                    notes.append(
                        f"{side} {kind} on {name}: {note} (restored the last finite state)"
                    )
                    mark = "*"
                cells.append(
                    f"{n_params(flow):>7,}{nll:>9.4f} ±{nll_se:.4f}{gap:>9.4f} ±{gap_se:.4f}"
                    f"{mark:1}{seconds:>5.0f}"
                )
                rates.append((1e3 * seconds / args.steps, *speed(flow, test, args.n_sample)))
            print(f"{name:<13}{kind:<10}{'   '.join(cells)}", flush=True)
            speeds.append((name, kind, rates))
    for note in notes:
        print("* " + note)
    if speeds:
        print(
            f"\nspeed: training ms/step; log_prob and sampling throughput in points/s "
            f"(log_prob on {args.n_test:,} points, sampling {args.n_sample:,} per call)\n"
        )
        header = f"{'dataset':<13}{'flow':<10}{'ms/step':>8}{'log_prob/s':>12}{'sample/s':>12}"
        if not args.no_pyro:
            header += f"   {'Pyro ms':>8}{'log_prob/s':>12}{'sample/s':>12}"
        print(header)
        print("-" * len(header))
        for name, kind, rates in speeds:
            line = f"{name:<13}{kind:<10}"
            line += "   ".join(
                f"{ms:>8.1f}{_rate(log_prob)}{_rate(sample)}" for ms, log_prob, sample in rates
            )
            print(line)

    if not args.no_nsf_defaults:
        truth = toy("ring", args.n_train + args.n_test, seed=args.seed)
        data, test = truth.samples[: args.n_train], truth.samples[args.n_train :]
        torch.manual_seed(args.seed)
        flow = pf.NSF(dim=2)
        start = time.perf_counter()
        pf.fit(flow, data, steps=3000, progress=False, seed=args.seed)
        seconds = time.perf_counter() - start
        nll, nll_se, gap, gap_se = kl_gap(flow, truth, test)
        print(
            f"\npf.NSF(dim=2), pf.fit defaults, 3000 steps, ring: "
            f"test NLL {nll:.4f} ±{nll_se:.4f}, "
            f"KL {gap:.4f} ±{gap_se:.4f} nats ({seconds:.0f} s)"
        )


if __name__ == "__main__":
    main()
