"""The fast reverse-KL path of :func:`~pyroflows.infer.fit_svi`: a guide on a recorded model.

Pyro's ``SVI`` runs the model and the guide under its handlers at every step: the Python of the
model, the messenger stack and the trace bookkeeping cost milliseconds a step, more than the
arithmetic of a small model and flow. When a guide can be trained on the model's density of its
packed latent vector (an :class:`~pyroflows.infer.AutoFlowGuide`, or any guide with the
``_reverse_kl`` method of the contract below) and the model qualifies
(:class:`~pyroflows.infer.potential.Potential`: continuous latents of fixed shapes, no
subsampling, no parameters of its own, the same structure at every call), :class:`FastSVI`
records the model once and each step is plain torch:

    draw ``n`` particles from the guide in one call -> ``log q`` (the flow's own samples: no
    inversion) -> the recorded ``log p`` -> the objective -> backward -> clipping -> Adam,

eager, or through ``torch.compile`` (on CUDA one CUDA graph of the whole step) with
``compile=True``. The objective is the one the ``loss`` argument names: Pyro's ``Trace_ELBO``
(with its ``num_particles``), :class:`~pyroflows.infer.STL_ELBO`, or
:class:`~pyroflows.infer.IWAE` (``estimator="standard"`` or ``"dreg"``), with the same
estimates and gradients as those objectives on the same draws (Pyro's ``Trace_ELBO`` with
``vectorize_particles=True`` draws the same particles from the same seed). Other objectives,
and models that do not qualify, take Pyro's traced ``SVI``; :func:`fit_svi` says why once.

**The guide's contract.** ``guide._reverse_kl(log_p, num_particles, objective)`` draws
``num_particles`` particles, scores them with ``log_p`` (``(n, latent_dim) -> (n,)``) and
returns ``(value, surrogate)``: the loss estimate and a 0-d tensor whose gradient is the
estimator's; ``objective`` is ``"elbo"``, ``"stl"``, ``"iwae"`` or ``"dreg"``. Its trainable
tensors are its ``parameters()``, shared with Pyro's param store once the guide has run in
a Pyro context (the fast path runs it once before training), so that ``Predictive``, the
param store's ``save``/``load`` and checkpoints see the trained values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ..engine import Loss, SVILoss
from ..engine.losses import solves_odes
from .guides import DEFAULT_PARTICLES
from .objectives import IWAE, STL_ELBO
from .potential import NotTraceable, Potential

__all__ = ["FastPathUnavailable", "FastSVI", "default_loss", "objective_of"]

#: the tempered likelihood's first exponent (:meth:`FastSVI.temper`)
ANNEAL_BETA0 = 0.05
#: the draws the structure check of the model records it at (half at each of two points sets)
CHECK_DRAWS = 16


class FastPathUnavailable(UserWarning):
    """:func:`~pyroflows.infer.fit_svi` trains with Pyro's traced ``SVI`` instead of the fast
    path; the message says why."""


def default_loss(guide: Any) -> pyro.infer.ELBO:
    """The objective :func:`~pyroflows.infer.fit_svi` uses when none is given.

    The guide's own ``default_loss()`` when it has one
    (:meth:`AutoFlowGuide.default_loss <pyroflows.infer.AutoFlowGuide.default_loss>`:
    sticking-the-landing with 16 particles where its inverse is cheap); for another guide of
    the fast path (one with ``_reverse_kl``) :class:`~pyroflows.infer.STL_ELBO` with 16
    particles; for any other guide Pyro's ``Trace_ELBO()`` (one particle), as
    ``pyro.infer.SVI`` users expect.

    Example:
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyroflows.infer.fast import default_loss
        >>> type(default_loss(AutoNormal(lambda: None))).__name__
        'Trace_ELBO'
    """
    own = getattr(guide, "default_loss", None)
    if callable(own):
        return own()
    if hasattr(guide, "_reverse_kl"):  # another fast-path guide (AutoFlowMixture, ...)
        return STL_ELBO(num_particles=DEFAULT_PARTICLES)
    return Trace_ELBO()


def objective_of(loss: Any) -> tuple[str, int] | None:
    """``(objective, num_particles)`` of the fast path for a Pyro ELBO, or ``None`` when the
    fast path has no equivalent (the traced path is then used).

    Example:
        >>> import pyro
        >>> from pyroflows.infer import IWAE
        >>> from pyroflows.infer.fast import objective_of
        >>> objective_of(pyro.infer.Trace_ELBO(num_particles=8))
        ('elbo', 8)
        >>> objective_of(IWAE(num_particles=32, estimator="dreg"))
        ('dreg', 32)
        >>> objective_of(pyro.infer.TraceMeanField_ELBO()) is None
        True
    """
    kind = type(loss)
    if kind is Trace_ELBO:
        return "elbo", int(loss.num_particles)
    if kind is STL_ELBO:
        return "stl", int(loss.num_particles)
    if kind is IWAE:
        return ("dreg" if loss.estimator == "dreg" else "iwae"), int(loss.num_particles)
    return None


class FastSVI(SVILoss):
    """The engine loss of the fast path: a guide's objective on a recorded model.

    Building it checks that the model qualifies (sets the guide up if needed, runs it once in a
    Pyro context so that its parameters are the param store's, and records the model at two
    sets of points: :meth:`Potential.check`); it raises
    :class:`~pyroflows.infer.potential.NotTraceable` otherwise. ``loss()`` is differentiable
    (its value is the loss estimate, its gradient the estimator's), so the engine's
    :class:`~pyroflows.engine.Step` back-propagates it with torch and can compile it. The state
    (checkpoints, the divergence guard's snapshots) is the param store's, as for
    :class:`~pyroflows.engine.SVILoss`.

    Args:
        model: a Pyro model.
        guide: a guide with ``_reverse_kl`` (an :class:`~pyroflows.infer.AutoFlowGuide`).
        elbo: the objective (:func:`objective_of` must know it).
        args: the model's positional arguments.
        kwargs: the model's keyword arguments.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> import pyroflows as pf
        >>> from pyroflows.infer.fast import FastSVI
        >>> def model():
        ...     pyro.sample("z", dist.Normal(1.0, 2.0))
        >>> pyro.clear_param_store()
        >>> guide = pf.infer.AutoFlowGuide(model, layers=1, hidden=(8,))
        >>> loss = FastSVI(model, guide, pyro.infer.Trace_ELBO(num_particles=4))
        >>> loss().shape
        torch.Size([])
        >>> pyro.clear_param_store()
    """

    backward = Loss.backward  # plain torch: the engine's Step back-propagates (and can compile)

    def __init__(
        self,
        model: Callable,
        guide: Any,
        elbo: pyro.infer.ELBO,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> None:
        super().__init__(model, guide, elbo, args, kwargs)
        self.anneal: tuple[int, float] | None = None  # (steps, beta0), see :meth:`temper`
        self.calls = 0
        found = objective_of(elbo)
        if found is None:
            raise NotTraceable(f"the objective {type(elbo).__name__} has no fast equivalent")
        if not hasattr(guide, "_reverse_kl"):
            raise NotTraceable(f"the guide {type(guide).__name__} has no _reverse_kl method")
        self.objective, self.num_particles = found
        args, kwargs = self.args, self.kwargs
        self.potential = Potential(model, guide, args, kwargs)  # (sets the guide up if needed)
        self.not_compilable = solves_odes(guide)
        # One run of the guide in a Pyro context: its tensors become the param store's (or the
        # store's become its own, after pyro.get_param_store().load), as SVI would do.
        with torch.no_grad(), poutine.block(), poutine.trace(param_only=True) as params:
            guide(*args, **kwargs)
        names = [name for name, site in params.trace.nodes.items() if site["type"] == "param"]
        store = self.store
        self._params = [store._params[name] for name in names if name in store._params]
        self._names = names
        owned = {id(p) for p in guide.parameters()}
        if not all(id(p) in owned for p in self._params):
            raise NotTraceable(
                "the guide computes with parameters that are not its own modules' "
                "(e.g. pyro.param calls)"
            )
        with torch.no_grad():
            q = guide.get_posterior()
            draws = q.sample((CHECK_DRAWS // 2,))
            wide = q.sample((CHECK_DRAWS // 2,)) + torch.randn_like(draws)
            self.potential.check(torch.cat([draws, wide]))
        # The guide's automatic start (AutoFlowGuide(laplace="auto")), once, on the recorded model.
        start = getattr(guide, "_start", None)
        self.start = start(self.log_p) if start is not None else None

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def temper(self, steps: int, beta0: float = ANNEAL_BETA0) -> None:
        """Train on the tempered posterior ``prior · likelihood^β`` for the first ``steps``
        steps, ``β_t = beta0^(1 - t / steps)`` rising geometrically from ``beta0`` to 1, then on
        the posterior itself. Tempering starts the guide on a broad target and sharpens it: with
        a mixture guide it found every mode of separated multimodal posteriors where the
        untempered fit missed some (docs/multimodal.md). The recorded loss is then the tempered
        one (not ``-ELBO``) until step ``steps``."""
        self.anneal = (int(steps), float(beta0))

    def inputs(self, batch: None) -> tuple:
        step, self.calls = self.calls, self.calls + 1
        if self.anneal is None:
            return ()
        steps, beta0 = self.anneal
        beta = beta0 ** (1.0 - step / steps) if step < steps else 1.0
        return (torch.tensor(beta, dtype=torch.get_default_dtype()),)  # a tensor: no recompiles

    def log_p(self, z: torch.Tensor, beta: torch.Tensor | None = None) -> torch.Tensor:
        """The model's log joint density of packed unconstrained latents ``z``, ``(n, latent_dim)``
        -> ``(n,)``; with ``beta``, the tempered ``log prior + beta · log likelihood``."""
        log_prior, log_lik = self.potential(z)
        return log_prior + (log_lik if beta is None else beta.to(log_lik) * log_lik)

    def __call__(self, beta: torch.Tensor | None = None) -> torch.Tensor:
        log_p = self.log_p if beta is None else (lambda z: self.log_p(z, beta))
        value, surrogate = self.guide._reverse_kl(log_p, self.num_particles, self.objective)
        # The value of the loss, the gradient of the estimator.
        return value.detach() + (surrogate - surrogate.detach())

    def validation(self, batch: Any) -> tuple[float, float]:
        raise ValueError("FastSVI: the fast path has no validation data")

    def setup(self, source: Any, fresh: bool) -> None:
        pass  # the constructor ran the guide and recorded the model

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.calls = int(state.get("calls", 0))

    def fingerprint(self) -> dict[str, Any]:
        found = {**super().fingerprint(), "path": "fast", "objective": self.objective}
        return found if self.anneal is None else {**found, "anneal": list(self.anneal)}


def fast_loss(
    model: Callable,
    guide: Any,
    elbo: pyro.infer.ELBO,
    args: tuple,
    kwargs: dict,
    *,
    required: bool,
) -> FastSVI | None:
    """A :class:`FastSVI` when the guide, the objective and the model qualify; otherwise
    ``None`` after a :class:`FastPathUnavailable` warning saying why (or, with ``required``,
    the :class:`~pyroflows.infer.potential.NotTraceable` error)."""
    try:
        return FastSVI(model, guide, elbo, args, kwargs)
    except NotTraceable as err:
        if required:
            raise
        warnings.warn(
            f"fit_svi: {err}; training with Pyro's traced SVI instead (slower; pass fast=False "
            "to choose it and silence this warning)",
            FastPathUnavailable,
            stacklevel=3,
        )
        return None
