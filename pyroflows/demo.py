"""The demo: a neural spline flow fitted to a ring of eight Gaussians, whose density is known.

``pyroflows demo`` (or ``python -m pyroflows.demo``, with the same options) runs :func:`run`:
it draws the ring (:func:`pyroflows.datasets.load_data`), holds out a validation and a test set,
fits :class:`pyroflows.NSF` with :func:`pyroflows.fit`, prints the KL gap to the truth
(:func:`pyroflows.evaluation.evaluate`) and writes ``model/`` (:func:`pyroflows.save`),
``metrics.json`` and ``density.png`` (:func:`pyroflows.report.plot_density`) to
``./pyroflows-demo`` (or ``--out``), all through :func:`pyroflows.report.fit_and_report`.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

import torch

from ._checks import check_positive_int
from .datasets import load_data
from .flows import NSF
from .report import fit_and_report

__all__ = ["run"]

DATA = "builtin:ring"
OUT = "pyroflows-demo"
STEPS = 1500
LR = 3e-3
BATCH_SIZE = 256
N = 20_000
LAYERS, HIDDEN, BINS = 4, (64, 64), 8
#: Fractions of the points held out for validation and for the test (the KL gap).
HELD_OUT = 0.1
#: Intra-op threads while the demo runs. Its tensors are small (256 x 64): a second thread gains
#: nothing, and on a busy machine the threads wait for each other. On two shared cores under
#: load the whole demo took 199 s (177 s of CPU) with torch's default of 2 threads and 12 s
#: (11 s of CPU) with 1, to the same result.
THREADS = 1


def run(
    out: str | os.PathLike = OUT,
    *,
    steps: int | None = STEPS,
    epochs: int | None = None,
    n: int = N,
    seed: int = 0,
    lr: float = LR,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device | None = None,
    progress: bool = True,
    plot: bool = True,
    verbose: bool = True,
    file: IO[str] | None = None,
    threads: int | None = THREADS,
) -> dict[str, Any]:
    """Fit an NSF to ``n`` points of the ring of Gaussians and report how close it gets.

    Draws ``n`` points of :func:`pyroflows.datasets.toy` ``"ring"`` with ``seed``, holds out
    10% for validation and 10% for the test, fits :class:`pyroflows.NSF` (4 coupling layers,
    hidden widths 64, 64, 8 bins) by :func:`pyroflows.fit` (Adam, cosine schedule), and writes
    ``out/model``, ``out/metrics.json`` and ``out/density.png`` with
    :func:`pyroflows.report.fit_and_report`, printing a summary. It takes about
    10 seconds of one CPU core and reaches a KL gap of about 0.05 nats.

    Args:
        out: the output folder.
        steps: optimiser steps (``None`` with ``epochs``).
        epochs: passes over the training points instead of ``steps``.
        n: points drawn from the ring.
        seed: seeds the draw, the split, the initialisation and the minibatches.
        lr: Adam's learning rate (decayed to 0 by the cosine schedule).
        batch_size: points per step.
        device: where to train (default: the CPU).
        progress: show a progress bar.
        plot: write ``density.png`` (needs matplotlib).
        verbose: print a line before training and a summary after it.
        file: where to print them (default: standard output).
        threads: torch's intra-op threads while the demo runs (restored after); ``None``
            leaves them as they are. One is fastest for this small model (see
            :data:`THREADS`).

    Returns:
        The metrics written to ``metrics.json``; ``metrics["kl_gap"]`` is the estimated
        KL(p || q) in nats on the test points.

    Example:
        >>> import tempfile
        >>> from pyroflows.demo import run
        >>> metrics = run(tempfile.mkdtemp(), steps=5, n=500, progress=False, plot=False,
        ...               verbose=False)
        >>> metrics["data"], metrics["n_train"], metrics["flow"]["builder"]
        ('builtin:ring', 400, 'nsf')
    """
    x, truth = load_data(DATA, n=n, seed=seed)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held = max(round(HELD_OUT * len(x)), 1)
    test, valid, train = x[order[:held]], x[order[held : 2 * held]], x[order[2 * held :]]
    torch.manual_seed(seed)
    flow = NSF(2, layers=LAYERS, hidden=HIDDEN, bins=BINS)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(check_positive_int("threads", threads))
    try:
        return fit_and_report(
            flow,
            train,
            out,
            valid=valid,
            test=test,
            truth=truth,
            data_name=DATA,
            plot=plot,
            command="pyroflows demo",
            verbose=verbose,
            file=file,
            steps=steps,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            scheduler="cosine",
            device=device,
            progress=progress,
            seed=seed,
        )
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    # ``python -m pyroflows.demo [OPTIONS]``: the command line's syntax lives in one place.
    from .cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
