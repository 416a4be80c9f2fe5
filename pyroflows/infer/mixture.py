r"""A mixture of flows as an automatic guide, for posteriors with several modes.

Reverse KL, :math:`\mathrm{KL}(q \,\|\, p)`, is mode-seeking: a single flow guide started in
one mode stays there, and on two well-separated, equally weighted modes it ends about
:math:`\log 2` nats short of the evidence. :class:`AutoFlowMixture` makes the posterior over the
packed unconstrained latent a mixture

.. math::

    q(z) = \sum_{k=1}^K w_k \, q_k(z), \qquad w = \mathrm{softmax}(\ell),

whose components are flows, each followed by its own learnable Gaussian map and each started
at its own location, and trains it with the *stratified* mixture ELBO of Morningstar et al.
(2021), which draws from every component at every step so that none is starved of gradient.
:class:`FlowMixture` is the distribution it returns (``get_posterior()``).

**The component choice is not reparameterisable.** :class:`FlowMixture` is *partially*
reparameterised: ``rsample`` picks a component for each draw at random and returns a
reparameterised draw of that component, and ``score_parts`` (Pyro's hook for such
distributions) adds the score-function term :math:`\log w_k \cdot (\log p - \log q)` for the
choice. So ``pyro.infer.SVI`` with Pyro's ``Trace_ELBO`` gives an unbiased gradient: pathwise
for the components, REINFORCE without a baseline for the weights (noisy: train with
``pf.infer.fit_svi``, whose fast path uses :meth:`AutoFlowMixture._reverse_kl` and needs no
score function). pyroflows' ``STL_ELBO`` and ``IWAE`` on Pyro's traced path read
``has_rsample`` instead of ``score_parts`` and so miss the choice's term: under them the
weights get no (STL) or a biased (IWAE) gradient. Do not train a mixture with them on the
traced path (``fit_svi`` falls back to ``Trace_ELBO`` there when no loss is given).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.distributions.transforms import LowerCholeskyAffine
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import biject_to
from torch.distributions.transforms import AffineTransform, Transform

from .._checks import check_positive_int
from ..flows import MAF, Flow, vector_builders
from ..transforms import MaskedAutoregressive
from ..transforms.base import has_inverse
from .guides import (
    COVARIANCES,
    AutoFlowGuide,
    _build_flow,
    _check_flow_name,
    _full_covariance,
    _prototype_location,
    _without_sampling_failures,
)

__all__ = ["MIXTURE_OBJECTIVES", "AutoFlowMixture", "FlowMixture"]

#: The ``objective`` values :meth:`AutoFlowMixture._reverse_kl` accepts.
MIXTURE_OBJECTIVES = ("elbo", "stl", "iwae")
#: Prior draws per site from which ``init_spread`` reads the prior's scale.
PRIOR_DRAWS = 64
# The component that drew each entry of a FlowMixture sample rides on the sample tensor.
_COMPONENT = "_pyroflows_mixture_component"


# -- the distribution -----------------------------------------------------------------------------
class FlowMixture(TorchDistribution):
    r"""A finite mixture :math:`\sum_k w_k q_k(z)` of distributions over ``R^dim``.

    ``log_prob`` is :math:`\log \sum_k \exp(\log w_k + \log q_k(z))`: it evaluates every
    component at every point, so each component must score points it did not draw cheaply
    (coupling flows: one pass per layer). Draws are iid across ``batch_shape`` (the components
    have no batch dimensions; ``expand`` only changes how many are drawn at once).

    ``rsample`` draws component indices :math:`k \sim \mathrm{Categorical}(w)` and a
    reparameterised draw of each chosen component; the indices ride on the returned tensor, and
    :meth:`score_parts` reads them to add the score function :math:`\log w_k` of the choice (Pyro's
    convention for partially reparameterised distributions), so Pyro's ``Trace_ELBO`` gets an
    unbiased gradient. A value that does not carry indices (not drawn here) and requires grad
    is refused there, rather than scored as if fully reparameterised.

    Args:
        logits: unnormalised log weights, shape ``(K,)``.
        components: ``K`` distributions, each with ``batch_shape == ()`` and event shape
            ``(dim,)``.
        batch_shape: the batch shape of the mixture (the number of iid draws per ``sample()``).
        validate_args: as for torch distributions.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyroflows.infer.mixture import FlowMixture
        >>> _ = torch.manual_seed(0)
        >>> parts = [dist.Normal(torch.full((2,), m), 1.0).to_event(1) for m in (-3.0, 3.0)]
        >>> q = FlowMixture(torch.log(torch.tensor([0.2, 0.8])), parts)
        >>> z = q.rsample((5,))
        >>> z.shape, q.log_prob(z).shape
        (torch.Size([5, 2]), torch.Size([5]))
        >>> q.weights
        tensor([0.2000, 0.8000])
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        logits: torch.Tensor,
        components: Sequence[torch.distributions.Distribution],
        batch_shape: torch.Size | Sequence[int] = (),
        validate_args: bool | None = None,
    ) -> None:
        components = list(components)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 1:
            raise ValueError(
                f"logits: expected a tensor of shape (K,); got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}"
            )
        if len(components) != logits.shape[0]:
            raise ValueError(
                f"components: expected {logits.shape[0]} distributions (one per logit); got "
                f"{len(components)}"
            )
        if not components:
            raise ValueError("components: expected at least one distribution; got none")
        event_shape = components[0].event_shape
        for i, c in enumerate(components):
            if c.batch_shape != () or c.event_shape != event_shape or len(event_shape) != 1:
                raise ValueError(
                    f"components[{i}]: expected batch shape () and event shape "
                    f"{tuple(event_shape) if len(event_shape) == 1 else '(dim,)'}; got "
                    f"{tuple(c.batch_shape)} and {tuple(c.event_shape)}"
                )
            if not c.has_rsample:
                raise ValueError(
                    f"components[{i}]: expected a reparameterised distribution (has_rsample); "
                    f"got {type(c).__name__}"
                )
        self.logits = logits
        self.components = components
        super().__init__(torch.Size(batch_shape), event_shape, validate_args=validate_args)

    @property
    def weights(self) -> torch.Tensor:
        """The mixture weights :math:`w = \\mathrm{softmax}(\\ell)`, shape ``(K,)``."""
        return self.logits.softmax(-1)

    @property
    def log_weights(self) -> torch.Tensor:
        """:math:`\\log w`, shape ``(K,)``."""
        return self.logits.log_softmax(-1)

    def expand(self, batch_shape, _instance=None) -> FlowMixture:
        new = self._get_checked_instance(FlowMixture, _instance)
        new.logits = self.logits
        new.components = self.components
        super(FlowMixture, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    @staticmethod
    def drawn_from(value: torch.Tensor) -> torch.Tensor | None:
        """The component index of each draw of a tensor returned by :meth:`sample` or
        :meth:`rsample` (shape ``value.shape[:-1]``), or ``None`` for any other tensor."""
        return getattr(value, _COMPONENT, None)

    def component_log_probs(self, value: torch.Tensor) -> torch.Tensor:
        """:math:`\\log w_k + \\log q_k(z)` for every component: shape ``(K, *value.shape[:-1])``.

        Normalised over ``K`` (``softmax(dim=0)``), these are the responsibilities of the
        components for each point.
        """
        batch = value.shape[:-1]
        flat = value.reshape(-1, value.shape[-1])
        parts = torch.stack([c.log_prob(flat) for c in self.components])  # (K, n)
        return (self.log_weights[:, None] + parts).reshape((-1, *batch))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_prob = self.component_log_probs(value).logsumexp(0)
        shape = torch.broadcast_shapes(log_prob.shape, self.batch_shape)
        return log_prob.expand(shape)

    def _draw(self, sample_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = torch.Size(sample_shape) + self.batch_shape
        n = shape.numel()
        with torch.no_grad():
            k = torch.multinomial(self.weights.detach(), n, replacement=True) if n else None
        if k is None:
            z = self.components[0].rsample((0,))
            return z.reshape(shape + self.event_shape), z.new_zeros(shape, dtype=torch.long)
        counts = torch.bincount(k, minlength=len(self.components)).tolist()
        parts = [c.rsample((m,)) for c, m in zip(self.components, counts, strict=True) if m]
        order = torch.argsort(k, stable=True)  # parts, concatenated, are z[order]
        z = torch.cat(parts).index_select(0, torch.argsort(order))
        return z.reshape(shape + self.event_shape), k.reshape(shape)

    def rsample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        z, k = self._draw(sample_shape)
        setattr(z, _COMPONENT, k)
        return z

    def sample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        with torch.no_grad():
            z, k = self._draw(sample_shape)
        setattr(z, _COMPONENT, k)
        return z

    def score_parts(self, value: torch.Tensor, *args: Any, **kwargs: Any) -> ScoreParts:
        """Pyro's ELBO ingredients: the pathwise part and the score of the component choice.

        For a value drawn by :meth:`rsample` (it carries its component indices ``k``):
        ``log_prob = entropy_term = log q(z)`` and ``score_function = log w_k``. For a value
        without a gradient path (drawn by :meth:`sample`, or under ``torch.no_grad``), the
        distribution is treated as not reparameterised: ``score_function = log q(z)``,
        ``entropy_term = 0``.

        Raises:
            ValueError: for a value that requires grad but was not drawn by this
                distribution's :meth:`rsample` (its choice cannot be scored).
        """
        log_prob = self.log_prob(value)
        if not value.requires_grad:
            return ScoreParts(log_prob=log_prob, score_function=log_prob, entropy_term=0)
        k = self.drawn_from(value)
        if k is None or k.shape != value.shape[:-1]:
            raise ValueError(
                "score_parts: expected a value drawn by this FlowMixture's rsample (it carries "
                "the component of each draw); got a value with a gradient path but no component "
                "indices, whose component choice cannot be scored"
            )
        score = self.log_weights[k].expand(log_prob.shape)
        return ScoreParts(log_prob=log_prob, score_function=score, entropy_term=log_prob)


# -- the guide ------------------------------------------------------------------------------------
def _one_way_message(name: str, kind: str) -> str:
    return (
        f"flow: expected a flow that samples and scores in one pass per layer ('realnvp', "
        f"'nsf', 'nice', 'linear'); got {name}, whose {kind} autoregressive layers take dim "
        f"sequential passes one way, and a mixture samples every component and scores every "
        f"component at every draw"
    )


def _check_fast_both_ways(flow: nn.Module, name: str) -> None:
    """Refuse a flow that cannot both sample and score arbitrary points in one pass per layer."""
    for m in flow.modules():
        if isinstance(m, MaskedAutoregressive) and m.event_shape[0] > 1:
            raise ValueError(_one_way_message(name, f"{m.orientation!r}-oriented"))
    transforms = flow().transforms
    one_way = [type(t).__name__ for t in transforms if not has_inverse(t)]
    if one_way:
        raise ValueError(
            f"flow: expected a flow whose transforms are invertible (a mixture scores every "
            f"component at points it did not draw); got {name} with {one_way}"
        )


class AutoFlowMixture(AutoContinuous):
    r"""A mixture of flows over all latent sites, for posteriors with several modes.

    The latent sites are packed into one unconstrained vector :math:`z \in R^D` as by
    :class:`~pyroflows.infer.AutoFlowGuide` (Pyro's ``AutoContinuous``: same packing, plates,
    ``init_loc_fn`` conventions, improper priors). The posterior over it is

    .. math::

        q(z) = \sum_{k=1}^K w_k \, q_k(z), \qquad
        z = \mathrm{loc}_k + \mathrm{diag}(\mathrm{scale}_k) \, U_k \, f_k(\epsilon)
        \text{ under } q_k, \quad \epsilon \sim N(0, I),

    with learnable logits :math:`\ell` (:math:`w = \mathrm{softmax}(\ell)`, uniform at first),
    and per component a flow :math:`f_k` (the identity at first) and a Gaussian map
    (:math:`U_k` unit lower-triangular for a full covariance). :meth:`get_posterior` returns a
    :class:`FlowMixture`, a normalised Pyro distribution with event shape ``(latent_dim,)``, so
    ``Predictive``, :meth:`sample_posterior`, :func:`~pyroflows.infer.log_evidence` and PSIS
    work unchanged.

    **Start.** Every component starts as :math:`N(\mathrm{loc}_k, \mathtt{init\_scale}^2 I)`,
    :math:`\mathrm{loc}_k = m + \mathtt{init\_spread} \cdot s \odot \xi_k`: :math:`m` is the
    ``init_loc_fn`` location, :math:`s` the prior's scale per unconstrained coordinate (the
    interquartile range / 1.349 of ``PRIOR_DRAWS`` draws of each site's prior given the
    prototype's other values; 1 for sites that cannot be sampled, e.g. improper priors) and
    :math:`\xi_k` standard normal, centred over the components (for :math:`K = 2`,
    :math:`\xi_2 = -\xi_1`, so the two start on opposite sides of :math:`m`). Components started
    in the same mode's basin stay together: reverse KL does not push them apart. Starting them
    apart, and taking more components than the modes you expect, is what finds the modes
    (``docs/multimodal.md`` has the measurements).

    **Training.** ``pf.infer.fit_svi(model, guide, steps=N, lr=0.03)`` trains it on the fast
    path through :meth:`_reverse_kl`: the *stratified* ELBO draws ``ceil(n / K)``
    reparameterised particles from *each* component and weighs the component terms by
    :math:`w_k`, with :math:`\log q` the mixture density,

    .. math::

        \mathcal{L} = \sum_k w_k \, \mathbb{E}_{q_k}\big[\log p(z) - \log q(z)\big],

    which is the ELBO of :math:`q`, with an exact (not sampled) dependence on the weights: no
    score function, and a component with a small weight still gets draws. ``fit_svi``'s
    default objective (``STL_ELBO``) gives its sticking-the-landing form, the best measured;
    ``Trace_ELBO`` the plain one; ``IWAE`` its importance-weighted form (SIWAE), which leaves
    the weights of separated components free and is not recommended (``docs/multimodal.md``).
    Take a larger learning rate than ``fit_svi``'s default 1e-3: the weights converge slowly
    (0.03 met the goals in the benchmark, 0.01 left weights 0.05 off after 1000 steps). Under
    ``pyro.infer.SVI`` with ``Trace_ELBO`` the guide draws one component per particle and
    Pyro adds a score-function term for the choice (see :class:`FlowMixture`).

    **Which flow.** The mixture density evaluates *every* component at *every* draw, so each
    flow must score points it did not draw: both directions in one pass per layer. Coupling
    flows do: ``"realnvp"`` (default: cheaper, and the components' Gaussian maps carry most
    of a mode), ``"nsf"`` (splines, for skewed or heavy modes), ``"nice"``, ``"linear"``. IAF
    would invert sequentially (``latent_dim`` passes per layer per component) and MAF would
    sample sequentially: both are refused. One latent dimension cannot be split for
    coupling: use ``"nsf"`` (built autoregressive over one feature, which is one pass) or
    ``"linear"``.

    Args:
        model: a Pyro model with continuous latent sites of fixed shapes (as for
            :class:`~pyroflows.infer.AutoFlowGuide`).
        components: the number of components :math:`K` (at least 1). Take more than the modes
            you expect: surplus components share a mode or fade to a small weight, at
            ``K`` times the cost of one flow per step.
        flow: ``"realnvp"``, ``"nsf"``, ``"nice"``, ``"linear"`` (or a registered vector
            builder whose layers are one pass both ways), or a callable ``dim -> Flow`` called
            once per component. A Flow instance is refused: ``K`` components need ``K`` flows.
        layers: flow layers per component (if the builder takes ``layers``).
        hidden: hidden widths of each conditioner (if the builder takes ``hidden``).
        init_loc_fn: Pyro init strategy for the centre :math:`m` (default ``init_to_median``).
        init_scale: initial standard deviation of each component, per unconstrained coordinate.
            The default, 1, is wider than :class:`~pyroflows.infer.AutoFlowGuide`'s 0.1: with
            0.1 the flows first had to stretch each component twentyfold, saturating their
            scales, and on three modes in 10 dimensions the stratified STL fits missed the goal
            more often (``docs/multimodal.md``).
        init_spread: spread of the component locations around :math:`m`, in prior scales; 0
            starts every component at :math:`m` (they then stay together).
        covariance: ``"full"``, ``"diagonal"`` or ``"auto"`` (full up to
            ``FULL_COVARIANCE_MAX_DIM`` latent dimensions), per component.
        **flow_kwargs: further arguments of the named flow's builder (``bins``, ...).

    References:
        Automatic Differentiation Variational Inference with Mixtures (Morningstar, Vikram,
        Ham, Gallagher and Dillon, 2021).
        Variational Inference with Normalizing Flows (Rezende and Mohamed, 2015).

    Example:
        >>> import math, pyro, torch
        >>> import pyro.distributions as dist
        >>> from pyroflows.infer.mixture import AutoFlowMixture
        >>> def model():  # two modes, at -3 and +3
        ...     z = pyro.sample("z", dist.Normal(0.0, 3.0))
        ...     log_mix = torch.logaddexp(dist.Normal(-3.0, 0.5).log_prob(z),
        ...                               dist.Normal(3.0, 0.5).log_prob(z)) - math.log(2)
        ...     pyro.factor("mix", log_mix - dist.Normal(0.0, 3.0).log_prob(z))
        >>> pyro.set_rng_seed(0)
        >>> guide = AutoFlowMixture(model, components=3, flow="nsf", layers=1, hidden=(8,))
        >>> guide()["z"].shape  # the first call sets the guide up
        torch.Size([])
        >>> q = guide.get_posterior()  # a FlowMixture over the packed latent
        >>> q.event_shape, q.weights.shape
        (torch.Size([1]), torch.Size([3]))
        >>> def log_p(z):  # the model's log density at z, shape (n, 1) -> (n,)
        ...     return torch.logaddexp(dist.Normal(-3.0, 0.5).log_prob(z[:, 0]),
        ...                            dist.Normal(3.0, 0.5).log_prob(z[:, 0])) - math.log(2)
        >>> value, surrogate = guide._reverse_kl(log_p, 12, "stl")  # 4 draws per component
        >>> surrogate.backward()  # gradients for an optimiser step on guide.parameters()
        >>> guide.sample_posterior(100)["z"].shape
        torch.Size([100])
    """

    def __init__(
        self,
        model: Callable,
        components: int = 2,
        flow: str | Callable[[int], Flow] = "realnvp",
        layers: int = 3,
        hidden: Sequence[int] = (64, 64),
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 1.0,
        init_spread: float = 1.0,
        covariance: str = "auto",
        **flow_kwargs: Any,
    ) -> None:
        check_positive_int("components", components)
        if isinstance(flow, nn.Module):
            raise TypeError(
                f"flow: expected a name or a callable dim -> Flow (called once per component: "
                f"{components} components need {components} flows); got a "
                f"{type(flow).__name__} instance"
            )
        if isinstance(flow, str):
            _check_flow_name(flow)
            if issubclass(vector_builders()[flow], MAF):  # MAF and IAF
                raise ValueError(_one_way_message(repr(flow), vector_builders()[flow].__name__))
        elif not callable(flow):
            raise TypeError(f"flow: expected a name or a callable(dim); got {type(flow)}")
        elif flow_kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(flow_kwargs)} for a given flow")
        for name, value, positive in (
            ("init_scale", init_scale, True),
            ("init_spread", init_spread, False),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value < 0
                or (positive and value == 0)
            ):
                kind = "positive" if positive else "non-negative"
                raise ValueError(f"{name}: expected a {kind} number; got {value!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance: expected one of {COVARIANCES}; got {covariance!r}")
        self.components = components
        self._flow_spec = (flow,)
        self._layers = layers
        self._hidden = tuple(hidden)
        self._flow_kwargs = flow_kwargs
        self._init_scale = float(init_scale)
        self._init_spread = float(init_spread)
        self._covariance = covariance
        self._raw_model = (model,)  # a tuple, so that an nn.Module model is not registered
        self._arg_device: torch.device | None = None
        init = _without_sampling_failures(init_loc_fn, lambda: self._arg_device)
        super().__init__(model, init_loc_fn=init)

    # -- structure ---------------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs) -> None:
        loc = _prototype_location(self, args, kwargs)
        dim, k = self.latent_dim, self.components
        self.full_covariance = _full_covariance(self._covariance, dim)
        offsets = torch.randn(k, dim).to(loc)
        if k > 1:  # centred, and rescaled to unit variance: the components surround m
            offsets = (offsets - offsets.mean(0)) * math.sqrt(k / (k - 1))
        spread = self._init_spread * self._prior_scale().to(loc)
        self.loc = nn.Parameter(loc + spread * offsets)
        self.scale = PyroParam(torch.full((k, dim), self._init_scale).to(loc), constraints.positive)
        if self.full_covariance:
            eye = torch.eye(dim).to(loc).expand(k, dim, dim).contiguous()
            self.scale_tril = PyroParam(eye, constraints.unit_lower_cholesky)
        self.logits = nn.Parameter(torch.zeros(k).to(loc))
        spec = self._flow_spec[0]
        name = repr(spec) if isinstance(spec, str) else "the given flow"
        flows = []
        for _ in range(k):
            built = _build_flow(spec, dim, self._layers, self._hidden, self._flow_kwargs)
            _check_fast_both_ways(built, name)
            flows.append(built.to(device=loc.device, dtype=loc.dtype))
        self.flows = nn.ModuleList(flows)

    @torch.no_grad()
    def _prior_scale(self) -> torch.Tensor:
        """Per unconstrained coordinate: a robust scale (IQR / 1.349) of ``PRIOR_DRAWS`` draws of
        each site's distribution in the prototype trace; 1 where it cannot be sampled."""
        parts = []
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            size = math.prod(self._unconstrained_shapes[name])
            fn = site["fn"]
            try:
                draws = biject_to(fn.support).inv(fn.sample((PRIOR_DRAWS,)))
                draws = draws.reshape(PRIOR_DRAWS, size).double()
                q = torch.quantile(draws, torch.tensor([0.25, 0.75]).to(draws), dim=0)
                scale = (q[1] - q[0]) / 1.349
                scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)
            except (NotImplementedError, RuntimeError):
                scale = torch.ones(size, dtype=torch.float64)
            parts.append(scale.cpu())
        return torch.cat(parts)

    @property
    def weights(self) -> torch.Tensor:
        """The mixture weights, shape ``(K,)`` (after the first call of the guide)."""
        return self.logits.softmax(-1)

    def _affine(self, k: int) -> Transform:
        # cache_size=1: a component scores its own draw from the flow's cached output
        shift, scale = self.loc[k], self.scale[k]
        if self.full_covariance:
            return LowerCholeskyAffine(shift, scale[:, None] * self.scale_tril[k], cache_size=1)
        return AffineTransform(shift, scale, event_dim=1, cache_size=1)

    def component(self, k: int) -> dist.TransformedDistribution:
        """Component ``k`` of the posterior, :math:`q_k`, event shape ``(latent_dim,)``."""
        d = self.flows[k]()
        return dist.TransformedDistribution(d.base_dist, [*d.transforms, self._affine(k)])

    def get_posterior(self, *args, **kwargs) -> FlowMixture:
        """The posterior over the packed unconstrained latent: a :class:`FlowMixture` with event
        shape ``(latent_dim,)``."""
        if self._pyro_context.active:
            # As AutoFlowGuide: after pyro.get_param_store().load(...), compute with the loaded
            # flow tensors (PyroModule registers plain submodules without updating them).
            pyro.module(self._pyro_get_fullname("flows"), self.flows, update_module_params=True)
        return FlowMixture(self.logits, [self.component(k) for k in range(self.components)])

    def get_base_dist(self) -> dist.Distribution:
        """Refused: a mixture is not one transform of one base distribution."""
        raise NotImplementedError(
            "AutoFlowMixture has no single base distribution and transform (NeuTra needs one): "
            "use get_posterior() or component(k)"
        )

    def get_transform(self, *args, **kwargs) -> Transform:
        """Refused: a mixture is not one transform of one base distribution."""
        return self.get_base_dist()

    # -- summaries (AutoFlowGuide's, which only need get_posterior and the packing) ----------------
    _ensure_prototype = AutoFlowGuide._ensure_prototype
    _constrain = AutoFlowGuide._constrain
    sample_posterior = AutoFlowGuide.sample_posterior
    quantiles = AutoFlowGuide.quantiles
    median = AutoFlowGuide.median
    log_density = AutoFlowGuide.log_density

    # -- the fast-path objective -------------------------------------------------------------------
    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """Every parameter of the guide with ``requires_grad=False`` (restored on exit)."""
        params = [p for p in self.parameters() if p.requires_grad]
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def _reverse_kl(
        self,
        log_p: Callable[[torch.Tensor], torch.Tensor],
        num_particles: int,
        objective: str = "elbo",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The stratified mixture ELBO (or SIWAE) of a target density, and its surrogate.

        Draws :math:`T = \lceil n / K \rceil` reparameterised particles :math:`z_{k,t}` from
        every component :math:`k` (``K T`` in all) and with
        :math:`f_{k,t} = \log p(z_{k,t}) - \log q(z_{k,t})` (:math:`q` the mixture):

        * ``"elbo"``: :math:`\mathcal{L} = \sum_k w_k \frac1T \sum_t f_{k,t}`, an unbiased
          estimate of the ELBO of :math:`q` whose gradient is exact in the weights;
        * ``"stl"``: the same value; :math:`\log q` in the surrogate has stopped-gradient
          parameters (sticking the landing), which drops a zero-mean term;
        * ``"iwae"``: SIWAE, :math:`\log \frac1T \sum_t \sum_k w_k e^{f_{k,t}}`, a bound between
          the ELBO and :math:`\log Z` that tightens as ``T`` grows.

        Cost per step: ``K`` flow passes in the sampling direction over ``T`` points each,
        and ``K`` in the density direction over all ``K T`` points (the mixture density).

        Args:
            log_p: the target's log density on the packed unconstrained latent, a map from
                shape ``(n, latent_dim)`` to ``(n,)`` (``log p(x, z)`` with Jacobians).
            num_particles: ``n``, the number of particles (at least 1; rounded up to a
                multiple of ``K``).
            objective: ``"elbo"``, ``"stl"`` or ``"iwae"`` (no DReG estimator for mixtures).

        Returns:
            ``(value, surrogate)``: the negated bound (0-d, detached) and a 0-d tensor whose
            gradient with respect to the guide's parameters is the estimator's.
        """
        check_positive_int("num_particles", num_particles)
        if objective not in MIXTURE_OBJECTIVES:
            raise ValueError(
                f"objective: expected one of {MIXTURE_OBJECTIVES} for AutoFlowMixture (it has "
                f"no DReG estimator; use 'iwae'); got {objective!r}"
            )
        if self.prototype_trace is None:
            raise ValueError(
                "AutoFlowMixture: expected a set-up guide; call it once on the model's "
                "arguments (or guide._setup_prototype(*args)) first"
            )
        k = self.components
        t = -(-num_particles // k)
        posterior = self.get_posterior()
        z = torch.cat([c.rsample((t,)) for c in posterior.components])  # (K T, D), k-major
        log_target = log_p(z)
        if tuple(log_target.shape) != (k * t,):
            raise ValueError(
                f"log_p: expected a tensor of shape ({k * t},) for {k * t} points; got "
                f"{tuple(log_target.shape)}"
            )
        if objective == "stl":
            with self._frozen():
                log_q = self.get_posterior().log_prob(z.view_as(z))
        else:
            log_q = posterior.log_prob(z)
        f = (log_target - log_q).reshape(k, t)
        if objective == "iwae":
            bound = (posterior.log_weights[:, None] + f).logsumexp((0, 1)) - math.log(t)
        else:
            bound = (posterior.weights * f.mean(1)).sum()
        return -bound.detach(), -bound
