r"""How good is a guide? Importance-sampling diagnostics and ArviZ export.

A guide :math:`q` is judged by the importance weights :math:`w = p(x, z) / q(z)` of its own
draws: :func:`psis_khat` fits a generalised Pareto distribution to their upper tail (PSIS,
through ArviZ) and reads off its shape :math:`\hat k`; :func:`importance_ess` gives Kish's
effective sample size :math:`(\sum w)^2 / \sum w^2`. :func:`report` gives all of them, with the
ELBO and the importance-sampled :math:`\log p(x)`, from one set of draws.
:func:`to_inference_data` exports guide draws, named like the model's sites, to ArviZ.

All of them read the weights of the guide's own draws, so they see the posterior only where
the guide puts mass: a guide that misses a mode or cuts a tail of the posterior can look
healthy (low :math:`\hat k`, high ESS, small standard errors) while its evidence estimate is
biased and its draws miss part of the posterior. :doc:`/diagnostics` shows such cases and what
to do about them.

ArviZ differs across versions (0.x on Python < 3.12 has ``az.psislw`` and ``InferenceData``;
1.x on Python >= 3.12 is split into arviz-base and arviz-stats and returns an xarray
``DataTree``); :func:`_psislw` and :func:`_from_dict` hold the difference, and ArviZ is imported
only when a diagnostic needs it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from .infer.evidence import DEFAULT_BATCH, _logmeanexp_and_se, importance_draws

__all__ = [
    "ESS",
    "PSIS",
    "GuideReport",
    "importance_ess",
    "khat_reading",
    "psis_khat",
    "report",
    "to_inference_data",
]


class PSIS(NamedTuple):
    """The PSIS diagnostic of a guide.

    Attributes:
        khat: the generalised Pareto shape fitted to the upper tail of the importance weights.
        reading: ``"good"`` (k-hat < 0.5: the weights have finite variance; importance
            sampling and :func:`~pyroflows.infer.log_evidence` are reliable where the guide
            reaches), ``"ok"`` (< 0.7: usable after Pareto smoothing, converging slowly) or
            ``"unreliable"`` (>= 0.7, or NaN: the guide misses posterior mass).
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
    """``"good"`` below 0.5, ``"ok"`` below 0.7, ``"unreliable"`` otherwise (or NaN).

    ``-inf`` (weights without a tail: all equal, as when the guide is the posterior) is
    ``"good"``; ``+inf`` is ``"unreliable"``.

    Example:
        >>> from pyroflows.diagnostics import khat_reading
        >>> khat_reading(0.2), khat_reading(0.6), khat_reading(1.3)
        ('good', 'ok', 'unreliable')
    """
    if math.isnan(khat) or khat >= 0.7:
        return "unreliable"
    return "good" if khat < 0.5 else "ok"


# What each reading of k-hat means, as GuideReport prints it.
_READINGS = {
    "good": "the weights have finite variance",
    "ok": "usable after Pareto smoothing, slow to converge",
    "unreliable": "the guide misses posterior mass",
}


def _arviz():
    with warnings.catch_warnings():
        # ArviZ 0.2x announces its 1.x refactor on import; we already code against both.
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing", category=FutureWarning)
        import arviz

    return arviz


def _psislw(log_w: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed log weights and k-hat of raw log weights ``log p - log q`` (1-D)."""
    finite = log_w[np.isfinite(log_w)]
    if finite.size and finite.min() == finite.max() and not np.isposinf(log_w).any():
        # Equal weights (the guide is the posterior, up to zero weights outside it) have no
        # tail: nothing to smooth, and k-hat is -inf. ArviZ fits a Pareto tail to zero
        # exceedances and returns +inf, which would read as "unreliable".
        top = finite[0]
        return log_w - (top + np.log(finite.size)), -math.inf
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


def _finite_somewhere(log_w: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(log_w).any():
        raise ValueError(
            "the guide's draws all have non-finite log weights (log p - log q); check that the "
            "guide's support lies inside the model's"
        )
    return log_w


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
    return _finite_somewhere(log_w)


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

    **What k-hat cannot see.** It is a statistic of the guide's own draws, so it judges the
    posterior only where the guide puts mass. A guide that misses a mode or cuts off a tail of
    the posterior draws nowhere near the missing mass, its weights there stay unobserved, and
    the weights it does see can be light-tailed: k-hat reads "good", the ESS is high, the
    standard error of :func:`~pyroflows.infer.log_evidence` is small, and yet the evidence is
    biased low by the log of the missing fraction and the draws miss part of the posterior
    (a guide covering one of two equal, separated modes: k-hat far below 0.5 and log Z off by
    log 2 = 0.69 nats). A low k-hat means "no evidence of trouble where the guide looked".
    Compare independent fits (different seeds, starts, flows: the largest log Z estimate is the
    least biased, all are low in expectation), run NUTS on the
    :func:`~pyroflows.infer.exact.neutra`-reparameterised model, and see
    :doc:`/diagnostics`.

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
    return _kish(log_w)


def _kish(log_w: torch.Tensor) -> ESS:
    normalised = torch.softmax(log_w, dim=0)
    ess = float(1.0 / normalised.square().sum())
    return ESS(ess, ess / log_w.numel())


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


@dataclasses.dataclass(frozen=True)
class GuideReport:
    """What the importance weights of one set of guide draws say about a guide (see :func:`report`).

    All estimates are in nats and come from the same ``num_samples`` draws
    :math:`z_i \\sim q` with weights :math:`w_i = p(x, z_i) / q(z_i)`. ``print(report)`` shows
    them as a table; :meth:`to_dict` returns them as plain data.

    Attributes:
        num_samples: the number of guide draws.
        elbo: the ELBO :math:`\\frac1n \\sum_i \\log w_i` (``-inf`` when a draw falls outside
            the model's support).
        elbo_se: its standard error :math:`\\operatorname{sd}(\\log w) / \\sqrt n`.
        log_z: the importance-sampled :math:`\\log \\frac1n \\sum_i w_i` (as
            :func:`~pyroflows.infer.log_evidence`), biased low in expectation.
        log_z_se: its delta-method standard error (meaningful when ``khat < 0.5``).
        gap: ``log_z - elbo``, an estimate of :math:`\\mathrm{KL}(q \\,\\|\\, p(\\cdot \\mid x))`,
            as good as ``log_z`` is (near 0 when the guide is the posterior *or* misses mass
            it never draws from).
        khat: the PSIS Pareto shape of the weights' upper tail (:func:`psis_khat`).
        reading: what ``khat`` means: ``"good"``, ``"ok"`` or ``"unreliable"``
            (:func:`khat_reading`).
        ess: Kish's effective sample size :math:`1 / \\sum_i \\tilde w_i^2` of the normalised
            weights (:func:`importance_ess`).
        ess_fraction: ``ess / num_samples``.
    """

    num_samples: int
    elbo: float
    elbo_se: float
    log_z: float
    log_z_se: float
    gap: float
    khat: float
    reading: str
    ess: float
    ess_fraction: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain ``dict`` (floats, ints and a string), e.g. for a table."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        rows = [
            ("ELBO", f"{self.elbo:.4f} ± {self.elbo_se:.4f}"),
            ("log Z (importance)", f"{self.log_z:.4f} ± {self.log_z_se:.4f}"),
            ("gap log Z - ELBO", f"{self.gap:.4f}"),
            ("PSIS k-hat", f"{self.khat:.2f} ({self.reading}: {_READINGS[self.reading]})"),
            ("ESS", f"{self.ess:.1f} of {self.num_samples} ({100 * self.ess_fraction:.1f}%)"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"Guide diagnostics from {self.num_samples} draws (nats)"]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        lines.append(
            "  (these see only where the guide draws: a missed mode or tail goes unnoticed)"
        )
        return "\n".join(lines)


def report(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 4000,
    batch: int = DEFAULT_BATCH,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> GuideReport:
    r"""The ELBO, the evidence, PSIS k-hat and ESS of a guide, from one set of draws.

    Draws ``num_samples`` particles :math:`z_i \sim q` from the guide (vectorised, ``batch``
    at a time) with their joint weights :math:`w_i = p(x, z_i) / q(z_i)` and reads off:

    * the ELBO :math:`\frac1n \sum_i \log w_i` with its standard error;
    * the importance-sampled :math:`\log \widehat{p(x)} = \log \frac1n \sum_i w_i` with
      its standard error (as :func:`~pyroflows.infer.log_evidence`);
    * their gap, which estimates :math:`\mathrm{KL}(q \,\|\, p(\cdot \mid x))`;
    * PSIS :math:`\hat k` and its reading (as :func:`psis_khat`): is importance sampling
      with this guide reliable?
    * Kish's effective sample size and its fraction of the draws (as :func:`importance_ess`).

    **Limits.** Every number here is a statistic of the guide's own draws; none can see
    posterior mass the guide never draws from. A guide that covers one of two separated modes,
    or cuts off a tail, reads healthy: :math:`\hat k` low, ESS high, small standard errors and
    a small gap, while ``log_z`` is biased low by the log of the missed fraction of the
    posterior and its draws miss that part. (Seen here: a one-dimensional NSF guide gave
    :math:`\log Z = -79.204 \pm 0.003` against the exact :math:`-79.189`, with
    :math:`\hat k = 0.25`.) The standard errors measure the Monte Carlo noise of these draws,
    not that bias. A low :math:`\hat k` means no evidence of trouble where the guide looked;
    to look elsewhere, compare independent fits (the largest ``log_z`` is the least biased: all
    are low in expectation) and check with MCMC, e.g. NUTS on
    :func:`~pyroflows.infer.exact.neutra`. See :doc:`/diagnostics`.

    Args:
        model: a Pyro model (with its data, through ``args``/``kwargs``, observed).
        guide: a guide over the model's latent sites.
        *args: passed to the model and guide.
        num_samples: number of guide draws (at least 2; a few thousand for a stable k-hat).
        batch: particles per vectorised chunk.
        max_plate_nesting: the deepest plate nesting; ``None`` guesses it.
        **kwargs: passed to the model and guide.

    Returns:
        A :class:`GuideReport`; ``print`` it, or read its fields (``.log_z``, ``.khat``, ...)
        or :meth:`~GuideReport.to_dict`.

    Raises:
        ValueError: for counts that are not positive integers, fewer than 2 draws, or a guide
            whose draws all have non-finite weights.

    References:
        Yes, but Did It Work?: Evaluating Variational Inference (Yao, Vehtari, Simpson and
        Gelman, 2018).

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.diagnostics import report
        >>> def model(x):  # z ~ N(0, 1), x | z ~ N(z, 1): log p(x) = log N(x; 0, 2)
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):  # the posterior N(x / 2, 1 / 2), 1.2x too wide
        ...     pyro.sample("z", dist.Normal(x / 2, 1.2 * 0.5**0.5))
        >>> _ = torch.manual_seed(0)
        >>> result = report(model, guide, torch.tensor(1.0), num_samples=2000)
        >>> result.reading, round(result.log_z, 2), round(dist.Normal(0.0, 2**0.5).log_prob(
        ...     torch.tensor(1.0)).item(), 2)
        ('good', -1.52, -1.52)
        >>> sorted(result.to_dict())[:4]
        ['elbo', 'elbo_se', 'ess', 'ess_fraction']
    """
    log_w = _weights(model, guide, args, kwargs, num_samples, batch, max_plate_nesting)
    elbo = float(log_w.mean())
    elbo_se = float(log_w.std(unbiased=True) / math.sqrt(num_samples))
    log_z, log_z_se = _logmeanexp_and_se(log_w)
    _, khat = _psislw(log_w.numpy())
    ess = _kish(log_w)
    return GuideReport(
        num_samples=num_samples,
        elbo=elbo,
        elbo_se=elbo_se,
        log_z=log_z,
        log_z_se=log_z_se,
        gap=log_z - elbo,
        khat=khat,
        reading=khat_reading(khat),
        ess=ess.ess,
        ess_fraction=ess.fraction,
    )
