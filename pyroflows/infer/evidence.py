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
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

from .._checks import check_positive_int
from .objectives import _guess_max_plate_nesting, log_importance_weights

__all__ = ["log_evidence"]

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


def _log_weights(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    batch: int,
    max_plate_nesting: int | None,
    draws: dict[str, torch.Size] | None = None,
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """``num_samples`` joint log weights, ``batch`` particles (vectorised) at a time.

    Returns the weights as a float64 CPU tensor of shape ``(num_samples,)`` and, for each site
    named in ``draws`` (a model latent site and its unvectorised shape), the model's values of
    the same particles, as a list of ``(batch_i, *shape)`` chunks.
    """
    _check_counts(num_samples, batch)
    nesting = _nesting(model, guide, args, kwargs, max_plate_nesting)
    chunks: list[torch.Tensor] = []
    values: dict[str, list[torch.Tensor]] = {name: [] for name in draws or {}}
    with torch.no_grad():
        for start in range(0, num_samples, batch):
            k = min(batch, num_samples - start)
            # With max_plate_nesting given, log_importance_weights runs the model exactly once
            # (vectorised over the k particles); tracing it there reads the values it weighed.
            traced = poutine.trace(model) if draws else model
            log_w = log_importance_weights(
                traced, guide, *args, num_particles=k, max_plate_nesting=nesting, **kwargs
            )
            chunks.append(log_w.detach().to("cpu", torch.float64))
            if draws:
                sites = prune_subsample_sites(traced.trace).nodes
                for name, shape in draws.items():
                    value = sites[name]["value"].detach()
                    if value.numel() != k * shape.numel():
                        raise RuntimeError(
                            f"site {name!r}: expected {k} draws of shape {tuple(shape)}; got a "
                            f"value of shape {tuple(value.shape)}"
                        )
                    values[name].append(value.reshape(k, *shape).cpu())
    return torch.cat(chunks), values


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
    log_w, _ = _log_weights(model, guide, args, kwargs, num_samples, batch, max_plate_nesting)
    return _logmeanexp_and_se(log_w)
