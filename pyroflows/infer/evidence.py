r"""Importance-sampled log evidence: :func:`log_evidence`.

With guide draws :math:`z_i \sim q` and weights :math:`w_i = p(x, z_i) / q(z_i)`,

.. math::

    \widehat{p(x)} = \frac1n \sum_i w_i, \qquad
    \operatorname{se}(\log \widehat{p(x)}) \approx
        \frac{\operatorname{sd}(w)}{\sqrt n\, \bar w}
        = \sqrt{\frac{n \sum_i \tilde w_i^2 - 1}{n - 1}},

where :math:`\tilde w_i = w_i / \sum_j w_j` are the normalised weights (the delta method on
:math:`\log \bar w`, with the unbiased variance of the weights). :math:`\log \widehat{p(x)}` is a
stochastic lower bound in expectation (Jensen), whose bias shrinks as :math:`1/n`; the standard
error is only meaningful when the weights' variance is finite, which
:func:`pyroflows.diagnostics.psis_khat` checks (k-hat < 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

from .._checks import check_positive_int
from .objectives import _guess_max_plate_nesting, log_importance_weights

__all__ = ["DEFAULT_BATCH", "ImportanceDraws", "importance_draws", "log_evidence"]

#: particles per vectorised chunk, unless told otherwise
DEFAULT_BATCH = 1000


def _check_counts(num_samples: Any, batch: Any) -> None:
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch", batch)
    if num_samples < 2:
        raise ValueError(
            f"num_samples: expected at least 2 (for a standard error); got {num_samples}"
        )


def _nesting(model: Callable, guide: Callable, args, kwargs, max_plate_nesting: int | None) -> int:
    if max_plate_nesting is not None:
        return max_plate_nesting
    with torch.no_grad():
        return _guess_max_plate_nesting(model, guide, args, kwargs)


def _latent_shapes(model: Callable, guide: Callable, args, kwargs) -> dict[str, torch.Size]:
    """The model's latent sample sites and their unvectorised shapes, from one run."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return {
        name: site["value"].shape
        for name, site in prune_subsample_sites(model_trace).nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


class ImportanceDraws(NamedTuple):
    """Guide draws and their joint log importance weights (see :func:`importance_draws`).

    Attributes:
        log_weights: ``log p(x, z_i) - log q(z_i)``, a float64 CPU tensor of shape
            ``(num_samples,)``.
        latents: for each latent sample site of the model, its values of the same draws in
            the constrained space (what the model sees), a CPU tensor of shape
            ``(num_samples, *site_shape)``; empty unless asked for.
    """

    log_weights: torch.Tensor
    latents: dict[str, torch.Tensor]


def importance_draws(
    model: Callable,
    guide: Callable,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    num_samples: int,
    batch: int = DEFAULT_BATCH,
    max_plate_nesting: int | None = None,
    latents: bool = False,
) -> ImportanceDraws:
    r"""``num_samples`` guide draws with their joint log importance weights, in chunks.

    The guide is drawn from ``batch`` particles at a time, each chunk vectorised with
    :func:`~pyroflows.infer.objectives.log_importance_weights` (memory grows with ``batch``,
    not ``num_samples``), and the model replayed against it: each draw :math:`z_i` gets its
    joint log weight :math:`\log p(x, z_i) - \log q(z_i)`, with Pyro's scales and masks. No
    gradients are recorded. This is what :func:`log_evidence` and the diagnostics of
    :mod:`pyroflows.diagnostics` (PSIS k-hat, importance ESS, ArviZ export) read.

    Args:
        model: a Pyro model (with its data, through ``args``/``kwargs``, observed).
        guide: a guide over the model's latent sites.
        args: positional arguments of the model and guide (a tuple: the model's own keywords
            cannot collide with this function's).
        kwargs: keyword arguments of the model and guide.
        num_samples: number of draws (at least 2).
        batch: particles per vectorised chunk.
        max_plate_nesting: the deepest plate nesting in the model and guide; ``None`` guesses
            it from one unvectorised run.
        latents: also return the model's values of every latent site for the same draws
            (found from one more unvectorised run).

    Returns:
        An :class:`ImportanceDraws` ``(log_weights, latents)``.

    Raises:
        ValueError: for counts that are not positive integers, fewer than 2 draws, or, with
            ``latents``, a model without latent sample sites.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer.evidence import importance_draws
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> draws = importance_draws(model, model, num_samples=6, batch=4, latents=True)
        >>> draws.log_weights  # the guide is the model: every weight is 1
        tensor([0., 0., 0., 0., 0., 0.], dtype=torch.float64)
        >>> draws.latents["z"].shape
        torch.Size([6])
    """
    _check_counts(num_samples, batch)
    args, kwargs = tuple(args), dict(kwargs or {})
    shapes = _latent_shapes(model, guide, args, kwargs) if latents else {}
    if latents and not shapes:
        raise ValueError("model: expected at least one latent sample site; found none")
    nesting = _nesting(model, guide, args, kwargs, max_plate_nesting)
    chunks: list[torch.Tensor] = []
    values: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    with torch.no_grad():
        for start in range(0, num_samples, batch):
            k = min(batch, num_samples - start)
            # With max_plate_nesting given, log_importance_weights runs the model exactly once
            # (vectorised over the k particles); tracing it there reads the values it weighed.
            traced = poutine.trace(model) if shapes else model
            log_w = log_importance_weights(
                traced, guide, *args, num_particles=k, max_plate_nesting=nesting, **kwargs
            )
            chunks.append(log_w.detach().to("cpu", torch.float64))
            if shapes:
                sites = prune_subsample_sites(traced.trace).nodes
                for name, shape in shapes.items():
                    value = sites[name]["value"].detach()
                    if value.numel() != k * shape.numel():
                        raise RuntimeError(
                            f"site {name!r}: expected {k} draws of shape {tuple(shape)}; got a "
                            f"value of shape {tuple(value.shape)}"
                        )
                    values[name].append(value.reshape(k, *shape).cpu())
    return ImportanceDraws(
        torch.cat(chunks), {name: torch.cat(parts) for name, parts in values.items()}
    )


def _logmeanexp_and_se(log_w: torch.Tensor) -> tuple[float, float]:
    n = log_w.numel()
    top = log_w.max()
    if not torch.isfinite(top):
        return float(top), math.nan
    w = torch.exp(log_w - top)
    mean = w.mean()
    estimate = float(top + mean.log())
    se = float(w.std(unbiased=True) / (mean * math.sqrt(n)))
    return estimate, se


def log_evidence(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 10_000,
    batch: int = DEFAULT_BATCH,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> tuple[float, float]:
    r"""Importance-sampled estimate of :math:`\log p(x)` and its standard error.

    Draws ``num_samples`` particles from the guide, ``batch`` at a time (each chunk vectorised
    with :func:`~pyroflows.infer.objectives.log_importance_weights`, so memory grows with
    ``batch``, not ``num_samples``), and returns :math:`\log \frac1n \sum_i w_i` with the
    delta-method standard error :math:`\operatorname{sd}(w) / (\sqrt n\, \bar w)` (see the
    module docstring). No gradients are recorded.

    The guide should be at least as wide as the posterior: a guide narrower than the
    posterior gives weights with infinite variance, an estimate biased low and a standard
    error that understates it; check with :func:`pyroflows.diagnostics.psis_khat`.

    The weights are joint: one call estimates :math:`\log p(x)` of everything the model
    observes in that call. For a model with independent local latents per data point (a VAE),
    the joint weights of many points degrade fast (their variance grows with the number of
    points), so estimate the evidence of one data point per call and sum the estimates (their
    standard errors add in quadrature), as ``benchmarks/vae.py`` does; pass
    ``max_plate_nesting`` in such loops to save a guessing run per call.

    Args:
        model: a Pyro model (with its data, through ``args``/``kwargs``, observed).
        guide: a guide over the model's latent sites.
        *args: passed to the model and guide.
        num_samples: number of importance samples :math:`n` (at least 2).
        batch: particles per vectorised chunk.
        max_plate_nesting: the deepest plate nesting in the model and guide; ``None`` guesses
            it from one unvectorised run.
        **kwargs: passed to the model and guide.

    Returns:
        ``(estimate, standard_error)`` as floats, in nats.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer.evidence import log_evidence
        >>> def model(x):  # z ~ N(0, 1), x | z ~ N(z, 1): p(x) = N(x; 0, 2)
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):  # the exact posterior N(x / 2, 1 / 2)
        ...     pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))
        >>> x = torch.tensor(1.0)
        >>> estimate, se = log_evidence(model, guide, x, num_samples=1000)
        >>> exact = dist.Normal(0.0, 2**0.5).log_prob(x).item()
        >>> abs(estimate - exact) < 1e-5 and se < 1e-5  # exact guide: every weight is p(x)
        True
    """
    draws = importance_draws(
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        batch=batch,
        max_plate_nesting=max_plate_nesting,
    )
    return _logmeanexp_and_se(draws.log_weights)
