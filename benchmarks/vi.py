"""Variational inference: AutoFlowGuide next to Pyro's autoguides, on targets with known answers.

    python benchmarks/vi.py [--steps 3000] [--targets funnel10,banana2,...] [--guides ...]
                            [--seed 0] [--warm auto|on|off|both] [--quick]

Targets. With a known normaliser (log Z = 0, written as proper Pyro models, or as a factor over a
dummy latent with a proper prior that the factor divides out):

* ``funnel10``: Neal's funnel, ``v ~ N(0, 3²)``, ``x[1..9] | v ~ N(0, exp(v))``.
* ``banana2``, ``banana10``: Haario's twisted Gaussian, ``x1 ~ N(0, 10²)``,
  ``x2 | x1 ~ N(b (x1² - 100), 1)`` with ``b = BANANA_B``, the remaining coordinates ``N(0, 1)``.
* ``mixture2``, ``mixture10``: ``½ N(-m, I) + ½ N(m, I)`` with ``m`` along the diagonal,
  ``|m| = MIXTURE_SHIFT`` (two modes ``2 |m|`` sds apart), as a factor over a ``N(0, I)`` latent.

From posteriordb (``benchmarks/posteriors.py``; unknown log Z; guide draws are compared with the
reference NUTS draws): ``eight_schools`` (non-centred), ``kidiq`` (improper flat prior on the
coefficients), ``mesquite`` (flat priors on everything) and ``arK`` (AR(5)).

Guides, trained in the same run with the same budget: the same objective (``Trace_ELBO`` with
``PARTICLES`` vectorised particles), the same optimiser (Pyro's ``ClippedAdam``, clip norm 10,
learning rate ``--lr`` decayed geometrically to a tenth over the run) and the same number of
steps, through :func:`pyroflows.infer.fit_svi`. Flow sizes are matched: 3 layers, conditioners
(64, 64), splines with 8 bins on [-5, 5].

* ``flow-iaf``, ``flow-nsf``: ``pf.infer.AutoFlowGuide(model, flow="iaf"|"nsf")`` (defaults:
  ``init_to_median``, ``init_scale=0.1``, full-covariance Gaussian after the flow). With a warm
  start (``--warm``; ``auto`` uses it on the posteriordb regressions, where the posterior is
  badly scaled and strongly correlated) the guide is first moved to the Laplace approximation
  by :meth:`AutoFlowGuide.warm_start`, and the row is labelled ``+warm``. Its cost is included
  in the time shown.
* ``flow-iaf-wide``, ``flow-nsf-wide`` (only when named in ``--guides``): the same, started
  with ``init_scale=1`` (as wide as Pyro's flow autoguides start) instead of the default 0.1.
* ``AutoNormal``, ``AutoMVN``: Pyro's ``AutoNormal`` and ``AutoMultivariateNormal`` (defaults).
* ``AutoIAFNormal``: Pyro's, ``num_transforms=3``, ``hidden_dim=[64, 64]``.
* ``AutoNF-spline``: Pyro's ``AutoNormalizingFlow`` with 3 ``spline_autoregressive`` layers
  (hidden ``[64, 64]``, 8 bins, bound 5).

Reported per guide: the ELBO (mean log weight of ``--eval`` guide draws, with its standard
error); where log Z is known the gap ``log Z - ELBO`` (= KL(q || p)); the IWAE(K=1000) estimate
of log Z (``pf.infer.log_evidence``, 1000 importance samples); PSIS k-hat
(``pf.diagnostics.psis_khat``, 2000 draws); for posteriordb the largest
``|mean_q - mean_ref| / sd_ref`` over the Stan parameters and the range of ``sd_q / sd_ref``
(from the same ``--eval`` guide draws); and the wall time. A guide that raises (e.g. Pyro's
autoguides on ``ImproperUniform`` sites, which they try to sample) is reported as
``fails: <reason>``. The best guide per target is the one with the highest ELBO (the smallest
KL(q || p): log Z is the same for every guide); guides whose ELBO is within two standard errors
of the difference (plus 0.01 nats) are tied with it.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

import pyroflows as pf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import posteriors  # benchmarks/posteriors.py, next to this file

LAYERS, HIDDEN, BINS, BOUND = 3, (64, 64), 8, 5.0
PARTICLES = 8  # vectorised particles per step, every guide
MAX_PLATE_NESTING = 1
BANANA_B = 0.1  # Haario et al.'s "strongly twisted" banana
MIXTURE_SHIFT = 2.5
IWAE_K = 1000
KHAT_DRAWS = 2000
TIE_NATS = 0.01

SYNTHETIC = ("funnel10", "banana2", "banana10", "mixture2", "mixture10")
POSTERIORDB = ("eight_schools", "kidiq", "mesquite", "arK")
ALL_TARGETS = SYNTHETIC + POSTERIORDB
# Where --warm auto warm-starts AutoFlowGuide: the posteriordb posteriors, whose Laplace
# approximation is a good start (not the funnel, whose "mode" is at v -> -inf, nor the mixture).
WARM_AUTO = {"eight_schools", "kidiq", "mesquite", "arK"}
ALL_GUIDES = ("flow-iaf", "flow-nsf", "AutoNormal", "AutoMVN", "AutoIAFNormal", "AutoNF-spline")
# Not run by default: AutoFlowGuide started wide (init_scale=1, as Pyro's flow autoguides start
# at N(0, I)), to see how much of a gap the default narrow start (0.1) costs on a budget.
EXTRA_GUIDES = ("flow-iaf-wide", "flow-nsf-wide")


# -- targets --------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    model: Callable[[], None]
    log_z: float | None
    description: str
    posterior: posteriors.Posterior | None = None


def funnel(dim: int) -> Callable[[], None]:
    def model() -> None:
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        scale = torch.exp(v / 2)[..., None].expand((*v.shape, dim - 1))
        pyro.sample("x", dist.Normal(torch.zeros_like(scale), scale).to_event(1))

    return model


def banana(dim: int, b: float = BANANA_B) -> Callable[[], None]:
    def model() -> None:
        x1 = pyro.sample("x1", dist.Normal(0.0, 10.0))
        pyro.sample("x2", dist.Normal(b * (x1**2 - 100.0), 1.0))
        if dim > 2:
            pyro.sample("rest", dist.Normal(torch.zeros(dim - 2), 1.0).to_event(1))

    return model


def mixture(dim: int, shift: float = MIXTURE_SHIFT) -> Callable[[], None]:
    m = torch.full((dim,), shift / math.sqrt(dim))
    components = dist.Normal(torch.stack([-m, m]), 1.0).to_event(1)  # batch (2,), event (dim,)
    dummy = dist.Normal(torch.zeros(dim), 1.0).to_event(1)

    def model() -> None:
        z = pyro.sample("z", dummy)
        log_mix = torch.logsumexp(components.log_prob(z.unsqueeze(-2)), dim=-1) - math.log(2)
        pyro.factor("mixture", log_mix - dummy.log_prob(z))

    return model


def make_target(name: str) -> Target:
    if name == "funnel10":
        return Target(name, funnel(10), 0.0, "Neal's funnel, d=10 (proper model)")
    if name.startswith("banana"):
        d = int(name[len("banana") :])
        return Target(name, banana(d), 0.0, f"twisted Gaussian, b={BANANA_B}, d={d}")
    if name.startswith("mixture"):
        d = int(name[len("mixture") :])
        return Target(
            name,
            mixture(d),
            0.0,
            f"two-mode Gaussian mixture, modes {2 * MIXTURE_SHIFT:g} sd apart, d={d}",
        )
    if name in POSTERIORDB:
        post = posteriors.load(name)
        return Target(name, post.model, None, f"posteriordb {post.folder}", post)
    raise ValueError(f"unknown target {name!r}; expected one of {ALL_TARGETS}")


# -- guides ---------------------------------------------------------------------------------------
def make_guide(kind: str, model: Callable) -> Callable:
    scale = {"init_scale": 1.0} if kind.endswith("-wide") else {}
    if kind.startswith("flow-iaf"):
        return pf.infer.AutoFlowGuide(model, flow="iaf", layers=LAYERS, hidden=HIDDEN, **scale)
    if kind.startswith("flow-nsf"):
        return pf.infer.AutoFlowGuide(
            model, flow="nsf", layers=LAYERS, hidden=HIDDEN, bins=BINS, bound=BOUND, **scale
        )
    if kind == "AutoNormal":
        return AutoNormal(model)
    if kind == "AutoMVN":
        return AutoMultivariateNormal(model)
    if kind == "AutoIAFNormal":
        return AutoIAFNormal(model, hidden_dim=list(HIDDEN), num_transforms=LAYERS)
    if kind == "AutoNF-spline":
        init = partial(
            T.iterated,
            LAYERS,
            T.spline_autoregressive,
            hidden_dims=list(HIDDEN),
            count_bins=BINS,
            bound=BOUND,
        )
        return AutoNormalizingFlow(model, init)
    raise ValueError(f"unknown guide {kind!r}; expected one of {ALL_GUIDES + EXTRA_GUIDES}")


# -- one fit --------------------------------------------------------------------------------------
@dataclass
class Result:
    guide: str
    error: str | None = None
    elbo: float = math.nan
    elbo_se: float = math.nan
    iwae: float = math.nan
    iwae_se: float = math.nan
    khat: float = math.nan
    mean_err: float = math.nan
    sd_ratio: tuple[float, float] = (math.nan, math.nan)
    seconds: float = math.nan
    notes: list[str] = field(default_factory=list)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 90:
        first = first[:87] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run_one(target: Target, kind: str, warm: bool, args: argparse.Namespace) -> Result:
    label = kind + ("+warm" if warm else "")
    result = Result(label)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = target.model
    t0 = time.perf_counter()
    try:
        guide = make_guide(kind, model)
        if warm:
            ws = guide.warm_start(method="laplace")
            fallback = ", diagonal fallback" if ws.diagonal_fallback else ""
            result.notes.append(
                f"{label}: Laplace warm start at log p = {ws.log_density:.2f} "
                f"(|grad| = {ws.grad_norm:.1e}{fallback})"
            )
        lrd = 0.1 ** (1.0 / args.steps)
        optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": lrd, "clip_norm": 10.0})
        loss = Trace_ELBO(
            num_particles=PARTICLES,
            vectorize_particles=True,
            max_plate_nesting=MAX_PLATE_NESTING,
        )
        pf.infer.fit_svi(model, guide, loss=loss, steps=args.steps, optimizer=optim, progress=False)
        result.seconds = time.perf_counter() - t0
        evaluate(target, guide, result, args)
    except Exception as exc:  # a guide that crashes is a result
        result.error = _reason(exc)
        if math.isnan(result.seconds):
            result.seconds = time.perf_counter() - t0
    return result


def evaluate(target: Target, guide: Callable, result: Result, args: argparse.Namespace) -> None:
    model = target.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = pf.diagnostics.to_inference_data(
            model, guide, num_samples=args.eval, max_plate_nesting=MAX_PLATE_NESTING
        )
        log_w = np.asarray(data.sample_stats["log_weight"]).reshape(-1)
        finite = np.isfinite(log_w)
        if not finite.all():
            result.notes.append(
                f"{result.guide}: {int((~finite).sum())} of {len(log_w)} log weights not finite"
            )
        result.elbo = float(np.mean(log_w)) if finite.all() else -math.inf
        result.elbo_se = float(np.std(log_w[finite], ddof=1) / math.sqrt(finite.sum()))
        result.iwae, result.iwae_se = pf.infer.log_evidence(
            model, guide, num_samples=IWAE_K, max_plate_nesting=MAX_PLATE_NESTING
        )
        result.khat = pf.diagnostics.psis_khat(
            model, guide, num_samples=KHAT_DRAWS, max_plate_nesting=MAX_PLATE_NESTING
        ).khat
    post = target.posterior
    if post is not None:
        values = {name: torch.as_tensor(np.asarray(data.posterior[name])[0]) for name in post.sites}
        params = post.to_params(values).double().numpy()
        mean, sd = params.mean(0), params.std(0, ddof=1)
        result.mean_err = float(np.max(np.abs(mean - post.ref_mean) / post.ref_sd))
        ratio = sd / post.ref_sd
        result.sd_ratio = (float(ratio.min()), float(ratio.max()))


# -- reporting ------------------------------------------------------------------------------------
def _f(x: float, fmt: str = ".3f") -> str:
    return "nan" if x is None or not math.isfinite(x) else format(x, fmt)


def best_and_tied(results: list[Result]) -> set[str]:
    ok = [r for r in results if r.error is None and math.isfinite(r.elbo)]
    if not ok:
        return set()
    best = max(ok, key=lambda r: r.elbo)
    tied = set()
    for r in ok:
        se = math.sqrt(best.elbo_se**2 + r.elbo_se**2)
        if best.elbo - r.elbo <= 2 * se + TIE_NATS:
            tied.add(r.guide)
    return tied


def print_table(target: Target, results: list[Result]) -> set[str]:
    winners = best_and_tied(results)
    print(
        f"\n== {target.name}: {target.description}"
        + (f"; log Z = {target.log_z:g}" if target.log_z is not None else "; log Z unknown")
    )
    pdb = target.posterior is not None
    header = f"{'guide':<20} {'ELBO':>16} {'logZ-ELBO':>10} {'IWAE logZ (K=1000)':>20} {'k-hat':>6}"
    if pdb:
        header += f" {'max|dmean|/sd':>13} {'sd ratio':>13}"
    header += f" {'time s':>7}  best"
    print(header)
    print("-" * len(header))
    for r in results:
        if r.error is not None:
            print(f"{r.guide:<20} fails: {r.error}")
            continue
        gap = target.log_z - r.elbo if target.log_z is not None else math.nan
        line = (
            f"{r.guide:<20} {_f(r.elbo):>9} ± {_f(r.elbo_se):<5}"
            f" {(_f(gap) if target.log_z is not None else '-'):>10}"
            f" {_f(r.iwae):>11} ± {_f(r.iwae_se):<6}"
            f" {_f(r.khat, '.2f'):>6}"
        )
        if pdb:
            lo, hi = r.sd_ratio
            line += f" {_f(r.mean_err, '.3f'):>13} {_f(lo, '.2f') + '-' + _f(hi, '.2f'):>13}"
        line += f" {r.seconds:>7.1f}  {'*' if r.guide in winners else ''}"
        print(line)
    for r in results:
        for note in r.notes:
            print(f"   note: {note}")
    return winners


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS))
    parser.add_argument("--guides", default=",".join(ALL_GUIDES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval", type=int, default=10_000, help="guide draws for ELBO/moments")
    parser.add_argument(
        "--warm",
        choices=("auto", "on", "off", "both"),
        default="auto",
        help="Laplace warm start of AutoFlowGuide (auto: posteriordb targets only)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny budget (smoke check)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval = min(args.steps, 30), min(args.eval, 1000)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    guides = [g.strip() for g in args.guides.split(",") if g.strip()]
    for g in guides:
        if g not in ALL_GUIDES + EXTRA_GUIDES:
            parser.error(
                f"--guides: unknown guide {g!r}; expected some of {ALL_GUIDES + EXTRA_GUIDES}"
            )
    for t in targets:
        if t not in ALL_TARGETS:
            parser.error(f"--targets: unknown target {t!r}; expected some of {ALL_TARGETS}")

    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"pyroflows {getattr(pf, '__version__', '?')}; threads {torch.get_num_threads()}"
    )
    print(
        f"steps {args.steps}, Trace_ELBO with {PARTICLES} vectorised particles, ClippedAdam "
        f"lr {args.lr:g} -> {args.lr / 10:g} (geometric), clip 10; seed {args.seed}; "
        f"ELBO/moments from {args.eval} draws, IWAE K={IWAE_K}, k-hat from {KHAT_DRAWS} draws; "
        f"warm start: {args.warm}" + (" (QUICK: smoke check only)" if args.quick else "")
    )
    if any(t in POSTERIORDB for t in targets) and not posteriors.available():
        print(f"posteriordb data not found under {posteriors.DATA_ROOT}; skipping those targets")
        targets = [t for t in targets if t not in POSTERIORDB]

    tally: dict[str, list[int]] = {}
    t_start = time.perf_counter()
    for name in targets:
        target = make_target(name)
        results = []
        for kind in guides:
            if kind.startswith("flow-"):
                if args.warm == "both":
                    plans = [False, True]
                elif args.warm == "auto":
                    plans = [name in WARM_AUTO]
                else:
                    plans = [args.warm == "on"]
            else:
                plans = [False]
            for warm in plans:
                results.append(run_one(target, kind, warm, args))
        winners = print_table(target, results)
        for r in results:
            key = r.guide if args.warm == "both" else r.guide.removesuffix("+warm")
            counts = tally.setdefault(key, [0, 0, 0])  # best/tied, ran, failed
            counts[1] += 1
            counts[2] += r.error is not None
            counts[0] += r.guide in winners
        sys.stdout.flush()

    print(f"\n== summary over {len(targets)} targets (best or tied on ELBO = smallest KL(q||p))")
    if args.warm == "auto" and WARM_AUTO & set(targets):
        print(f"(flow-* rows were warm-started on: {', '.join(sorted(WARM_AUTO & set(targets)))})")
    for guide, (wins, ran, failed) in tally.items():
        print(
            f"{guide:<20} best or tied on {wins} of {ran}"
            + (f"; fails on {failed}" if failed else "")
        )
    print(f"total time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
