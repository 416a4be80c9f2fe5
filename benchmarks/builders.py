"""Throughput of each pyroflows builder next to Pyro's closest built-in, in one run.

    python benchmarks/builders.py [--dim 8] [--batch 512] [--threads 1] [--device cpu]

Both sides use the same architecture: 5 layers, conditioners with hidden widths (64, 64), the
feature order reversed between layers, no normalisation layers; rational-quadratic splines
with 8 bins on [-5, 5] (Pyro's ``SplineCoupling``/``SplineAutoregressive`` with
``order="quadratic"``: its ``spline_coupling``/``spline_autoregressive`` helpers build
linear-rational splines). Each figure is the median over repeats of samples per second for
``log_prob`` of fresh data without gradients and for ``sample``. MAF-type flows (fast density)
are compared with Pyro's autoregressive transforms used through ``.inv``; IAF-type flows (fast
sampling) with them used directly, which is how Pyro's documentation uses them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN, DenseNN

import pyroflows as pf

LAYERS, HIDDEN, BINS, BOUND = 5, (64, 64), 8, 5.0


class PyroFlow:
    """Pyro's built-in equivalent of one of our builders; calling it gives the distribution."""

    def __init__(self, kind: str, dim: int, device: str) -> None:
        self.parts: list = []
        self.modules = torch.nn.ModuleList()
        for i in range(LAYERS):
            if i > 0:
                self.parts.append(T.Permute(torch.arange(dim - 1, -1, -1, device=device)))
            if kind in ("MAF", "IAF"):
                t = T.affine_autoregressive(dim, hidden_dims=list(HIDDEN))
            elif kind == "RealNVP":
                t = T.affine_coupling(dim, hidden_dims=list(HIDDEN))
            elif kind == "NSF":
                # Not T.spline_coupling: its splines are linear-rational (order="linear") and it
                # also passes the kept half through a learned spline (identity=False).
                split = dim // 2
                n = dim - split
                net = DenseNN(split, list(HIDDEN), param_dims=[n * BINS, n * BINS, n * (BINS - 1)])
                t = T.SplineCoupling(dim, split, net, BINS, BOUND, order="quadratic", identity=True)
            elif kind == "NSF-AR":
                # Not T.spline_autoregressive, linear-rational too.
                arn = AutoRegressiveNN(dim, list(HIDDEN), param_dims=[BINS, BINS, BINS - 1])
                t = T.SplineAutoregressive(dim, arn, BINS, BOUND, order="quadratic")
            else:
                raise ValueError(kind)
            self.modules.append(t)
            self.parts.append(t.inv if kind in ("MAF", "NSF-AR") else t)
        self.modules.to(device)
        zeros = torch.zeros(dim, device=device)
        self.base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def __call__(self) -> dist.TransformedDistribution:
        return dist.TransformedDistribution(self.base, self.parts)


def ours(kind: str, dim: int) -> pf.Flow:
    common = {"layers": LAYERS, "hidden": HIDDEN}
    if kind == "NICE":
        return pf.NICE(dim, **common)
    if kind == "RealNVP":
        return pf.RealNVP(dim, actnorm=False, **common)
    if kind == "MAF":
        return pf.MAF(dim, actnorm=False, **common)
    if kind == "IAF":
        return pf.IAF(dim, actnorm=False, **common)
    if kind == "NSF":
        return pf.NSF(dim, bins=BINS, bound=BOUND, mixing="reverse", actnorm=False, **common)
    if kind == "NSF-AR":
        return pf.NSF(
            dim,
            bins=BINS,
            bound=BOUND,
            autoregressive=True,
            mixing="reverse",
            actnorm=False,
            **common,
        )
    if kind == "LinearFlow":
        return pf.LinearFlow(dim, layers=LAYERS)
    raise ValueError(kind)


def perturb(params) -> None:
    """Move every parameter off its initial value, so that no zero weights shortcut the work."""
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))


def median_rates(fns: list[Callable[[], object]], batch: int, repeats: int, device: str):
    """Samples per second of each function, median over repeats.

    The functions are timed in alternation, so that drifts in machine load hit all alike.
    """

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns:
        for _ in range(3):
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - start)
    return [batch / statistics.median(ts) for ts in times]


def rates(makes: list, data: torch.Tensor, repeats: int, device: str):
    """[(log_prob, sample) samples per second] for each distribution factory in ``makes``."""
    batch = data.shape[0]
    with torch.no_grad():
        log_prob = median_rates(
            [lambda m=m: m().log_prob(data.clone()) for m in makes], batch, repeats, device
        )
        sample = median_rates(
            [lambda m=m: m().sample((batch,)) for m in makes], batch, repeats, device
        )
    return list(zip(log_prob, sample, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dim, batch = args.device, args.dim, args.batch
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, pyroflows {pf.__version__}, "
        f"device {device}, threads {torch.get_num_threads()}, dim {dim}, batch {batch}, "
        f"{LAYERS} layers, hidden {HIDDEN}; samples/s, median of {args.repeats}"
    )
    header = (
        f"{'flow':<11}{'log_prob':>12}{'Pyro':>12}{'ratio':>8}"
        f"{'sample':>12}{'Pyro':>12}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for kind in ("NICE", "RealNVP", "MAF", "IAF", "NSF", "NSF-AR", "LinearFlow"):
        flow = ours(kind, dim).to(device)
        perturb(flow.parameters())
        data = torch.randn(batch, dim, device=device)
        if kind in ("RealNVP", "MAF", "IAF", "NSF", "NSF-AR"):
            peer = PyroFlow(kind, dim, device)
            perturb(peer.modules.parameters())
            (lp, sa), (plp, psa) = rates([flow, peer], data, args.repeats, device)
            row = f"{kind:<11}{lp:>12,.0f}{plp:>12,.0f}{lp / plp:>8.2f}"
            row += f"{sa:>12,.0f}{psa:>12,.0f}{sa / psa:>8.2f}"
        else:
            [(lp, sa)] = rates([flow], data, args.repeats, device)
            row = f"{kind:<11}{lp:>12,.0f}{'n/a':>12}{'':>8}{sa:>12,.0f}{'n/a':>12}{'':>8}"
        print(row)


if __name__ == "__main__":
    main()
