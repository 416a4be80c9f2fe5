r"""How good is a guide? Importance-sampling diagnostics and ArviZ export.

A guide :math:`q` is judged by the importance weights :math:`w = p(x, z) / q(z)` of its own
draws: :func:`psis_khat` fits a generalised Pareto distribution to their upper tail (PSIS,
through ArviZ) and reads off its shape :math:`\hat k`; :func:`importance_ess` gives Kish's
effective sample size :math:`(\sum w)^2 / \sum w^2`. :func:`to_inference_data` exports guide
draws, named like the model's sites, to ArviZ.

ArviZ differs across versions (0.x on Python < 3.12 has ``az.psislw`` and ``InferenceData``;
1.x on Python >= 3.12 is split into arviz-base and arviz-stats and returns an xarray
``DataTree``); :func:`_psislw` and :func:`_from_dict` hold the difference, and ArviZ is imported
only when a diagnostic needs it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from .infer.evidence import DEFAULT_BATCH, importance_draws

__all__ = ["ESS", "PSIS", "importance_ess", "khat_reading", "psis_khat", "to_inference_data"]


class PSIS(NamedTuple):
    """The PSIS diagnostic of a guide.

    Attributes:
        khat: the generalised Pareto shape fitted to the upper tail of the importance weights.
        reading: ``"good"`` (k-hat < 0.5: the weights have finite variance; importance
            sampling and :func:`~pyroflows.infer.log_evidence` are reliable), ``"ok"``
            (< 0.7: usable after Pareto smoothing, converging slowly) or ``"unreliable"``
            (>= 0.7, or not finite: the guide misses posterior mass).
    """

    khat: float
    reading: str


class ESS(NamedTuple):
    """Kish's effective sample size of the self-normalised importance weights.

    Attributes:
        ess: :math:`1 / \\sum_i \\tilde w_i^2` for normalised weights :math:`\\tilde w`, in
            ``[1, num_samples]``.
        fraction: ``ess / num_samples``, in ``(0, 1]`` (1 when the guide is the posterior).
    """

    ess: float
    fraction: float


def khat_reading(khat: float) -> str:
    """``"good"`` below 0.5, ``"ok"`` below 0.7, ``"unreliable"`` otherwise (or not finite).

    Example:
        >>> from pyroflows.diagnostics import khat_reading
        >>> khat_reading(0.2), khat_reading(0.6), khat_reading(1.3)
        ('good', 'ok', 'unreliable')
    """
    if not math.isfinite(khat) or khat >= 0.7:
        return "unreliable"
    return "good" if khat < 0.5 else "ok"


def _arviz():
    with warnings.catch_warnings():
        # ArviZ 0.2x announces its 1.x refactor on import; we already code against both.
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        import arviz

    return arviz


def _psislw(log_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed log weights and k-hat of raw log weights ``log p - log q`` (1-D)."""
    az = _arviz()
    if hasattr(az, "psislw"):  # ArviZ < 1
        smoothed, khat = az.psislw(log_w)
        return np.asarray(smoothed), float(khat)
    from arviz_stats.base import array_stats  # ArviZ >= 1

    # arviz-stats' psislw takes log-likelihood values, as PSIS-LOO does (the log ratios are
    # -log_lik), and negates them; its loo_approximate_posterior passes -(log p - log q) too.
    smoothed, khat = array_stats.psislw(-log_w)
    return np.asarray(smoothed), float(khat)


def _from_dict(groups: dict[str, dict[str, np.ndarray]]):
    az = _arviz()
    if int(az.__version__.split(".")[0]) >= 1:  # arviz-base: one dict of groups -> DataTree
        return az.from_dict(groups)
    return az.from_dict(**groups)


def _weights(model, guide, args, kwargs, num_samples, batch, max_plate_nesting) -> torch.Tensor:
    log_w = importance_draws(
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        batch=batch,
        max_plate_nesting=max_plate_nesting,
    ).log_weights
    if not torch.isfinite(log_w).any():
        raise ValueError(
            "the guide's draws all have non-finite log weights (log p - log q); check that the "
            "guide's support lies inside the model's"
        )
    return log_w


def psis_khat(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    batch: int = DEFAULT_BATCH,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> PSIS:
    r"""Pareto k-hat of the guide's importance weights, and what it means.

    Draws ``num_samples`` particles from the guide (vectorised, ``batch`` at a time), computes
    the joint log weights :math:`\log p(x, z) - \log q(z)` and Pareto-smooths them with ArviZ
    (``az.psislw``, or arviz-stats' counterpart in ArviZ 1.x). :math:`\hat k` estimates the
    tail shape of the weights: below 0.5 their variance is finite; above 0.7 importance
    sampling (and the guide as a posterior approximation) is unreliable. The estimate is
    itself noisy: use at least a few hundred samples.

    Args:
        model: a Pyro model.
        guide: a guide over its latent sites.
        *args: passed to the model and guide.
        num_samples: number of guide draws.
        batch: particles per vectorised chunk.
        max_plate_nesting: the deepest plate nesting; ``None`` guesses it.
        **kwargs: passed to the model and guide.

    Returns:
        A :class:`PSIS`: read ``.khat`` (the estimate) and ``.reading`` (what it means).

    References:
        Yes, but Did It Work?: Evaluating Variational Inference (Yao, Vehtari, Simpson and
        Gelman, 2018). Pareto Smoothed Importance Sampling (Vehtari, Simpson, Gelman, Yao and
        Gabry, 2024).

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import psis_khat
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def narrow():
        ...     pyro.sample("z", dist.Normal(0.0, 0.2))
        >>> _ = torch.manual_seed(0)
        >>> psis_khat(model, narrow, num_samples=2000).reading
        'unreliable'
    """
    log_w = _weights(model, guide, args, kwargs, num_samples, batch, max_plate_nesting)
    _, khat = _psislw(log_w.numpy())
    return PSIS(khat, khat_reading(khat))


def importance_ess(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    batch: int = DEFAULT_BATCH,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> ESS:
    r"""Kish's effective sample size of the guide's self-normalised importance weights.

    :math:`\mathrm{ESS} = (\sum_i w_i)^2 / \sum_i w_i^2` for the joint weights
    :math:`w_i = p(x, z_i) / q(z_i)` of ``num_samples`` guide draws: ``num_samples`` when the
    guide is the posterior, close to 1 when one draw dominates. Like any sample statistic of
    heavy-tailed weights, it can look fine while the tail is bad; read it with
    :func:`psis_khat`.

    Args:
        model: a Pyro model.
        guide: a guide over its latent sites.
        *args: passed to the model and guide.
        num_samples: number of guide draws.
        batch: particles per vectorised chunk.
        max_plate_nesting: the deepest plate nesting; ``None`` guesses it.
        **kwargs: passed to the model and guide.

    Returns:
        An :class:`ESS` ``(ess, fraction)``.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import importance_ess
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> ess = importance_ess(model, model, num_samples=500)  # q = p: equal weights
        >>> round(ess.ess, 6), round(ess.fraction, 6)
        (500.0, 1.0)
    """
    log_w = _weights(model, guide, args, kwargs, num_samples, batch, max_plate_nesting)
    normalised = torch.softmax(log_w, dim=0)
    ess = float(1.0 / normalised.square().sum())
    return ESS(ess, ess / num_samples)


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    batch: int = DEFAULT_BATCH,
    log_weights: bool = True,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
):
    """Guide draws of the model's latent sites as ArviZ data (one chain).

    The ``posterior`` group holds, for each latent sample site of the model, ``num_samples``
    draws in the constrained space (the values the model sees: a positive site is positive),
    with dims ``(chain=1, draw=num_samples, *site_shape)``. With ``log_weights`` the
    ``sample_stats`` group holds ``log_weight`` ``(1, num_samples)``, the importance log weight
    :math:`\\log p(x, z) - \\log q(z)` *of each draw* (draws and weights come from the same
    vectorised runs, so weighted posterior expectations and PSIS can use them).

    Args:
        model: a Pyro model.
        guide: a guide over its latent sites (a function, an autoguide, a flow guide).
        *args: passed to the model and guide.
        num_samples: number of draws.
        batch: particles per vectorised chunk.
        log_weights: add the ``sample_stats`` group.
        max_plate_nesting: the deepest plate nesting; ``None`` guesses it.
        **kwargs: passed to the model and guide.

    Returns:
        An ArviZ ``InferenceData`` (ArviZ < 1) or ``xarray.DataTree`` (ArviZ >= 1); in both,
        ``data.posterior["site"]`` is the site's draws.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import to_inference_data
        >>> def model():
        ...     pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     pyro.sample("loc", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        >>> data = to_inference_data(model, model, num_samples=100)
        >>> data.posterior["scale"].shape, data.posterior["loc"].shape
        ((1, 100), (1, 100, 3))
        >>> bool((data.posterior["scale"] > 0).all())
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
        latents=True,
    )
    groups = {
        "posterior": {name: value.unsqueeze(0).numpy() for name, value in draws.latents.items()}
    }
    if log_weights:
        groups["sample_stats"] = {"log_weight": draws.log_weights.unsqueeze(0).numpy()}
    return _from_dict(groups)
