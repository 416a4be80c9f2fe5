"""Multimodal posteriors: a single flow guide, a mixture of flows, and likelihood tempering.

    nice -n 10 python benchmarks/multimodal.py [--quick] [--seeds 3] [--steps 1000] [--jobs 2]
        [--targets two2,two2u,...] [--methods flow,mixK,...] [--lr 0.03] [--particles 32]
        [--objective stl|elbo] [--spread 1] [--start offsets|draws] [--init-scale 1]

The default run (8 targets, 5 methods, 3 seeds, 1000 steps) takes about 10 minutes on 2 idle
cores with ``--jobs 2``; ``--quick`` (two targets, three methods, 2 seeds, 500 steps) about
one minute.

Targets (log Z = 0 exactly): Gaussian mixtures with unit-covariance modes, written as Pyro
models as in ``benchmarks/vi.py``: a latent ``z ~ N(0, PRIOR_SD² I)`` (the "prior") and a
``pyro.factor`` (the "likelihood") that turns it into the mixture, so that tempering has a
prior to start from. Modes ``SEPARATION`` sds apart:

* ``two2``, ``two10``: two modes at ``±(SEPARATION / 2) u`` (``u`` along the diagonal), weights
  0.5/0.5, in 2 and 10 dimensions; ``two2u``, ``two10u``: weights 0.2/0.8.
* ``three2``, ``three10``: three modes on an equilateral triangle of side ``SEPARATION``,
  centred at 0, in the plane of the diagonal and one orthogonal direction, weights 1/3 each;
  ``three2u``, ``three10u``: 0.2/0.3/0.5.

Methods (``pyroflows.infer.mixture.AutoFlowMixture``; ``K = 1`` is a single flow followed by a
full-covariance Gaussian, the structure of ``AutoFlowGuide``), all with the same budget: a
RealNVP of ``LAYERS`` layers per component, ``--steps`` steps of ``pf.infer.fit_svi`` on its
fast path (torch Adam at ``--lr`` with cosine decay, ``--particles`` particles per step,
``STL_ELBO``: the stratified STL of ``AutoFlowMixture._reverse_kl``; ``--objective elbo`` for
``Trace_ELBO``):

* ``flow``: one component.
* ``flow+anneal``: one component, trained on the tempered target ``log prior + beta log lik``,
  ``beta`` rising geometrically from ``BETA0`` to 1 over the first ``ANNEAL_FRACTION`` of the
  steps, then 1. ``fit_svi`` has no tempering option: these rows run ``fit_svi``'s fast step
  (the same Adam, schedule and objective) in a loop here, on the tempered ``log p``.
* ``mixK``: ``K = number of modes`` components.
* ``mix2K``: ``2 x number of modes`` components.
* ``mix2K+anneal``: as ``mix2K``, tempered as ``flow+anneal``.
* ``siwae2K`` (only when named): ``2 x number of modes`` components trained with SIWAE
  (``pf.infer.IWAE(num_particles)`` on the fast path).

The components start ``init_spread`` prior scales apart (the guide's offsets), or with
``--start draws`` each at its own draw from the prior.

Reported per target and method, over ``--seeds`` seeds: the gap ``log Z - ELBO`` (mean ± se
over seeds; the ELBO of each fit from ``--eval`` guide draws), the fraction of guide draws
nearest to each mode centre (mean over seeds) against the true weights, the worst weight error
``max |fraction - weight|`` (mean and worst seed), and how many seeds met the goal (every weight
within 0.05 and gap < 0.05).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import platform
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

import pyroflows as pf
from pyroflows.engine import make_optimizer, schedule
from pyroflows.infer.mixture import AutoFlowMixture

PRIOR_SD = 4.0
SEPARATION = 8.0
BETA0 = 0.05
ANNEAL_FRACTION = 0.5
LAYERS, HIDDEN = 2, (32, 32)
GOAL_WEIGHT, GOAL_GAP = 0.05, 0.05

TARGETS = ("two2", "two2u", "two10", "two10u", "three2", "three2u", "three10", "three10u")
METHODS = ("flow", "flow+anneal", "mixK", "mix2K", "mix2K+anneal")
EXTRA_METHODS = ("siwae2K",)  # run when named in --methods
QUICK_TARGETS, QUICK_METHODS = ("two2u", "three10u"), ("flow", "mixK", "mix2K")


# -- targets --------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    dim: int
    centres: torch.Tensor  # (M, dim)
    weights: torch.Tensor  # (M,)

    @property
    def modes(self) -> int:
        return len(self.weights)

    def prior(self) -> dist.Distribution:
        return dist.Normal(torch.zeros(self.dim), PRIOR_SD).to_event(1)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """The normalised mixture density, ``(..., dim) -> (...)``."""
        parts = dist.Normal(self.centres, 1.0).to_event(1).log_prob(z.unsqueeze(-2))
        return torch.logsumexp(parts + self.weights.log(), -1)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log prior, log lik)`` of the model below at ``z``; they sum to the mixture."""
        log_prior = self.prior().log_prob(z)
        return log_prior, self.log_density(z) - log_prior

    def model(self) -> None:
        z = pyro.sample("z", self.prior())
        pyro.factor("lik", self.split(z)[1])

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """The fraction of the points ``z`` (n, dim) nearest to each centre, shape (M,)."""
        k = torch.cdist(z, self.centres).argmin(-1)
        return torch.bincount(k, minlength=self.modes).double() / len(z)


def make_target(name: str) -> Target:
    modes, rest = (2, name[3:]) if name.startswith("two") else (3, name[5:])
    unequal = rest.endswith("u")
    dim = int(rest.removesuffix("u"))
    u = torch.full((dim,), 1 / math.sqrt(dim))
    if modes == 2:
        centres = torch.stack([-u, u]) * SEPARATION / 2
        weights = torch.tensor([0.2, 0.8] if unequal else [0.5, 0.5])
    else:
        v = torch.zeros(dim)
        v[0], v[1] = 1.0, -1.0  # orthogonal to u
        v = v / v.norm()
        radius = SEPARATION / math.sqrt(3)
        angles = torch.tensor([90.0, 210.0, 330.0]) * math.pi / 180
        centres = radius * (angles.cos()[:, None] * u + angles.sin()[:, None] * v)
        weights = torch.tensor([0.2, 0.3, 0.5] if unequal else [1 / 3] * 3)
    return Target(name, dim, centres, weights)


# -- one fit --------------------------------------------------------------------------------------
@dataclass
class Result:
    gap: float
    fractions: torch.Tensor
    seconds: float

    def weight_error(self, target: Target) -> float:
        return float((self.fractions - target.weights.double()).abs().max())


def components_of(method: str, target: Target) -> int:
    if method.startswith("flow"):
        return 1
    return target.modes * (2 if "2K" in method else 1)


def beta_at(step: int, steps: int) -> float:
    """The tempering exponent at ``step``: geometric from BETA0 to 1 over the ramp, then 1."""
    ramp = max(1, int(ANNEAL_FRACTION * steps))
    return 1.0 if step >= ramp else BETA0 ** (1 - step / ramp)


def fit(target: Target, method: str, seed: int, args: argparse.Namespace) -> Result:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoFlowMixture(
        target.model,
        components=components_of(method, target),
        flow=args.flow,
        layers=LAYERS,
        hidden=HIDDEN,
        init_spread=args.spread,
        init_scale=args.init_scale,
    )
    if args.start == "draws":  # each component at its own prior draw instead
        guide._setup_prototype()
        with torch.no_grad():
            guide.loc.copy_(target.prior().sample((guide.components,)))
    siwae = method.startswith("siwae")
    t0 = time.perf_counter()
    if method.endswith("+anneal"):
        anneal(target, guide, "iwae" if siwae else args.objective, args)
    else:
        if siwae:
            loss = pf.infer.IWAE(num_particles=args.particles)
        elif args.objective == "stl":
            loss = pf.infer.STL_ELBO(num_particles=args.particles)
        else:
            loss = pyro.infer.Trace_ELBO(num_particles=args.particles)
        pf.infer.fit_svi(
            target.model, guide, loss=loss, steps=args.steps, lr=args.lr, progress=False, fast=True
        )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        q = guide.get_posterior()
        z = q.sample((args.eval,))
        gap = -float((target.log_density(z) - q.log_prob(z)).mean())
    return Result(gap, target.nearest(z), seconds)


def anneal(target: Target, guide: AutoFlowMixture, objective: str, args: argparse.Namespace):
    """fit_svi's fast step (torch Adam, cosine decay of the rate to 0, no clipping) on the
    tempered target ``log prior + beta log lik``: fit_svi has no tempering option."""
    guide._setup_prototype()
    optim = make_optimizer("adam", guide.parameters(), args.lr)
    decay = schedule(optim, args.steps)
    for step in range(args.steps):
        beta = beta_at(step, args.steps)

        def log_p(z: torch.Tensor, beta: float = beta) -> torch.Tensor:
            log_prior, log_lik = target.split(z)
            return log_prior + beta * log_lik

        optim.zero_grad()
        _, surrogate = guide._reverse_kl(log_p, args.particles, objective)
        surrogate.backward()
        optim.step()
        decay.step()


# -- tables ---------------------------------------------------------------------------------------
def _mean_se(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(t))) if len(t) > 1 else math.nan
    return float(t.mean()), se


def print_target(target: Target, rows: dict[str, list[Result]]) -> None:
    weights = "/".join(f"{w:.2f}" for w in target.weights.tolist())
    print(
        f"\n== {target.name}: {target.modes} modes {SEPARATION:g} sd apart, d={target.dim}, "
        f"weights {weights}; log Z = 0"
    )
    header = (
        f"{'method':<14} {'K':>2} {'gap (mean ± se)':>17} {'draws per mode (mean)':>24} "
        f"{'max|frac-w|':>12} {'worst':>6} {'goal':>5} {'s/fit':>6}"
    )
    print(header)
    print("-" * len(header))
    for method, results in rows.items():
        gap, gap_se = _mean_se([r.gap for r in results])
        frac = torch.stack([r.fractions for r in results]).mean(0)
        errors = [r.weight_error(target) for r in results]
        goal = sum(
            r.gap < GOAL_GAP and e <= GOAL_WEIGHT for r, e in zip(results, errors, strict=True)
        )
        print(
            f"{method:<14} {components_of(method, target):>2} {gap:>8.3f} ± {gap_se:<6.3f} "
            f"{'/'.join(f'{f:.2f}' for f in frac.tolist()):>24} "
            f"{sum(errors) / len(errors):>12.3f} {max(errors):>6.3f} "
            f"{goal:>2}/{len(results):<2} {sum(r.seconds for r in results) / len(results):>6.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=None, help=f"some of {','.join(TARGETS)}")
    parser.add_argument(
        "--methods", default=None, help=f"some of {','.join(METHODS + EXTRA_METHODS)}"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--particles", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--flow", default="realnvp")
    parser.add_argument("--objective", default="stl", choices=("elbo", "stl"))
    parser.add_argument("--spread", type=float, default=1.0, help="init_spread of the guide")
    parser.add_argument(
        "--start",
        choices=("offsets", "draws"),
        default="offsets",
        help="component locations: init_spread offsets (the guide's) or one prior draw each",
    )
    parser.add_argument("--init-scale", type=float, default=1.0, help="init_scale of the guide")
    parser.add_argument("--eval", type=int, default=4000, help="guide draws per evaluation")
    parser.add_argument("--jobs", type=int, default=2, help="fits run in parallel (processes)")
    parser.add_argument("--quick", action="store_true", help="small budget (about a minute)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.eval = min(args.steps, 500), min(args.seeds, 2), 2000
    targets = _names(args.targets, QUICK_TARGETS if args.quick else TARGETS, TARGETS)
    methods = _names(
        args.methods, QUICK_METHODS if args.quick else METHODS, METHODS + EXTRA_METHODS
    )
    if isinstance(targets, str) or isinstance(methods, str):
        parser.error(targets if isinstance(targets, str) else methods)
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive integer; got {args.jobs}")
    _worker_setup()
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"pyroflows {getattr(pf, '__version__', '?')}; {args.jobs} process(es) of 1 thread"
    )
    print(
        f"flow {args.flow} ({LAYERS} layers, hidden {HIDDEN}) per component; start "
        f"{args.start}, init_spread {args.spread:g}, init_scale {args.init_scale:g}; "
        f"objective {args.objective}; prior N(0, {PRIOR_SD:g}² I)"
    )
    print(
        f"pf.infer.fit_svi: {args.steps} steps, Adam, lr {args.lr:g} (cosine decay), "
        f"{args.particles} particles; anneal: beta {BETA0:g} -> 1 over the first "
        f"{ANNEAL_FRACTION:.0%}; seeds 0..{args.seeds - 1}; {args.eval} draws per evaluation"
        + (" (QUICK)" if args.quick else "")
    )
    t_start = time.perf_counter()
    tasks = [(t, m, seed) for t in targets for m in methods for seed in range(args.seeds)]
    if args.jobs == 1:
        done: dict = {task: _fit_task(*task, args) for task in tasks}
        _print_tables(targets, methods, args.seeds, done)
    else:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_setup) as pool:
            done = {task: pool.submit(_fit_task, *task, args) for task in tasks}
            _print_tables(targets, methods, args.seeds, done)  # each as its fits finish
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s")


def _print_tables(targets: list[str], methods: list[str], seeds: int, done: dict) -> None:
    for name in targets:
        rows = {m: [_result(done[(name, m, seed)]) for seed in range(seeds)] for m in methods}
        print_target(make_target(name), rows)
        sys.stdout.flush()


def _names(given: str | None, default: tuple, allowed: tuple) -> list[str] | str:
    names = list(default) if given is None else [x.strip() for x in given.split(",") if x.strip()]
    wrong = [x for x in names if x not in allowed]
    return f"expected some of {allowed}; got {wrong}" if wrong else names


def _worker_setup() -> None:
    torch.set_num_threads(1)
    pyro.enable_validation(False)


def _fit_task(name: str, method: str, seed: int, args: argparse.Namespace) -> Result:
    return fit(make_target(name), method, seed, args)


def _result(value: Result | Future) -> Result:
    return value.result() if isinstance(value, Future) else value


if __name__ == "__main__":
    main()
