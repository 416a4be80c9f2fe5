"""The ``pyroflows`` command: fit flows to data, sample from them and score data with them.

::

    pyroflows fit DATA --out DIR [--flow nsf] [--layers 5] [--hidden 128,128] [--steps 2000]
    pyroflows sample DIR -n 10000 --out samples.npy
    pyroflows eval DIR DATA [--json]
    pyroflows demo [--out pyroflows-demo]

``DATA`` is a file (``.npy``, ``.npz`` (``file.npz:KEY`` picks an array), ``.csv``, ``.txt``)
holding one row per point, or a built-in data set, ``builtin:NAME[:DIM]`` (see
:data:`pyroflows.datasets.TOYS`). ``fit`` holds out a test set and a validation set, trains with
:func:`pyroflows.fit`, and writes ``DIR/model`` (:func:`pyroflows.save`), ``DIR/metrics.json``
(train/validation/test NLL in nats with standard errors, the KL gap to the truth for built-in
data with a known density, time, steps per second) and, for 2-D data when matplotlib is
installed, ``DIR/density.png``. User errors (a missing file, a bad option, data of the wrong
width) print one line, ``pyroflows: error: ...``, and exit with status 2.

Example:
    >>> import contextlib, io, tempfile
    >>> from pyroflows.cli import main
    >>> out = tempfile.mkdtemp()
    >>> args = ["fit", "builtin:ring", "-n", "500", "--flow", "realnvp", "--layers", "2"]
    >>> args += ["--hidden", "8", "--steps", "5", "--out", out, "--no-progress", "--no-plot"]
    >>> with contextlib.redirect_stdout(io.StringIO()):
    ...     status = main(args)
    >>> status
    0
    >>> main(["fit", "no-such-file.csv", "--out", out])
    2
    >>> import shutil; shutil.rmtree(out)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from . import demo as _demo
from .datasets import TOYS, Toy, load_data
from .evaluation import Evaluation, evaluate
from .flows import Flow, vector_builders
from .io import CONFIG_FILE, load
from .report import fit_and_report, format_estimate
from .train import TrainingDiverged

__all__ = ["build_parser", "demo", "main", "run_demo"]

PROG = "pyroflows"
SAMPLE_FORMATS = (".npy", ".npz", ".csv", ".txt")
#: ``eval`` draws built-in data from this seed offset, a stream ``fit`` (seed 0, 1, ...) never
#: trains on.
EVAL_SEED_OFFSET = 1_000_000
DEMO_DATA, DEMO_OUT, DEMO_STEPS, DEMO_LR, DEMO_N = (
    _demo.DATA,
    _demo.OUT,
    _demo.STEPS,
    _demo.LR,
    _demo.N,
)


class UsageError(ValueError):
    """A problem with the command line that argparse cannot see (reported with exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block above them)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``, described as ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
    return value


def _hidden(text: str) -> tuple[int, ...]:
    """``"128"`` or ``"128,128"`` -> hidden widths."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"expected one positive integer or a comma list such as 128,128; got {text!r}"
        )
    return widths


def _fraction_or_file(text: str) -> float | str:
    """A held-out fraction in [0, 1) or a data file (anything that is not a number)."""
    try:
        value = float(text)
    except ValueError:
        return text
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a file; got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------


def _add_fit_options(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    model = p.add_argument_group("model")
    if not demo:
        model.add_argument(
            "--flow",
            choices=sorted(vector_builders()),
            default="nsf",
            type=str.lower,
            help="the flow builder, a name of pyroflows.flows.BUILDERS (default: nsf)",
        )
        model.add_argument(
            "--layers", type=_positive_int, help="number of layers (default: the builder's)"
        )
        model.add_argument(
            "--hidden",
            type=_hidden,
            metavar="W[,W...]",
            help="hidden widths of the conditioners, e.g. 128 or 128,128 (default: 64,64)",
        )
        model.add_argument("--bins", type=_positive_int, help="spline bins (nsf only; default: 8)")
        model.add_argument(
            "--autoregressive",
            action="store_true",
            help="nsf: autoregressive (MADE) spline layers instead of coupling",
        )
    train = p.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=_positive_int,
        default=DEMO_STEPS if demo else None,
        help=f"optimiser steps (default: {DEMO_STEPS if demo else 1000})",
    )
    length.add_argument("--epochs", type=_positive_int, help="passes over the training data")
    train.add_argument(
        "--batch-size", type=_positive_int, default=256, help="rows per step (default: 256)"
    )
    train.add_argument(
        "--lr",
        type=_positive_float,
        default=DEMO_LR if demo else 1e-3,
        help="Adam learning rate, decayed to 0 by a cosine schedule "
        f"(default: {DEMO_LR if demo else 1e-3:g})",
    )
    if not demo:
        train.add_argument("--constant-lr", action="store_true", help="no learning-rate schedule")
        train.add_argument(
            "--loss",
            choices=("nll", "flow_matching"),
            default="nll",
            help="nll: maximum likelihood (default); flow_matching: regression of a continuous "
            "flow's velocity (--flow cnf only)",
        )
        train.add_argument(
            "--valid",
            type=_fraction_or_file,
            default=0.1,
            metavar="FRACTION|FILE",
            help="validation data: a fraction of DATA held out (default: 0.1) or a file; "
            "the flow keeps its parameters of the best validation NLL",
        )
        train.add_argument(
            "--test",
            type=_fraction_or_file,
            default=0.1,
            metavar="FRACTION|FILE",
            help="test data: a fraction of DATA held out (default: 0.1) or a file",
        )
        train.add_argument(
            "--patience",
            type=_positive_int,
            help="stop after this many validations (about 40 per run) without improvement",
        )
    train.add_argument(
        "-n",
        "--n-samples",
        type=_positive_int,
        dest="n",
        default=DEMO_N if demo else None,
        metavar="N",
        help=f"points to draw from the ring (default: {DEMO_N})"
        if demo
        else "points to draw from builtin data (default: 10000), or rows to take at random "
        "from a file (default: all)",
    )
    train.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=0,
        help="seeds the data draw, the splits, initialisation and minibatches (default: 0)",
    )
    train.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    if not demo:
        train.add_argument(
            "--checkpoint",
            type=Path,
            metavar="DIR",
            help="write the complete training state here at every validation",
        )
        train.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --checkpoint (default folder: OUT/checkpoint)",
        )
    output = p.add_argument_group("output")
    if demo:
        output.add_argument(
            "--out",
            type=Path,
            default=Path(DEMO_OUT),
            metavar="DIR",
            help=f"output folder (default: ./{DEMO_OUT})",
        )
    else:
        output.add_argument(
            "--out",
            type=Path,
            required=True,
            metavar="DIR",
            help="output folder: model/, metrics.json, density.png",
        )
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--no-plot", action="store_true", help="do not write density.png")


def build_parser() -> argparse.ArgumentParser:
    """The ``pyroflows`` argument parser (sub-commands fit, sample, eval, demo)."""
    parser = _Parser(
        prog=PROG,
        description="Normalizing flows for Pyro: fit flows to data, sample from them, score data.",
        epilog="DATA is a .npy/.npz/.csv/.txt file (one row per point; file.npz:KEY picks an "
        f"array) or builtin:NAME[:DIM] with NAME in {', '.join(TOYS)}. "
        "Run 'pyroflows COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "fit",
        help="fit a flow to data; write the model, metrics and a density plot",
        description="Fit a flow to DATA by maximum likelihood and write OUT/model, "
        "OUT/metrics.json and (2-D data, matplotlib installed) OUT/density.png. For builtin data "
        "with a known density the KL gap KL(p||q) = test NLL - entropy is reported.",
    )
    p.add_argument("data", metavar="DATA", help="a data file or builtin:NAME[:DIM]")
    _add_fit_options(p)
    p.set_defaults(handler=_cmd_fit)

    p = commands.add_parser(
        "sample",
        help="draw samples from a fitted flow",
        description="Draw samples from the flow saved in DIR (a fit output folder or its model/).",
    )
    p.add_argument("model", metavar="DIR", type=Path, help="a fit output folder or a saved flow")
    p.add_argument(
        "-n",
        "--n-samples",
        type=_positive_int,
        default=10_000,
        dest="n",
        metavar="N",
        help="number of samples (default: 10000)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="where to write them: .npy, .npz (array 'samples'), .csv or .txt; - for CSV on "
        "standard output",
    )
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    p.set_defaults(handler=_cmd_sample)

    p = commands.add_parser(
        "eval",
        help="mean negative log-likelihood of data under a fitted flow",
        description="Print the mean NLL (nats per point) of DATA under the flow in DIR and its "
        "standard error; for builtin data with a known density also the KL gap to the truth. "
        f"Builtin data are drawn with seed {EVAL_SEED_OFFSET:,} + SEED, a stream that fit "
        "never trains on.",
    )
    p.add_argument("model", metavar="DIR", type=Path, help="a fit output folder or a saved flow")
    p.add_argument("data", metavar="DATA", help="a data file or builtin:NAME[:DIM]")
    p.add_argument(
        "-n",
        "--n-samples",
        type=_positive_int,
        dest="n",
        metavar="N",
        help="points to draw from builtin data (default: 10000) or rows to take from a file",
    )
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_eval)

    p = commands.add_parser(
        "demo",
        help="fit a neural spline flow to a 2-D ring of Gaussians (about 15 s on one CPU core)",
        description=f"Fit pyroflows.NSF ({_demo.LAYERS} layers, hidden "
        f"{','.join(map(str, _demo.HIDDEN))}, {_demo.BINS} bins) to {DEMO_DATA} (a ring of 8 "
        "Gaussians with a "
        "known density), report the KL gap to the truth, and write model/, metrics.json and "
        "density.png to the output folder.",
    )
    _add_fit_options(p, demo=True)
    p.set_defaults(handler=_cmd_demo)
    return parser


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N; got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")
    return device


def _model_folder(path: Path) -> Path:
    """A fit output folder holds the flow in ``model/``; accept both."""
    if not (path / CONFIG_FILE).is_file() and (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    return path


def _check_width(name: str, x: torch.Tensor, dim: int) -> None:
    if x.shape[1] != dim:
        raise UsageError(
            f"{name}: expected {dim} columns (the flow's dim); got data of shape {tuple(x.shape)}"
        )


def _held_out(
    spec: float | str,
    name: str,
    x: torch.Tensor,
    truth: Toy | None,
    taken: int,
    order: torch.Tensor,
    seed: int,
) -> tuple[torch.Tensor | None, int, Toy | None]:
    """Validation or test data: a fraction of ``x`` (the rows of ``order`` after ``taken``) or
    another data set; returns ``(data or None, rows of x taken so far, the data's Toy)``."""
    if isinstance(spec, str):
        # Builtin data get their own seed stream, never the draw being trained on.
        offset = EVAL_SEED_OFFSET if name == "test" else 2 * EVAL_SEED_OFFSET
        held, held_truth = load_data(spec, n=None, seed=offset + seed)
        _check_width(f"--{name} {spec}", held, x.shape[1])
        return held, taken, held_truth
    count = round(spec * len(x))
    if spec > 0 and count == 0:
        count = 1
    if count == 0:
        return None, taken, None
    return x[order[taken : taken + count]], taken + count, truth


def _split(args: argparse.Namespace, x: torch.Tensor, truth: Toy | None):
    """``(train, valid or None, test or None, the test data's Toy or None)``, seeded."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    test, taken, test_truth = _held_out(args.test, "test", x, truth, 0, order, args.seed)
    valid, taken, _ = _held_out(args.valid, "valid", x, truth, taken, order, args.seed)
    if taken >= len(x):
        raise UsageError(
            f"--valid {args.valid}, --test {args.test}: nothing left to train on out of "
            f"{len(x)} rows"
        )
    train = x[order[taken:]] if taken else x
    return train, valid, test, test_truth


def _build_flow(args: argparse.Namespace, dim: int) -> Flow:
    name = args.flow
    builder = vector_builders()[name]
    takes = inspect.signature(builder).parameters
    kwargs: dict[str, Any] = {}
    for option, value in (("layers", args.layers), ("hidden", args.hidden)):
        if value is None:
            continue
        if option not in takes:
            raise UsageError(
                f"--{option}: --flow {name} ({builder.__name__}) has no {option!r} option; "
                "leave it out"
            )
        kwargs[option] = value
    if name == "nsf":
        if args.bins is not None:
            kwargs["bins"] = args.bins
        # A single feature cannot be split for coupling; the autoregressive form works.
        kwargs["autoregressive"] = args.autoregressive or dim == 1
    elif args.bins is not None or args.autoregressive:
        option = "--bins" if args.bins is not None else "--autoregressive"
        raise UsageError(f"{option}: applies to --flow nsf only; got --flow {name}")
    if args.loss == "flow_matching" and name != "cnf":
        raise UsageError(
            f"--loss flow_matching: trains continuous flows only (--flow cnf); got --flow {name}"
        )
    return builder(dim, **kwargs)


# ---------------------------------------------------------------------------------------------
# fit and demo
# ---------------------------------------------------------------------------------------------


def _fit(args: argparse.Namespace) -> dict[str, Any]:
    """``pyroflows fit``: data and flow from the options, then :func:`fit_and_report`."""
    device = _device(args.device)
    x, truth = load_data(args.data, n=args.n, seed=args.seed)
    train, valid, test, test_truth = _split(args, x, truth)
    torch.manual_seed(args.seed)
    flow = _build_flow(args, x.shape[1])
    checkpoint = args.checkpoint
    if args.resume and checkpoint is None:
        checkpoint = args.out / "checkpoint"
    return fit_and_report(
        flow,
        train,
        args.out,
        valid=valid,
        test=test,
        truth=test_truth,
        data_name=str(args.data),
        plot=not args.no_plot,
        command=f"{PROG} {args.command}",
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        scheduler=None if args.constant_lr else "cosine",
        loss=args.loss,
        patience=args.patience,
        device=device,
        progress=not args.no_progress,
        checkpoint=checkpoint,
        resume=args.resume,
        seed=args.seed,
    )


def _cmd_fit(args: argparse.Namespace) -> int:
    _fit(args)
    return 0


def _run_demo(args: argparse.Namespace) -> dict[str, Any]:
    return _demo.run(
        args.out,
        steps=args.steps,
        epochs=args.epochs,
        n=args.n,
        seed=args.seed,
        lr=args.lr,
        batch_size=args.batch_size,
        device=_device(args.device),
        progress=not args.no_progress,
        plot=not args.no_plot,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    _run_demo(args)
    return 0


def run_demo(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``pyroflows demo`` with the options in ``argv``; returns the metrics it writes.

    ``python -m pyroflows.demo OPTIONS`` runs this. Argument errors exit as argparse does
    (status 2). The work is :func:`pyroflows.demo.run`'s.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return _run_demo(build_parser().parse_args(["demo", *map(str, argv)]))


def demo(
    out: str | os.PathLike = DEMO_OUT,
    steps: int = DEMO_STEPS,
    seed: int = 0,
    n: int = DEMO_N,
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    """Run ``pyroflows demo`` and return its metrics (``metrics["kl_gap"]``: KL(p||q), nats).

    The same as :func:`pyroflows.demo.run` (which takes the other options of the command too).
    """
    return _demo.run(out, steps=steps, seed=seed, n=n, progress=progress, plot=plot)


# ---------------------------------------------------------------------------------------------
# sample and eval
# ---------------------------------------------------------------------------------------------


def _cmd_sample(args: argparse.Namespace) -> int:
    target = args.out
    suffix = Path(target).suffix.lower()
    if target != "-" and suffix not in SAMPLE_FORMATS:
        raise UsageError(
            f"--out: expected a file ending in {', '.join(SAMPLE_FORMATS)} (or - for standard "
            f"output); got {target!r}"
        )
    device = _device(args.device)
    flow = load(_model_folder(args.model), device=device)
    flow.eval()
    torch.manual_seed(args.seed)
    parts = []
    with torch.no_grad():
        for start in range(0, args.n, 100_000):
            count = min(100_000, args.n - start)
            parts.append(flow().sample((count,)).cpu())
    samples = torch.cat(parts).numpy()
    if target == "-":
        np.savetxt(sys.stdout, samples, delimiter=",", fmt="%.8g")
        return 0
    path = Path(target)
    if suffix == ".npy":
        np.save(path, samples)
    elif suffix == ".npz":
        np.savez(path, samples=samples)
    else:
        header = ",".join(f"x{i}" for i in range(samples.shape[1]))
        np.savetxt(path, samples, delimiter=",", fmt="%.8g", header=header, comments="")
    print(f"wrote {args.n:,} samples ({samples.shape[1]}-D) to {path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    device = _device(args.device)
    flow = load(_model_folder(args.model), device=device)
    flow.eval()
    x, truth = load_data(args.data, n=args.n, seed=EVAL_SEED_OFFSET + args.seed)
    _check_width(f"DATA {args.data}", x, flow.dim)
    known = truth is not None and truth.log_prob is not None
    score: Evaluation = evaluate(flow, x, truth=truth if known else None)
    result: dict[str, Any] = {"data": str(args.data), "n": score.n}
    result.update(nll=score.nll, nll_se=score.nll_se)
    if known:
        result.update(entropy=score.entropy, entropy_se=score.entropy_se)
        result.update(kl_gap=score.kl_gap, kl_gap_se=score.kl_gap_se)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    nll = format_estimate(score.nll, score.nll_se)
    print(f"mean NLL {nll} nats per point ({len(x):,} points of {args.data})")
    if known:
        print(
            f"KL(p||q) gap {format_estimate(score.kl_gap, score.kl_gap_se)} nats "
            f"(true entropy {format_estimate(score.entropy, score.entropy_se)})"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def _error(message: str) -> int:
    line = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyroflows`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a user error (bad arguments, unreadable or
        mismatched data, a missing model), 1 when training diverged.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as stop:  # --help, --version and argparse's own errors (status 2)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError) as err:
        return _error(str(err) if str(err) else type(err).__name__)


if __name__ == "__main__":
    sys.exit(main())
