"""NumPyro and FlowJAX flow guides on the targets of ``benchmarks/vi.py``, jit-compiled.

    python benchmarks/numpyro_peers.py [--targets funnel10,...] [--peers ...] [--seeds 0,1,2]
                                       [--steps 2000] [--particles 16] [--lr 1e-3]
                                       [--eval 10000] [--json FILE] [--quick]

The same targets as ``vi.py`` written in NumPyro (same site names, shapes and densities,
normalising constants included, so ELBOs compare across libraries; ``tests/
test_benchmark_models.py`` checks the log densities against the Pyro models):
``funnel10``, ``banana2``, ``banana10``, ``mixture2``, ``mixture10`` (log Z = 0) and the eight
posteriordb posteriors of ``benchmarks/posteriors.py``. Peers, each trained with the same budget
as ``vi.py``'s guides (``--steps`` steps, ``--particles`` particles, Adam with ``--lr``):

* ``NumPyro-IAF``: ``numpyro.infer.autoguide.AutoIAFNormal(model, num_flows=3,
  hidden_dims=[64, 64])`` (the flow size of ``vi.py``'s flows), trained by
  ``numpyro.infer.SVI`` with ``Trace_ELBO(num_particles=P)`` (vectorised) and
  ``numpyro.optim.Adam(lr)``, the whole loop jit-compiled (``svi.update`` in a
  ``lax.fori_loop``).
* ``NumPyro-BNAF``: ``AutoBNAFNormal(model)`` with its defaults (one block-neural flow,
  hidden factors ``[8, 8]``), trained the same way.
* ``FlowJAX-MAF``: ``flowjax.flows.masked_autoregressive_flow`` (3 layers, width 64, depth 2,
  ``invert=False`` so that drawing is the fast direction, as a variational flow needs) on a
  standard normal base, trained by reverse KL with sticking-the-landing gradients
  (``flowjax.train.losses.ElboLoss(target, P, stick_the_landing=True)``) and ``optax.adam(lr)``,
  in the loop of ``flowjax.train.fit_to_key_based_loss`` (one jitted step per Python iteration;
  the loss read every step, as the library does). The target is NumPyro's potential of the same
  model (``initialize_model``), on the flat unconstrained latent vector.

Timing: the jitted training loop and evaluation of a peer are built once per target and reused
by its seeds, so the first seed pays the compilation (as ``vi.py``'s ``pf-compile`` row, which
runs on the first seed). Reported apart: ``compile s`` (first seed only), the time to the end of
the first step (``svi.init`` plus one compiled step, or FlowJAX's first step) less one step at the
steady rate; and seconds per 1000 steps at the steady rate (the remaining steps, timed to
``block_until_ready``).

JAX runs on the CPU with one thread, comparable with ``torch.set_num_threads(1)``:
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` and
``JAX_PLATFORMS=cpu`` are set before jax is imported (the script prints them, and the ratio of
process CPU time to wall time over the training loops, which is about 1 with one thread).

Evaluation, from ``--eval`` guide draws (10,000), as ``vi.py`` does for its guides: the log
weights ``log p(x, z) - log q(z)`` give the ELBO (their mean) with its standard error, the gap
``log Z - ELBO``, the IWAE(K=1000) log Z (mean over the draws' blocks of 1000) and PSIS k-hat; the
draws' fraction per mode (mixtures) and, for posteriordb, the largest
``|mean_q - mean_ref| / sd_ref`` and the range of ``sd_q / sd_ref`` over the Stan parameters.
Statistics are computed by ``vi.py``'s ``summarize`` so the rows are comparable.

Without numpyro/jax (or flowjax, for its row) the script prints one line saying so and exits
cleanly (``pip install pyroflows[bench]`` installs them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import posteriors  # benchmarks/posteriors.py, next to this file
import vi  # benchmarks/vi.py: targets' constants, Record, summarize, the tables

ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
PEERS = ("NumPyro-IAF", "NumPyro-BNAF", "FlowJAX-MAF")
EVAL_CHUNK = 2000  # guide draws per jitted evaluation call
# Targets run with 64-bit floats: the GP kernel's Cholesky factor (jitter 1e-10) fails in float32
# for a third of the posterior (the Pyro model computes it in float64 and the rest in float32).
X64_TARGETS = ("gp_pois_regr",)
CPU_RATIOS: list[float] = []  # process CPU time / wall time of each training loop
REQUIRES = {"NumPyro-IAF": ("numpyro", "jax"), "NumPyro-BNAF": ("numpyro", "jax")}
REQUIRES["FlowJAX-MAF"] = ("numpyro", "jax", "flowjax", "optax", "equinox", "paramax")


def missing(peer: str) -> list[str]:
    """The packages a peer needs that are not installed."""
    return [m for m in REQUIRES[peer] if importlib.util.find_spec(m) is None]


def configure_jax() -> str:
    """Put JAX on the CPU with one thread; call before jax is first imported. Returns a note."""
    if "jax" in sys.modules:
        return "jax was imported before configure_jax: its thread settings are the caller's"
    flags = os.environ.get("XLA_FLAGS", "")
    if ONE_THREAD_FLAGS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {ONE_THREAD_FLAGS}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, JAX_PLATFORMS={os.environ['JAX_PLATFORMS']}"


# -- the targets in NumPyro -----------------------------------------------------------------------
def _read_data(name: str) -> dict:
    with open(posteriors.DATA_ROOT / posteriors.FOLDERS[name] / "data.json") as f:
        return json.load(f)


def numpyro_model(name: str) -> Callable[[], None]:
    """The target ``name`` of ``vi.py`` as a NumPyro model without arguments."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd
    from jax import lax
    from jax.scipy.special import logsumexp
    from numpyro.distributions import constraints

    if name == "funnel10":
        dim = 10

        def model() -> None:
            v = numpyro.sample("v", nd.Normal(0.0, 3.0))
            scale = jnp.exp(v / 2) * jnp.ones(dim - 1)
            numpyro.sample("x", nd.Normal(jnp.zeros(dim - 1), scale).to_event(1))

        return model
    if name.startswith("banana"):
        dim, b = int(name[len("banana") :]), vi.BANANA_B

        def model() -> None:
            x1 = numpyro.sample("x1", nd.Normal(0.0, 10.0))
            numpyro.sample("x2", nd.Normal(b * (x1**2 - 100.0), 1.0))
            if dim > 2:
                numpyro.sample("rest", nd.Normal(jnp.zeros(dim - 2), 1.0).to_event(1))

        return model
    if name.startswith("mixture"):
        dim = int(name[len("mixture") :])
        m = jnp.full((dim,), vi.MIXTURE_SHIFT / math.sqrt(dim))
        components = nd.Normal(jnp.stack([-m, m]), 1.0).to_event(1)
        dummy = nd.Normal(jnp.zeros(dim), 1.0).to_event(1)

        def model() -> None:
            z = numpyro.sample("z", dummy)
            log_mix = logsumexp(components.log_prob(z[..., None, :]), axis=-1) - math.log(2)
            numpyro.factor("mixture", log_mix - dummy.log_prob(z))

        return model
    if name not in posteriors.FOLDERS:
        raise ValueError(f"name: expected one of {vi.ALL_TARGETS}; got {name!r}")
    d = _read_data(name)

    if name == "eight_schools":
        y, sigma = jnp.array(d["y"]), jnp.array(d["sigma"])

        def model() -> None:
            mu = numpyro.sample("mu", nd.Normal(0.0, 5.0))
            tau = numpyro.sample("tau", nd.HalfCauchy(5.0))
            with numpyro.plate("schools", len(y)):
                theta_trans = numpyro.sample("theta_trans", nd.Normal(0.0, 1.0))
                numpyro.sample("y", nd.Normal(mu + tau * theta_trans, sigma), obs=y)

    elif name == "kidiq":
        hs, iq = jnp.array(d["mom_hs"], dtype=float), jnp.array(d["mom_iq"], dtype=float)
        X = jnp.stack([jnp.ones_like(hs), hs, iq, hs * iq], axis=-1)
        score = jnp.array(d["kid_score"], dtype=float)

        def model() -> None:
            beta = numpyro.sample("beta", nd.ImproperUniform(constraints.real_vector, (), (4,)))
            sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))
            numpyro.sample("kid_score", nd.Normal(X @ beta, sigma).to_event(1), obs=score)

    elif name == "mesquite":
        c = {k: jnp.array(v, dtype=float) for k, v in d.items() if isinstance(v, list)}
        d1, d2 = c["diam1"], c["diam2"]
        X = jnp.stack(
            [
                jnp.ones_like(d1),
                jnp.log(d1 * d2 * c["canopy_height"]),
                jnp.log(d1 * d2),
                jnp.log(d1 / d2),
                jnp.log(c["total_height"]),
                jnp.log(c["density"]),
                c["group"],
            ],
            axis=-1,
        )
        log_weight = jnp.log(c["weight"])

        def model() -> None:
            beta = numpyro.sample("beta", nd.ImproperUniform(constraints.real_vector, (), (7,)))
            sigma = numpyro.sample("sigma", nd.ImproperUniform(constraints.positive, (), ()))
            numpyro.sample("log_weight", nd.Normal(X @ beta, sigma).to_event(1), obs=log_weight)

    elif name == "arK":
        K, T, y = int(d["K"]), int(d["T"]), jnp.array(d["y"])
        lags = jnp.stack([y[K - k : T - k] for k in range(1, K + 1)], axis=-1)

        def model() -> None:
            alpha = numpyro.sample("alpha", nd.Normal(0.0, 10.0))
            beta = numpyro.sample("beta", nd.Normal(jnp.zeros(K), 10.0).to_event(1))
            sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))
            numpyro.sample("y", nd.Normal(alpha + lags @ beta, sigma).to_event(1), obs=y[K:])

    elif name == "diamonds":
        X = jnp.asarray(np.asarray(d["X"], dtype=np.float64)[:, 1:])
        Xc, Y = X - X.mean(0), jnp.array(d["Y"])

        def model() -> None:
            b = numpyro.sample("b", nd.Normal(jnp.zeros(Xc.shape[1]), 1.0).to_event(1))
            intercept = numpyro.sample("Intercept", nd.StudentT(3.0, 8.0, 10.0))
            sigma = numpyro.sample("sigma", nd.FoldedDistribution(nd.StudentT(3.0, 0.0, 10.0)))
            numpyro.sample("Y", nd.Normal(intercept + Xc @ b, sigma).to_event(1), obs=Y)

    elif name == "gp_pois_regr":  # run under jax.enable_x64 (see X64_TARGETS)
        x, k = jnp.array(d["x"], dtype=float), jnp.array(d["k"], dtype=float)
        d2 = (x[:, None] - x[None, :]) ** 2

        def model() -> None:
            rho = numpyro.sample("rho", nd.Gamma(25.0, 4.0))
            alpha = numpyro.sample("alpha", nd.HalfNormal(2.0))
            f_tilde = numpyro.sample("f_tilde", nd.Normal(jnp.zeros(len(x)), 1.0).to_event(1))
            cov = alpha**2 * jnp.exp(-d2 / (2 * rho**2)) + 1e-10 * jnp.eye(len(x))
            f = jnp.linalg.cholesky(cov) @ f_tilde
            numpyro.sample("k", nd.Poisson(jnp.exp(f)).to_event(1), obs=k)

    elif name == "low_dim_gauss_mix":
        y = jnp.array(d["y"])

        def model() -> None:
            # posteriors.SortedNormal: 2! N(mu1) N(mu2) on mu1 < mu2
            mu = numpyro.sample("mu", nd.ImproperUniform(constraints.ordered_vector, (), (2,)))
            numpyro.factor("mu_prior", nd.Normal(0.0, 2.0).log_prob(mu).sum(-1) + math.log(2))
            sigma = numpyro.sample("sigma", nd.HalfNormal(2.0 * jnp.ones(2)).to_event(1))
            theta = numpyro.sample("theta", nd.Beta(5.0, 5.0))
            weights = nd.Categorical(probs=jnp.stack([theta, 1 - theta], axis=-1))
            mixture = nd.MixtureSameFamily(weights, nd.Normal(mu, sigma))
            numpyro.sample("y", mixture.expand((len(y),)).to_event(1), obs=y)

    elif name == "garch":
        y, sigma1 = jnp.array(d["y"]), float(d["sigma1"])

        def model() -> None:
            mu = numpyro.sample("mu", nd.ImproperUniform(constraints.real, (), ()))
            alpha0 = numpyro.sample("alpha0", nd.ImproperUniform(constraints.positive, (), ()))
            alpha1 = numpyro.sample("alpha1", nd.Beta(1.0, 2.0))
            unit = numpyro.sample("beta1_unit", nd.Uniform(0.0, 1.0))
            beta1 = (1 - alpha1) * unit

            def variance(v, y_prev):
                v = alpha0 + alpha1 * (y_prev - mu) ** 2 + beta1 * v
                return v, v

            _, rest = lax.scan(variance, jnp.asarray(sigma1**2), y[:-1])
            s2 = jnp.concatenate([jnp.array([sigma1**2]), rest])
            numpyro.sample("y", nd.Normal(mu, jnp.sqrt(s2)).to_event(1), obs=y)

    return model


# -- fitting --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fitted:
    """A trained peer: draw ``n`` latents as ``(z, log_q, log_p, constrained sites)``."""

    draw: Callable[[object, int], tuple[np.ndarray, np.ndarray, np.ndarray, dict]]
    compile_s: float
    sec_per_1000: float
    cpu_ratio: float


def _potential(model: Callable, key) -> tuple[Callable, Callable, Callable, int]:
    """NumPyro's potential of ``model`` on the flat unconstrained vector, with (un)packing."""
    from jax.flatten_util import ravel_pytree
    from numpyro.infer.util import initialize_model

    info = initialize_model(key, model)
    flat, unravel = ravel_pytree(info.param_info.z)
    return info.potential_fn, unravel, info.postprocess_fn, int(flat.size)


def _timed_loop(first: Callable[[], object], rest: Callable[[], object], steps: int):
    """Run the first step (with compilation) and the rest; returns compile, s/step, cpu ratio."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(first())
    t1, c1 = time.perf_counter(), time.process_time()
    jax.block_until_ready(rest())
    t2, c2 = time.perf_counter(), time.process_time()
    per_step = (t2 - t1) / max(steps - 1, 1)
    ratio = (c2 - c1) / (t2 - t1) if t2 - t1 > 0.5 else math.nan  # too short to read
    return max(t1 - t0 - per_step, 0.0), per_step, ratio


@functools.cache
def _numpyro_setup(kind: str, name: str, particles: int, lr: float):
    """The SVI object, the jitted training loop and the jitted evaluation of one peer on one
    target, built once and reused by every seed (jit compiles them on first use)."""
    import jax
    import jax.numpy as jnp
    import numpyro.optim
    from jax import lax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal

    model = numpyro_model(name)
    if kind == "NumPyro-IAF":
        guide = AutoIAFNormal(model, num_flows=vi.LAYERS, hidden_dims=list(vi.HIDDEN))
    else:
        guide = AutoBNAFNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO(num_particles=particles))

    @jax.jit
    def run(state, n):
        def body(_, carry):
            return svi.update(carry[0])

        return lax.fori_loop(0, n, body, (state, jnp.zeros(())))

    potential, _, postprocess, dim = _potential(model, jax.random.key(0))

    @jax.jit
    def draw_chunk(params, key):
        posterior = guide.get_posterior(params)
        z, intermediates = posterior.sample_with_intermediates(key, (EVAL_CHUNK,))
        log_q = posterior.log_prob(z, intermediates)
        sites = guide._unpack_latent(z)  # the guide's own packing of its latent vector
        log_p = -jax.vmap(potential)(sites)
        return z, log_q, log_p, jax.vmap(postprocess)(sites)

    return svi, run, guide, dim, draw_chunk


def fit_numpyro(kind: str, name: str, seed: int, args: argparse.Namespace) -> Fitted:
    import jax

    fresh = _numpyro_setup.cache_info().currsize
    svi, run, guide, dim, draw_chunk = _numpyro_setup(kind, name, args.particles, args.lr)
    fresh = _numpyro_setup.cache_info().currsize > fresh
    state = None

    def first():
        nonlocal state
        state, loss = run(svi.init(jax.random.key(seed)), 1)
        return loss

    def rest():
        nonlocal state
        state, loss = run(state, args.steps - 1)
        return loss

    compile_s, per_step, ratio = _timed_loop(first, rest, args.steps)
    if guide.latent_dim != dim:
        raise RuntimeError(f"latent size: guide {guide.latent_dim}, potential {dim}")
    draw = _drawer(partial(draw_chunk, svi.get_params(state)))
    return Fitted(draw, compile_s if fresh else math.nan, 1000 * per_step, ratio)


@functools.cache
def _flowjax_setup(name: str, particles: int, lr: float):
    """FlowJAX's pieces for one target: built once, so its jitted step compiles once."""
    import equinox as eqx
    import jax
    import optax
    from flowjax.train.losses import ElboLoss

    model = numpyro_model(name)
    potential, unravel, postprocess, dim = _potential(model, jax.random.key(0))

    def target(z):
        return -potential(unravel(z))

    loss_fn = ElboLoss(target, particles, stick_the_landing=True)
    optimizer = optax.adam(lr)

    @eqx.filter_jit
    def draw_chunk(flow, key):
        z, log_q = flow.sample_and_log_prob(key, (EVAL_CHUNK,))
        log_p = jax.vmap(target)(z)
        return z, log_q, log_p, jax.vmap(lambda x: postprocess(unravel(x)))(z)

    return dim, loss_fn, optimizer, draw_chunk


def fit_flowjax(name: str, seed: int, args: argparse.Namespace) -> Fitted:
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr
    import paramax
    from flowjax.distributions import Normal
    from flowjax.flows import masked_autoregressive_flow
    from flowjax.train.train_utils import step

    fresh = _flowjax_setup.cache_info().currsize
    dim, loss_fn, optimizer, draw_chunk = _flowjax_setup(name, args.particles, args.lr)
    fresh = _flowjax_setup.cache_info().currsize > fresh
    key_flow, key_train = jr.split(jr.key(seed))
    flow = masked_autoregressive_flow(
        key_flow,
        base_dist=Normal(jnp.zeros(dim)),
        flow_layers=vi.LAYERS,
        nn_width=vi.HIDDEN[0],
        nn_depth=len(vi.HIDDEN),
        invert=False,
    )
    # flowjax.train.fit_to_key_based_loss's loop, without its progress bar
    params, static = eqx.partition(
        flow, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable)
    )
    opt_state = optimizer.init(params)
    keys = jr.split(key_train, args.steps)
    losses = []

    def one(key):
        nonlocal params, opt_state
        params, opt_state, loss = step(
            params, static, key=key, optimizer=optimizer, opt_state=opt_state, loss_fn=loss_fn
        )
        losses.append(loss.item())
        return loss

    def rest():
        for key in keys[1:]:
            one(key)
        return params

    compile_s, per_step, ratio = _timed_loop(lambda: one(keys[0]), rest, args.steps)
    draw = _drawer(partial(draw_chunk, eqx.combine(params, static)))
    return Fitted(draw, compile_s if fresh else math.nan, 1000 * per_step, ratio)


def _drawer(draw_chunk: Callable) -> Callable:
    def draw(key, n: int):
        import jax

        chunks = [draw_chunk(k) for k in jax.random.split(key, -(-n // EVAL_CHUNK))]
        z, log_q, log_p = (np.concatenate([np.asarray(c[i]) for c in chunks])[:n] for i in range(3))
        sites = {s: np.concatenate([np.asarray(c[3][s]) for c in chunks])[:n] for s in chunks[0][3]}
        return z, log_q, log_p, sites

    return draw


def _x64(on: bool):
    """A context with JAX's 64-bit mode on or off (``jax.enable_x64``; older JAX: experimental)."""
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    from jax.experimental import enable_x64

    return enable_x64(on)


def run_peer(peer: str, name: str, seed: int, args: argparse.Namespace) -> vi.Record:
    """Train one peer on one target with one seed and evaluate it as ``vi.py`` does."""
    import jax

    record = vi.Record(name, peer, seed)
    if name in X64_TARGETS:
        record.notes.append("run in float64 (jax.enable_x64)")
    try:
        with _x64(name in X64_TARGETS):
            if peer == "FlowJAX-MAF":
                fitted = fit_flowjax(name, seed, args)
            else:
                fitted = fit_numpyro(peer, name, seed, args)
            z, log_q, log_p, sites = fitted.draw(jax.random.key(10_000 + seed), args.eval)
        record.sec_per_1000, record.compile_s = fitted.sec_per_1000, fitted.compile_s
        if math.isfinite(fitted.cpu_ratio):
            CPU_RATIOS.append(fitted.cpu_ratio)
        if fitted.cpu_ratio > 1.1:
            record.notes.append(
                f"CPU time / wall time {fitted.cpu_ratio:.2f}: more than one thread"
            )
        params = None
        if name in posteriors.FOLDERS:
            import torch

            post = vi.posterior(name)
            values = {
                s: torch.as_tensor(np.asarray(sites[s], dtype=np.float64)) for s in post.sites
            }
            params = post.to_params(values).numpy()
        vi.summarize(record, log_p - log_q, z=z, params=params)
    except Exception as exc:  # a peer that crashes is a result
        record.error = vi.reason(exc)
    return record


def main(argv: list[str] | None = None) -> list[vi.Record]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=None, help="names, or synthetic, posteriordb, all")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=vi.STEPS)
    parser.add_argument("--particles", type=int, default=vi.PARTICLES)
    parser.add_argument("--lr", type=float, default=vi.LR)
    parser.add_argument("--eval", type=int, default=vi.EVAL, help="guide draws for the ELBO")
    parser.add_argument("--json", help="write the records (a list of dicts) to this file")
    parser.add_argument("--quiet", action="store_true", help="no tables (with --json)")
    parser.add_argument("--quick", action="store_true", help="tiny budget (smoke check)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval = min(args.steps, 30), min(args.eval, vi.IWAE_K)
    default = vi.QUICK_TARGETS if args.quick else vi.ALL_TARGETS
    targets = vi.parse_list(parser, "--targets", args.targets or ",".join(default), vi.ALL_TARGETS)
    peers = vi.parse_list(parser, "--peers", args.peers, PEERS)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if s]

    records: list[vi.Record] = []
    absent = {p: missing(p) for p in peers}
    runnable = [p for p in peers if not absent[p]]
    skipped = [p for p in peers if absent[p]]
    if skipped:
        packages = ", ".join(dict.fromkeys(m for p in skipped for m in absent[p]))
        print(
            f"numpyro_peers: {', '.join(skipped)} skipped ({packages} not installed; "
            "pip install 'pyroflows[bench]')"
        )
    if runnable:
        note = configure_jax()
        import jax
        import numpyro

        versions = f"jax {jax.__version__}, numpyro {numpyro.__version__}"
        if importlib.util.find_spec("flowjax") is not None:
            from importlib.metadata import version

            versions += f", flowjax {version('flowjax')}"
        print(
            f"numpyro_peers: python {platform.python_version()}, {versions}; "
            f"{jax.devices()[0].platform} with one thread ({note})"
        )
        print(
            f"numpyro_peers: {args.steps} steps, {args.particles} particles, Adam lr {args.lr:g}; "
            f"seeds {seeds}; evaluation from {args.eval} draws"
            + (" (QUICK: smoke check only)" if args.quick else "")
        )
        for name in targets:
            if name in posteriors.FOLDERS and not posteriors.available(name):
                print(f"numpyro_peers: {name} skipped (posteriordb data absent)")
                continue
            for peer in runnable:
                for seed in seeds:
                    records.append(run_peer(peer, name, seed, args))
                    sys.stdout.flush()
            if not args.quiet:
                vi.print_target(name, [r for r in records if r.target == name])
    if CPU_RATIOS:
        print(
            f"numpyro_peers: CPU time / wall time of the training loops: mean "
            f"{np.mean(CPU_RATIOS):.2f}, max {np.max(CPU_RATIOS):.2f} (one busy thread: at most 1; "
            "below 1 when other processes share the cores)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in records], f)
    return records


if __name__ == "__main__":
    main()
