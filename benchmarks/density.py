"""Density estimation: test NLL, KL gap and speed of our flows next to Pyro's built-ins.

    python benchmarks/density.py [--steps 1500] [--seed 0] [--threads N] [--lr 1e-3]
                                 [--flows NSF BNAF ...] [--no-pyro] [--no-nsf-defaults]
                                 [--cnf-ml-steps 600] [--fm-steps N] [--rk4-steps 2 4 8 32]
    python benchmarks/density.py --digits [--digits-flows NSF CNF-FM] [--digits-steps 2000]
                                 [--digits-fm-steps N] [--digits-cnf-hidden 512 512 512] ...

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

Continuous flows (issue 18; not in the default ``--flows``, name them:
``--flows NSF CNF-ML CNF-FM CNF-FM-OT``), all ``pf.CNF(2, hidden=(208, 208, 208))`` (90k
parameters; the adaptive ``dopri5`` solver at ``atol = rtol = 1e-5``, the exact trace):

* ``CNF-ML``: maximum likelihood (``pf.fit(loss="nll")``): every step solves the ODE with the
  trace and back-propagates through the solver, about 0.4 s per step at this width, so it gets
  its own, smaller budget ``--cnf-ml-steps`` (default 600).
* ``CNF-FM``: flow matching (``loss="flow_matching"``: regression on straight paths from
  independent base draws, no ODE solved in training; validation by the exact NLL), ``--fm-steps``
  (default ``--steps``).
* ``CNF-FM-OT``: the same with minibatch optimal-transport pairs
  (``pf.engine.FlowMatching(flow, coupling="ot")``).

Their extra table gives, per solver, the field evaluations (NFE) of one sampling solve and of
one ``log_prob`` solve, the KL gap and the throughputs: ``dopri5`` (the default), then fixed-step
``rk4`` with ``--rk4-steps`` steps (``4 N`` evaluations; the density is then that of the
discretised flow, its trace still exact).

``--digits`` runs the 64-D comparison instead of the toys: :func:`pyroflows.datasets.digits`
(values 0..16) dequantised uniformly (``v + u``, ``--digits-copies`` draws per training image),
standardised, split as ``benchmarks/images.py`` does (1,350 training, 150 validation and 297 test
images); ``NSF`` (5 layers, hidden (128, 128), 612k parameters) next to ``CNF-FM`` (hidden
``--digits-cnf-hidden``, default (512, 512, 512): 596k). The test NLL is in nats per image on the
dequantised 0..17 scale (bits/dim = NLL / (64 ln 2), an upper bound on the 17-level data's), the
CNF's with the exact trace (64 vector-Jacobian products per evaluation; ``--digits-test-rows``).
``CNF-ML`` on digits (Hutchinson's trace in training) costs seconds per step: it is only timed
over its first ``--digits-ml-probe`` steps unless named in ``--digits-flows``.

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
#: continuous flows (issue 18): not in the default ``--flows`` (CNF-ML alone takes minutes)
CNF_FLOWS = ("CNF-ML", "CNF-FM", "CNF-FM-OT")
CNF_HIDDEN = (208, 208, 208)  # 89,858 parameters at d = 2, next to MAF's 87k and NSF's 99k
PYRO_FLOWS = ("MAF", "RealNVP", "NSF", "BNAF")  # the others have no Pyro built-in
TIMING_S = 0.5
CNF_ML_STEPS = 600  # each step solves the ODE with the trace: ~0.4 s at these sizes
RK4_STEPS = (2, 4, 8, 32)
DIGITS_CNF_HIDDEN = (512, 512, 512)  # 596k parameters at d = 64, next to NSF's 612k


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
    if kind in CNF_FLOWS:
        return pf.CNF(2, hidden=CNF_HIDDEN)
    raise ValueError(kind)


def loss_of(kind: str, flow: pf.Flow):
    """``pf.fit``'s ``loss`` for ``kind``: maximum likelihood except for the flow-matching rows."""
    if kind == "CNF-FM":
        return "flow_matching"
    if kind == "CNF-FM-OT":
        return pf.engine.FlowMatching(flow, coupling="ot")
    return "nll"


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
    flow: pf.Flow,
    data: torch.Tensor,
    steps: int,
    seed: int,
    lr: float = 1e-3,
    loss="nll",
    **options,
) -> tuple[float, str]:
    """pf.fit with the shared budget; returns (seconds, note)."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    note = ""
    try:
        pf.fit(
            flow,
            data,
            steps=steps,
            batch_size=BATCH,
            lr=lr,
            progress=False,
            seed=seed,
            loss=loss,
            **options,
        )
    except pf.TrainingDiverged as err:
        note = f"diverged at step {err.step}"
    return time.perf_counter() - start, note


def steps_of(kind: str, args: argparse.Namespace) -> int:
    if kind == "CNF-ML":
        return args.cnf_ml_steps
    if kind in ("CNF-FM", "CNF-FM-OT"):
        return args.fm_steps or args.steps
    return args.steps


def solves(flow: pf.Flow, test: torch.Tensor, n_sample: int) -> tuple[int, int]:
    """Field evaluations of one sampling solve (``n_sample`` points) and of one log_prob solve
    (the test points) under the flow's current options."""
    with torch.no_grad():
        flow().sample((n_sample,))
        sample = flow.transform.evaluations
        flow().log_prob(test)
        return sample, flow.transform.evaluations


def continuous_rows(flow, truth, test, n_sample: int, fixed: list[int]) -> list[str]:
    """The solver table's cells for one continuous flow: dopri5 (its default), then rk4."""
    rows = []
    for steps in [None, *fixed]:
        options = {} if steps is None else {"solver": "rk4", "steps": steps}
        with flow.options(**options):
            nfe_sample, nfe_log_prob = solves(flow, test, n_sample)
            gap, gap_se = kl_gap(flow, truth, test)[2:]
            log_prob, sample = speed(flow, test, n_sample)
        solver = "dopri5" if steps is None else f"rk4 x{steps}"
        rows.append(
            f"{solver:<9}{nfe_sample:>7}{nfe_log_prob:>7}{gap:>9.4f} ±{gap_se:.4f}"
            f"{_rate(log_prob)}{_rate(sample)}"
        )
    return rows


def digits_split(seed: int, copies: int):
    """(train, valid, test, log-det of the standardisation) for the 64-D digits.

    ``pyroflows.datasets.digits()`` holds integers 0..16; they are dequantised uniformly,
    ``y = v + u`` with ``u ~ U[0, 1)^64`` (``copies`` independent draws of each training image,
    one of each validation and test image), and standardised with the training copies' mean and
    standard deviation; NLLs are reported on the ``y`` scale (the standardisation's log|det| is
    added back), where ``NLL / (64 ln 2)`` bounds the bits/dim of the 17-level data from above.
    The images are split as ``benchmarks/images.py`` splits them (permutation of seed 0: 1,500
    for training, of which 150 validate, and 297 for test).
    """
    values = pf.datasets.digits()
    order = torch.randperm(len(values), generator=torch.Generator().manual_seed(0))
    train, valid, test = values[order[:1350]], values[order[1350:1500]], values[order[1500:]]
    generator = torch.Generator().manual_seed(seed)
    train = train.repeat(copies, 1)
    train, valid, test = (
        x + torch.rand(x.shape, generator=generator) for x in (train, valid, test)
    )
    mean, std = train.mean(0), train.std(0)
    return (
        *((x - mean) / std for x in (train, valid, test)),
        std.log().sum().item(),
    )


def digits_flow(kind: str, hidden: tuple[int, ...]) -> pf.Flow:
    if kind == "NSF":
        return pf.NSF(64, layers=LAYERS, hidden=HIDDEN, bins=BINS)
    return pf.CNF(64, hidden=hidden)


def digits(args: argparse.Namespace) -> None:
    from pyroflows.transforms.continuous import exact_trace

    train_z, valid_z, test_z, log_std = digits_split(args.seed, args.digits_copies)
    test_z = test_z[: args.digits_test_rows]
    hidden = tuple(args.digits_cnf_hidden)
    print(
        f"digits (64-D, values 0..16): 1,350 training images x {args.digits_copies} uniform "
        f"dequantisations, 150 validation, {len(test_z)} test images (the split of "
        "benchmarks/images.py); standardised per feature; NLL in nats per image on the "
        "dequantised 0..17 scale, bits/dim = NLL / (64 ln 2) (uniform: log2 17 = 4.09)"
    )
    print(
        f"NSF: {LAYERS} layers, hidden {HIDDEN}, {BINS} bins; CNF: hidden {hidden}, dopri5 "
        "atol = rtol = 1e-5; CNF test NLL with the exact trace (64 vector-Jacobian products per "
        f"evaluation); batch {BATCH}, Adam lr {args.lr:g} with cosine decay, validation "
        f"(best state kept) every {args.digits_eval_every} steps for the CNFs, pf.fit's default "
        f"for NSF; seed {args.seed}\n"
    )
    header = (
        f"{'flow':<11}{'params':>9}{'steps':>7}{'test NLL':>18}{'bits/dim':>10}{'train s':>9}"
        f"{'ms/step':>9}{'sample s':>10}{'NFE':>6}{'NLL s':>7}{'NFE':>6}"
    )
    print(header)
    print("-" * len(header))
    for kind in args.digits_flows:
        torch.manual_seed(args.seed)
        flow = digits_flow(kind, hidden)
        steps = args.digits_steps if kind == "NSF" else (args.digits_fm_steps or args.digits_steps)
        if kind == "CNF-ML":
            steps = args.digits_ml_steps
        loss = loss_of(kind, flow)
        seconds, note = train(
            flow,
            train_z,
            steps,
            args.seed,
            args.lr,
            loss,
            valid=valid_z,
            # an exact-trace validation of the CNF takes seconds: fewer of them
            eval_every=None if kind == "NSF" else args.digits_eval_every,
        )
        start = time.perf_counter()
        with torch.no_grad(), exact_trace(flow):
            nll = -flow().log_prob(test_z).double() + log_std
        nll_s = time.perf_counter() - start
        nfe_nll = getattr(getattr(flow, "transform", None), "evaluations", None)
        start = time.perf_counter()
        with torch.no_grad():
            flow().sample((args.digits_sample,))
        sample_s = time.perf_counter() - start
        nfe_sample = getattr(getattr(flow, "transform", None), "evaluations", None)
        mean, se = nll.mean().item(), nll.std().item() / math.sqrt(len(nll))
        nfe = (f"{nfe_sample:>6}", f"{nfe_nll:>6}") if kind != "NSF" else (f"{'':>6}",) * 2
        print(
            f"{kind:<11}{n_params(flow):>9,}{steps:>7}{mean:>9.1f} ±{se:>6.1f}"
            f"{mean / (64 * math.log(2)):>10.3f}{seconds:>9.0f}{1e3 * seconds / steps:>9.1f}"
            f"{sample_s:>10.2f}{nfe[0]}{nll_s:>7.1f}{nfe[1]}" + (f"  * {note}" if note else ""),
            flush=True,
        )
    print(
        f"\nsample s: seconds to draw {args.digits_sample} images (NFE: field evaluations of "
        f"that solve); NLL s: seconds for the test NLL of {len(test_z)} images (NFE of that "
        "solve); train s includes pf.fit's validations"
    )
    if "CNF-ML" not in args.digits_flows and args.digits_ml_probe:
        torch.manual_seed(args.seed)
        flow = digits_flow("CNF-ML", hidden)
        steps = args.digits_ml_probe
        seconds, _ = train(flow, train_z, steps, args.seed, args.lr, "nll", valid=None)
        print(
            f"CNF-ML (maximum likelihood, Hutchinson trace above 16-D, dopri5) not trained: "
            f"{1e3 * seconds / steps:.0f} ms/step over its first {steps} steps (NFE "
            f"{flow.transform.evaluations} in the last solve, from the identity flow; NFE grows "
            f"as the field learns), so {args.digits_steps} steps would take at least "
            f"{seconds / steps * args.digits_steps / 60:.0f} min"
        )


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
        choices=FLOWS + CNF_FLOWS,
        help="default: all but the continuous flows (CNF-ML, CNF-FM, CNF-FM-OT); none: only "
        "the last line",
    )
    parser.add_argument("--no-pyro", action="store_true", help="skip Pyro's built-ins")
    parser.add_argument(
        "--no-nsf-defaults", action="store_true", help="skip the NSF(dim=2), 3000-step line"
    )
    parser.add_argument(
        "--cnf-ml-steps",
        type=int,
        default=CNF_ML_STEPS,
        help=f"steps of CNF-ML (default {CNF_ML_STEPS}: each solves the ODE)",
    )
    parser.add_argument(
        "--fm-steps", type=int, help="steps of CNF-FM and CNF-FM-OT (default: --steps)"
    )
    parser.add_argument(
        "--rk4-steps",
        type=int,
        nargs="*",
        default=list(RK4_STEPS),
        help=f"fixed-step rk4 settings of the continuous flows' solver table (default {RK4_STEPS})",
    )
    parser.add_argument(
        "--digits",
        action="store_true",
        help="the 64-D digits comparison instead of the 2-D toys",
    )
    parser.add_argument(
        "--digits-flows",
        nargs="+",
        default=["NSF", "CNF-FM"],
        choices=("NSF", "CNF-FM", "CNF-FM-OT", "CNF-ML"),
    )
    parser.add_argument("--digits-steps", type=int, default=2000, help="NSF's (default 2000)")
    parser.add_argument(
        "--digits-fm-steps", type=int, help="CNF-FM(-OT)'s (default: --digits-steps)"
    )
    parser.add_argument("--digits-ml-steps", type=int, default=200, help="CNF-ML's (default 200)")
    parser.add_argument(
        "--digits-ml-probe",
        type=int,
        default=5,
        help="without CNF-ML in --digits-flows, time its first steps (default 5; 0: skip)",
    )
    parser.add_argument(
        "--digits-cnf-hidden",
        type=int,
        nargs="+",
        default=list(DIGITS_CNF_HIDDEN),
        help=f"the CNF's hidden widths on digits (default {DIGITS_CNF_HIDDEN})",
    )
    parser.add_argument("--digits-copies", type=int, default=8, help="dequantisations per image")
    parser.add_argument(
        "--digits-eval-every", type=int, default=500, help="CNFs' validation interval (500)"
    )
    parser.add_argument("--digits-test-rows", type=int, default=297, help="of the 297")
    parser.add_argument("--digits-sample", type=int, default=300, help="images to draw (timing)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"python benchmarks/density.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, pyroflows {pf.__version__}, "
        f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}"
    )
    if args.digits:
        digits(args)
        return
    print(
        f"budget per flow: {args.steps} steps, batch {BATCH}, Adam lr {args.lr:g} with cosine "
        f"decay, 10% of {args.n_train:,} training points for validation; {LAYERS} layers, hidden "
        f"{HIDDEN}, {BINS} bins; test: {args.n_test:,} fresh points; seed {args.seed}"
    )
    print(
        "new flows (NAF, BNAF, ResFlow*): density-fast orientation (log_prob one pass, sampling "
        "solves numerically); sizes in the docstring"
    )
    if set(args.flows) & set(CNF_FLOWS):
        print(
            f"continuous flows: pf.CNF(2, hidden={CNF_HIDDEN}), dopri5 atol = rtol = 1e-5, exact "
            f"trace; CNF-ML {args.cnf_ml_steps} steps (maximum likelihood), CNF-FM and CNF-FM-OT "
            f"{args.fm_steps or args.steps} steps (flow matching, independent / minibatch-OT "
            "pairs; validation by the exact NLL)"
        )
    print("NLL and KL(p||q) in nats per point (± one standard error); s: training seconds\n")
    header = f"{'dataset':<13}{'flow':<10}{'params':>7}{'ours NLL':>17}{'ours KL':>17}{'s':>6}"
    if not args.no_pyro:
        header += f"   {'params':>7}{'Pyro NLL':>17}{'Pyro KL':>17}{'s':>6}"
    if args.flows:
        print(header)
        print("-" * len(header))
    notes, speeds, solver_rows = [], [], []
    for name in args.datasets if args.flows else ():
        truth = toy(name, args.n_train + args.n_test, seed=args.seed)
        data, test = truth.samples[: args.n_train], truth.samples[args.n_train :]
        for kind in args.flows:
            cells, rates = [], []
            sides = [("ours", ours)]
            if kind in PYRO_FLOWS and not args.no_pyro:
                sides.append(("Pyro", pyros))
            steps = steps_of(kind, args)
            for side, build in sides:
                torch.manual_seed(args.seed)
                flow = build(kind)
                loss = loss_of(kind, flow) if side == "ours" else "nll"
                seconds, note = train(flow, data, steps, args.seed, args.lr, loss)
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
                rates.append((1e3 * seconds / steps, *speed(flow, test, args.n_sample)))
                if kind in CNF_FLOWS:
                    for row in continuous_rows(flow, truth, test, args.n_sample, args.rk4_steps):
                        solver_rows.append(f"{name:<13}{kind:<10}{steps:>6}  {row}")
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
    if solver_rows:
        print(
            "\ncontinuous flows by solver: NFE = field evaluations of one solve (sampling "
            f"{args.n_sample:,} points / log_prob of the {args.n_test:,} test points); dopri5 "
            "adaptive at atol = rtol = 1e-5 (the default), rk4 xN: N fixed steps (4N "
            "evaluations); KL with the exact trace at that solver; throughput in points/s\n"
        )
        header = (
            f"{'dataset':<13}{'flow':<10}{'steps':>6}  {'solver':<9}{'NFE s':>7}{'NFE lp':>7}"
            f"{'KL':>9}{'':>8}{'log_prob/s':>12}{'sample/s':>12}"
        )
        print(header)
        print("-" * len(header))
        for row in solver_rows:
            print(row)

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
