r"""Variational objectives: a plate-aware IWAE with the DReG estimator, and sticking the landing.

Both objectives are Pyro :class:`~pyro.infer.elbo.ELBO` subclasses, so they drop into
``pyro.infer.SVI(model, guide, optim, loss=...)``: ``loss`` returns the negated bound as a float,
``loss_and_grads`` also backpropagates a surrogate whose gradient is the chosen estimator, and
``differentiable_loss`` returns that surrogate as a tensor whose value is the negated bound.

Particles are vectorised: model and guide run once under an outermost
``pyro.plate("num_particles_vectorized", K, dim=-(max_plate_nesting + 1))``, as Pyro's
``vectorize_particles=True`` does (so the model and guide need a static structure).

*Stopped-gradient* guide densities (DReG and STL) are obtained by replaying the guide on the
sampled values, which still carry their reparameterisation graph, while every parameter in Pyro's
param store (which ``pyro.param`` and ``pyro.module`` fill) and every param site of the traces is
marked ``requires_grad_(False)``; autograd records at operation time, so ``log q(z)`` then depends
on the variational parameters through ``z`` only. The flags are restored even when the replay
raises. Parameters that reach neither (a bare ``nn.Module`` called in the guide without
``pyro.module``) are not stopped, and SVI would not train them anyway. The replayed values are
fresh aliases of the sampled tensors, so a transform cache keyed on tensor identity (Pyro's own
transforms) cannot return the unfrozen pass.

Cost of a replay with a flow guide: the replayed flow has not seen ``z``, so ``log q(z)`` inverts
it. Coupling flows (``RealNVP``, ``NICE``, coupling ``NSF``) and ``MAF`` invert in one pass per
layer; an ``IAF`` inverts in ``dim`` sequential passes per layer, which makes a DReG or STL step
with an IAF guide roughly ``dim`` times as expensive in the guide as a standard one.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan
from torch.distributions import Independent, TransformedDistribution

from ..distribution import FlowDistribution
from ..transforms.base import has_inverse

__all__ = ["IWAE", "STL_ELBO", "log_importance_weights"]

#: Name of the outermost plate over particles (the name Pyro's ``vectorize_particles`` uses).
PARTICLE_PLATE = "num_particles_vectorized"
ESTIMATORS = ("standard", "dreg")

_UNREGISTERED_WARNING = ".*was not registered in the param store because requires_grad=False"


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_num_particles(num_particles: Any) -> int:
    if isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral):
        raise TypeError(f"num_particles: expected a positive integer; got {num_particles!r}")
    if num_particles < 1:
        raise ValueError(f"num_particles: expected a positive integer; got {num_particles!r}")
    return int(num_particles)


def _check_max_plate_nesting(max_plate_nesting: Any) -> float:
    if max_plate_nesting is None or max_plate_nesting == math.inf:
        return math.inf
    if isinstance(max_plate_nesting, bool) or not isinstance(max_plate_nesting, numbers.Integral):
        raise TypeError(
            f"max_plate_nesting: expected a non-negative integer or None; got {max_plate_nesting!r}"
        )
    if max_plate_nesting < 0:
        raise ValueError(
            f"max_plate_nesting: expected a non-negative integer or None; got {max_plate_nesting!r}"
        )
    return int(max_plate_nesting)


def _guess_max_plate_nesting(model: Callable, guide: Callable, args, kwargs) -> int:
    """Run the pair once, unvectorised and hidden from outer handlers, and read the plate dims."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


# ----------------------------------------------------------------------------------------------
# Vectorised traces
# ----------------------------------------------------------------------------------------------


def _sample_sites(trace: Trace) -> list[dict]:
    return [site for site in trace.nodes.values() if site["type"] == "sample"]


@dataclass
class _Particles:
    """One vectorised run of the guide and of the model against it (K particles)."""

    model_trace: Trace  # subsample sites pruned, log_prob computed
    guide_trace: Trace  # subsample sites pruned, score_parts computed
    raw_guide_trace: Trace  # with subsample sites: replaying it reuses the minibatch
    num_particles: int
    max_plate_nesting: int

    @property
    def ndim(self) -> int:
        """Number of batch dims a reduced log-density carries (plates and the particle dim)."""
        return self.max_plate_nesting + 1

    @property
    def particle_dim(self) -> int:
        return -self.ndim

    def wrap(self, fn: Callable) -> Callable:
        return _particle_plate(fn, self.num_particles, self.max_plate_nesting)


def _particle_plate(fn: Callable, num_particles: int, max_plate_nesting: int) -> Callable:
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1))(fn)


def _run_particles(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    max_plate_nesting: int,
    inverting: str | None = None,
) -> _Particles:
    """Trace the guide and the model against it; ``inverting``: the name of an objective that
    will replay the guide with frozen parameters, which checks the guide can (before the model
    runs)."""
    if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
        raise NotImplementedError("pyroflows objectives do not support GuideMessenger guides")
    vmodel = _particle_plate(model, num_particles, max_plate_nesting)
    vguide = _particle_plate(guide, num_particles, max_plate_nesting)
    raw_guide_trace = poutine.trace(vguide).get_trace(*args, **kwargs)
    if inverting is not None:
        _check_invertible(raw_guide_trace, inverting)
    model_trace = poutine.trace(poutine.replay(vmodel, trace=raw_guide_trace)).get_trace(
        *args, **kwargs
    )
    nesting = max_plate_nesting + 1
    if is_validation_enabled():
        check_model_guide_match(model_trace, raw_guide_trace, nesting)
        check_if_enumerated(raw_guide_trace)
    guide_trace = prune_subsample_sites(raw_guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    if is_validation_enabled():
        for site in _sample_sites(model_trace) + _sample_sites(guide_trace):
            check_site_shape(site, nesting)
    return _Particles(model_trace, guide_trace, raw_guide_trace, num_particles, max_plate_nesting)


def _param_leaves(traces: tuple[Trace, ...]) -> list[torch.Tensor]:
    """The leaf tensors behind Pyro's param store and behind the traces' param sites."""
    tensors = [param for _, param in pyro.get_param_store().named_parameters()]
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] == "param" and isinstance(site["value"], torch.Tensor):
                unconstrained = getattr(site["value"], "unconstrained", None)
                tensors.append(unconstrained() if callable(unconstrained) else site["value"])
    leaves, seen = [], set()
    for tensor in tensors:
        if tensor is not None and tensor.is_leaf and id(tensor) not in seen:
            seen.add(id(tensor))
            leaves.append(tensor)
    return leaves


@contextlib.contextmanager
def _stopped_param_gradients(traces: tuple[Trace, ...] = ()) -> Iterator[None]:
    """Mark every parameter ``requires_grad=False`` for the block (a stop-gradient).

    The parameters are those in Pyro's param store (which ``pyro.param`` and ``pyro.module``
    fill) and those recorded as param sites in ``traces``. Autograd records at operation time,
    so whatever the block computes from them is a constant to them while gradients still flow
    through other inputs. The flags are restored on exit, exceptions included. ``pyro.module``
    warns about parameters that do not require grad; that warning is silenced here, where it is
    expected.
    """
    frozen = [param for param in _param_leaves(traces) if param.requires_grad]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UNREGISTERED_WARNING)
            for param in frozen:
                param.requires_grad_(False)
            yield
    finally:
        for param in frozen:
            param.requires_grad_(True)


def _replay_frozen(fn: Callable, particles: _Particles, args: tuple, kwargs: dict) -> Trace:
    """Trace ``fn`` (model or guide) on the guide's values with all parameters frozen.

    The replayed values are fresh aliases (``view_as``) of the sampled tensors: they carry the
    same reparameterisation graph, but a transform cache keyed on tensor identity (Pyro's own
    transforms) cannot hand back the unfrozen forward pass. Subsample sites are replayed too, so
    the minibatch is the same. Hidden from outer handlers (``poutine.block``).
    """
    aliased = Trace()
    for name, site in particles.raw_guide_trace.nodes.items():
        if site["type"] == "sample":
            value = site["value"]
            if isinstance(value, torch.Tensor):
                value = value.view_as(value)
            aliased.add_node(name, **{**site, "value": value})
    traces = (particles.raw_guide_trace, particles.model_trace)
    with poutine.block(), _stopped_param_gradients(traces):
        trace = poutine.trace(poutine.replay(particles.wrap(fn), trace=aliased)).get_trace(
            *args, **kwargs
        )
        trace = prune_subsample_sites(trace)
        trace.compute_log_prob()
    return trace


# ----------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------


def _reduce(
    sites: list[dict], particles: _Particles, keep: tuple[int, ...], key: str = "log_prob"
) -> torch.Tensor | float:
    """Sum ``site[key]`` over the sites and over every batch dim but those in ``keep``.

    The result has ``particles.ndim`` dims (size 1 where summed), or is ``0.0`` without sites.
    """
    ndim = particles.ndim
    total: torch.Tensor | float = 0.0
    for site in sites:
        term = site[key]
        if not isinstance(term, torch.Tensor):
            term = torch.as_tensor(term)
        if term.dim() > ndim:
            raise ValueError(
                f"site {site['name']!r}: expected a log-density with at most {ndim} batch dims "
                f"(max_plate_nesting + 1); got shape {tuple(term.shape)}"
            )
        term = term.reshape((1,) * (ndim - term.dim()) + term.shape)
        dims = [d for d in range(-ndim, 0) if d not in keep]
        if dims:
            term = term.sum(dims, keepdim=True)
        total = total + term
    return total


def _expand_particles(x: torch.Tensor | float, particles: _Particles) -> torch.Tensor:
    x = torch.as_tensor(x)
    x = x.reshape((1,) * (particles.ndim - x.dim()) + x.shape)
    shape = list(x.shape)
    shape[particles.particle_dim] = particles.num_particles
    return x.expand(shape)


def _factorising_plates(particles: _Particles) -> list:
    """Vectorised plates (other than the particle plate) that contain every sample site."""
    common: dict | None = None
    for trace in (particles.model_trace, particles.guide_trace):
        for site in _sample_sites(trace):
            frames = {
                (f.name, f.dim): f
                for f in site["cond_indep_stack"]
                if f.vectorized and f.name != PARTICLE_PLATE
            }
            common = frames if common is None else {k: common[k] for k in common if k in frames}
    return list(common.values()) if common else []


def _common_scale(particles: _Particles, plates: list) -> float:
    """The scale every site carries, divided out of the weights before the log-mean-exp.

    When all sites share one scalar scale (a subsampled data plate's ``N / B``, a global
    ``poutine.scale``), that scale. Otherwise the subsampling factor of the factorising plates
    (which every site carries), or 1 for joint weights.
    """
    scales = set()
    for trace in (particles.model_trace, particles.guide_trace):
        for site in _sample_sites(trace):
            scale = site["scale"]
            if isinstance(scale, torch.Tensor):
                scale = scale.item() if scale.numel() == 1 else math.nan  # nan: not shared
            scales.add(float(scale))
    if len(scales) == 1 and next(iter(scales)) > 0:  # nan > 0 is False
        return next(iter(scales))
    factor = 1.0
    for frame in plates:
        if frame.full_size is not None and frame.size:
            factor *= frame.full_size / frame.size
    return factor


@dataclass
class _Weights:
    log_p: torch.Tensor | float  # model log-density, reduced to (K, *plates), scaled
    log_q: torch.Tensor | float  # guide log-density, reduced likewise
    keep: tuple[int, ...]  # the particle dim and the factorising plate dims
    scale: float  # common scale divided out before the log-mean-exp

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_p - self.log_q


def _weights(particles: _Particles, plate_aware: bool) -> _Weights:
    plates = _factorising_plates(particles) if plate_aware else []
    keep = (particles.particle_dim, *(f.dim for f in plates))
    log_p = _reduce(_sample_sites(particles.model_trace), particles, keep)
    log_q = _reduce(_sample_sites(particles.guide_trace), particles, keep)
    return _Weights(log_p, log_q, keep, _common_scale(particles, plates))


def _log_mean_exp(log_w: torch.Tensor, particles: _Particles, scale: float) -> torch.Tensor:
    """``scale * logmeanexp_k(log_w / scale)`` over the particle dim (kept, size 1)."""
    log_w = _expand_particles(log_w, particles) / scale
    dim = particles.particle_dim
    return scale * (torch.logsumexp(log_w, dim, keepdim=True) - math.log(particles.num_particles))


def _normalised_weights(log_w: torch.Tensor, particles: _Particles, scale: float) -> torch.Tensor:
    log_w = _expand_particles(log_w, particles).detach() / scale
    return torch.softmax(log_w, dim=particles.particle_dim)


def _drop_zero_weight_particles(particles: _Particles, w: torch.Tensor) -> None:
    """Stop the gradient at the sampled values of particles whose normalised weight is 0.

    Every term of the DReG surrogate reaches a particle's values with a coefficient ``w``,
    ``w^2 - w`` or ``w^2``, all exactly 0 when ``w`` underflowed to 0, so the particle's exact
    contribution to every gradient is 0. Autograd still evaluates the local derivatives along
    its path and multiplies them by that zero: a particle far in the tails (e.g. a scale
    ``exp(u)`` that underflowed to 0, where ``d log N(x; mu, sigma) / d sigma`` is infinite) gives
    ``0 * inf = nan``, and since the particles share the guide's parameters, one such particle
    would turn the whole gradient into ``nan``. A hook on each guide sample value (it sees the
    gradient accumulated from the model and guide traces and their frozen replays, which alias
    it) sets the gradient of those particles to exactly 0, its correct value; particles with a
    positive weight are untouched, so a ``nan`` there still surfaces.
    """
    keep = w > 0
    if bool(keep.all()):
        return
    for site in _sample_sites(particles.raw_guide_trace):
        value = site["value"]
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            continue
        event_dim = site["fn"].event_dim
        batch_dim = value.dim() - event_dim
        mask = keep
        # Right-align the mask with the value's batch dims; where the value broadcasts (size 1,
        # or a dim it lacks), keep the gradient if any weight it stands for is positive.
        while mask.dim() > batch_dim:
            mask = mask.any(0)
        mask = mask.reshape((1,) * (batch_dim - mask.dim()) + mask.shape)
        batch_shape = value.shape[:batch_dim]
        for d in range(batch_dim):
            if batch_shape[d] == 1 and mask.shape[d] != 1:
                mask = mask.any(d, keepdim=True)
            elif mask.shape[d] not in (1, batch_shape[d]):
                mask = None
                break
        if mask is None:
            continue
        mask = mask.reshape(mask.shape + (1,) * event_dim)
        value.register_hook(lambda grad, mask=mask: torch.where(mask, grad, grad.new_zeros(())))


def _check_reparameterised(particles: _Particles, what: str) -> None:
    for site in _sample_sites(particles.guide_trace):
        if not getattr(site["fn"], "has_rsample", False):
            raise NotImplementedError(
                f"{what} needs a reparameterised guide; guide site {site['name']!r} "
                f"({type(site['fn']).__name__}) has no rsample: use estimator='standard' "
                "(IWAE) or pyro.infer.Trace_ELBO"
            )


def _one_way_transforms(fn: Any) -> list[str]:
    """Names of the transforms without an inverse inside a site's distribution (looking
    through ``Independent``, expanded and masked wrappers and nested transformed
    distributions; a flow's base distribution is not a transformed one)."""
    names: list[str] = []
    while fn is not None:
        if isinstance(fn, TransformedDistribution):
            names += [type(t).__name__ for t in fn.transforms if not has_inverse(t)]
            if isinstance(fn, FlowDistribution):
                break
        elif not isinstance(fn, (Independent, ExpandedDistribution, MaskedDistribution)):
            break
        fn = fn.base_dist
    return names


def _check_invertible(guide_trace: Trace, objective: str) -> None:
    """Refuse, before the model runs, a guide that the frozen replay could not score.

    STL and DReG evaluate ``log q`` at the guide's samples with the parameters stopped: a
    replayed guide that has not seen the samples, so its transforms must invert them.
    """
    for site in _sample_sites(guide_trace):
        if site["is_observed"]:
            continue
        names = _one_way_transforms(site["fn"])
        if names:
            raise ValueError(
                f"{objective}: expected a guide whose transforms have inverses (it evaluates "
                "log q at the guide's samples with the guide's parameters stopped, by replaying "
                f"the guide, which inverts its transforms); got guide site {site['name']!r} "
                f"with {', '.join(sorted(set(names)))}, which has no inverse: use "
                "pyro.infer.Trace_ELBO or IWAE(estimator='standard'), or a flow whose "
                "transforms invert (e.g. pf.IAF, pf.NSF, pf.RealNVP)"
            )


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def log_importance_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_particles: int,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    r"""Joint log importance weights of ``num_particles`` guide draws, vectorised.

    Runs ``guide(*args, **kwargs)`` once under an outermost
    ``pyro.plate("num_particles_vectorized", K, dim=-(max_plate_nesting + 1))``, replays
    ``model(*args, **kwargs)`` against it, and returns, for each particle :math:`k`,

    .. math::

        \log w_k = \sum_{\text{model sites}} \log p(\cdot)_k
                 - \sum_{\text{guide sites}} \log q(\cdot)_k,

    each site's ``log_prob`` summed over all its plates, exactly as Pyro stores it in
    ``site["log_prob"]``: scaled (``poutine.scale``, and ``N / B`` in a subsampled plate) and
    masked. The weights are *joint* (never factorised over plates, unlike :class:`IWAE`), so
    without subsampling or scaling :math:`\frac{1}{K}\sum_k w_k` is an unbiased estimate of
    :math:`p(x)`, :math:`\operatorname{logsumexp}_k \log w_k - \log K` is :math:`\log p(x)`
    from below in expectation, and ``softmax(log_w)`` gives self-normalised importance weights.
    Subsample sites are excluded; observed sites count in the model term. Computed under
    ``torch.no_grad()``: nothing is backpropagated.

    With ``max_plate_nesting`` given, the guide runs exactly once and the model exactly once
    (replayed against it), both vectorised over the particles; with ``None`` the pair first runs
    once more, unvectorised, to guess it. The model and guide must have a static structure,
    every guide site must be sampled (no enumeration), and neither may take a keyword argument
    named ``num_particles`` or ``max_plate_nesting``.

    Args:
        model: the Pyro model.
        guide: the Pyro guide (its sample sites cover the model's latent sites).
        *args: positional arguments of both.
        num_particles: number of particles :math:`K`.
        max_plate_nesting: the deepest plate nesting in model and guide; ``None`` guesses it
            by running the pair once (unvectorised).
        **kwargs: keyword arguments of both.

    Returns:
        A tensor of shape ``(num_particles,)``.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer.objectives import log_importance_weights
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> log_importance_weights(model, guide, num_particles=4)  # q = p: all weights are 1
        tensor([0., 0., 0., 0.])
    """
    num_particles = _check_num_particles(num_particles)
    nesting = _check_max_plate_nesting(max_plate_nesting)
    if nesting == math.inf:
        nesting = _guess_max_plate_nesting(model, guide, args, kwargs)
    particles = _run_particles(model, guide, args, kwargs, num_particles, nesting)
    weights = _weights(particles, plate_aware=False)
    return _expand_particles(weights.log_w, particles).reshape(num_particles)


class _ParticleObjective(ELBO):
    """Shared machinery: argument checks, ``max_plate_nesting`` and the vectorised traces."""

    def __init__(self, num_particles: int, max_plate_nesting: int | None) -> None:
        super().__init__(
            num_particles=_check_num_particles(num_particles),
            max_plate_nesting=_check_max_plate_nesting(max_plate_nesting),
        )

    def _particles(
        self, model: Callable, guide: Callable, args, kwargs, inverting: str | None = None
    ) -> _Particles:
        if self.max_plate_nesting == math.inf:
            self.max_plate_nesting = _guess_max_plate_nesting(model, guide, args, kwargs)
        return _run_particles(
            model,
            guide,
            args,
            kwargs,
            self.num_particles,
            int(self.max_plate_nesting),
            inverting,
        )

    def _get_trace(self, model, guide, args, kwargs):
        """One vectorised (model trace, guide trace) pair over all particles."""
        particles = self._particles(model, guide, args, kwargs)
        return particles.model_trace, particles.guide_trace

    def _loss_and_surrogate(self, model, guide, args, kwargs, grad: bool):
        raise NotImplementedError

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negated bound, estimated once with ``num_particles`` particles (a float)."""
        with torch.no_grad():
            value, _ = self._loss_and_surrogate(model, guide, args, kwargs, grad=False)
        loss = -value.item()
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The negated bound as a tensor whose gradient is the estimator's."""
        value, surrogate = self._loss_and_surrogate(model, guide, args, kwargs, grad=True)
        loss = -value.detach() - (surrogate - surrogate.detach())
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The negated bound (a float); accumulates the estimator's gradient into ``.grad``."""
        value, surrogate = self._loss_and_surrogate(model, guide, args, kwargs, grad=True)
        if getattr(surrogate, "requires_grad", False):
            (-surrogate).backward(retain_graph=self.retain_graph)
        loss = -value.item()
        warn_if_nan(loss, "loss")
        return loss


class IWAE(_ParticleObjective):
    r"""The importance-weighted bound, plate-aware, with an optional DReG guide gradient.

    With :math:`K` particles :math:`z_k \sim q(z \mid x)` and weights
    :math:`w_k = p(x, z_k) / q(z_k \mid x)`,

    .. math::

        \mathcal{L}_K = \mathbb{E}\Big[\log \frac{1}{K} \sum_{k=1}^K w_k\Big]
        \le \log p(x),

    which is the ELBO at :math:`K = 1` and increases to :math:`\log p(x)` as :math:`K` grows.
    Particles are vectorised (one run of model and guide under an outermost particle plate).

    **Plates.** When every sample site of the model and of the guide lies in one common plate
    (a VAE's data plate holding local latents and observations), model and guide factorise over
    it and the weights are taken per plate element, giving the tighter

    .. math::

        \mathcal{L}_K = \sum_n \log \frac{1}{K} \sum_k w_{k,n},

    with :math:`\log w_{k,n}` summed over the sites of element :math:`n` (several common plates,
    nested, factorise jointly). Under subsampling the sites' log-densities carry the scale
    :math:`N/B`; it is divided out before the log-mean-exp and multiplied back after it, so the
    estimate is :math:`(N/B) \sum_{n \in \text{batch}} \log \frac{1}{K} \sum_k w_{k,n}`
    (likewise for a scale shared by every site, e.g. ``poutine.scale``). Otherwise (a global
    latent, or any site outside the plate) the weights are joint, summed over all sites and
    plates, as in Pyro's ``RenyiELBO``; then scales that differ between sites stay inside the
    weights as Pyro applies them.

    **Gradients.** Model parameters (a decoder) always get the gradient of :math:`\mathcal{L}_K`,
    :math:`\sum_k \tilde w_k \nabla_\theta \log p(x, z_k)` with normalised weights
    :math:`\tilde w_k = w_k / \sum_j w_j`. The guide's gradient depends on ``estimator``:

    - ``"standard"``: the gradient of :math:`\mathcal{L}_K` itself (reparameterised where the
      guide is, with a score-function term :math:`\log \hat Z \, \nabla \log q(z_k)` for sites
      that are not; no baseline). Its signal-to-noise ratio decays as :math:`K` grows.
    - ``"dreg"``: the doubly reparameterised estimator,
      :math:`\sum_k \tilde w_k^2 \, \frac{\partial \log w_k}{\partial z_k}
      \frac{\partial z_k}{\partial \phi}`, where :math:`\log q` is evaluated with
      stopped-gradient parameters so only the path through :math:`z_k` counts. Unbiased for the
      same gradient, with lower variance (zero when :math:`q` is the exact posterior); needs a
      reparameterised guide (``NotImplementedError`` otherwise). With :math:`K = 1` it is
      :class:`STL_ELBO`'s estimator. A particle whose normalised weight underflowed to 0
      contributes exactly 0 (its sampled values get a zero gradient), so a particle far in the
      tails, where a local derivative is infinite, cannot turn the gradient into ``nan``.

    **Cost.** ``loss`` and the standard estimator: one vectorised run of guide and model.
    ``"dreg"`` adds one guide and one model replay on the same draws with all parameters frozen
    (the surrogate needs :math:`\log p` once with and once without its parameter path). With a
    flow guide the replayed :math:`\log q(z)` inverts the flow: one pass per layer for coupling
    flows and MAF, ``dim`` sequential passes per layer for an :class:`~pyroflows.IAF`.

    Args:
        num_particles: the number of particles :math:`K`.
        estimator: ``"standard"`` or ``"dreg"`` (the guide's gradient estimator).
        max_plate_nesting: the deepest plate nesting in model and guide; ``None`` (the default)
            guesses it on the first call by running the pair once. The particle plate sits at
            ``dim=-(max_plate_nesting + 1)``.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016).

        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives (Tucker, Lawson,
        Gu and Maddison, 2018).

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer.objectives import IWAE
        >>> pyro.clear_param_store()
        >>> pyro.set_rng_seed(0)
        >>> def model(x):
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     loc = pyro.param("loc", torch.tensor(0.0))
        ...     pyro.sample("z", dist.Normal(loc, 1.0))
        >>> iwae = IWAE(num_particles=8, estimator="dreg", max_plate_nesting=0)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), loss=iwae)
        >>> losses = [svi.step(torch.tensor(1.0)) for _ in range(3)]
        >>> all(isinstance(loss, float) for loss in losses)
        True
        >>> pyro.clear_param_store()
    """

    def __init__(
        self,
        num_particles: int = 8,
        estimator: str = "standard",
        max_plate_nesting: int | None = None,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {ESTIMATORS}; got {estimator!r}")
        super().__init__(num_particles, max_plate_nesting)
        self.estimator = estimator

    def _loss_and_surrogate(self, model, guide, args, kwargs, grad: bool):
        inverting = "IWAE(estimator='dreg')" if grad and self.estimator == "dreg" else None
        particles = self._particles(model, guide, args, kwargs, inverting)
        weights = _weights(particles, plate_aware=True)
        log_z = _log_mean_exp(weights.log_w, particles, weights.scale)  # (1, *plates)
        value = log_z.sum()
        if not grad:
            return value, None
        if self.estimator == "standard":
            surrogate = value
            # Score-function term for guide sites that are not reparameterised: in element n,
            # the per-element bound log Z_n times d log q(z_{k,n}); Pyro's score_function is
            # already scaled, hence log Z_n / scale.
            scored = [
                site
                for site in _sample_sites(particles.guide_trace)
                if not getattr(site["fn"], "has_rsample", False)
            ]
            if scored:
                score = _reduce(
                    [{**s, "sf": s["score_parts"].score_function} for s in scored],
                    particles,
                    weights.keep,
                    key="sf",
                )
                surrogate = surrogate + (log_z.detach() / weights.scale * score).sum()
            return value, surrogate
        _check_reparameterised(particles, "IWAE(estimator='dreg')")
        w = _normalised_weights(weights.log_w, particles, weights.scale)
        _drop_zero_weight_particles(particles, w)
        model_bar = _replay_frozen(model, particles, args, kwargs)
        guide_bar = _replay_frozen(guide, particles, args, kwargs)
        log_p_bar = _reduce(_sample_sites(model_bar), particles, weights.keep)
        log_q_bar = _reduce(_sample_sites(guide_bar), particles, weights.keep)
        # theta: sum_k w_k d log p / d theta (log_p's parameter path, weights w).
        # phi, through z only: sum_k w_k^2 d log w_k / dz dz/dphi; log_p's z-path carries w, so
        # the frozen model adds (w^2 - w), and the frozen guide gives -w^2 d log q / dz.
        surrogate = (
            (w * weights.log_p).sum() + ((w * w - w) * log_p_bar).sum() - (w * w * log_q_bar).sum()
        )
        return value, surrogate


class STL_ELBO(_ParticleObjective):
    r"""The ELBO with the sticking-the-landing (path-only) guide gradient.

    The bound is the usual evidence lower bound, estimated with :math:`K` vectorised particles,

    .. math::

        \mathcal{L} = \frac{1}{K} \sum_{k=1}^K \big[\log p(x, z_k) - \log q(z_k \mid x)\big],
        \qquad z_k = z(\epsilon_k; \phi),

    with Pyro's scales and masks, so its value and its plate handling are those of
    ``Trace_ELBO`` (no factorisation question arises for the ELBO). Model parameters get the
    ELBO's gradient. The guide's gradient drops the score term
    :math:`-\mathbb{E}[\nabla_\phi \log q_\phi(z)] = 0`: :math:`\log q` is evaluated with
    stopped-gradient parameters, leaving
    :math:`\frac{1}{K}\sum_k \frac{\partial}{\partial z}[\log p(x, z) - \log q(z)]_{z_k}
    \frac{\partial z_k}{\partial \phi}`, which is unbiased and exactly zero when :math:`q` is
    the posterior. Needs a reparameterised guide (``NotImplementedError`` otherwise).

    Cost: one vectorised run of guide and model, plus one guide replay with frozen parameters;
    with a flow guide the replay inverts the flow (one pass per layer for coupling flows and
    MAF, ``dim`` sequential passes per layer for an :class:`~pyroflows.IAF`).

    Args:
        num_particles: the number of particles :math:`K`.
        max_plate_nesting: the deepest plate nesting in model and guide; ``None`` (the default)
            guesses it on the first call by running the pair once.

    References:
        Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        Inference (Roeder, Wu and Duvenaud, 2017).

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows.infer.objectives import STL_ELBO
        >>> pyro.clear_param_store()
        >>> pyro.set_rng_seed(0)
        >>> def model():
        ...     pyro.sample("z", dist.Normal(1.0, 0.5))
        >>> def guide():  # the exact posterior: the STL gradient is exactly zero
        ...     loc = pyro.param("loc", torch.tensor(1.0))
        ...     pyro.sample("z", dist.Normal(loc, 0.5))
        >>> STL_ELBO(num_particles=4).loss_and_grads(model, guide) == 0.0
        True
        >>> pyro.param("loc").unconstrained().grad
        tensor(0.)
        >>> pyro.clear_param_store()
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int | None = None) -> None:
        super().__init__(num_particles, max_plate_nesting)

    def _loss_and_surrogate(self, model, guide, args, kwargs, grad: bool):
        particles = self._particles(model, guide, args, kwargs, "STL_ELBO" if grad else None)
        keep = (particles.particle_dim,)
        log_p = _reduce(_sample_sites(particles.model_trace), particles, keep)
        log_q = _reduce(_sample_sites(particles.guide_trace), particles, keep)
        value = _expand_particles(log_p - log_q, particles).sum() / self.num_particles
        if not grad:
            return value, None
        _check_reparameterised(particles, "STL_ELBO")
        guide_bar = _replay_frozen(guide, particles, args, kwargs)
        log_q_bar = _reduce(_sample_sites(guide_bar), particles, keep)
        surrogate = _expand_particles(log_p - log_q_bar, particles).sum() / self.num_particles
        return value, surrogate
