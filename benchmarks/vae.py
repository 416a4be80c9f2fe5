"""VAEs on binarized MNIST: Gaussian, IAF, NSF, planar and Sylvester posteriors, ELBO and IWAE.

    python benchmarks/vae.py [--budget-minutes 20] [--steps N | --epochs E] [--configs ...]
                             [--z-dim 32] [--eval-images 1000] [--eval-k 1000] [--seed 0]
                             [--threads 1] [--quick]

Data: the fixed binarization of MNIST (Salakhutdinov & Murray 2008; Larochelle's 50k/10k/10k
split), read with :func:`pyroflows.datasets.binarized_mnist` from ``$PYROFLOWS_DATA`` or, by
default, ``<repository>/../shared/data`` (``mnist/binarized_mnist.npz``). Nothing is downloaded.

Model (the IWAE paper's one-stochastic-layer architecture, with 300-unit layers): a prior
``z ~ N(0, I_Z)``, a decoder ``z -> 300 -> 300 -> 784`` (tanh) giving Bernoulli logits for the
784 pixels, and an encoder ``x -> 300 -> 300`` (tanh) whose 300 features ``h`` are the
posterior's context. The posterior ``q(z | x)`` is an :class:`pyroflows.infer.AmortizedFlow`
(encoder + conditional flow) whose base is a diagonal Normal with mean and log-scale read
*linearly* from ``h`` (:class:`pyroflows.bases.ConditionalDiagNormal` with no hidden layer: the
usual VAE heads). The posteriors share the encoder, the decoder and these heads:

* ``gauss``: the base alone (a flow with no transforms): the standard Gaussian VAE posterior.
* ``iaf``: ``pf.IAF(Z, layers=2, hidden=(256,), context_dim=300, base=heads)``
  (the IAF paper's VAE posterior: each MADE also reads ``h``).
* ``nsf``: ``pf.NSF(Z, layers=2, hidden=(256,), context_dim=300, bins=8, bound=5,
  actnorm=False, base=heads)``: rational-quadratic spline coupling layers with LU mixing (no
  ActNorm: in VI there is no data batch to initialise it from).
* the posteriors of van den Berg et al. (2018), Table 1, each ``pf.SylvesterFlow(Z,
  layers=16, context_dim=300, kind=..., base=heads)``: 16 layers (their K = 16) *amortised*
  from ``h`` (every layer's parameters, ``Q`` included, come from ``h`` through a linear head
  whose rows for ``R`` (planar: ``u``) start at zero, so each posterior starts as the Gaussian
  one), in the sampling-fast orientation (one pass to draw and score a draw):

  - ``planar``: ``kind="planar"`` (Rezende and Mohamed, 2015);
  - ``o-snf``: ``kind="orthogonal", columns=min(32, Z)`` (their M = 32 orthonormal columns);
  - ``h-snf``: ``kind="householder", reflections=8`` (their H = 8 reflections, ``M = Z``);
  - ``t-snf``: ``kind="triangular"`` (``Q`` the identity or the reversal, alternating).

  They are trained with the ELBO only, as in the paper (``TABLE1`` is the ``--configs
  table1`` group: these four next to ``gauss-elbo`` and ``iaf-elbo``). IWAE with DReG would
  re-score every draw with detached parameters, i.e. invert the flow numerically each step.

The Sylvester rows follow van den Berg et al. in the flows (kinds, K = 16 layers, M = 32
columns, H = 8 reflections, amortised from the encoder), the objective (ELBO, one particle)
and the evaluation (importance-sampled ``-log p(x)``; theirs used 5000 samples), *not* in the
encoder and decoder (theirs: gated convolutional networks and z of dimension 64; here: the MLP
above with ``--z-dim``, default 32) nor in the training length (theirs: long GPU runs); the
``iaf`` row is this script's 2-layer IAF, not theirs. Their Table 1 on this binarized MNIST
(-ELBO / -log p(x), nats): diagonal Gaussian 86.55 / 82.14, planar 86.06 / 81.91, IAF
84.20 / 80.79, O-SNF 83.32 / 80.22 (``PAPER``; the planar figures are quoted from memory of the
paper, not re-checked here). A CPU budget of minutes per configuration is far from those
numbers: compare the rows with each other.

Each configuration is trained with ``pyro.infer.Trace_ELBO()`` (one particle) or with
``pf.infer.IWAE(num_particles=5, estimator="dreg")`` (the ``-iwae`` configurations of
``gauss``, ``iaf`` and ``nsf``), by :func:`pyroflows.infer.fit_svi` on
minibatches (the model and guide take ``size``/``subsample`` and pass them to
``pyro.plate("data", size, subsample=subsample)``). Every configuration gets the same budget: the
same number of steps, batch size (100), optimiser (plain Adam, lr 1e-3, ``optimizer="adam"``)
and seed, and validation on a fixed subset of the valid split (its own objective) every
``steps/EVALS`` steps, keeping the best state. ``--budget-minutes`` is a wall-clock cap on each
configuration's training (checked at validation points): a configuration that hits it stops
early, and its steps column then shows fewer steps than the others.

Test -log p(x) and -ELBO: for each image of a fixed random subset of the 10k test images (the
same subset for every configuration, drawn with a generator seeded by EVAL_SEED),
``pf.infer.importance_draws`` (the trained posterior as proposal, ``--eval-k`` samples) gives
the log weights ``log p(x_i, z) - log q(z | x_i)``: their log-mean-exp estimates
``log p(x_i)`` and their mean the ELBO of ``x_i``. The table shows the means of ``-ELBO`` and
``-log p(x)`` with their standard errors over the subset (``sd / sqrt(n)``: the subset is a
random sample of the test set; the Monte Carlo error of each image's estimate is far smaller and
is printed below the table), and the difference in ``-log p(x)`` to the first configuration
with a *paired* standard error (the same images; negative is better).

Literature, for orientation only (long GPU training, same fixed binarization): van den Berg et
al. (2018) above; Burda et al. (2016), one stochastic layer (784-200-200-50): VAE -86.76,
IWAE(k=5) -85.54, IWAE(k=50) -84.78; flow posteriors (IAF, NSF-type) typically improve a VAE's
log-likelihood by 1-3 nats. A CPU budget of minutes per configuration is far from convergence
(those runs used thousands of epochs), so compare the rows with each other, not with these
numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyroflows as pf
from pyroflows.bases import ConditionalDiagNormal
from pyroflows.datasets import binarized_mnist
from pyroflows.infer import IWAE, AmortizedFlow, fit_svi, importance_draws

PIXELS = 784
HIDDEN = 300  # encoder/decoder width; the encoder's features h are the flow's context
FLOW_LAYERS = 2
FLOW_HIDDEN = 256
BATCH = 100
LR = 1e-3
IWAE_K = 5
EVALS = 10  # validations per run
VALID_IMAGES = 2000  # fixed subset of the valid split used for validation
EVAL_SEED = 12345  # the test subset (the same for every configuration and every --seed)
SYLVESTER_LAYERS = 16  # van den Berg et al. (2018): K = 16 flows
SYLVESTER_COLUMNS = 32  # O-SNF: M = 32 orthonormal columns (at most z_dim)
SYLVESTER_REFLECTIONS = 8  # H-SNF: H = 8 Householder reflections
SYLVESTER_KINDS = {
    "planar": "planar",
    "o-snf": "orthogonal",
    "h-snf": "householder",
    "t-snf": "triangular",
}
POSTERIORS = ("gauss", "iaf", "nsf", *SYLVESTER_KINDS)
OBJECTIVES = ("elbo", "iwae")
# The original six (the default); the Sylvester posteriors are trained with the ELBO only.
DEFAULT_CONFIGS = tuple(f"{p}-{o}" for p in ("gauss", "iaf", "nsf") for o in OBJECTIVES)
CONFIGS = DEFAULT_CONFIGS + tuple(f"{p}-elbo" for p in SYLVESTER_KINDS)
# van den Berg et al. (2018), Table 1's posteriors (their IAF and Gaussian rows included).
TABLE1 = ("gauss-elbo", "iaf-elbo", *(f"{p}-elbo" for p in SYLVESTER_KINDS))
GROUPS = {"default": DEFAULT_CONFIGS, "table1": TABLE1, "all": CONFIGS}
# van den Berg et al. (2018), Table 1, binarized MNIST: (-ELBO, -log p(x)) in nats, K = 5000.
PAPER = {
    "gauss": (86.55, 82.14),
    "planar": (86.06, 81.91),  # quoted from memory of the paper, not re-checked here
    "iaf": (84.20, 80.79),
    "o-snf": (83.32, 80.22),
}
LITERATURE = (
    "Literature (Burda et al. 2016, 1 stochastic layer 784-200-200-50, long GPU training): "
    "VAE -86.76, IWAE k=5 -85.54, IWAE k=50 -84.78 nats; flow posteriors typically gain 1-3 nats.\n"
    "van den Berg et al. 2018, Table 1 (gated conv nets, z=64, long GPU training; -ELBO / "
    "-log p(x), K=5000): "
    + ", ".join(f"{k} {e:.2f} / {n:.2f}" for k, (e, n) in PAPER.items())
    + " (planar from memory, not re-checked)."
)


def default_data_dir() -> Path:
    if os.environ.get("PYROFLOWS_DATA"):
        return Path(os.environ["PYROFLOWS_DATA"]).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def data_available(data_dir: Path | None = None) -> bool:
    folder = default_data_dir() if data_dir is None else Path(data_dir)
    return (folder / "mnist" / "binarized_mnist.npz").is_file()


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear layers with tanh between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        if i > 0:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
    return nn.Sequential(*layers)


def posterior_flow(kind: str, z_dim: int, flow_hidden: int) -> pf.Flow:
    heads = ConditionalDiagNormal(z_dim, HIDDEN, hidden=())  # linear mean and log-scale heads
    if kind == "gauss":
        return pf.Flow([], dim=z_dim, context_dim=HIDDEN, base=heads)
    if kind == "iaf":
        return pf.IAF(
            z_dim, layers=FLOW_LAYERS, hidden=(flow_hidden,), context_dim=HIDDEN, base=heads
        )
    if kind == "nsf":
        return pf.NSF(
            z_dim,
            layers=FLOW_LAYERS,
            hidden=(flow_hidden,),
            context_dim=HIDDEN,
            bins=8,
            bound=5.0,
            actnorm=False,
            base=heads,
        )
    if kind in SYLVESTER_KINDS:
        options = {}
        if kind == "o-snf":
            options["columns"] = min(SYLVESTER_COLUMNS, z_dim)
        if kind == "h-snf":
            options["reflections"] = SYLVESTER_REFLECTIONS
        return pf.SylvesterFlow(
            z_dim,
            layers=SYLVESTER_LAYERS,
            context_dim=HIDDEN,
            kind=SYLVESTER_KINDS[kind],
            base=heads,
            **options,
        )
    raise ValueError(f"unknown posterior {kind!r}; expected one of {POSTERIORS}")


class VAE(nn.Module):
    """Bernoulli decoder z -> 300 -> 300 -> 784, posterior AmortizedFlow(encoder, flow)."""

    def __init__(self, posterior: str, z_dim: int, flow_hidden: int = FLOW_HIDDEN) -> None:
        super().__init__()
        self.z_dim = z_dim
        encoder = nn.Sequential(mlp((PIXELS, HIDDEN, HIDDEN)), nn.Tanh())
        self.q = AmortizedFlow(encoder, posterior_flow(posterior, z_dim, flow_hidden))
        self.decoder = mlp((z_dim, HIDDEN, HIDDEN, PIXELS))
        self.register_buffer("prior_loc", torch.zeros(z_dim))
        self.register_buffer("prior_scale", torch.ones(z_dim))

    def model(self, x: torch.Tensor, size: int | None = None, subsample=None) -> None:
        pyro.module("decoder", self.decoder)
        prior = dist.Normal(self.prior_loc, self.prior_scale).to_event(1)
        with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
            z = pyro.sample("z", prior)
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, size: int | None = None, subsample=None) -> None:
        pyro.module("posterior", self.q)
        with pyro.plate("data", len(x) if size is None else size, subsample=subsample):
            pyro.sample("z", self.q(x))


@dataclass
class Result:
    config: str
    posterior: str
    objective: str
    steps: int
    epochs: float
    train_minutes: float
    best_valid: float | None  # the objective's bound on the validation subset (nats, negated)
    eval_minutes: float
    log_px: torch.Tensor  # per test image, float64
    mc_se: torch.Tensor  # per image, the importance-sampling standard error
    elbo: torch.Tensor  # per test image, the mean of the eval_k log weights
    stopped_by_budget: bool

    @property
    def mean(self) -> float:
        return float(self.log_px.mean())

    @property
    def se(self) -> float:
        n = self.log_px.numel()
        return float(self.log_px.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan

    @property
    def elbo_mean(self) -> float:
        return float(self.elbo.mean())

    @property
    def elbo_se(self) -> float:
        n = self.elbo.numel()
        return float(self.elbo.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan


def estimate_log_px(vae: VAE, images: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """log p(x_i), its Monte Carlo standard error and the ELBO of each image, from k importance
    samples from q(z | x_i).

    One ``importance_draws`` call per image: its weights are *joint* over everything the model
    observes (not per element of the data plate, unlike ``IWAE``), so a call on n images would
    estimate log p(x_1, ..., x_n) with k joint weights, whose variance grows with n (biased low,
    with a standard error that does not show it). log p(x_i) is the log-mean-exp of the weights
    (as ``pf.infer.log_evidence``, with its delta-method standard error ``sd(w) / (sqrt(k)
    mean(w))``), the ELBO their mean.
    """
    values, errors, elbos = [], [], []
    vae.eval()
    for x in images:
        log_w = importance_draws(
            vae.model,
            vae.guide,
            (x[None],),
            num_samples=k,
            batch=min(k, chunk),
            max_plate_nesting=1,
        ).log_weights
        w = torch.exp(log_w - log_w.max())
        values.append(float(log_w.max() + w.mean().log()))
        errors.append(float(w.std(unbiased=True) / (w.mean() * math.sqrt(k))))
        elbos.append(float(log_w.mean()))
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (values, errors, elbos))


def run_config(config: str, data: dict[str, torch.Tensor], args) -> Result:
    posterior, objective = config.rsplit("-", 1)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(posterior, args.z_dim, args.flow_hidden)
    loss = (
        pyro.infer.Trace_ELBO()
        if objective == "elbo"
        else IWAE(num_particles=IWAE_K, estimator="dreg", max_plate_nesting=1)
    )
    n = len(data["train"])
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    budget_s = args.budget_minutes * 60.0
    t0 = time.perf_counter()
    capped = {"hit": False}

    def callback(step: int, history) -> bool:
        elapsed = time.perf_counter() - t0
        if args.verbose:
            valid = history.valid_nll[-1] if history.valid_nll else float("nan")
            print(
                f"  {config}: step {step}/{total}, {elapsed / 60:.1f} min, "
                f"valid -bound {valid:.2f}",
                flush=True,
            )
        if elapsed > budget_s and step < total:
            capped["hit"] = True
            return True
        return False

    history = fit_svi(
        vae.model,
        vae.guide,
        data=data["train"],
        valid=data["valid"],
        loss=loss,
        steps=total,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        eval_every=max(1, total // EVALS),
        seed=args.seed,
        progress=args.progress,
        callback=callback,
    )
    train_minutes = (time.perf_counter() - t0) / 60
    t1 = time.perf_counter()
    with torch.no_grad():
        log_px, mc_se, elbo = estimate_log_px(vae, data["test"], args.eval_k, args.eval_chunk)
    return Result(
        config=config,
        posterior=posterior,
        objective=objective,
        steps=history.steps,
        epochs=history.steps / steps_per_epoch,
        train_minutes=train_minutes,
        best_valid=history.best_valid_nll,
        eval_minutes=(time.perf_counter() - t1) / 60,
        log_px=log_px,
        mc_se=mc_se,
        elbo=elbo,
        stopped_by_budget=capped["hit"],
    )


POSTERIOR_NAMES = {
    "gauss": "Gaussian",
    "iaf": "IAF",
    "nsf": "NSF",
    "planar": "planar",
    "o-snf": "O-SNF",
    "h-snf": "H-SNF",
    "t-snf": "T-SNF",
}
OBJECTIVE_NAMES = {"elbo": "ELBO", "iwae": f"IWAE K={IWAE_K} DReG"}


def table(results: list[Result]) -> str:
    """-ELBO and -log p(x) on the test subset (nats, lower is better), and the paired difference
    in -log p(x) to the first row."""
    head = (
        f"{'config':<11} {'posterior':<9} {'objective':<15} {'steps':>6} {'epochs':>6} "
        f"{'train min':>9} {'eval min':>8} {'valid -bound':>12} {'test -ELBO ± SE':>16} "
        f"{'test -log p(x) ± SE':>19} {'Δ vs first ± SE':>16}"
    )
    lines = [head, "-" * len(head)]
    ref = results[0].log_px if results else None
    for r in results:
        diff = ref - r.log_px  # in -log p(x): negative means better than the first row
        d_se = float(diff.std(unbiased=True) / math.sqrt(diff.numel())) if diff.numel() > 1 else 0
        delta = "—" if r is results[0] else f"{float(diff.mean()):+7.2f} ± {d_se:4.2f}"
        valid = "—" if r.best_valid is None else f"{r.best_valid:.2f}"
        mark = "*" if r.stopped_by_budget else " "
        lines.append(
            f"{r.config:<11} {POSTERIOR_NAMES[r.posterior]:<9} "
            f"{OBJECTIVE_NAMES[r.objective]:<15} {r.steps:>5}{mark} {r.epochs:>6.1f} "
            f"{r.train_minutes:>9.1f} {r.eval_minutes:>8.1f} {valid:>12} "
            f"{-r.elbo_mean:>7.2f} ± {r.elbo_se:<6.2f} {-r.mean:>10.2f} ± {r.se:<6.2f} "
            f"{delta:>16}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=20.0,
        help="wall-clock cap on each configuration's training (default 20)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="SVI steps per configuration")
    g.add_argument("--epochs", type=int, default=None, help="epochs per configuration")
    p.add_argument(
        "--configs",
        default="default",
        help=(
            "comma-separated configurations (e.g. gauss-elbo,o-snf-elbo) or groups: "
            f"default = {','.join(DEFAULT_CONFIGS)}; table1 = {','.join(TABLE1)}; all"
        ),
    )
    p.add_argument("--z-dim", type=int, default=32)
    p.add_argument("--flow-hidden", type=int, default=FLOW_HIDDEN)
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--train-images", type=int, default=None, help="use the first N train images")
    p.add_argument("--valid-images", type=int, default=VALID_IMAGES)
    p.add_argument("--eval-images", type=int, default=1000, help="test subset size")
    p.add_argument("--eval-k", type=int, default=1000, help="importance samples per test image")
    p.add_argument("--eval-chunk", type=int, default=1000, help="samples per vectorised chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--progress", action="store_true", help="show fit_svi's progress bar")
    p.add_argument("--verbose", action="store_true", help="print each validation")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 1000 train images, 30 steps, 20 test images, K=50",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train_images = args.train_images or 1000
        args.valid_images = min(args.valid_images, 200)
        args.steps = args.steps or 30
        args.eval_images = min(args.eval_images, 20)
        args.eval_k = min(args.eval_k, 50)
        args.flow_hidden = min(args.flow_hidden, 64)
    if args.steps is None and args.epochs is None:
        args.epochs = 10
    configs: list[str] = []
    for c in (c.strip() for c in args.configs.split(",")):
        if not c:
            continue
        if c not in CONFIGS and c not in GROUPS:
            p.error(
                f"--configs: unknown configuration {c!r}; expected some of {CONFIGS} or a "
                f"group ({', '.join(GROUPS)})"
            )
        configs += [x for x in GROUPS.get(c, (c,)) if x not in configs]
    args.configs = configs
    return args


def load_data(args) -> dict[str, torch.Tensor]:
    data_dir = args.data_dir or default_data_dir()
    train = binarized_mnist("train", data_dir, download=False)
    valid = binarized_mnist("valid", data_dir, download=False)
    test = binarized_mnist("test", data_dir, download=False)
    if args.train_images is not None:
        train = train[: args.train_images]  # train and valid are already in random order
    valid = valid[: args.valid_images]
    # The test rows are sorted by label: take a random subset, the same for every configuration.
    generator = torch.Generator().manual_seed(EVAL_SEED)
    idx = torch.randperm(len(test), generator=generator)[: args.eval_images]
    return {"train": train.float(), "valid": valid.float(), "test": test[idx].float()}


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args)
    budget = f"{args.steps} steps" if args.steps is not None else f"{args.epochs} epochs"
    print(
        f"VAE benchmark on binarized MNIST: z={args.z_dim}, batch {args.batch_size}, Adam lr "
        f"{args.lr}, {budget} per configuration (cap {args.budget_minutes:g} min), seed "
        f"{args.seed}; IAF/NSF {FLOW_LAYERS} layers × hidden {args.flow_hidden}, planar/SNF "
        f"{SYLVESTER_LAYERS} layers (O-SNF M={min(SYLVESTER_COLUMNS, args.z_dim)}, H-SNF "
        f"H={SYLVESTER_REFLECTIONS}); train "
        f"{len(data['train'])}, valid {len(data['valid'])}, test subset {len(data['test'])} "
        f"images × K={args.eval_k}; torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}",
        flush=True,
    )
    results = []
    for config in args.configs:
        result = run_config(config, data, args)
        results.append(result)
        print(
            f"{config}: {result.steps} steps in {result.train_minutes:.1f} min, test -ELBO "
            f"{-result.elbo_mean:.2f} ± {result.elbo_se:.2f}, -log p(x) {-result.mean:.2f} ± "
            f"{result.se:.2f} (eval {result.eval_minutes:.1f} min)",
            flush=True,
        )
    print()
    print(table(results))
    if any(r.stopped_by_budget for r in results):
        print("* stopped by --budget-minutes before the planned steps")
    if results:
        mc = max(float(r.mc_se.pow(2).mean().sqrt()) for r in results)
        print(
            f"test -ELBO and -log p(x): means over {len(data['test'])} random test images of "
            f"the K={args.eval_k} importance-sampled estimates (the mean and the log-mean-exp "
            f"of the log weights); ± is the SE over the subset; Δ is the paired difference in "
            f"-log p(x) to the first row (negative: better); the "
            f"per-image Monte Carlo SE is at most {mc:.3f} (RMS), i.e. "
            f"{mc / math.sqrt(len(data['test'])):.4f} on the mean. Valid -bound: best "
            f"objective on {len(data['valid'])} valid images (-ELBO or -IWAE_K bound)."
        )
    print(LITERATURE)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
