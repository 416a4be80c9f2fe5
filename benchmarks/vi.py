"""Variational inference: pyroflows' defaults next to Pyro's autoguides and NumPyro/FlowJAX flows.

    python benchmarks/vi.py [--targets synthetic|posteriordb|all|funnel10,...] [--guides ...]
                            [--seeds 0,1,2] [--steps 2000] [--particles 16] [--lr 1e-3]
                            [--compile-seeds first|all] [--compile-cache cold|warm]
                            [--eval 10000] [--quick]

One run prints, per target, one row per guide with the mean ± standard error over seeds of each
figure, and marks the guides that are best or tied; then a summary and a table of speed ratios.
The default run (the five synthetic targets, seeds 0, 1, 2, 2000 steps) takes about 10-13 min on
one CPU thread; ``--targets posteriordb`` about 25 min (``--seeds 0,1``: about 17);
``--quick`` (30 steps, 1000 draws, seed 0, ``mixture2`` and ``garch``, no ``pf-compile``) about
a minute, mostly JAX compiling.

Targets. With a known normaliser (log Z = 0, written as proper Pyro models, or as a factor over a
dummy latent with a proper prior that the factor divides out):

* ``funnel10``: Neal's funnel, ``v ~ N(0, 3²)``, ``x[1..9] | v ~ N(0, exp(v))``.
* ``banana2``, ``banana10``: Haario's twisted Gaussian, ``x1 ~ N(0, 10²)``,
  ``x2 | x1 ~ N(b (x1² - 100), 1)`` with ``b = BANANA_B``, the remaining coordinates ``N(0, 1)``.
* ``mixture2``, ``mixture10``: ``½ N(-m, I) + ½ N(m, I)`` with ``m`` along the diagonal,
  ``|m| = MIXTURE_SHIFT`` (two modes ``2 |m|`` sds apart), as a factor over a ``N(0, I)`` latent.

From posteriordb (``benchmarks/posteriors.py``; log Z unknown, so the ELBO is shown; guide draws
are compared with the reference NUTS draws): ``eight_schools``, ``kidiq``, ``mesquite``, ``arK``,
``diamonds``, ``gp_pois_regr``, ``low_dim_gauss_mix``, ``garch``.

Guides (``--guides``; by default all but the ``pf-<flow>`` guides of issues 17 and 18, ``all`` for
every one, ``pf-flows`` for ``pf-defaults`` and the ``pf-<flow>`` guides of issue 17,
``pf-continuous`` for ``pf-defaults``, ``pf-nsf``, ``pf-naf``, ``pf-cnf`` and ``pf-cnf-rk4``):

* ``pf-defaults``: exactly ``pf.infer.fit_svi(model, pf.infer.AutoFlowGuide(model), steps=N)``:
  pyroflows' defaults (objective, particles, optimiser, learning rate, flow, start), whichever
  path ``fit_svi`` takes. Only ``progress=False`` and a timing ``callback`` are passed (they change
  nothing in the fit); Pyro's seed is set before the guide is built.
* ``pf-compile``: the same with ``compile=True`` (when ``fit_svi`` accepts it). Its compilation
  takes up to a minute per fit on a CPU, so by default it runs on the first seed only
  (``--compile-seeds all`` for every seed): its row then has no standard errors over seeds. It
  compiles from empty caches (``--compile-cache cold``: a fresh ``TORCHINDUCTOR_CACHE_DIR`` and
  the in-memory caches cleared), as a user's first run does and as JAX does (no persistent
  cache); ``--compile-cache warm`` keeps the machine's inductor cache.
* ``pf-nsf``, ``pf-naf``, ``pf-bnaf``, ``pf-sylvester``: the same as ``pf-defaults`` with
  ``AutoFlowGuide(model, flow=...)`` (``"nsf"``, ``"naf"``, ``"bnaf"``, ``"sylvester"``) and
  nothing else set: the guide's 5 layers, its hidden widths where the builder takes them (NSF,
  NAF: (64, 64); BNAF: the builder's ``hidden_factor=8``, ``depth=2``; Sylvester: orthogonal,
  ``dim`` columns), ``fit_svi``'s defaults (the guide's default objective: STL for NSF, the
  vectorised ``Trace_ELBO`` for the numerical-inverse flows, which AutoFlowGuide builds in the
  sampling-fast orientation). ``--guides pf-flows`` (those and ``pf-defaults``) on the synthetic
  targets, seeds 0, 1, 2: about 13 min.
* ``pf-cnf`` and its variants (issue 18): ``AutoFlowGuide(model, flow="cnf", ...)``, a continuous
  flow (one ODE, velocity field of hidden (64, 64)) trained as the others with ``fit_svi``'s
  defaults (the vectorised ``Trace_ELBO`` with 16 particles: each step one forward solve with
  the exact trace): ``pf-cnf`` (dopri5, atol = rtol = 1e-5, the builder's default),
  ``pf-cnf-rk4`` (``solver="rk4", steps=8``: 32 field evaluations per step, a fixed-step map),
  ``pf-cnf-h32`` (``hidden=(32, 32)``), ``pf-cnf-lr1e-2`` (``fit_svi(..., lr=1e-2)``) and
  ``pf-cnf-adjoint`` (``adjoint=True``: gradients by the adjoint method). Their rows add notes:
  the field evaluations per step (mean and last, read at the fit's callbacks) and the gap
  re-measured with an accurate solve (dopri5, atol = rtol = ``CNF_CHECK_TOL``) on
  ``CNF_CHECK_DRAWS`` fresh draws, which for ``pf-cnf-rk4`` is the continuous flow of the learnt
  field (the rk4 map's own ``log q`` integrates the trace with the same 8 steps, so it is not
  its exact density). ``--guides pf-continuous --seeds 0`` on the synthetic targets: about
  15 min of one idle CPU thread (a ``pf-cnf`` fit about 2 min; ``results/vi_cnf_0.6.0.txt``).
* ``AutoIAFNormal`` (``num_transforms=3``, ``hidden_dim=[64, 64]``), ``AutoNormal``, ``AutoMVN``
  (``AutoMultivariateNormal``), ``AutoNF-spline`` (``AutoNormalizingFlow`` with 3
  ``spline_autoregressive`` layers, hidden ``[64, 64]``, 8 bins, bound 5): Pyro's autoguides with
  their defaults, trained by Pyro's traced SVI (``pyro.infer.SVI``, ``Trace_ELBO`` with
  ``--particles`` vectorised particles, ``pyro.optim.Adam`` with ``--lr``) for ``--steps``
  steps: the budget of the anchors in issue 15.
* ``NumPyro-IAF``, ``NumPyro-BNAF``, ``FlowJAX-MAF``: the jit-compiled peers of
  ``benchmarks/numpyro_peers.py`` (same targets in NumPyro, same budget), run in a subprocess with
  JAX on one CPU thread; skipped, with one line, when numpyro/jax (or flowjax) are absent.

Reported per guide and seed, then as mean ± standard error over seeds: the ELBO (mean of
``log p(x, z) - log q(z)`` over ``--eval`` guide draws) and, where log Z is known, the gap
``log Z - ELBO`` (= KL(q || p)); the IWAE(K=1000) estimate of log Z (the mean over the draws'
blocks of 1000 of log-mean-exp of their weights); PSIS k-hat of all the draws (ArviZ); seconds
per 1000 steps at the steady rate (and, for the ``pf-*`` guides, a note with this thread's CPU
seconds per 1000 steps, less sensitive to a shared machine's load); ``compile s``, the time
before the steady rate is reached less the steps taken in it (``torch.compile``/``jax.jit``
compilation, or a guide's set-up); for the mixtures the fraction of draws on each side of the
plane between the modes; for posteriordb the largest ``|mean_q - mean_ref| / sd_ref`` over the
Stan parameters and the range of ``sd_q / sd_ref``. A guide that raises (Pyro's autoguides on
``ImproperUniform`` sites, which they try to sample) is reported as ``fails: <reason>``. Best per
target: the highest mean ELBO (the smallest KL(q || p): log Z is the same for every guide); a
guide is tied with it when the difference of means is within two standard errors of the
difference (standard errors over seeds; within a single draw set's when a row has one seed).

Torch runs on one thread (``--threads``). Timings on a shared machine are noisy; the script prints
the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import SVI, Trace_ELBO
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
STEPS, PARTICLES, LR = 2000, 16, 1e-3  # the anchors' budget in issue 15
EVAL = 10_000  # guide draws per fit for the ELBO, IWAE, k-hat and moments
IWAE_K = 1000
MAX_PLATE_NESTING = 1
BANANA_B = 0.1  # Haario et al.'s "strongly twisted" banana
MIXTURE_SHIFT = 2.5

SYNTHETIC = ("funnel10", "banana2", "banana10", "mixture2", "mixture10")
POSTERIORDB = tuple(posteriors.FOLDERS)
ALL_TARGETS = SYNTHETIC + POSTERIORDB
QUICK_TARGETS = ("mixture2", "garch")  # --quick: one synthetic target, one with flat priors
PF_FLOWS = {"pf-nsf": "nsf", "pf-naf": "naf", "pf-bnaf": "bnaf", "pf-sylvester": "sylvester"}
#: issue 18's continuous-flow guides: (AutoFlowGuide's options, fit_svi's options)
PF_CNF: dict[str, tuple[dict, dict]] = {
    "pf-cnf": ({}, {}),
    "pf-cnf-rk4": ({"solver": "rk4", "steps": 8}, {}),
    "pf-cnf-h32": ({"hidden": (32, 32)}, {}),
    "pf-cnf-lr1e-2": ({}, {"lr": 1e-2}),
    "pf-cnf-adjoint": ({"adjoint": True}, {}),
}
CNF_CHECK_TOL, CNF_CHECK_DRAWS = 1e-7, 2000  # the accurate re-evaluation of a CNF guide
PF_GUIDES = ("pf-defaults", "pf-compile", *PF_FLOWS, *PF_CNF)
PYRO_GUIDES = ("AutoIAFNormal", "AutoNormal", "AutoMVN", "AutoNF-spline")
PEER_GUIDES = ("NumPyro-IAF", "NumPyro-BNAF", "FlowJAX-MAF")  # numpyro_peers.PEERS
ALL_GUIDES = PF_GUIDES + PYRO_GUIDES + PEER_GUIDES
DEFAULT_GUIDES = tuple(g for g in ALL_GUIDES if g not in PF_FLOWS and g not in PF_CNF)
CONTINUOUS_GROUP = ("pf-defaults", "pf-nsf", "pf-naf", "pf-cnf", "pf-cnf-rk4")
PEERS_SCRIPT = Path(__file__).resolve().parent / "numpyro_peers.py"


# -- targets --------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    model: Callable[[], None]
    log_z: float | None
    description: str


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


@functools.cache
def posterior(name: str) -> posteriors.Posterior:
    return posteriors.load(name)


def make_target(name: str) -> Target:
    if name == "funnel10":
        return Target(name, funnel(10), 0.0, "Neal's funnel, d=10 (proper model)")
    if name in ("banana2", "banana10"):
        d = int(name[len("banana") :])
        return Target(name, banana(d), 0.0, f"twisted Gaussian, b={BANANA_B}, d={d}")
    if name in ("mixture2", "mixture10"):
        d = int(name[len("mixture") :])
        text = f"two-mode Gaussian mixture, modes {2 * MIXTURE_SHIFT:g} sd apart, d={d}"
        return Target(name, mixture(d), 0.0, text)
    if name in POSTERIORDB:
        post = posterior(name)
        return Target(name, post.model, None, f"posteriordb {post.folder}")
    raise ValueError(f"name: expected one of {ALL_TARGETS}; got {name!r}")


# -- one fit's record and its statistics ----------------------------------------------------------
@dataclass
class Record:
    """One guide fitted to one target with one seed (``numpyro_peers.py`` writes the same)."""

    target: str
    guide: str
    seed: int
    error: str | None = None
    elbo: float = math.nan
    elbo_se: float = math.nan
    iwae: float = math.nan
    iwae_se: float = math.nan
    khat: float = math.nan
    sec_per_1000: float = math.nan
    compile_s: float = math.nan
    modes: list[float] | None = None
    mean_err: float = math.nan
    sd_lo: float = math.nan
    sd_hi: float = math.nan
    notes: list[str] = field(default_factory=list)


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 90:
        first = first[:87] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _psis_khat(log_w: np.ndarray) -> float:
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(az, "psislw"):  # ArviZ < 1
            return float(az.psislw(log_w)[1])
        from arviz_stats.base import array_stats  # ArviZ 1.x

        return float(array_stats.psislw(-log_w)[1])


def _log_mean_exp(log_w: np.ndarray) -> float:
    top = log_w.max()
    return float(top + np.log(np.mean(np.exp(log_w - top))))


def summarize(
    record: Record,
    log_w: np.ndarray,
    z: np.ndarray | None = None,
    params: np.ndarray | None = None,
) -> None:
    """Fill ``record`` from guide draws' log weights ``(n,)``, their latent vectors ``z``
    ``(n, d)`` (mixtures: mode fractions) and their reference-column values ``params``
    ``(n, n_params)`` (posteriordb: moment errors)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    finite = np.isfinite(log_w)
    if not finite.all():
        record.notes.append(f"{int((~finite).sum())} of {len(log_w)} log weights not finite")
    record.elbo = float(log_w.mean()) if finite.all() else -math.inf
    record.elbo_se = float(log_w[finite].std(ddof=1) / math.sqrt(finite.sum()))
    blocks = log_w[: len(log_w) // IWAE_K * IWAE_K].reshape(-1, min(IWAE_K, len(log_w)))
    per_block = np.array([_log_mean_exp(b) for b in blocks])
    record.iwae = float(per_block.mean())
    if len(per_block) > 1:
        record.iwae_se = float(per_block.std(ddof=1) / math.sqrt(len(per_block)))
    if finite.all():
        record.khat = _psis_khat(log_w)
    if record.target.startswith("mixture") and z is not None:
        side = np.asarray(z).reshape(len(log_w), -1).sum(-1)  # the modes lie along the diagonal
        record.modes = [float(np.mean(side < 0)), float(np.mean(side >= 0))]
    if params is not None:
        post = posterior(record.target)
        mean, sd = params.mean(0), params.std(0, ddof=1)
        record.mean_err = float(np.max(np.abs(mean - post.ref_mean) / post.ref_sd))
        ratio = sd / post.ref_sd
        record.sd_lo, record.sd_hi = float(ratio.min()), float(ratio.max())


# -- the Pyro-side guides -------------------------------------------------------------------------
def make_pyro_guide(kind: str, model: Callable) -> Callable:
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
    raise ValueError(f"kind: expected one of {PYRO_GUIDES}; got {kind!r}")


def _steady(stamps: list[tuple[int, float]], t0: float) -> tuple[float, float]:
    """From ``(step, time)`` stamps: seconds per step over the second half of the run, and the
    rest of the time to the last stamp (compilation, set-up) less the steps taken in it."""
    if len(stamps) < 2:
        return math.nan, math.nan
    last_step, last = stamps[-1]
    mid_step, mid = min(stamps[:-1], key=lambda st: abs(st[0] - last_step / 2))
    per_step = (last - mid) / (last_step - mid_step)
    return per_step, max(last - t0 - last_step * per_step, 0.0)


@contextlib.contextmanager
def _inductor_cache(cold: bool):
    """With ``cold``: torch.compile starts from empty caches (a fresh on-disk cache folder, the
    in-memory ones cleared), as on a user's first run and as JAX starts (no persistent cache)."""
    if not cold:
        yield
        return
    import torch._dynamo
    from torch._inductor.utils import clear_inductor_caches

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="vi_inductor_") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        torch._dynamo.reset()
        clear_inductor_caches()
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def fit_pf(target: Target, kind: str, seed: int, args: argparse.Namespace, record: Record):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    stamps: list[tuple[int, float]] = []
    options = {"compile": True} if kind == "pf-compile" else {}
    with (
        _inductor_cache(kind == "pf-compile" and args.compile_cache == "cold"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        flow = {"flow": PF_FLOWS[kind]} if kind in PF_FLOWS else {}
        if kind in PF_CNF:
            flow = {"flow": "cnf", **PF_CNF[kind][0]}
            options.update(PF_CNF[kind][1])
        guide = pf.infer.AutoFlowGuide(target.model, **flow)
        evaluations: list[int] = []
        cpu: list[tuple[int, float]] = []  # this thread's CPU time: less sensitive to load

        def callback(step: int, _) -> None:
            stamps.append((step, time.perf_counter()))
            cpu.append((step, time.thread_time()))
            if kind in PF_CNF:  # the field evaluations of the latest training step's solve
                evaluations.append(guide.flow.transform.evaluations)

        pf.infer.fit_svi(
            target.model, guide, steps=args.steps, progress=False, callback=callback, **options
        )
    if evaluations:
        record.notes.append(
            f"seed {seed}: field evaluations per step {np.mean(evaluations):.0f} on average, "
            f"{evaluations[-1]} at the end"
        )
    per_step, record.compile_s = _steady(stamps, t0)
    record.sec_per_1000 = 1000 * per_step
    if len(cpu) > 1:
        record.notes.append(f"seed {seed}: CPU s/1000 steps {1000 * _steady(cpu, 0.0)[0]:.2f}")
    seen = set()
    for w in caught:
        text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:100]}"
        if "deprecated" not in text and text not in seen:
            seen.add(text)
            record.notes.append(text)
    return guide


def fit_pyro(target: Target, kind: str, seed: int, args: argparse.Namespace, record: Record):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    t0 = time.perf_counter()
    guide = make_pyro_guide(kind, target.model)
    loss = Trace_ELBO(
        num_particles=args.particles,
        vectorize_particles=True,
        max_plate_nesting=MAX_PLATE_NESTING,
    )
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": args.lr}), loss)
    svi.step()
    t1 = time.perf_counter()
    for _ in range(args.steps - 1):
        svi.step()
    per_step = (time.perf_counter() - t1) / max(args.steps - 1, 1)
    record.sec_per_1000, record.compile_s = 1000 * per_step, max(t1 - t0 - per_step, 0.0)
    return guide


def run_one(target: Target, kind: str, seed: int, args: argparse.Namespace) -> Record:
    record = Record(target.name, kind, seed)
    try:
        fit = fit_pf if kind in PF_GUIDES else fit_pyro
        guide = fit(target, kind, seed, args, record)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            draws = pf.infer.importance_draws(
                target.model,
                guide,
                num_samples=args.eval,
                max_plate_nesting=MAX_PLATE_NESTING,
                latents=True,
            )
        values = {k: v.double() for k, v in draws.latents.items()}
        z = values.get("z")
        params = None
        if target.name in POSTERIORDB:
            params = posterior(target.name).to_params(values).numpy()
        summarize(
            record, draws.log_weights.numpy(), z=None if z is None else z.numpy(), params=params
        )
        if kind in PF_CNF:
            record.notes.append(accurate_check(target, guide, seed, args))
    except Exception as exc:  # a guide that crashes is a result
        record.error = reason(exc)
    return record


def accurate_check(target: Target, guide: Callable, seed: int, args: argparse.Namespace) -> str:
    """A continuous-flow guide's ELBO (or gap) on fresh draws with an accurate solve (dopri5,
    atol = rtol = ``CNF_CHECK_TOL``): how much the training solver's error moves the figure."""
    t0 = time.perf_counter()
    tol = CNF_CHECK_TOL
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        guide.flow.options(solver="dopri5", atol=tol, rtol=tol),
    ):
        warnings.simplefilter("ignore")
        draws = pf.infer.importance_draws(
            target.model,
            guide,
            num_samples=min(args.eval, CNF_CHECK_DRAWS),
            max_plate_nesting=MAX_PLATE_NESTING,
        )
    log_w = draws.log_weights.double().numpy()
    elbo, se = float(log_w.mean()), float(log_w.std(ddof=1) / math.sqrt(len(log_w)))
    label = "gap" if target.log_z is not None else "ELBO"
    value = target.log_z - elbo if target.log_z is not None else elbo
    return (
        f"seed {seed}: {label} {value:.3f} ± {se:.3f} with dopri5 atol=rtol={tol:g} "
        f"({time.perf_counter() - t0:.0f} s for {len(log_w)} draws)"
    )


# -- the NumPyro/FlowJAX peers, in a subprocess ---------------------------------------------------
def run_peers(targets: Sequence[str], peers: Sequence[str], seeds: Sequence[int], args) -> list:
    """Run ``numpyro_peers.py`` once for every target and seed; its records, or [] if absent."""
    import importlib.util

    absent = [m for m in ("numpyro", "jax") if importlib.util.find_spec(m) is None]
    if absent:
        print(
            f"NumPyro/FlowJAX peers skipped ({', '.join(absent)} not installed; "
            "pip install 'pyroflows[bench]')"
        )
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        command = [
            sys.executable,
            str(PEERS_SCRIPT),
            f"--targets={','.join(targets)}",
            f"--peers={','.join(peers)}",
            f"--seeds={','.join(map(str, seeds))}",
            f"--steps={args.steps}",
            f"--particles={args.particles}",
            f"--lr={args.lr}",
            f"--eval={args.eval}",
            f"--json={out}",
            "--quiet",
        ]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            print(line)
        if done.returncode != 0 or not out.is_file():
            tail = done.stderr.strip().splitlines()[-5:]
            print(f"NumPyro/FlowJAX peers failed (exit {done.returncode}):", *tail, sep="\n  ")
            return []
        print(f"numpyro_peers: done in {time.perf_counter() - t0:.0f} s")
        with open(out) as f:
            return [Record(**r) for r in json.load(f)]


# -- aggregation over seeds and the tables --------------------------------------------------------
@dataclass
class Row:
    guide: str
    seeds: int
    error: str | None
    stats: dict[str, tuple[float, float]]  # name -> (mean, standard error over seeds)
    modes: tuple[float, float] | None
    notes: list[str]


def _mean_se(values: Sequence[float], single_se: float = math.nan) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), single_se
    if not np.all(np.isfinite(x)):
        return float(np.mean(x)) if not np.any(np.isnan(x)) else math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def aggregate(records: Sequence[Record]) -> list[Row]:
    rows = []
    for guide in dict.fromkeys(r.guide for r in records):
        mine = [r for r in records if r.guide == guide]
        ok = [r for r in mine if r.error is None]
        error = None if ok else mine[0].error
        single = ok[0] if len(ok) == 1 else None
        stats = {}
        for key, se_key in (("elbo", "elbo_se"), ("iwae", "iwae_se"), ("khat", None)):
            one_se = getattr(single, se_key) if single is not None and se_key else math.nan
            stats[key] = _mean_se([getattr(r, key) for r in ok], one_se)
        for key in ("mean_err", "sd_lo", "sd_hi"):
            stats[key] = _mean_se([getattr(r, key) for r in ok])
        for key in ("sec_per_1000", "compile_s"):  # compile: measured on the first seed only
            stats[key] = _mean_se([v for r in ok if math.isfinite(v := getattr(r, key))])
        modes = None
        if ok and ok[0].modes is not None:
            modes = tuple(float(np.mean([r.modes[i] for r in ok])) for i in range(2))
        notes = []
        for r in mine:
            if r.error is not None and ok:
                notes.append(f"seed {r.seed} fails: {r.error}")
            notes += [n for n in r.notes if n not in notes]
        rows.append(Row(guide, len(ok), error, stats, modes, notes))
    return rows


def best_and_tied(rows: Sequence[Row]) -> set[str]:
    ok = [r for r in rows if r.error is None and math.isfinite(r.stats["elbo"][0])]
    if not ok:
        return set()
    best = max(ok, key=lambda r: r.stats["elbo"][0])
    b_mean, b_se = best.stats["elbo"]
    tied = set()
    for r in ok:
        mean, se = r.stats["elbo"]
        spread = math.sqrt(np.nan_to_num(b_se) ** 2 + np.nan_to_num(se) ** 2)
        if b_mean - mean <= 2 * spread:
            tied.add(r.guide)
    return tied


def _pm(stat: tuple[float, float], fmt: str = ".3f", width: int = 15) -> str:
    mean, se = stat
    if not math.isfinite(mean):
        text = "-inf" if mean == -math.inf else "nan"
    elif math.isfinite(se):
        text = f"{mean:{fmt}} ± {se:{fmt}}"
    else:
        text = f"{mean:{fmt}}"
    return f"{text:>{width}}"


def print_target(name: str, records: Sequence[Record], description: str = "") -> list[Row]:
    rows = aggregate(records)
    winners = best_and_tied(rows)
    log_z = 0.0 if name in SYNTHETIC else None
    seeds = sorted({r.seed for r in records})
    print(
        f"\n== {name}"
        + (f": {description}" if description else "")
        + ("; log Z = 0" if log_z is not None else "; log Z unknown")
        + f"; seeds {seeds} (mean ± se over seeds)"
    )
    first = "logZ - ELBO" if log_z is not None else "ELBO"
    header = (
        f"{'guide':<14} {first:>17} {'IWAE log Z':>17} {'k-hat':>11} {'s/1000 st':>13}"
        f" {'compile s':>11}"
    )
    mixture = any(r.modes is not None for r in rows)
    pdb = name in POSTERIORDB
    if mixture:
        header += f" {'modes -/+':>11}"
    if pdb:
        header += f" {'max|dmean|/sd':>15} {'sd ratio':>11}"
    header += "  best"
    print(header)
    print("-" * len(header))
    for r in rows:
        label = r.guide + (" (1 seed)" if r.seeds == 1 and len(seeds) > 1 else "")
        if r.error is not None:
            print(f"{label:<14} fails: {r.error}")
            continue
        elbo = r.stats["elbo"]
        first_stat = (log_z - elbo[0], elbo[1]) if log_z is not None else elbo
        line = (
            f"{label:<14} {_pm(first_stat, width=17)} {_pm(r.stats['iwae'], width=17)}"
            f" {_pm(r.stats['khat'], '.2f', 11)} {_pm(r.stats['sec_per_1000'], '.2f', 13)}"
            f" {_pm(r.stats['compile_s'], '.1f', 11)}"
        )
        if mixture:
            modes = f"{r.modes[0]:.2f}/{r.modes[1]:.2f}" if r.modes else "-"
            line += f" {modes:>11}"
        if pdb:
            lo, hi = r.stats["sd_lo"][0], r.stats["sd_hi"][0]
            line += f" {_pm(r.stats['mean_err'], '.3f', 15)} {f'{lo:.2f}-{hi:.2f}':>11}"
        line += f"  {'*' if r.guide in winners else ''}"
        print(line)
    for r in rows:
        for note in r.notes:
            print(f"   note: {r.guide}: {note}")
    sys.stdout.flush()
    return rows


def print_summary(all_rows: dict[str, list[Row]]) -> None:
    targets = list(all_rows)
    guides = list(dict.fromkeys(r.guide for rows in all_rows.values() for r in rows))
    print(f"\n== summary over {len(targets)} targets (best or tied on ELBO)")
    for guide in guides:
        wins = ran = failed = 0
        for rows in all_rows.values():
            winners = best_and_tied(rows)
            for r in rows:
                if r.guide == guide:
                    ran += 1
                    failed += r.error is not None
                    wins += guide in winners
        print(
            f"{guide:<14} best or tied on {wins} of {ran}"
            + (f"; fails on {failed}" if failed else "")
        )

    print_matrix(all_rows, guides)

    def per_1000(rows: list[Row], guide: str) -> float:
        for r in rows:
            if r.guide == guide and r.error is None:
                return r.stats["sec_per_1000"][0]
        return math.nan

    shown = [
        g for g in ("pf-defaults", "pf-compile", "NumPyro-IAF", "AutoIAFNormal") if g in guides
    ]
    ratios = [  # (label, numerator, denominator): the goals are <= 2 and >= 5
        ("defaults/NumPyro", "pf-defaults", "NumPyro-IAF"),
        ("compile/NumPyro", "pf-compile", "NumPyro-IAF"),
        ("PyroIAF/defaults", "AutoIAFNormal", "pf-defaults"),
        ("PyroIAF/compile", "AutoIAFNormal", "pf-compile"),
    ]
    ratios = [r for r in ratios if r[1] in guides and r[2] in guides]
    if not ratios:
        return
    print(
        "\n== speed: seconds per 1000 steps, and their ratios "
        "(goals: pyroflows within 2x of NumPyro-IAF, at least 5x faster than AutoIAFNormal)"
    )
    print(
        f"{'target':<18}"
        + "".join(f"{g:>15}" for g in shown)
        + "".join(f"{r[0]:>18}" for r in ratios)
    )
    for name, rows in all_rows.items():
        line = f"{name:<18}" + "".join(f"{per_1000(rows, g):>15.2f}" for g in shown)
        line += "".join(f"{per_1000(rows, a) / per_1000(rows, b):>18.2f}" for _, a, b in ratios)
        print(line)


def reference_noise(name: str) -> float:
    """max |mean(chains 1-5) - mean(chains 6-10)| / sd of the reference draws: how well NUTS'
    own 10,000 draws pin the means (the error of the half-sets' mean is about half of this)."""
    draws = posterior(name).draws
    half = len(draws) // 2
    diff = np.abs(draws[:half].mean(0) - draws[half:].mean(0))
    return float(np.max(diff / draws.std(0, ddof=1)))


def print_matrix(all_rows: dict[str, list[Row]], guides: Sequence[str]) -> None:
    """The headline tables: gap per synthetic target and guide; for posteriordb, the largest
    mean error in reference sds and the range of sd ratios per target and guide."""

    def cell(rows: list[Row], guide: str, text: Callable[[Row], str]) -> str:
        for r in rows:
            if r.guide == guide:
                return "fails" if r.error is not None else text(r)
        return "-"

    def gap(r: Row) -> str:
        mean, se = r.stats["elbo"]
        return f"{-mean:.3f} ± {se:.3f}" if math.isfinite(se) else f"{-mean:.3f}"

    synthetic = [t for t in all_rows if t in SYNTHETIC]
    if synthetic:
        print("\n== gap log Z - ELBO (nats), mean ± se over seeds; * best or tied")
        print(f"{'target':<12}" + "".join(f"{g:>18}" for g in guides))
        for name in synthetic:
            rows, winners = all_rows[name], best_and_tied(all_rows[name])
            line = f"{name:<12}"
            for g in guides:
                line += f"{cell(rows, g, gap) + ('*' if g in winners else ' '):>18}"
            print(line)
    pdb = [t for t in all_rows if t in POSTERIORDB]
    if pdb:
        print(
            "\n== posteriordb: max |mean_q - mean_ref| / sd_ref (sd_q / sd_ref from-to), mean over "
            "seeds; NUTS: the reference's own split-half difference"
        )
        print(f"{'target':<18}{'NUTS':>8}" + "".join(f"{g:>20}" for g in guides))

        def moments(r: Row) -> str:
            lo, hi = r.stats["sd_lo"][0], r.stats["sd_hi"][0]
            return f"{r.stats['mean_err'][0]:.3f} ({lo:.2f}-{hi:.2f})"

        for name in pdb:
            line = f"{name:<18}{reference_noise(name):>8.3f}"
            line += "".join(f"{cell(all_rows[name], g, moments):>20}" for g in guides)
            print(line)


def parse_list(parser, option: str, text: str, allowed: Sequence[str]) -> list[str]:
    if option == "--targets":
        groups = {"synthetic": SYNTHETIC, "posteriordb": POSTERIORDB, "all": ALL_TARGETS}
    else:
        groups = {
            "all": ALL_GUIDES,
            "pf-flows": ("pf-defaults", *PF_FLOWS),
            "pf-continuous": CONTINUOUS_GROUP,
        }
    items: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if item in groups:
            items += groups[item]
        elif item in allowed:
            items.append(item)
        elif item:
            parser.error(f"{option}: expected some of {tuple(allowed)}; got {item!r}")
    return list(dict.fromkeys(items))


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets", default=None, help="names, or synthetic (default), posteriordb, all"
    )
    parser.add_argument(
        "--guides",
        default=None,
        help="names, or all, or pf-flows, or pf-continuous (default: all but the pf-<flow> "
        "guides; --quick: no pf-compile)",
    )
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--particles", type=int, default=PARTICLES, help="Pyro's and the peers'")
    parser.add_argument("--lr", type=float, default=LR, help="Pyro's and the peers' Adam")
    parser.add_argument("--compile-seeds", choices=("first", "all"), default="first")
    parser.add_argument(
        "--compile-cache",
        choices=("cold", "warm"),
        default="cold",
        help="pf-compile from empty torch.compile caches (cold) or with the machine's (warm)",
    )
    parser.add_argument("--eval", type=int, default=EVAL, help="guide draws per fit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny budget (smoke check)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval = min(args.steps, 30), min(args.eval, IWAE_K)
    targets = parse_list(
        parser,
        "--targets",
        args.targets or ",".join(QUICK_TARGETS if args.quick else SYNTHETIC),
        ALL_TARGETS,
    )
    quick_guides = [g for g in DEFAULT_GUIDES if g != "pf-compile"]  # compiling takes a minute
    default_guides = quick_guides if args.quick else DEFAULT_GUIDES
    guides = parse_list(parser, "--guides", args.guides or ",".join(default_guides), ALL_GUIDES)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if s]
    if "pf-compile" in guides and "compile" not in inspect.signature(pf.infer.fit_svi).parameters:
        print("pf-compile skipped: this fit_svi has no compile argument")
        guides.remove("pf-compile")

    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"pyroflows {getattr(pf, '__version__', '?')}; torch threads {torch.get_num_threads()}; "
        f"load average {_load()}"
    )
    print(
        f"{args.steps} steps; Pyro's guides and the peers: {args.particles} particles, Adam lr "
        f"{args.lr:g}; pf-*: fit_svi's defaults; seeds {seeds} (pf-compile: "
        f"{'all' if args.compile_seeds == 'all' else 'the first'}); statistics from {args.eval} "
        f"draws, IWAE K={IWAE_K}" + (" (QUICK: smoke check only)" if args.quick else "")
    )
    if any(t in POSTERIORDB for t in targets) and not posteriors.available():
        print(f"posteriordb data not found under {posteriors.DATA_ROOT}; skipping those targets")
        targets = [t for t in targets if t not in POSTERIORDB]

    t_start = time.perf_counter()
    peers = [g for g in guides if g in PEER_GUIDES]
    peer_records = run_peers(targets, peers, seeds, args) if peers else []
    all_rows: dict[str, list[Row]] = {}
    for name in targets:
        target = make_target(name)
        records = []
        for seed in seeds:
            for kind in guides:
                if kind in PEER_GUIDES:
                    continue
                if kind == "pf-compile" and args.compile_seeds == "first" and seed != seeds[0]:
                    continue
                records.append(run_one(target, kind, seed, args))
        records += [r for r in peer_records if r.target == name]
        order = {g: i for i, g in enumerate(guides)}
        records.sort(key=lambda r: (order[r.guide], r.seed))
        all_rows[name] = print_target(name, records, target.description)
    print_summary(all_rows)
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s; load average {_load()}")


if __name__ == "__main__":
    main()
