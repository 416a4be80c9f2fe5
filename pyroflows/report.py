"""Fit a flow and write a run folder: the model, its metrics and a density plot.

What ``pyroflows fit`` and ``pyroflows demo`` do once the data and the flow are chosen, as
library functions: :func:`fit_and_report` trains with :func:`pyroflows.fit`, scores every split
with :func:`pyroflows.evaluation.evaluate`, saves the flow with :func:`pyroflows.save`, writes
``metrics.json`` and, for 2-D data, ``density.png`` (:func:`plot_density`), and prints a short
summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from . import __version__
from .datasets import Toy
from .engine.distributed import resolve
from .evaluation import BATCH_SIZE, Evaluation, evaluate
from .flows import NSF, Flow, LinearFlow
from .io import save
from .train import fit

__all__ = ["describe", "fit_and_report", "format_estimate", "plot_density"]

#: The density plot shows at most this many training points and as many flow samples.
PLOT_POINTS = 20_000


def describe(flow: Flow) -> str:
    """A one-line description of a flow: builder, main settings and parameter count.

    Example:
        >>> import pyroflows as pf
        >>> from pyroflows.report import describe
        >>> describe(pf.NSF(2, layers=2, hidden=(8,), bins=4))  # doctest: +ELLIPSIS
        'NSF (2 layers, hidden 8, 4 bins, ... parameters)'
    """
    kwargs = (flow.config or {}).get("kwargs", {})
    parts = [f"{kwargs['layers']} layers"] if "layers" in kwargs else []
    if "hidden" in kwargs and not isinstance(flow, LinearFlow):  # LinearFlow's is its base's
        parts.append("hidden " + ",".join(str(h) for h in kwargs["hidden"]))
    if isinstance(flow, NSF):
        parts.append(f"{kwargs['bins']} bins")
        if kwargs.get("autoregressive"):
            parts.append("autoregressive")
    count = sum(p.numel() for p in flow.parameters())
    parts.append(f"{count:,} parameters")
    return f"{type(flow).__name__} ({', '.join(parts)})"


def format_estimate(mean: float | None, se: float | None) -> str:
    """An estimate as the reports print it: ``"1.2345 ± 0.0012"``, ``"n/a"`` without one.

    Example:
        >>> from pyroflows.report import format_estimate
        >>> format_estimate(1.23456, 0.01), format_estimate(None, None)
        ('1.2346 ± 0.0100', 'n/a')
    """
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def _loss_name(loss: Any) -> str:
    """How ``metrics.json`` names the loss of :func:`pyroflows.fit`: its name, or its class."""
    return loss if isinstance(loss, str) else type(loss).__name__


def _device_of(flow: Flow) -> torch.device:
    return next((t.device for t in (*flow.parameters(), *flow.buffers())), torch.device("cpu"))


def _log_q(flow: Flow, points: torch.Tensor) -> torch.Tensor:
    """``log q`` of ``points`` in batches, float64 on the CPU."""
    device = _device_of(flow)
    parts = []
    with torch.no_grad():
        for start in range(0, len(points), BATCH_SIZE):
            batch = points[start : start + BATCH_SIZE].to(device)
            parts.append(flow().log_prob(batch).double().cpu())
    return torch.cat(parts)


def plot_density(
    flow: Flow,
    data: torch.Tensor,
    path: str | os.PathLike | None = None,
    *,
    truth: Toy | Callable[[torch.Tensor], torch.Tensor] | None = None,
    title: str | None = None,
    seed: int = 0,
    grid: int = 200,
):
    """Data, the true density (when known), the learned density and flow samples, side by side.

    For an unconditional flow over 2-D data. The axes are square and centred on the data
    (their 0.2% and 99.8% quantiles, padded by 10%); the densities are evaluated on a
    ``grid x grid`` mesh. Samples are drawn with their own random stream seeded by ``seed``, so
    the global RNG is left as it was. Needs matplotlib (``pip install pyroflows[plot]``); the
    figure is a bare ``matplotlib.figure.Figure``, which leaves pyplot's global state alone.

    Args:
        flow: an unconditional flow with ``dim == 2``.
        data: the points to show, shape ``(n, 2)`` (at most :data:`PLOT_POINTS` are drawn).
        path: where to save the figure (PNG, 100 dpi); ``None`` to only return it.
        truth: the true log-density, a callable on float64 points ``(m, 2)`` or a
            :class:`~pyroflows.datasets.Toy` (without a known density: no panel).
        title: the figure's title (default: :func:`describe` of the flow).
        seed: seed of the flow samples.
        grid: mesh points per axis.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: when matplotlib is not installed.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.report import plot_density
        >>> figure = plot_density(pf.RealNVP(2, layers=2, hidden=(8,)), torch.randn(500, 2))
        >>> len(figure.axes)
        3
    """
    try:
        # A bare Figure renders with Agg and leaves pyplot's global backend and state alone.
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_density needs matplotlib: pip install pyroflows[plot]") from None
    if not isinstance(flow, Flow) or tuple(flow.event_shape) != (2,) or flow.context_dim:
        raise ValueError(f"flow: expected an unconditional flow over 2-D data; got {flow!r}")
    data = torch.as_tensor(data)
    if data.dim() != 2 or data.shape[1] != 2 or len(data) < 2:
        raise ValueError(
            f"data: expected a tensor of shape (n, 2), n >= 2; got {tuple(data.shape)}"
        )
    true_log_prob = truth.log_prob if isinstance(truth, Toy) else truth

    x = data.double().cpu().numpy()
    lo, hi = np.quantile(x, 0.002, axis=0), np.quantile(x, 0.998, axis=0)
    pad = 0.1 * (hi - lo) + 1e-3
    lo, hi = lo - pad, hi + pad
    side = max(hi - lo)  # square axes, centred on the data
    centre = (lo + hi) / 2
    lo, hi = centre - side / 2, centre + side / 2
    extent = (lo[0], hi[0], lo[1], hi[1])
    gx, gy = np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid)
    mesh = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
    dtype = next((p.dtype for p in flow.parameters()), torch.get_default_dtype())
    points = torch.tensor(mesh, dtype=dtype)
    learned = _log_q(flow, points).exp().reshape(grid, grid).numpy()
    device = _device_of(flow)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            samples = flow().sample((min(len(x), PLOT_POINTS),)).double().cpu().numpy()
    samples = samples[np.isfinite(samples).all(1)]
    shown = x[:PLOT_POINTS]

    panels = [(f"data ({len(x):,} training points)", "hist", shown)]
    if true_log_prob is not None:
        with torch.no_grad():
            true = true_log_prob(points.double()).exp().reshape(grid, grid).numpy()
        panels.append(("true density", "image", true))
    panels.append(("learned density", "image", learned))
    panels.append((f"flow samples ({len(samples):,})", "hist", samples))

    fig = Figure(figsize=(3.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    bins = np.linspace(lo[0], hi[0], 121), np.linspace(lo[1], hi[1], 121)
    for ax, (name, kind, values) in zip(axes[0], panels, strict=True):
        if kind == "hist":
            ax.hist2d(values[:, 0], values[:, 1], bins=bins, cmap="viridis", rasterized=True)
        else:
            ax.imshow(values, origin="lower", extent=extent, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(describe(flow) if title is None else title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def fit_and_report(
    flow: Flow,
    train: torch.Tensor,
    out: str | os.PathLike,
    *,
    valid: torch.Tensor | None = None,
    test: torch.Tensor | None = None,
    truth: Toy | Callable[[torch.Tensor], torch.Tensor] | None = None,
    data_name: str = "data",
    plot: bool = True,
    command: str = "pyroflows fit",
    verbose: bool = True,
    file: IO[str] | None = None,
    **fit_kwargs: Any,
) -> dict[str, Any]:
    """Fit ``flow`` to ``train`` and write ``out/model``, ``out/metrics.json``, ``out/density.png``.

    Trains with :func:`pyroflows.fit` (``valid`` as its validation data), scores the train,
    validation and test sets with :func:`~pyroflows.evaluation.evaluate` (and the KL gap on the
    test set when ``truth``, the density ``test`` was drawn from, is known), saves the flow
    with :func:`pyroflows.save`, writes the metrics as JSON and, for 2-D data with matplotlib
    installed and ``plot``, the figure of :func:`plot_density`. Prints a line before training
    and a summary after it.

    Args:
        flow: an unconditional flow, built by a registered builder (so that it can be saved).
        train: training data ``(n, *flow.event_shape)``.
        out: the output folder (created if needed, before training).
        valid: validation data, or ``None`` (the flow then keeps its last state).
        test: test data, or ``None``.
        truth: the true log-density of the distribution of ``test`` (a callable or a
            :class:`~pyroflows.datasets.Toy` with a known density), or ``None``.
        data_name: how the data are named in the output (a file name, ``builtin:ring``).
        plot: write ``density.png`` (2-D data only; skipped with a note without matplotlib).
        command: what the first line of the output starts with.
        verbose: print a line before training and a summary after it.
        file: where to print them (default: standard output, as ``print`` does).
        **fit_kwargs: arguments of :func:`pyroflows.fit` (``steps``, ``epochs``,
            ``batch_size``, ``lr``, ``scheduler``, ``patience``, ``device``, ``progress``,
            ``checkpoint``, ``resume``, ``seed``, ...).

    Returns:
        The metrics written to ``metrics.json``: ``train_nll``, ``valid_nll``, ``test_nll``
        (nats per point) with standard errors, ``entropy`` and ``kl_gap`` (``None`` without
        ``truth``), the flow's :attr:`~pyroflows.Flow.config`, the training settings, time and
        steps per second. Under ``torchrun`` (data-parallel training, see ``distributed`` in
        :func:`pyroflows.fit`) ``distributed`` holds the number of ranks, the backend and the
        batch size per rank; rank 0 alone evaluates, prints and writes, and the other ranks
        return the training metrics only.

    Example:
        >>> import tempfile, torch, pyroflows as pf
        >>> from pyroflows.report import fit_and_report
        >>> x = torch.randn(600, 2, generator=torch.Generator().manual_seed(0))
        >>> flow = pf.RealNVP(2, layers=2, hidden=(8,))
        >>> metrics = fit_and_report(flow, x[:400], tempfile.mkdtemp(), valid=x[400:500],
        ...                          test=x[500:], plot=False, verbose=False, steps=20,
        ...                          progress=False)
        >>> metrics["steps"], sorted(metrics["flow"])
        (20, ['builder', 'kwargs'])
    """
    folder = Path(out)
    device = fit_kwargs.get("device")
    group = resolve(fit_kwargs.get("distributed"), None if device is None else torch.device(device))
    main = group is None or group.main  # under torchrun rank 0 alone prints and writes
    if main:
        folder.mkdir(parents=True, exist_ok=True)  # fail before training, not after
    sizes = [0 if part is None else len(part) for part in (train, valid, test)]
    dim = int(np.prod(train.shape[1:]))
    echo = (lambda line: print(line, file=file, flush=True)) if verbose and main else _silent
    echo(
        f"{command}: {describe(flow)} on {data_name} ({dim}-D): "
        f"{sizes[0]:,} train, {sizes[1]:,} valid, {sizes[2]:,} test"
    )
    history = fit(flow, train, valid=valid, **fit_kwargs)
    flow.eval()

    first_step = getattr(history, "first_step", 0)
    speed = (history.steps - first_step) / history.seconds if history.seconds > 0 else None
    metrics: dict[str, Any] = {
        "pyroflows_version": __version__,
        "data": data_name,
        "dim": dim,
        "flow": flow.config,
        "parameters": sum(p.numel() for p in flow.parameters()),
        "n_train": sizes[0],
        "n_valid": sizes[1],
        "n_test": sizes[2],
        "steps": history.steps,
        "batch_size": fit_kwargs.get("batch_size", 256),
        "lr": fit_kwargs.get("lr", 1e-3),
        "loss": _loss_name(fit_kwargs.get("loss", "nll")),
        "seed": fit_kwargs.get("seed"),
        "device": str(torch.device(fit_kwargs.get("device") or _device_of(flow))),
        "torch_threads": torch.get_num_threads(),
        "seconds": history.seconds,
        "steps_per_second": speed,
        "best_step": history.best_step,
        "stopped_early": history.stopped_early,
        "interrupted": history.interrupted,
        "units": "nats per point",
    }
    if group is not None:
        metrics["distributed"] = {
            "world": group.world,
            "backend": group.backend,
            "batch_size_per_rank": metrics["batch_size"],
        }
    if not main:
        return metrics
    known = truth.log_prob if isinstance(truth, Toy) else truth
    for name, part in (("train", train), ("valid", valid), ("test", test)):
        score: Evaluation | None = None
        if part is not None:
            score = evaluate(flow, part, truth=known if name == "test" else None)
        metrics[f"{name}_nll"] = None if score is None else score.nll
        metrics[f"{name}_nll_se"] = None if score is None else score.nll_se
        if name == "test":
            for key in ("entropy", "entropy_se", "kl_gap", "kl_gap_se"):
                metrics[key] = None if score is None else getattr(score, key)

    save(flow, folder / "model")
    written = [folder / "model"]
    text = json.dumps(metrics, indent=2)
    (folder / "metrics.json").write_text(text + "\n")
    metrics = json.loads(text)  # what was written (lists, not tuples)
    written.append(folder / "metrics.json")
    note = None
    if not plot:
        pass
    elif dim != 2 or len(train.shape) != 2:
        note = f"density.png skipped: the plot is for 2-D data; these are {dim}-D"
    else:
        try:
            title = f"{describe(flow)} on {data_name}"
            seed = fit_kwargs.get("seed") or 0
            plot_density(flow, train, folder / "density.png", truth=known, title=title, seed=seed)
            written.append(folder / "density.png")
        except ImportError:
            note = "density.png skipped: matplotlib is not installed (pip install pyroflows[plot])"

    echo(
        f"trained {history.steps} steps in {history.seconds:.1f} s"
        + (f" ({speed:.1f} steps/s)" if speed else "")
        + (f"; best validation NLL at step {history.best_step}" if history.best_step else "")
        + ("; stopped early" if history.stopped_early else "")
        + ("; interrupted (kept the best state so far)" if history.interrupted else "")
    )

    def shown(key: str) -> str:
        return format_estimate(metrics[key], metrics[f"{key}_se"])

    echo(
        f"NLL (nats per point): train {shown('train_nll')}, valid {shown('valid_nll')}, "
        f"test {shown('test_nll')}"
    )
    if metrics["kl_gap"] is not None:
        echo(
            f"KL(p||q) gap {shown('kl_gap')} nats "
            f"(test NLL minus the true entropy {shown('entropy')})"
        )
    if note:
        echo(note)
    echo("wrote " + ", ".join(str(p) for p in written))
    return metrics


def _silent(line: str) -> None:
    del line
