"""Flow guides for Pyro: an automatic guide over all latent sites, and amortised posteriors.

:class:`AutoFlowGuide` is an ``AutoContinuous`` guide (Pyro's packing of every latent site into
one unconstrained vector, its plates, ``Predictive`` compatibility) whose posterior is a
normalizing flow followed by a learnable Gaussian affine map. It starts at the ``init_loc_fn``
location with scale ``init_scale`` (1 by default) rather than at ``N(0, I)`` as Pyro's
``AutoNormalizingFlow`` does; it initialises models with improper flat priors, which cannot be
sampled; and :meth:`AutoFlowGuide.warm_start` moves it to a MAP or Laplace approximation, for
badly scaled, strongly correlated posteriors (on :func:`~pyroflows.infer.fit_svi`'s fast path
this happens by itself when it helps: ``laplace="auto"``).

:class:`AmortizedFlow` pairs an encoder with a conditional flow, ``q(z | x) = flow(encoder(x))``,
for VAEs and other amortised posteriors.

**Which flow to choose.**

* ``"iaf"`` (default): sampling is one pass per layer and the guide scores its own samples for
  free (no inversion), which is all that ELBO training and ``Predictive`` need. The flow for VI.
* ``"realnvp"`` / ``"nsf"`` (coupling layers): both directions are one pass per layer, so they
  are as fast as IAF in VI and can also score arbitrary points cheaply (e.g. importance weights of
  other proposals). NSF's splines fit skewed and multimodal marginals better; RealNVP is cheaper.
  Coupling needs at least two latent dimensions (NSF falls back to an autoregressive spline).
* ``"maf"``: density evaluation is one pass, but sampling costs ``latent_dim`` sequential passes
  per layer; every SVI step samples, so MAF is slow for VI beyond a few dozen dimensions. Choose
  it only when you need the guide's density at points it did not sample.
* ``"nice"`` (additive coupling, volume-preserving but for a final scaling) and ``"linear"``
  (LU-linear maps with elementwise sinh-arcsinh layers: skewed, heavy- or light-tailed
  Gaussians) are cheaper still and less flexible.

Any vector builder registered with :func:`pyroflows.flows.register_builder` is accepted by name
too; image flows (``"glow"``, ``"image_realnvp"``) are refused.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import LowerCholeskyAffine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import biject_to, transform_to
from torch.distributions.transforms import AffineTransform, ComposeTransform, Transform

from .._checks import check_nonnegative_int
from ..flows import BUILDERS, Flow, vector_builders
from ..transforms import ActNorm
from .objectives import STL_ELBO

__all__ = [
    "FLOWS",
    "AmortizedFlow",
    "AutoFlowGuide",
    "WarmStart",
    "init_to_unconstrained_zero",
]

#: The built-in names ``AutoFlowGuide(flow=NAME)`` accepts: the vector builders of
#: :data:`pyroflows.flows.BUILDERS` (builders registered later are accepted too).
FLOWS = tuple(vector_builders())
#: The built-in flows whose inverse (what STL and DReG need) is an iterative solve.
NUMERICAL_FLOWS = ("naf", "bnaf", "residual", "sylvester", "cnf")
COVARIANCES = ("auto", "full", "diagonal")
#: ``covariance="auto"`` keeps a full lower-Cholesky factor up to this many latent dimensions
#: (its cost per sample is O(latent_dim²)), a diagonal scale beyond.
FULL_COVARIANCE_MAX_DIM = 200
#: guide draws of each ELBO estimate that ``laplace="auto"`` compares
LAPLACE_DRAWS = 256
#: particles per step of the default objective (:meth:`AutoFlowGuide.default_loss`)
DEFAULT_PARTICLES = 16
#: the default objective of an IAF guide is sticking-the-landing up to this many latent
#: dimensions (its gradient inverts the flow: ``latent_dim`` sequential passes per layer)
STL_SEQUENTIAL_MAX_DIM = 3
_UNSAMPLED = "_pyroflows_unsampled"


# -- initialisation -------------------------------------------------------------------------------
def init_to_unconstrained_zero(
    site: dict | None = None, *, device: torch.device | str | None = None
) -> Any:
    """Initialise a site at zero in unconstrained space, without sampling from it.

    Pyro's ``init_to_feasible`` does the same but draws a sample first to learn the shape, which
    improper priors (``pyro.distributions.ImproperUniform``) cannot give. Here the shape is the
    distribution's ``batch_shape + event_shape``, mapped to unconstrained space with the
    constraint's ``inverse_shape``. The value is ``biject_to(support)(0)``: 0 on the real line,
    1 for positive sites, the midpoint of an interval, the uniform point of a simplex.

    The distribution holds no tensor to say where the value should live, so it is created on
    ``device`` (torch's default device when ``None``) in the default dtype and marked;
    :class:`AutoFlowGuide` passes the device of the model's first floating-point tensor
    argument, and moves its parameters to the device of the model's other values or data.

    Args:
        site: a Pyro sample site (``None`` returns the function itself, as Pyro's strategies do).
        device: where to create the value.

    Example:
        >>> import pyro.distributions as dist
        >>> from torch.distributions import constraints
        >>> from pyroflows.infer.guides import init_to_unconstrained_zero
        >>> d = dist.ImproperUniform(constraints.positive, (), (3,))
        >>> init_to_unconstrained_zero({"name": "s", "fn": d})
        tensor([1., 1., 1.])
    """
    if site is None:
        return init_to_unconstrained_zero
    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
    value = transform(torch.zeros(shape, device=device))
    value._pyro_custom_init = False
    setattr(value, _UNSAMPLED, True)
    return value


def _without_sampling_failures(
    init_fn: Callable, device: Callable[[], torch.device | None] = lambda: None
) -> Callable:
    """``init_fn``, falling back to :func:`init_to_unconstrained_zero` (on ``device()``) where a
    site cannot be sampled (``ImproperUniform.sample`` raises ``NotImplementedError``, which
    Pyro's strategies do not catch: its ``init_to_median`` falls back to ``init_to_feasible``,
    which samples)."""

    @functools.wraps(init_fn)
    def init(site: dict | None = None) -> Any:
        if site is None:
            return init
        try:
            return init_fn(site)
        except NotImplementedError:
            return init_to_unconstrained_zero(site, device=device())

    return init


def _reference_tensor(values: Sequence[torch.Tensor], args: tuple, kwargs: dict):
    """A tensor whose device (and dtype) the guide should adopt: a sampled init value if any,
    else the model's first floating-point tensor argument, else ``None``."""
    for v in values:
        if not getattr(v, _UNSAMPLED, False):
            return v
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


def _prototype_location(guide: AutoContinuous, args: tuple, kwargs: dict) -> torch.Tensor:
    """Set up ``guide``'s prototype (``AutoContinuous``) and return its ``init_loc_fn`` location,
    shape ``(latent_dim,)``, on the device and dtype of the model's sampled values (or, for
    improper priors, of its data)."""
    # Values of sites that cannot be sampled (improper priors) follow the data's device.
    arg = _reference_tensor((), args, kwargs)
    guide._arg_device = None if arg is None else arg.device
    AutoContinuous._setup_prototype(guide, *args, **kwargs)
    sites = [s["value"] for _, s in guide.prototype_trace.iter_stochastic_nodes()]
    loc = guide._init_loc()
    ref = _reference_tensor(sites, args, kwargs)
    if ref is not None:
        loc = loc.to(device=ref.device, dtype=torch.promote_types(loc.dtype, ref.dtype))
    return loc


def _full_covariance(covariance: str, dim: int) -> bool:
    """Whether ``covariance`` (``"full"``, ``"diagonal"``, ``"auto"``) means a full factor."""
    return covariance == "full" or (covariance == "auto" and dim <= FULL_COVARIANCE_MAX_DIM)


# -- flows ----------------------------------------------------------------------------------------
def _build_flow(
    flow: str | Flow | Callable[[int], Flow],
    dim: int,
    layers: int,
    hidden: Sequence[int],
    flow_kwargs: dict,
) -> Flow:
    if isinstance(flow, str):
        built = _named_flow(flow, dim, layers, hidden, flow_kwargs)
    else:
        built = flow if isinstance(flow, nn.Module) else flow(dim)
    if not isinstance(built, nn.Module):
        raise TypeError(f"flow: expected callable(dim) to return a Flow; got {type(built)}")
    if getattr(built, "dim", dim) != dim:
        raise ValueError(f"flow: expected a flow over {dim} latent dimensions; got {built.dim}")
    if getattr(built, "context_dim", 0):
        raise ValueError(
            f"flow: expected an unconditional flow (context_dim=0); got context_dim="
            f"{built.context_dim} (use AmortizedFlow for conditional posteriors)"
        )
    d = built()
    if not isinstance(d, dist.TransformedDistribution) or d.event_shape != (dim,):
        raise ValueError(
            f"flow: expected a flow whose distribution is a TransformedDistribution with event "
            f"shape ({dim},); got {type(d).__name__} with event shape {tuple(d.event_shape)}"
        )
    _declare_actnorm(built)
    return built


def _check_flow_name(name: str) -> None:
    builders = vector_builders()
    if name in builders:
        return
    expected = f"flow: expected one of {tuple(builders)}, a Flow or a callable; got {name!r}"
    if name in BUILDERS:
        raise ValueError(
            f"{expected}, an image flow (its first argument is shape=(C, H, W)); a guide's flow "
            "acts on the vector of all latent values"
        )
    raise ValueError(expected)


def _named_flow(name: str, dim: int, layers: int, hidden: Sequence[int], flow_kwargs: dict) -> Flow:
    """``BUILDERS[name](dim, ...)``, with ``layers`` and ``hidden`` where the builder takes them."""
    cls = vector_builders()[name]
    takes = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "layers" in takes:
        kwargs["layers"] = layers
    if "hidden" in takes:
        kwargs["hidden"] = hidden
    if "actnorm" in takes:
        # off: in VI there is no data batch to initialise it from (see _declare_actnorm)
        kwargs["actnorm"] = False
    # A guide samples (and scores its own samples): the sampling direction is to be one pass.
    if "fast" in takes:
        kwargs["fast"] = "sampling"
    if "autoregressive" in takes and dim < 2:
        kwargs["autoregressive"] = True  # one latent dimension cannot be split for coupling
    kwargs.update(flow_kwargs)
    try:
        return cls(dim, **kwargs)
    except ValueError as err:
        raise ValueError(
            f"flow={name!r} cannot be built over this model's {dim} latent dimension"
            f"{'s' if dim != 1 else ''}: {err}"
            + (" (use flow='iaf', 'maf' or 'nsf')" if dim < 2 else "")
        ) from None


def _declare_actnorm(flow: nn.Module) -> None:
    """Declare uninitialised ActNorm layers initialised, at the identity.

    ActNorm standardises the first batch it sees. In a guide that would be whatever batch of
    posterior samples happens to come first, possibly after training (``sample_posterior``), which
    would silently change the trained guide.
    """
    for m in flow.modules():
        if isinstance(m, ActNorm) and not bool(m.initialized):
            state = m.state_dict()
            state["initialized"] = torch.ones_like(state["initialized"])
            m.load_state_dict(state)


# -- the guide ------------------------------------------------------------------------------------
@dataclass
class WarmStart:
    """What :meth:`AutoFlowGuide.warm_start` found.

    Attributes:
        loc: the MAP point in unconstrained space, shape ``(latent_dim,)``.
        scale_tril: lower Cholesky factor of the Laplace covariance ``H⁻¹``, shape
            ``(latent_dim, latent_dim)`` (diagonal when the Hessian was not positive definite);
            ``None`` for ``method="map"``.
        log_density: ``log p(x, z)`` at ``loc`` in unconstrained space (Jacobians included).
        grad_norm: norm of its gradient at ``loc`` (near 0 when the optimiser converged).
        diagonal_fallback: the Hessian was not positive definite and only its diagonal was used.
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor | None
    log_density: float
    grad_norm: float
    diagonal_fallback: bool = False


class AutoFlowGuide(AutoContinuous):
    """A normalizing-flow posterior over all latent sites, started at ``init_loc_fn``.

    Every latent site is mapped to unconstrained space and packed into one vector
    ``z ∈ R^latent_dim`` (Pyro's ``AutoContinuous``). The posterior over it is

    ``z = m + A · (loc + diag(scale) · U · f(ε))``,  ``ε ~ N(0, I)``,

    where ``f`` is a flow (the identity at initialisation: its conditioners are zero-initialised),
    ``loc``, ``scale > 0`` (per dimension) and ``U`` (unit lower-triangular; absent for a
    diagonal covariance) are learnt, and ``(m, A)`` is a fixed reference affine map: ``m`` the
    ``init_loc_fn`` location and ``A = I`` at first, the MAP point and Laplace Cholesky factor
    after :meth:`warm_start`. The guide starts as ``N(m, init_scale² I)``, not at ``N(0, I)`` as
    Pyro's ``AutoNormalizingFlow``: the same
    distribution as a flow on a learnable affine base ``N(m, init_scale² I)``, which it is while
    the flow is the identity. The Gaussian map comes after the flow and the learnt parameters
    live in the reference's coordinates, so after a warm start both the optimiser and the flow
    work in standardised units, however badly scaled and correlated the model:
    the flow only learns what is not Gaussian. :meth:`gaussian` returns the current Gaussian map.

    ``log q`` of the guide's own samples costs no inversion for IAF, RealNVP and NSF (each
    transform caches its last pair). The learnt scale is ``exp`` of its unconstrained value
    (``constraints.positive``), so that Adam's steps are relative and a scale travels from
    ``init_scale`` to a posterior sd orders of magnitude away in a few hundred steps.
    Parameters are Pyro parameters, created on the first call on the device and dtype of the
    model's initial values (or, for improper priors, of the model's data): ``AutoFlowGuide.loc``,
    ``.scale``, ``.scale_tril``, the reference ``.ref_loc`` and ``.ref_scale`` (used detached,
    so no optimiser moves them; stored so that ``pyro.get_param_store().save`` keeps a warm
    start) and the flow's, under ``AutoFlowGuide.flow``. After ``pyro.get_param_store().load``,
    a new guide computes with the loaded flow tensors (unlike a plain ``pyro.module`` call).

    ``median`` and ``quantiles`` are per-coordinate empirical quantiles of ``num_samples`` draws
    (a flow has no closed form), mapped to constrained space; ``sample_posterior`` draws constrained
    values of every latent site.

    Args:
        model: a Pyro model; its latent sites must be continuous with fixed shapes. Global latents
            may sit in plates (``with pyro.plate("groups", 3): pyro.sample(...)``).
        flow: the name of a vector builder of :data:`pyroflows.flows.BUILDERS`: ``"iaf"``
            (default), ``"maf"``, ``"nsf"``, ``"realnvp"``, ``"nice"``, ``"linear"``, the
            flows with numerical inverses ``"naf"``, ``"bnaf"``, ``"residual"``,
            ``"sylvester"``, or the continuous ``"cnf"`` (an ODE solve per step: 15-20x an
            IAF's cost; best on curved posteriors, worst on funnels; see the module notes on
            which to choose) or one registered with
            :func:`~pyroflows.flows.register_builder`; an unconditional
            :class:`~pyroflows.flows.Flow` with ``dim == latent_dim``; or a callable
            ``dim -> Flow``.
        layers: number of flow layers of a named flow (if its builder takes ``layers``). The
            default, 5, halved the gap of 3 layers on the curved targets of
            ``benchmarks/vi.py`` (banana, d=2 and 10) at equal steps.
        hidden: hidden widths of each conditioner of a named flow (if its builder takes
            ``hidden``). Named flows are built without ActNorm (``actnorm=False``).
        init_loc_fn: Pyro init strategy for the initial location (``init_to_median``,
            ``init_to_value(values=...)``, ...). Sites that cannot be sampled (improper priors)
            fall back to :func:`init_to_unconstrained_zero`, whatever the strategy.
        init_scale: initial standard deviation of every unconstrained coordinate. The default,
            1, was measured against 0.1 (Pyro's Gaussian autoguides' start, and this guide's
            before pyroflows 0.3): a narrow start left reverse KL in a narrow optimum on every
            target of ``benchmarks/vi.py`` (gaps 2-6x larger at 2000 steps). ``init_loc_fn``
            defaults to Pyro's ``init_to_median`` (the median of 15 prior draws,
            so random: pass ``init_to_feasible`` or ``init_to_value`` for a fixed start).
        covariance: ``"full"`` (learnable unit lower-triangular ``U``), ``"diagonal"`` or
            ``"auto"`` (full up to ``FULL_COVARIANCE_MAX_DIM`` = 200 latent dimensions).
        laplace: the start of the first fit on :func:`~pyroflows.infer.fit_svi`'s fast path.
            ``"auto"`` (default): a Laplace warm start (:meth:`warm_start`) is tried and kept
            when its ELBO, estimated with ``LAPLACE_DRAWS`` draws, beats the default start's
            (badly scaled, strongly correlated posteriors: regressions on un-centred
            covariates, flat priors), and dropped otherwise (no finite mode, as in Neal's
            funnel; a narrow mode; a failed search); ``True``: always (an error if it fails);
            ``False``: never. It runs once per guide (not again on a second ``fit_svi``, nor
            on the traced path; call :meth:`warm_start` yourself there).
        **flow_kwargs: further arguments of the named flow's builder (``bins``, ``mixing``, ...).

    References:
        Variational Inference with Normalizing Flows (Rezende and Mohamed, 2015).
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma, Salimans,
        Jozefowicz, Chen, Sutskever and Welling, 2016).
        Automatic Differentiation Variational Inference (Kucukelbir, Tran, Ranganath, Gelman and
        Blei, 2017), as implemented in Pyro's ``pyro.infer.autoguide``.

    Example:
        >>> import pyro, torch
        >>> import pyro.distributions as dist
        >>> from pyroflows.infer.guides import AutoFlowGuide
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> pyro.clear_param_store()  # no other guide's parameters under the same names
        >>> pyro.set_rng_seed(0)
        >>> y = 3.0 + torch.randn(20)
        >>> guide = AutoFlowGuide(model, flow="iaf", layers=2, hidden=(16,))
        >>> optim = pyro.optim.Adam({"lr": 0.02})
        >>> svi = pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())
        >>> for _ in range(200):
        ...     _ = svi.step(y)
        >>> guide.sample_posterior(1000, y)["mu"].shape
        torch.Size([1000])
    """

    def __init__(
        self,
        model: Callable,
        flow: str | Flow | Callable[[int], Flow] = "iaf",
        layers: int = 5,
        hidden: Sequence[int] = (64, 64),
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 1.0,
        covariance: str = "auto",
        laplace: bool | str = "auto",
        **flow_kwargs: Any,
    ) -> None:
        if isinstance(flow, str):
            _check_flow_name(flow)
        elif not callable(flow):
            raise TypeError(f"flow: expected a name, a Flow or a callable(dim); got {type(flow)}")
        elif flow_kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(flow_kwargs)} for a given flow")
        if (
            isinstance(init_scale, bool)
            or not isinstance(init_scale, numbers.Real)
            or not init_scale > 0
            or not math.isfinite(init_scale)
        ):
            raise ValueError(f"init_scale: expected a positive number; got {init_scale!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance: expected one of {COVARIANCES}; got {covariance!r}")
        if laplace not in (True, False, "auto"):
            raise ValueError(f"laplace: expected True, False or 'auto'; got {laplace!r}")
        self._laplace = laplace
        self._started = False  # the fast path decided the start (laplace) once
        self._flow_spec = (flow,)  # a tuple: a Flow instance registers only once built
        self._layers = layers
        self._hidden = tuple(hidden)
        self._flow_kwargs = flow_kwargs
        self._init_scale = float(init_scale)
        self._covariance = covariance
        self._raw_model = (model,)  # a tuple, so that an nn.Module model is not registered
        self._arg_device: torch.device | None = None
        init = _without_sampling_failures(init_loc_fn, lambda: self._arg_device)
        super().__init__(model, init_loc_fn=init)

    # -- structure ---------------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs) -> None:
        loc = _prototype_location(self, args, kwargs)
        dim = self.latent_dim
        self.full_covariance = _full_covariance(self._covariance, dim)
        # The reference affine (ref_loc, ref_scale): fixed during training (used detached), set
        # by warm_start; parameters, not buffers, so that the param store saves them.
        self.ref_loc = nn.Parameter(loc)
        self.ref_scale = nn.Parameter(
            torch.eye(dim, dtype=loc.dtype, device=loc.device)
            if self.full_covariance
            else torch.ones_like(loc)
        )
        self.loc = nn.Parameter(torch.zeros_like(loc))
        self.scale = PyroParam(torch.full_like(loc, self._init_scale), constraints.positive)
        if self.full_covariance:
            eye = torch.eye(dim, dtype=loc.dtype, device=loc.device)
            self.scale_tril = PyroParam(eye, constraints.unit_lower_cholesky)
        flow = _build_flow(self._flow_spec[0], dim, self._layers, self._hidden, self._flow_kwargs)
        self.flow = flow.to(device=loc.device, dtype=loc.dtype)

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian map ``u -> shift + factor @ u`` applied after the flow.

        Returns:
            ``(shift, factor)``: shapes ``(latent_dim,)`` and ``(latent_dim, latent_dim)`` (lower
            triangular) for a full covariance, ``(latent_dim,)`` (a diagonal) otherwise. While
            the flow is the identity, the guide is ``N(shift, factor factorᵀ)``.
        """
        ref_loc, ref_scale = self.ref_loc.detach(), self.ref_scale.detach()
        if self.full_covariance:
            shift = ref_loc + ref_scale @ self.loc
            return shift, ref_scale @ (self.scale[..., None] * self.scale_tril)
        return ref_loc + ref_scale * self.loc, ref_scale * self.scale

    def _affine(self) -> Transform:
        # cache_size=1: scoring a sample returns the flow's own output object, so the flow's
        # transforms hit their caches instead of inverting (IAF's inverse is sequential).
        shift, factor = self.gaussian()
        if self.full_covariance:
            return LowerCholeskyAffine(shift, factor, cache_size=1)
        return AffineTransform(shift, factor, event_dim=1, cache_size=1)

    def get_base_dist(self) -> dist.Distribution:
        """The flow's base distribution (``N(0, I)`` for the named flows)."""
        return self.flow.base(None)

    def get_transform(self, *args, **kwargs) -> Transform:
        """The flow's transforms followed by the Gaussian map ``u -> loc + L u``."""
        return ComposeTransform([*self._flow_dist().transforms, self._affine()])

    def get_posterior(self, *args, **kwargs) -> dist.TransformedDistribution:
        """The posterior over the packed unconstrained latent, event shape ``(latent_dim,)``."""
        d = self._flow_dist()
        return dist.TransformedDistribution(d.base_dist, [*d.transforms, self._affine()])

    def _flow_dist(self) -> dist.TransformedDistribution:
        flow = self.flow
        if self._pyro_context.active:
            # PyroModule registers a plain submodule with update_module_params=False: after
            # pyro.get_param_store().load(...), the flow would compute with its own fresh tensors
            # while SVI optimised the loaded ones. Swap the param store's tensors in.
            name = self._pyro_get_fullname("flow")
            _check_store_shapes(name, flow)
            pyro.module(name, flow, update_module_params=True)
            self._adopt_store_tensors()
        return flow()

    def _adopt_store_tensors(self) -> None:
        # PyroModule swaps the store's tensors in for PyroParams (scale, scale_tril) but not for
        # plain nn.Parameters: after pyro.get_param_store().load(...), or on a store holding a
        # previous guide's values, loc/ref_loc/ref_scale would compute with the module's own
        # tensors while the store (and the optimiser) hold others. Adopt the store's.
        store = pyro.get_param_store()
        for name in ("loc", "ref_loc", "ref_scale"):
            own = self._parameters.get(name)
            stored = store._params.get(self._pyro_get_fullname(name))
            if own is None or stored is None or stored is own or stored.shape != own.shape:
                continue
            if not isinstance(stored, nn.Parameter):
                fullname = self._pyro_get_fullname(name)
                stored = nn.Parameter(stored)
                store._params[fullname] = stored
                store._param_to_name[stored] = fullname
            nn.Module.__setattr__(self, name, stored)

    # -- the fast reverse-KL path ------------------------------------------------------------------
    def _reverse_kl(
        self, log_p: Callable[[torch.Tensor], torch.Tensor], num_particles: int, objective: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One estimate of the objective on ``num_particles`` reparameterised draws of the packed
        latent, for :mod:`pyroflows.infer.fast`.

        Returns ``(value, surrogate)``: the loss (``-ELBO``, or ``-`` the IWAE bound for
        ``"iwae"``/``"dreg"``) and a 0-d tensor whose gradient is the estimator's: the ELBO's
        (``"elbo"``), its path-only part (``"stl"``: ``log q`` scored at the detached draws, so
        the score term cancels), the IWAE bound's (``"iwae"``) or the doubly reparameterised one
        (``"dreg"``: squared normalised weights on the path-only gradients). ``"stl"`` and
        ``"dreg"`` score the detached draws with the flow's inverse (one pass per coupling layer,
        ``latent_dim`` sequential passes per IAF layer).
        """
        q = self.get_posterior()
        z = q.rsample((num_particles,))
        log_p_z = log_p(z)
        log_w = log_p_z - q.log_prob(z)
        if objective in ("stl", "dreg"):
            path = log_w + q.log_prob(z.detach())  # the gradient of log w through z only
        if objective == "elbo":
            value = -log_w.mean()
            return value, value
        if objective == "stl":
            return -log_w.mean(), -path.mean()
        value = math.log(num_particles) - torch.logsumexp(log_w, dim=0)
        if objective == "iwae":
            return value, value
        if objective == "dreg":
            w = torch.softmax(log_w.detach(), dim=0)
            return value, -(w * w * path).sum()
        raise ValueError(f"objective: expected 'elbo', 'stl', 'iwae' or 'dreg'; got {objective!r}")

    def default_loss(self) -> pyro.infer.ELBO:
        """The objective :func:`~pyroflows.infer.fit_svi` trains this guide with by default.

        With ``DEFAULT_PARTICLES`` (16) particles per step: :class:`~pyroflows.infer.STL_ELBO`
        (sticking-the-landing: the score term dropped, so the gradient's variance vanishes as
        the guide approaches the posterior) when scoring the guide's detached draws is cheap,
        i.e. for flows whose inverse is one pass (coupling flows, MAF, ``"linear"``) and for an
        IAF over at most ``STL_SEQUENTIAL_MAX_DIM`` (3) latent dimensions; Pyro's ``Trace_ELBO``
        (vectorised) for a larger IAF, whose inverse costs ``latent_dim`` sequential passes per
        layer. Measured on one CPU thread for the default 5-layer IAF: an STL step costs 1.6x an
        ELBO step at 2 latent dimensions, 2.8x at 4 and 5.4x at 10, while halving the gap at
        equal steps (``benchmarks/README.md``). Pass ``loss=pf.infer.STL_ELBO(16)`` to buy the
        lower gap with time in more dimensions. Before the guide is set up (``latent_dim``
        unknown) an IAF gets the ELBO.
        """
        flow = getattr(self, "flow", None)
        modules = list(flow.modules()) if flow is not None else []
        sequential = self._flow_spec[0] == "iaf" or any(
            getattr(m, "orientation", None) == "iaf" for m in modules
        )
        # Scoring detached draws inverts the flow: an iterative solve (NAF, BNAF, residual,
        # planar/radial/Sylvester, continuous flows) costs tens of passes per step, so those
        # train with the ELBO, which scores the draws from the flow's cache.
        numerical = self._flow_spec[0] in NUMERICAL_FLOWS or any(
            getattr(m, "inverse_kind", None) == "numerical" for m in modules
        )
        if numerical or (
            sequential and getattr(self, "latent_dim", math.inf) > STL_SEQUENTIAL_MAX_DIM
        ):
            return pyro.infer.Trace_ELBO(num_particles=DEFAULT_PARTICLES, vectorize_particles=True)
        return STL_ELBO(num_particles=DEFAULT_PARTICLES)

    @torch.no_grad()
    def _elbo(self, log_p: Callable[[torch.Tensor], torch.Tensor], draws: int) -> float:
        q = self.get_posterior()
        z = q.sample((draws,))
        log_w = log_p(z) - q.log_prob(z)
        return float(log_w.mean()) if bool(torch.isfinite(log_w).all()) else -math.inf

    def _start(self, log_p: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
        """The automatic start of the fast path (``laplace``), once per guide: returns what it
        did, for the fit's message, or ``None``."""
        if self._started or self._laplace is False:
            return None
        self._started = True
        with torch.no_grad():  # trained (or loaded) parameters are not started again
            fresh = not self.loc.any() and torch.allclose(
                self.scale, torch.full_like(self.scale, self._init_scale)
            )
        if not fresh:
            return None
        names = ["ref_loc", "ref_scale", "loc", "scale_unconstrained"]
        names += ["scale_tril_unconstrained"] if self.full_covariance else []
        kept = {name: getattr(self, name).detach().clone() for name in names}
        before = self._elbo(log_p, LAPLACE_DRAWS)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.warm_start(log_density=lambda z: log_p(z[None])[0])
        except ValueError as err:
            if self._laplace is True:
                raise
            return f"Laplace start not used ({str(err).splitlines()[0]})"
        after = self._elbo(log_p, LAPLACE_DRAWS)
        if self._laplace is True or after > before:
            return f"Laplace start: ELBO {after:.4g} (default start {before:.4g})"
        with torch.no_grad():
            for name, value in kept.items():
                getattr(self, name).copy_(value)
        return f"Laplace start not used: ELBO {after:.4g} (default start {before:.4g})"

    # -- summaries ---------------------------------------------------------------------------------
    def _ensure_prototype(self, args: tuple, kwargs: dict) -> None:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draw constrained posterior samples of every latent site.

        Args:
            num_samples: number of draws.
            *args: the model's positional arguments (needed only before the first call).
            **kwargs: the model's keyword arguments (likewise).

        Returns:
            A dict from site name to a tensor of shape ``(num_samples, *site_shape)``.
        """
        self._ensure_prototype(args, kwargs)
        latent = self.get_posterior().sample((num_samples,))
        return self._constrain(latent)

    def _constrain(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unpack ``(n, latent_dim)`` latents into constrained ``(n, *site_shape)`` values."""
        n = latent.shape[0]
        # _unpack_latent broadcasts batch dims against plate dims: put the batch left of them.
        nesting = max(
            (-f.dim for stack in self._cond_indep_stacks.values() for f in stack), default=0
        )
        latent = latent.reshape((n,) + (1,) * nesting + latent.shape[-1:])
        return {
            site["name"]: biject_to(site["fn"].support)(u).reshape((n, *site["value"].shape))
            for site, u in self._unpack_latent(latent)
        }

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args, num_samples: int = 4096, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Per-coordinate posterior quantiles, estimated from ``num_samples`` draws.

        Quantiles are taken per unconstrained coordinate and mapped to constrained space, which
        gives the constrained marginal quantiles for elementwise monotone constraints (real,
        positive, intervals), as in Pyro's Gaussian autoguides. The Monte Carlo error of a
        quantile is about ``sqrt(p (1 - p) / num_samples) / density``, i.e. 0.02 posterior
        standard deviations for the median of a near-Gaussian marginal at the default.

        Args:
            quantiles: levels in ``(0, 1)``, shape ``(q,)``.
            num_samples: number of posterior draws.
            *args: the model's positional arguments (needed only before the first call).
            **kwargs: the model's keyword arguments (likewise).

        Returns:
            A dict from site name to a tensor of shape ``(q, *site_shape)``.
        """
        self._ensure_prototype(args, kwargs)
        latent = self.get_posterior().sample((num_samples,))
        levels = torch.as_tensor(quantiles, dtype=latent.dtype, device=latent.device)
        if levels.dim() != 1 or not ((levels > 0) & (levels < 1)).all():
            raise ValueError(f"quantiles: expected a list of levels in (0, 1); got {quantiles!r}")
        return self._constrain(torch.quantile(latent, levels, dim=0))

    @torch.no_grad()
    def median(self, *args, num_samples: int = 4096, **kwargs) -> dict[str, torch.Tensor]:
        """Per-coordinate posterior medians, estimated from ``num_samples`` draws.

        See :meth:`quantiles`. Returns a dict from site name to a tensor of the site's shape.
        """
        result = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {name: value[0] for name, value in result.items()}

    # -- warm start --------------------------------------------------------------------------------
    def log_density(self, latent: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``log p(x, z)`` of the model at a packed unconstrained latent ``z``, Jacobians included.

        Args:
            latent: shape ``(latent_dim,)``.
            *args: the model's positional arguments.
            **kwargs: the model's keyword arguments.

        Returns:
            A scalar tensor, differentiable with respect to ``latent``.
        """
        self._ensure_prototype(args, kwargs)
        values = {}
        log_det = latent.new_zeros(())
        for site, u in self._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(u)
            log_det = log_det + transform.log_abs_det_jacobian(u, value).sum()
            values[site["name"]] = value
        conditioned = poutine.condition(self._raw_model[0], data=values)
        trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        return trace.log_prob_sum() + log_det

    def warm_start(
        self,
        *args,
        method: str = "laplace",
        steps: int = 500,
        optim: str = "lbfgs",
        lr: float | None = None,
        newton_steps: int = 10,
        log_density: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> WarmStart:
        """Move the Gaussian part of the guide to the MAP point (and Laplace covariance).

        Maximises ``log p(x, z)`` over the unconstrained latent ``z`` from the guide's current
        centre (by L-BFGS with a strong-Wolfe line search, or Adam), then polishes the point with
        a few Newton steps (affine invariant, so badly scaled, strongly correlated posteriors,
        where L-BFGS in float32 stalls, still reach the mode; linear algebra in float64), sets
        the guide's centre to the maximiser and,
        for ``method="laplace"``, sets ``L`` to the Cholesky factor of ``H⁻¹``, where
        ``H = -∇² log p(x, z)`` (``torch.autograd.functional.hessian``, ``latent_dim``
        gradient evaluations). A diagonal-covariance guide takes the Laplace marginal standard
        deviations. If ``H`` is not positive definite, only its diagonal is used (coordinates with
        a non-positive curvature keep their scale) and a warning says so. The flow layers are not
        touched: call this before training, while they are the identity, and train from there.

        Args:
            *args: the model's positional arguments.
            **kwargs: the model's keyword arguments.
            method: ``"laplace"`` (location and covariance) or ``"map"`` (location only).
            steps: maximum number of optimiser iterations.
            optim: ``"lbfgs"`` (deterministic models) or ``"adam"`` (models whose log density is
                stochastic, e.g. with subsampling).
            lr: learning rate; defaults to 1 for L-BFGS and 0.01 for Adam.
            newton_steps: at most this many Newton steps (with step halving) after the optimiser,
                with L-BFGS or for the Laplace method; 0 to skip them.
            log_density: ``z -> log p(x, z)`` on a packed latent of shape ``(latent_dim,)``
                (default: :meth:`log_density`, which runs the model; the fast path passes its
                recorded model, which is faster).

        Returns:
            A :class:`WarmStart` with the MAP point, the Laplace factor and diagnostics.

        References:
            Bayesian Data Analysis, section 4.1 (Gelman, Carlin, Stern, Dunson, Vehtari and
            Rubin, 2013); Pyro's ``AutoLaplaceApproximation``.
        """
        if method not in ("laplace", "map"):
            raise ValueError(f"method: expected 'laplace' or 'map'; got {method!r}")
        if optim not in ("lbfgs", "adam"):
            raise ValueError(f"optim: expected 'lbfgs' or 'adam'; got {optim!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive integer; got {steps!r}")
        check_nonnegative_int("newton_steps", newton_steps)
        self._ensure_prototype(args, kwargs)

        def neg_log_density(z: torch.Tensor) -> torch.Tensor:
            try:
                if log_density is not None:
                    return -log_density(z)
                return -self.log_density(z, *args, **kwargs)
            except ValueError as err:
                # e.g. a distribution's argument check failing as the search runs off to a
                # degenerate point; nothing in the guide has been changed yet.
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ValueError(
                    f"warm_start: the model failed during the search ({first}); the model may "
                    "have no finite mode. The guide is unchanged: train it without a warm "
                    "start, or try method='map' with optim='adam' and a small lr."
                ) from err

        with torch.no_grad():
            start, factor = self.gaussian()
        z = start.clone().requires_grad_(True)
        if optim == "lbfgs":
            opt = torch.optim.LBFGS(
                [z],
                lr=1.0 if lr is None else lr,
                max_iter=steps,
                history_size=50,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-9,
                tolerance_change=1e-12,
            )

            def closure() -> torch.Tensor:
                loss = neg_log_density(z)
                # autograd.grad, not backward: the model's own parameters keep no stray gradients
                (z.grad,) = torch.autograd.grad(loss, z)
                return loss.detach()

            try:
                opt.step(closure)
            except RuntimeError as err:  # LBFGS overflows when the density is unbounded
                raise ValueError(
                    f"warm_start: the L-BFGS search diverged ({err}); the model may have no "
                    "finite mode. The guide is unchanged: train it without a warm start."
                ) from err
        else:
            opt = torch.optim.Adam([z], lr=0.01 if lr is None else lr)
            for _ in range(steps):
                (z.grad,) = torch.autograd.grad(neg_log_density(z), z)
                opt.step()
        z = z.detach()
        if method == "laplace" or optim == "lbfgs":
            z = _newton(neg_log_density, z, newton_steps)
        z_ = z.clone().requires_grad_(True)
        loss = neg_log_density(z_)
        (grad,) = torch.autograd.grad(loss, z_)
        if not (torch.isfinite(z).all() and torch.isfinite(loss) and torch.isfinite(grad).all()):
            # No finite mode was found: leave the guide as it was rather than write NaN into it.
            raise ValueError(
                f"warm_start: the search ended at a non-finite point or density (log p = "
                f"{float(-loss.detach())}); the model may have no finite mode. The guide is "
                "unchanged: train it without a warm start, or try method='map' with "
                "optim='adam' and a small lr."
            )

        scale_tril, fallback = None, False
        if method == "laplace":
            hess = _hessian(neg_log_density, z)
            chol, info = torch.linalg.cholesky_ex(hess)
            if info == 0:
                scale_tril = torch.linalg.cholesky(torch.cholesky_inverse(chol)).to(z)
            else:
                fallback = True
                curvature = hess.diagonal().to(z)
                current = factor.pow(2).sum(-1).sqrt() if factor.dim() == 2 else factor
                sd = torch.where(curvature > 0, curvature.clamp_min(1e-30).rsqrt(), current)
                scale_tril = torch.diag(sd)
                warnings.warn(
                    "warm_start: the Hessian of -log p at the MAP point is not positive definite; "
                    "using its diagonal only (the mode may not have been reached: try more steps)",
                    stacklevel=2,
                )
        self._set_gaussian(z, scale_tril)
        return WarmStart(z, scale_tril, float(-loss.detach()), float(grad.norm()), fallback)

    @torch.no_grad()
    def _set_gaussian(self, loc: torch.Tensor, scale_tril: torch.Tensor | None) -> None:
        """Make ``N(loc, scale_tril scale_trilᵀ)`` the reference and reset the learnable affine
        to the identity on top of it (the guide then learns in standardised coordinates)."""
        # In place: the param store holds these very tensors, and a reassignment would be
        # overwritten from the store on the next call.
        if scale_tril is None:  # MAP only: keep the current spread
            _, factor = self.gaussian()
            scale_tril = factor if self.full_covariance else torch.diag(factor)
        self.ref_loc.copy_(loc)
        if self.full_covariance:
            self.ref_scale.copy_(scale_tril)
            self.scale_tril_unconstrained.copy_(
                transform_to(constraints.unit_lower_cholesky).inv(torch.eye(len(loc)).to(loc))
            )
        else:
            self.ref_scale.copy_(scale_tril.pow(2).sum(-1).sqrt())  # marginal sds
        self.loc.zero_()
        self.scale_unconstrained.zero_()  # exp(0) = 1


def _check_store_shapes(name: str, flow: nn.Module) -> None:
    """Refuse a param store holding another flow under this guide's names (Pyro would load
    it into this flow and fail deep inside with a shape error)."""
    store = pyro.get_param_store()
    for key, param in flow.named_parameters():
        stored = store._params.get(f"{name}$$${key}")
        if stored is not None and stored.shape != param.shape:
            raise ValueError(
                f"the param store holds {name}$$${key} of shape {tuple(stored.shape)}, from "
                f"another guide of the same name; this guide's flow expects "
                f"{tuple(param.shape)}: call pyro.clear_param_store() before building a new guide"
            )


def _hessian(fn: Callable, z: torch.Tensor) -> torch.Tensor:
    """The symmetrised Hessian of ``fn`` at ``z``, in float64 for the linear algebra."""
    hess = torch.autograd.functional.hessian(fn, z).double()
    return (hess + hess.T) / 2


def _newton(fn: Callable, z: torch.Tensor, steps: int) -> torch.Tensor:
    """Minimise ``fn`` from ``z`` by Newton steps with step halving; stop where the Hessian is
    not positive definite or no step decreases ``fn``."""
    for _ in range(steps):
        z_ = z.clone().requires_grad_(True)
        value = fn(z_)
        (grad,) = torch.autograd.grad(value, z_)
        chol, info = torch.linalg.cholesky_ex(_hessian(fn, z))
        if info != 0:
            break
        step = torch.cholesky_solve(grad.double()[:, None], chol)[:, 0].to(z)
        value = float(value.detach())
        for t in (1.0, 0.5, 0.25, 0.125):
            with torch.no_grad():
                candidate = z - t * step
                new = float(fn(candidate))
            if math.isfinite(new) and new <= value:
                break
        else:
            break
        z = candidate
        # converged: the Newton decrement is at the float precision of fn
        if 0.5 * float(grad.double() @ step.double()) < 1e-7 * max(1.0, abs(value)):
            break
    return z


# -- amortised posteriors -------------------------------------------------------------------------
class AmortizedFlow(nn.Module):
    """An amortised posterior ``q(z | x) = flow(encoder(x))`` for VAEs.

    The encoder maps an observation ``x`` to features ``h`` of shape ``(*batch, context_dim)``;
    the conditional flow reads them as its context. With ``base="conditional_normal"`` the base's
    mean and scale are read from ``h`` too, and the flow refines that Gaussian (the IAF paper's
    VAE posterior). One module holds both, so one ``pyro.module`` call registers the encoder's
    and the flow's parameters, and ``.to(device)`` moves both. ``q(x)`` has
    ``batch_shape == x.shape[:-1]`` (for a vector encoder), so it drops into ``pyro.plate``,
    subsampled or not. Use an IAF or a coupling flow: ELBO training samples and scores its own
    samples, which is one pass for them and sequential for MAF.

    Args:
        encoder: module mapping ``x`` of shape ``(*batch, ...)`` to ``(*batch, context_dim)``.
        flow: a conditional :class:`~pyroflows.flows.Flow` (``context_dim > 0``).

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016).

    Example:
        >>> import pyro, torch
        >>> import pyro.distributions as dist
        >>> import pyroflows as pf
        >>> from pyroflows.infer.guides import AmortizedFlow
        >>> encoder = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh())
        >>> q = AmortizedFlow(encoder, pf.IAF(2, layers=2, hidden=(16,), context_dim=8,
        ...                                   base="conditional_normal"))
        >>> data = torch.randn(100, 5)
        >>> def guide(data):
        ...     pyro.module("q", q)
        ...     with pyro.plate("data", len(data), subsample_size=10) as idx:
        ...         return pyro.sample("z", q(data[idx]))
        >>> guide(data).shape
        torch.Size([10, 2])
    """

    def __init__(self, encoder: nn.Module, flow: Flow) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder: expected an nn.Module; got {type(encoder)}")
        if not isinstance(flow, Flow):
            raise TypeError(f"flow: expected a pyroflows Flow; got {type(flow)}")
        if not flow.context_dim:
            raise ValueError(
                "flow: expected a conditional flow (context_dim > 0) reading the encoder's "
                "features; got context_dim=0"
            )
        self.encoder = encoder
        self.flow = flow

    def forward(self, x: torch.Tensor) -> dist.TransformedDistribution:
        """``q(z | x)``: batch shape ``encoder(x).shape[:-1]``, event shape ``(flow.dim,)``."""
        return self.flow(self.encoder(x))
