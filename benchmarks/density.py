"""Density estimation: test NLL and KL gap of MAF, RealNVP and NSF next to Pyro's built-ins.

    python benchmarks/density.py [--steps 1500] [--seed 0] [--threads N]

On two 2-D data sets with exact densities (``pyroflows.datasets.toy``: "ring", eight Gaussians
on a circle, and "checkerboard"), each of our builders and Pyro's closest built-in stack is
trained in the same run with the same budget: the same training loop (:func:`pyroflows.fit`,
Pyro's transforms wrapped in a :class:`pyroflows.Flow`), the same steps, batch size (256),
Adam learning rate (``pf.fit``'s default, 1e-3) with cosine decay, the same 10% validation split
(the best validation state is kept) and the same data. Architecture on both sides: 5 layers,
conditioners with hidden widths (128, 128), splines with 8 bins.

* ours: ``pf.MAF``, ``pf.RealNVP``, ``pf.NSF`` with those sizes and otherwise the builders'
  defaults (ActNorm after each layer; reversed order between MAF layers, LU-linear mixing
  between NSF layers, alternating masks for RealNVP).
* Pyro: ``affine_autoregressive(...).inv`` (MAF orientation: one pass for the density),
  ``affine_coupling`` and ``spline_coupling`` (``bound=5``, ours' default: Pyro's default of 3
  would leave the checkerboard's edges in the identity tails), with ``Permute`` (reversal)
  between layers, on a standard Normal base.

The KL gap is ``KL(p || q) = E_p[log p - log q]``, estimated on held-out samples with the exact
``log p`` (paired, so the standard error shown is that of the difference). A last line reports
``pf.NSF(dim=2)`` trained with ``pf.fit``'s defaults for 3000 steps on the ring.
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
FLOWS = ("MAF", "RealNVP", "NSF")


def ours(kind: str) -> pf.Flow:
    if kind == "MAF":
        return pf.MAF(2, layers=LAYERS, hidden=HIDDEN)
    if kind == "RealNVP":
        return pf.RealNVP(2, layers=LAYERS, hidden=HIDDEN)
    if kind == "NSF":
        return pf.NSF(2, layers=LAYERS, hidden=HIDDEN, bins=BINS)
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
        else:
            raise ValueError(kind)
        modules.append(t)
        parts.append(t.inv if kind == "MAF" else t)
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


def train(flow: pf.Flow, data: torch.Tensor, steps: int, seed: int) -> tuple[float, str]:
    """pf.fit with the shared budget; returns (seconds, note)."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    note = ""
    try:
        pf.fit(flow, data, steps=steps, batch_size=BATCH, progress=False, seed=seed)
    except pf.TrainingDiverged as err:
        note = f"diverged at step {err.step}"
    return time.perf_counter() - start, note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--n-train", type=int, default=20_000, help="training points")
    parser.add_argument("--n-test", type=int, default=10_000, help="test points")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument(
        "--flows", nargs="*", default=list(FLOWS), choices=FLOWS, help="none: only the last line"
    )
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
        f"budget per flow: {args.steps} steps, batch {BATCH}, Adam lr 1e-3 with cosine decay, "
        f"10% of {args.n_train:,} training points for validation; {LAYERS} layers, hidden "
        f"{HIDDEN}, {BINS} bins; test: {args.n_test:,} fresh points; seed {args.seed}"
    )
    print("NLL and KL(p||q) in nats per point (± one standard error)\n")
    header = (
        f"{'dataset':<13}{'flow':<8}{'ours NLL':>17}{'ours KL':>17}{'s':>6}   "
        f"{'Pyro NLL':>17}{'Pyro KL':>17}{'s':>6}"
    )
    if args.flows:
        print(header)
        print("-" * len(header))
    notes = []
    for name in args.datasets if args.flows else ():
        truth = toy(name, args.n_train + args.n_test, seed=args.seed)
        data, test = truth.samples[: args.n_train], truth.samples[args.n_train :]
        for kind in args.flows:
            cells = []
            for side, build in (("ours", ours), ("Pyro", pyros)):
                torch.manual_seed(args.seed)
                flow = build(kind)
                seconds, note = train(flow, data, args.steps, args.seed)
                nll, nll_se, gap, gap_se = kl_gap(flow, truth, test)
                mark = ""
                if note:
                    notes.append(
                        f"{side} {kind} on {name}: {note} (restored the last finite state)"
                    )
                    mark = "*"
                cells.append(
                    f"{nll:>9.4f} ±{nll_se:.4f}{gap:>9.4f} ±{gap_se:.4f}{mark:1}{seconds:>5.0f}"
                )
            print(f"{name:<13}{kind:<8}{cells[0]}   {cells[1]}", flush=True)
    for note in notes:
        print("* " + note)

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
