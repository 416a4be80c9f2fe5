r"""Exact answers from a fitted guide: PSIS-corrected draws and NeuTra MCMC.

A guide :math:`q` is an approximation of the posterior :math:`p(z \mid x)`. Two ways correct
what it gets wrong, at a price:

* :func:`psis_draws`, **importance resampling**: draw :math:`z_i \sim q`, weight each draw by
  :math:`w_i = p(x, z_i) / q(z_i)`, Pareto-smooth the weights (PSIS, through ArviZ) and resample.
  Cheap (one batch of guide draws and model evaluations). The resampled draws converge to the
  posterior as the number of guide draws grows, where the guide reaches: the estimate of the
  weights' tail shape, :math:`\hat k`, says how fast (below 0.7, usefully; above it, not at all
  in practice). It cannot restore posterior mass the guide never draws from (see
  :doc:`/diagnostics`).
* :func:`neutra`, **neural transport MCMC**: the guide's map :math:`T` (a standard normal
  :math:`\varepsilon` to the approximate posterior :math:`z = T(\varepsilon)`) reparameterises
  the model, and NUTS samples :math:`\varepsilon` from the pulled-back posterior
  :math:`p(x, T(\varepsilon))\,|\det J_T(\varepsilon)|`. This is exact MCMC whatever the guide:
  the better the guide, the closer that density is to a standard normal and the easier (faster,
  fewer divergences) the sampler's work. Pyro's own
  :class:`~pyro.infer.reparam.NeuTraReparam` does the work; :func:`neutra` packages it with the
  map back to the model's sites.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.reparam import NeuTraReparam

from .. import diagnostics  # a module object: pyroflows.diagnostics imports this package
from .._checks import check_positive_int
from .evidence import DEFAULT_BATCH, importance_draws

__all__ = ["RESAMPLING", "NeuTraModel", "PSISDraws", "neutra", "psis_draws"]

#: the resampling schemes of :func:`psis_draws`
RESAMPLING = ("systematic", "multinomial")


@dataclass(frozen=True)
class PSISDraws:
    """Posterior draws corrected by Pareto-smoothed importance resampling (see :func:`psis_draws`).

    Attributes:
        draws: for each latent sample site of the model, ``num_draws`` resampled values in the
            constrained space (what the model sees), a CPU tensor of shape
            ``(num_draws, *site_shape)``, in random order.
        khat: the Pareto shape :math:`\\hat k` of the importance weights' upper tail.
        reading: what ``khat`` means, as :func:`~pyroflows.diagnostics.khat_reading` reads it:
            ``"good"``, ``"ok"`` or ``"unreliable"``.
        ess: the effective sample size of the smoothed weights,
            :math:`1 / \\sum_i \\tilde w_i^2` for normalised weights :math:`\\tilde w`, in
            ``[1, num_samples]``: about how many independent posterior draws the resampled ones
            are worth (resampling more than ``ess`` draws repeats values).
        num_samples: the number of guide draws the weights came from.
        inference_data: the resampled draws as ArviZ data (one chain: ``posterior["site"]`` of
            shape ``(1, num_draws, *site_shape)``), or ``None`` unless asked for.
    """

    draws: dict[str, torch.Tensor]
    khat: float
    reading: str
    ess: float
    num_samples: int
    inference_data: Any = None


def _check_seed(seed: Any) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed: expected an integer or None; got {seed!r}")
    return None if seed is None else int(seed)


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Seed torch's global generators inside the block and restore them after it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _resample(
    probs: torch.Tensor, num_draws: int, method: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Indices of ``num_draws`` draws from the categorical ``probs``, in random order."""
    if method == "multinomial":
        index = torch.multinomial(probs, num_draws, replacement=True, generator=generator)
    else:
        # One uniform offset on a regular grid: each draw i appears floor or ceil of
        # num_draws * p_i times, a lower-variance estimate than independent draws.
        u = (torch.rand((), dtype=probs.dtype, generator=generator) + torch.arange(num_draws)) / (
            num_draws
        )
        cdf = torch.cumsum(probs, 0)
        index = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=len(probs) - 1)
        # Systematic resampling returns the draws sorted by their index; shuffle them so that
        # consecutive draws are not copies of each other (ArviZ reads a chain's order).
        index = index[torch.randperm(num_draws, generator=generator)]
    return index


def psis_draws(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 4000,
    num_draws: int | None = None,
    method: str = "systematic",
    inference_data: bool = False,
    seed: int | None = None,
    batch: int = DEFAULT_BATCH,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> PSISDraws:
    r"""Posterior draws from a guide, corrected by Pareto-smoothed importance resampling.

    Draws ``num_samples`` particles :math:`z_i \sim q` from the guide with their joint log
    weights :math:`\log w_i = \log p(x, z_i) - \log q(z_i)` (both from the same vectorised runs,
    :func:`~pyroflows.infer.importance_draws`), Pareto-smooths the weights with ArviZ (PSIS:
    the largest weights are replaced by quantiles of a generalised Pareto distribution fitted
    to their tail, which bounds their variance), and resamples ``num_draws`` draws with
    probabilities proportional to the smoothed weights. Expectations over the result are
    self-normalised importance sampling estimates: consistent as ``num_samples`` grows, with a
    bias and error that shrink fast when :math:`\hat k < 0.5`, slowly below 0.7, and not in
    practice above it (then a ``UserWarning`` says so).

    Resampling only reweights what the guide drew. Posterior mass the guide never reaches (a
    mode it missed, a tail it cut) stays missing, and :math:`\hat k` cannot see it: see
    :func:`~pyroflows.diagnostics.psis_khat` and :doc:`/diagnostics`. For draws that do not
    depend on the guide's reach, run NUTS on the :func:`neutra`-reparameterised model.

    Costs one batch of guide draws and model evaluations (vectorised, ``batch`` at a time) and
    no gradients. The draws are at most ``num_samples`` distinct values, worth about ``ess``
    independent ones.

    Args:
        model: a Pyro model (with its data, through ``args``/``kwargs``, observed).
        guide: a guide over the model's latent sites (an autoguide, a flow guide, a function).
        *args: passed to the model and guide.
        num_samples: number of guide draws to weight (at least 2).
        num_draws: number of resampled draws to return; ``None`` for ``num_samples``.
        method: ``"systematic"`` (one uniform offset on a regular grid: lower variance) or
            ``"multinomial"`` (independent draws); both return the draws in random order.
        inference_data: also return the draws as ArviZ data
            (:attr:`PSISDraws.inference_data`).
        seed: seed of the guide's draws and of the resampling, for a reproducible result
            (torch's global generators are restored afterwards); ``None`` draws from them.
        batch: guide draws per vectorised chunk.
        max_plate_nesting: the deepest plate nesting in the model and guide; ``None`` guesses
            it from one unvectorised run.
        **kwargs: passed to the model and guide.

    Returns:
        A :class:`PSISDraws`: ``.draws`` (site name to a tensor of shape
        ``(num_draws, *site_shape)``), ``.khat`` and ``.reading``, ``.ess``, ``.num_samples`` and
        ``.inference_data``.

    Raises:
        ValueError: for counts that are not positive integers, fewer than 2 guide draws, an
            unknown ``method``, a model without latent sites, or a guide whose draws all have
            non-finite weights.
        TypeError: for a ``seed`` that is not an integer.

    Warns:
        UserWarning: when :math:`\hat k \ge 0.7` (or is not finite): the resampled draws are
            not to be trusted.

    References:
        Pareto Smoothed Importance Sampling (Vehtari, Simpson, Gelman, Yao and Gabry, 2024).
        Yes, but Did It Work?: Evaluating Variational Inference (Yao, Vehtari, Simpson and
        Gelman, 2018).

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer.exact import psis_draws
        >>> def model(x):  # z ~ N(0, 1), x | z ~ N(z, 1): z | x = 1 ~ N(0.5, 0.5)
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):  # a guide 1.5x too wide, off centre
        ...     pyro.sample("z", dist.Normal(0.3, 1.5 * 0.5**0.5))
        >>> result = psis_draws(model, guide, torch.tensor(1.0), num_samples=4000, seed=0)
        >>> result.draws["z"].shape, result.reading
        (torch.Size([4000]), 'good')
        >>> round(result.draws["z"].mean().item(), 1), round(result.draws["z"].var().item(), 1)
        (0.5, 0.5)
    """
    num_draws = num_samples if num_draws is None else check_positive_int("num_draws", num_draws)
    if method not in RESAMPLING:
        raise ValueError(f"method: expected one of {RESAMPLING}; got {method!r}")
    seed = _check_seed(seed)
    with _seeded(seed):
        found = importance_draws(
            model,
            guide,
            args,
            kwargs,
            num_samples=num_samples,
            batch=batch,
            max_plate_nesting=max_plate_nesting,
            latents=True,
        )
    log_w = diagnostics._finite_somewhere(found.log_weights)
    smoothed, khat = diagnostics._psislw(log_w.numpy())
    probs = torch.softmax(torch.as_tensor(smoothed, dtype=torch.float64), 0)
    ess = float(1.0 / probs.square().sum())
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    index = _resample(probs, num_draws, method, generator)
    draws = {name: value[index] for name, value in found.latents.items()}
    reading = diagnostics.khat_reading(khat)
    if reading == "unreliable":
        warnings.warn(
            f"PSIS k-hat = {khat:.2f} >= 0.7: the importance weights are too heavy-tailed for "
            "the resampled draws to be trusted (the guide misses posterior mass). Train the "
            "guide longer or use a more flexible one, or run NUTS on pf.infer.neutra(model, "
            "guide) for exact draws.",
            UserWarning,
            stacklevel=2,
        )
    data = None
    if inference_data:
        posterior = {name: value.unsqueeze(0).numpy() for name, value in draws.items()}
        data = diagnostics._from_dict({"posterior": posterior})
    return PSISDraws(draws, khat, reading, ess, num_samples, data)


class NeuTraModel:
    """A model reparameterised by a trained guide's map (NeuTra), for NUTS: see :func:`neutra`.

    Calling it runs the reparameterised model: pass it to ``pyro.infer.NUTS`` or ``HMC`` like
    the model itself. Its single latent site, :attr:`latent_name`, is the standard-normal
    variable :math:`\\varepsilon` whose image under the guide's map :math:`T` is the model's
    packed unconstrained latent; :meth:`transform_samples` maps MCMC draws of it back to the
    model's sites. The map is read from the guide on every run, so it is the guide's current
    one.

    Attributes:
        model: the reparameterised model (``poutine.reparam`` with Pyro's
            :class:`~pyro.infer.reparam.NeuTraReparam`).
        guide: the guide whose map is used.
        reparam: the :class:`~pyro.infer.reparam.NeuTraReparam` instance.
        latent_name: the name of the MCMC site, ``"<first latent site>_shared_latent"``.
    """

    def __init__(self, model: Callable, guide: AutoContinuous) -> None:
        self.guide = guide
        self.reparam = NeuTraReparam(guide)
        self.model = self.reparam.reparam(model)
        first = next(name for name, _ in guide.prototype_trace.iter_stochastic_nodes())
        self.latent_name = f"{first}_shared_latent"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"NeuTraModel(guide={type(self.guide).__name__}, latent={self.latent_name!r})"

    @torch.no_grad()
    def transform_samples(
        self, samples: dict[str, torch.Tensor] | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The model's constrained site values of MCMC draws of the reparameterised model.

        Args:
            samples: ``mcmc.get_samples()`` (a dict holding :attr:`latent_name`, with or without
                ``group_by_chain=True``) or the draws of :attr:`latent_name` themselves, a
                tensor of shape ``(*batch, latent_dim)``.

        Returns:
            For each latent sample site of the model, a tensor of shape
            ``(*batch, *site_shape)`` (``batch`` is ``(num_samples,)``, or
            ``(num_chains, num_samples)`` for draws grouped by chain): the values the model
            sees, e.g. ready for ``arviz.from_dict(posterior=...)``.

        Raises:
            ValueError: for a dict without :attr:`latent_name`, or draws whose last dimension
                is not the guide's ``latent_dim``.
        """
        if isinstance(samples, dict):
            if self.latent_name not in samples:
                raise ValueError(
                    f"samples: expected a dict with the site {self.latent_name!r} (the MCMC "
                    f"draws of this model); got sites {sorted(samples)}"
                )
            latent = samples[self.latent_name]
        else:
            latent = torch.as_tensor(samples)
        dim = self.guide.latent_dim
        if latent.dim() < 1 or latent.shape[-1] != dim:
            raise ValueError(
                f"samples: expected draws of shape (*batch, {dim}); got {tuple(latent.shape)}"
            )
        batch = latent.shape[:-1]
        # Plate dims sit right of the batch: put the batch left of them, as the guide does.
        nesting = max((-plate.dim for plate in self.guide.plates.values()), default=0)
        flat = latent.reshape((-1,) + (1,) * nesting + (dim,))
        self.reparam.transform = self.guide.get_transform()  # the guide's map as it is now
        values = self.reparam.transform_sample(flat)
        sites = self.guide.prototype_trace.iter_stochastic_nodes()
        shapes = {name: site["value"].shape for name, site in sites}
        return {name: value.reshape(batch + shapes[name]) for name, value in values.items()}


def neutra(model: Callable, guide: AutoContinuous) -> NeuTraModel:
    r"""The model reparameterised by a trained guide (NeuTra), for NUTS/HMC, in one call.

    A trained :class:`~pyro.infer.autoguide.AutoContinuous` guide (such as
    :class:`~pyroflows.infer.AutoFlowGuide`) is a map :math:`T` from a standard normal
    :math:`\varepsilon` to the model's packed unconstrained latent. The returned model samples
    :math:`\varepsilon` instead, with density
    :math:`p(x, T(\varepsilon))\,|\det J_T(\varepsilon)|`: NUTS on it is exact MCMC for the
    original posterior, whatever the guide's quality, and a good guide makes that density close
    to a standard normal, which NUTS samples with large steps, short trajectories and no
    divergences (Hoffman et al., 2019). This wraps Pyro's
    :class:`~pyro.infer.reparam.NeuTraReparam` (``poutine.reparam`` over every latent site of
    the guide) and adds :meth:`NeuTraModel.transform_samples`, the map from MCMC draws back to
    the model's sites.

    Each step of the sampler pushes :math:`\varepsilon` through the guide's map and
    differentiates through it: for flows whose sampling direction is fast (IAF, RealNVP, NSF
    coupling layers), a gradient costs about one guide draw and one model evaluation. A MAF's
    sampling direction is sequential in the dimension, which makes every leapfrog step
    ``latent_dim`` times as expensive.

    The guide's map is read on every run of the model (it is the guide's current one); the
    model must have a static structure, with all latent sites known to the guide (Pyro's
    restriction), and observed sites must not be reparameterised. Run NUTS without
    ``jit_compile=True``: with Pyro 1.9 and torch 2.x, tracing a model under ``NeuTraReparam``
    fails (``RuntimeError: Unsupported value kind: Tensor``), for Pyro's own guides too.

    Args:
        model: the Pyro model the guide was trained on.
        guide: a trained ``AutoContinuous`` guide of that model (called at least once, as
            training does, so that it knows the model's sites).

    Returns:
        A :class:`NeuTraModel`: call it (or its ``.model``) where the model would go, e.g.
        ``pyro.infer.NUTS(neutra(model, guide))``; map draws back with
        ``.transform_samples(mcmc.get_samples())``.

    Raises:
        TypeError: for a guide that is not an ``AutoContinuous`` (``AutoNormal``, a hand-written
            guide: they have no joint map from a standard normal), or a model that is not
            callable.
        ValueError: for a guide that was never called (it does not know the model's sites).

    References:
        NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport (Hoffman,
        Sountsov, Dillon, Langmore, Tran and Vasudevan, 2019).

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import MCMC, NUTS
        >>> from pyroflows.infer import AutoFlowGuide
        >>> from pyroflows.infer.exact import neutra
        >>> def model(y):
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(0.0, scale), obs=y)
        >>> pyro.clear_param_store()
        >>> pyro.set_rng_seed(0)
        >>> y = 2.0 * torch.randn(10)
        >>> guide = AutoFlowGuide(model, flow="iaf", layers=1, hidden=(8,))
        >>> _ = guide(y)  # train it (pf.infer.fit_svi); here: only set it up
        >>> reparameterised = neutra(model, guide)
        >>> mcmc = MCMC(NUTS(reparameterised), num_samples=5, warmup_steps=5, disable_progbar=True)
        >>> mcmc.run(y)
        >>> samples = reparameterised.transform_samples(mcmc.get_samples())
        >>> samples["scale"].shape, bool((samples["scale"] > 0).all())
        (torch.Size([5]), True)
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable Pyro model; got {type(model).__name__}")
    if not isinstance(guide, AutoContinuous):
        raise TypeError(
            "guide: expected an AutoContinuous guide (pf.infer.AutoFlowGuide, Pyro's "
            "AutoMultivariateNormal, AutoIAFNormal, ...: NeuTra needs one map from a standard "
            f"normal to every latent site); got {type(guide).__name__}"
        )
    if guide.prototype_trace is None:
        raise ValueError(
            "guide: expected a trained guide (one that has been called on the model's "
            "arguments, as pf.infer.fit_svi does); got one that was never called"
        )
    return NeuTraModel(model, guide)
