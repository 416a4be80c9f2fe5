"""A Pyro model as a plain tensor function of the guide's latent vector, traced once.

:class:`Potential` turns ``model(*args, **kwargs)`` into the function

``z -> (log prior, log likelihood)``,  ``z``: ``(n, latent_dim)`` packed unconstrained latents,

whose sum is ``log p(x, T(z)) + log |det dT/dz|`` (``T`` maps each site's slice of ``z`` to its
support, as an :class:`~pyro.infer.autoguide.AutoContinuous` guide packs them), for all ``n``
particles in one vectorised run. The model runs once under Pyro's handlers (conditioned on the
particles, inside a particle plate) while :func:`torch.fx.experimental.proxy_tensor.make_fx`
records the tensor operations it performs; later calls replay that record, a graph of ``aten``
operations with no Pyro and no Python of the model in it, which autograd differentiates and
``torch.compile`` compiles. This is what the fast reverse-KL path of
:func:`~pyroflows.infer.fit_svi` trains on.

**What qualifies.** Continuous latent sites of fixed shapes (global latents in plates are fine),
any constraints (``biject_to`` of each support), improper flat priors, observed data given as
arguments (they are constants of the record: a new :class:`Potential` is needed for new data),
``pyro.factor`` and ``pyro.deterministic`` sites. Refused, with the reason in a
:class:`NotTraceable` error: discrete latent sites, subsampled plates (the subsample is random
at each call), parameters of the model itself (``pyro.param``/``pyro.module`` in the model), and
models whose structure depends on the values of the latents (detected by recording the model at
two different points and comparing the records, and by checking the record against a fresh run
of the model at a third point: a model that branches on a latent in a region none of these
points visits cannot be detected).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["NotTraceable", "Potential"]

PARTICLE_PLATE = "_pyroflows_particles"


class NotTraceable(ValueError):
    """A model that :class:`Potential` cannot record; the message says why."""


def _per_particle(x: torch.Tensor | float, n: int, nesting: int, what: str) -> torch.Tensor:
    """Sum a site's (scaled, masked) log-density over its plate dims: shape ``(n,)``.

    The particle plate sits at batch dim ``-(nesting + 1)``; dims right of it are plates.
    """
    x = torch.as_tensor(x)
    if x.dim() > nesting + 1:
        raise NotTraceable(
            f"site {what!r} has a log-density of batch shape {tuple(x.shape)}: expected at most "
            f"{nesting} plate dims right of the particles (declare its batch dims with "
            "pyro.plate or .to_event)"
        )
    if x.dim() < nesting + 1:
        x = x.reshape((1,) * (nesting + 1 - x.dim()) + tuple(x.shape))
    x = x.sum(tuple(range(1, nesting + 1))) if nesting else x
    return x.expand(n)


def _has_param(name: str) -> str:
    return (
        f"the model has a parameter {name!r} (pyro.param or pyro.module): the fast path "
        "trains the guide only"
    )


def _clean(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the record's dead operations and constant copies (``lift_fresh_copy`` copies a
    constant on every call; nothing writes to them)."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.lift_fresh_copy.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


class Potential:
    """The log joint density of a Pyro model on a guide's packed unconstrained latent vector.

    ``potential(z)`` with ``z`` of shape ``(n, latent_dim)`` returns ``(log_prior, log_lik)``,
    each of shape ``(n,)``: the log-densities of the latent sites (with the Jacobians of the
    maps to their supports) and of the observed sites (``obs=``, ``pyro.factor``), with Pyro's
    scales and masks. Their sum is the unnormalised log posterior density of ``z``. The first
    call for each ``n`` (and dtype and device) records the model; later calls replay the
    record. See the module notes for what qualifies.

    Args:
        model: a Pyro model.
        guide: an ``AutoContinuous`` guide of the model (its packing of the latent sites is used;
            it is set up with the model's arguments if it has not run yet).
        args: the model's positional arguments.
        kwargs: the model's keyword arguments.

    Raises:
        NotTraceable: (a ``ValueError``) for a model that cannot be recorded, saying why.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal, AutoDiagonalNormal
        >>> from pyroflows.infer.potential import Potential
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> potential = Potential(model, AutoDiagonalNormal(model), (torch.zeros(3),))
        >>> log_prior, log_lik = potential(torch.zeros(5, 1))
        >>> log_lik.shape, round(float(log_lik[0]), 4)  # 3 N(0 | 0, 1) terms
        (torch.Size([5]), -2.7568)
    """

    def __init__(
        self, model: Callable, guide: Any, args: tuple = (), kwargs: dict | None = None
    ) -> None:
        self.model, self.guide = model, guide
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        if getattr(guide, "prototype_trace", None) is None:
            if not hasattr(guide, "_setup_prototype"):
                raise TypeError(
                    f"guide: expected an AutoContinuous guide; got {type(guide).__name__}"
                )
            guide._setup_prototype(*self.args, **self.kwargs)
        self.latent_dim = int(guide.latent_dim)
        self._latents = {
            name: tuple(site["value"].shape)
            for name, site in guide.prototype_trace.iter_stochastic_nodes()
        }
        self.nesting = self._check_prototype()
        self._graphs: dict[tuple, torch.fx.GraphModule] = {}

    # -- what qualifies ----------------------------------------------------------------------------
    def _check_prototype(self) -> int:
        """Check the model's sites; return the deepest plate nesting."""
        # One run of the model at the guide's prototype values (improper sites are not sampled).
        values = {
            name: site["value"] for name, site in self.guide.prototype_trace.iter_stochastic_nodes()
        }
        conditioned = poutine.condition(self.model, data=values)
        with poutine.block():
            trace = poutine.trace(conditioned).get_trace(*self.args, **self.kwargs)
        for name, site in trace.nodes.items():
            if site["type"] == "param":
                raise NotTraceable(_has_param(name))
            if site["type"] != "sample":
                continue
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.size != frame.full_size:
                    raise NotTraceable(
                        f"site {name!r} is in the subsampled plate {frame.name!r} "
                        f"(subsample {frame.size} of {frame.full_size}), which draws another "
                        "subsample at every call"
                    )
            if site_is_subsample(site):
                continue
            if not site["is_observed"] and site["fn"].support.is_discrete:
                raise NotTraceable(f"the latent site {name!r} is discrete")
        return max(
            (
                -frame.dim
                for site in trace.nodes.values()
                if site["type"] == "sample"
                for frame in site["cond_indep_stack"]
                if frame.vectorized
            ),
            default=0,
        )

    # -- the function ------------------------------------------------------------------------------
    def log_joint(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as calling the potential, by running the model under Pyro's handlers (no
        record): slower, and the reference the record is checked against."""
        n = z.shape[0]
        latent = z.reshape((n,) + (1,) * self.nesting + (self.latent_dim,))
        values: dict[str, torch.Tensor] = {}
        log_prior = z.new_zeros(n)
        for site, u in self.guide._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(u)
            log_det = transform.log_abs_det_jacobian(u, value)
            log_prior = log_prior + log_det.reshape(n, -1).sum(-1)
            values[site["name"]] = value

        def run() -> None:
            with pyro.plate(PARTICLE_PLATE, n, dim=-(self.nesting + 1)):
                poutine.condition(self.model, data=values)(*self.args, **self.kwargs)

        trace = poutine.trace(run).get_trace()
        trace.compute_log_prob()
        log_lik = z.new_zeros(n)
        seen = set()
        for name, site in trace.nodes.items():
            if site["type"] == "param":
                raise NotTraceable(_has_param(name))
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            term = _per_particle(site["log_prob"], n, self.nesting, name)
            if site["is_observed"] and name not in values:
                log_lik = log_lik + term
                continue
            if name not in self._latents:
                raise NotTraceable(
                    f"the model drew the latent site {name!r}, which it did not draw when the "
                    "guide was set up: its structure changes between calls"
                )
            seen.add(name)
            log_prior = log_prior + term
        missing = set(self._latents) - seen
        if missing:
            raise NotTraceable(
                f"the model did not draw the latent sites {sorted(missing)} this time: its "
                "structure changes between calls"
            )
        return log_prior, log_lik

    def _record(self, z: torch.Tensor) -> torch.fx.GraphModule:
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the model's own warnings showed when it first ran

            def log_joint(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return self.log_joint(z)

            try:
                return _clean(make_fx(log_joint)(z.detach()))
            except RuntimeError as err:
                if "data-dependent" in str(err) or "tracing tensor" in str(err):
                    raise NotTraceable(
                        "the model reads the value of a tensor that depends on its latents "
                        "(e.g. Python branches on a sampled value, or .item()): its structure "
                        "may change between calls"
                    ) from None
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise NotTraceable(
                    f"the model failed on a batch of {z.shape[0]} particles ({first}); write it "
                    "so that it broadcasts over batch dims on the left (with pyro.plate for "
                    "its batch dims), as Pyro's vectorize_particles=True needs"
                ) from None

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.dim() != 2 or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"potential: expected z of shape (n, {self.latent_dim}); got {tuple(z.shape)}"
            )
        key = (z.shape[0], z.dtype, z.device)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._record(z)
        return graph(z)

    def check(self, z: torch.Tensor, tol: float = 1e-4) -> None:
        """Check that the model can be recorded: records it at two points (the rows of
        ``z[: n // 2]`` and ``z[n // 2 :]``) and compares the records, then compares the replay
        with a fresh run of the model at the reversed rows.

        Args:
            z: shape ``(n, latent_dim)``, ``n >= 2`` even, points in the posterior's region
                (e.g. draws of the guide at initialisation, spread out).
            tol: relative tolerance of the comparison with the fresh run.

        Raises:
            NotTraceable: when the records differ or the replay disagrees with the model.
        """
        z = z.detach()
        half = z.shape[0] // 2
        first, second = self._record(z[:half]), self._record(z[half : 2 * half])
        if first.code != second.code:
            raise NotTraceable(
                "the model performs different operations at different values of its latents "
                "(e.g. Python branches on a sampled value): its structure changes between calls"
            )
        zz = z[: 2 * half].flip(0)
        with torch.no_grad():
            with pyro.validation_enabled(False), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = self.log_joint(zz)
            replayed = self(zz)
        for got, want, what in zip(replayed, expected, ("latent", "observed"), strict=True):
            finite = torch.isfinite(want)
            scale = want[finite].abs().max().clamp_min(1.0) if finite.any() else 1.0
            if not torch.equal(finite, torch.isfinite(got)) or (
                (got[finite] - want[finite]).abs().max() > tol * scale
            ):
                raise NotTraceable(
                    f"the recorded model gives other {what} log-densities than the model itself "
                    "(it depends on something outside its arguments and latents, e.g. a global "
                    "or a random number drawn outside pyro.sample)"
                )
