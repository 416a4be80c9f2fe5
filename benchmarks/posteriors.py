"""Pyro models of posteriordb reference posteriors, with their data and reference draws.

Each model is written from the plain-math description in its folder's ``README.md`` under
``shared/data/posteriordb`` (found relative to this file: ``<repo>/../shared/data/posteriordb``).
The models take no arguments (the data are closed over) and vectorise over particles: every
latent site broadcasts against an outer particle plate at ``dim=-2`` (``max_plate_nesting=1``).

* ``eight_schools``: eight schools, non-centred (latent ``theta_trans``; the reference draws hold
  ``theta = mu + tau * theta_trans``).
* ``kidiq``: kid IQ regression with an interaction; improper flat prior on ``beta``
  (``ImproperUniform``).
* ``mesquite``: log-log regression of leaf biomass; improper flat priors on ``beta`` and
  ``sigma > 0``.
* ``arK``: AR(5) time series.

``load(name)`` returns a :class:`Posterior`: the model, the reference draws (constrained, in the
Stan parameter order), and maps between a dict of latent site values and those columns.
:func:`unconstrained_log_density` evaluates ``log p(x, z)`` at unconstrained points, Jacobians
included (for the score-identity check in ``tests/test_benchmark_models.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to, constraints

__all__ = [
    "DATA_ROOT",
    "FOLDERS",
    "Posterior",
    "available",
    "load",
    "unconstrained_log_density",
]

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "posteriordb"
FOLDERS = {
    "eight_schools": "eight_schools-eight_schools_noncentered",
    "kidiq": "kidiq-kidscore_interaction",
    "mesquite": "mesquite-logmesquite_logvas",
    "arK": "arK-arK",
}


@dataclass
class Posterior:
    """A posteriordb posterior as a Pyro model.

    Attributes:
        name: short name (a key of ``FOLDERS``).
        folder: the posteriordb folder.
        model: the Pyro model, called without arguments.
        sites: latent site name -> (support, shape, shape under a particle plate at dim -2
            without the particle dim), in model order.
        param_names: Stan names of the reference columns.
        draws: reference draws, float64 array ``(n_draws, n_params)`` (chains concatenated).
        to_params: latent site values (leading sample dim ``n``) -> tensor ``(n, n_params)``.
        from_params: tensor ``(n, n_params)`` -> latent site values (leading dim ``n``).
    """

    name: str
    folder: str
    model: Callable[[], None]
    sites: dict[str, tuple[constraints.Constraint, tuple[int, ...], tuple[int, ...]]]
    param_names: list[str]
    draws: np.ndarray
    to_params: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    from_params: Callable[[torch.Tensor], dict[str, torch.Tensor]]

    @property
    def ref_mean(self) -> np.ndarray:
        return self.draws.mean(0)

    @property
    def ref_sd(self) -> np.ndarray:
        return self.draws.std(0, ddof=1)


def available(name: str | None = None) -> bool:
    """Whether the shared posteriordb data (of one posterior, or of all) are present."""
    names = FOLDERS if name is None else [name]
    return all((DATA_ROOT / FOLDERS[n] / "reference_draws.npz").is_file() for n in names)


def _read(folder: str) -> tuple[dict, list[str], np.ndarray]:
    path = DATA_ROOT / folder
    with open(path / "data.json") as f:
        data = json.load(f)
    z = np.load(path / "reference_draws.npz")
    draws = z["draws"]
    return data, [str(s) for s in z["param_names"]], draws.reshape(-1, draws.shape[-1])


def _flat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(n, -1)


# -- eight schools (non-centred) ------------------------------------------------------------------
def _eight_schools(data: dict, dtype: torch.dtype):
    J = int(data["J"])
    y = torch.tensor(data["y"], dtype=dtype)
    sigma = torch.tensor(data["sigma"], dtype=dtype)

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=dtype), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=dtype)))
        with pyro.plate("schools", J):
            theta_trans = pyro.sample("theta_trans", dist.Normal(torch.zeros((), dtype=dtype), 1.0))
            pyro.sample("y", dist.Normal(mu + tau * theta_trans, sigma), obs=y)

    sites = {
        "mu": (constraints.real, (), (1,)),
        "tau": (constraints.positive, (), (1,)),
        "theta_trans": (constraints.real, (J,), (J,)),
    }

    def to_params(v: dict[str, torch.Tensor]) -> torch.Tensor:
        n = v["mu"].shape[0]
        mu, tau = _flat(v["mu"], n), _flat(v["tau"], n)
        theta = mu + tau * _flat(v["theta_trans"], n)
        return torch.cat([theta, mu, tau], dim=-1)

    def from_params(p: torch.Tensor) -> dict[str, torch.Tensor]:
        theta, mu, tau = p[:, :J], p[:, J], p[:, J + 1]
        return {"mu": mu, "tau": tau, "theta_trans": (theta - mu[:, None]) / tau[:, None]}

    return model, sites, to_params, from_params


# -- kid IQ with interaction (flat prior on beta) -------------------------------------------------
def _kidiq(data: dict, dtype: torch.dtype):
    score = torch.tensor(data["kid_score"], dtype=dtype)
    hs = torch.tensor(data["mom_hs"], dtype=dtype)
    iq = torch.tensor(data["mom_iq"], dtype=dtype)
    X = torch.stack([torch.ones_like(hs), hs, iq, hs * iq], dim=-1)  # (N, 4)
    N = len(score)

    def model() -> None:
        beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (4,)))
        sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(2.5, dtype=dtype)))
        with pyro.plate("data", N):
            # beta: (4,), or (k, 1, 4) under a particle plate: the sum lands on the data dim
            mean = (beta * X).sum(-1)
            pyro.sample("kid_score", dist.Normal(mean, sigma), obs=score)

    sites = {
        "beta": (constraints.real_vector, (4,), (1, 4)),
        "sigma": (constraints.positive, (), (1,)),
    }

    def to_params(v: dict[str, torch.Tensor]) -> torch.Tensor:
        n = v["sigma"].shape[0]
        return torch.cat([_flat(v["beta"], n), _flat(v["sigma"], n)], dim=-1)

    def from_params(p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"beta": p[:, :4], "sigma": p[:, 4]}

    return model, sites, to_params, from_params


# -- mesquite (flat priors on beta and sigma) -----------------------------------------------------
def _mesquite(data: dict, dtype: torch.dtype):
    def col(name: str) -> torch.Tensor:
        return torch.tensor(data[name], dtype=dtype)

    d1, d2, ch = col("diam1"), col("diam2"), col("canopy_height")
    X = torch.stack(
        [
            torch.ones_like(d1),
            torch.log(d1 * d2 * ch),
            torch.log(d1 * d2),
            torch.log(d1 / d2),
            torch.log(col("total_height")),
            torch.log(col("density")),
            col("group"),
        ],
        dim=-1,
    )  # (N, 7)
    log_weight = torch.log(col("weight"))
    N = len(log_weight)

    def model() -> None:
        beta = pyro.sample("beta", dist.ImproperUniform(constraints.real_vector, (), (7,)))
        sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
        with pyro.plate("data", N):
            mean = (beta * X).sum(-1)
            pyro.sample("log_weight", dist.Normal(mean, sigma), obs=log_weight)

    sites = {
        "beta": (constraints.real_vector, (7,), (1, 7)),
        "sigma": (constraints.positive, (), (1,)),
    }

    def to_params(v: dict[str, torch.Tensor]) -> torch.Tensor:
        n = v["sigma"].shape[0]
        return torch.cat([_flat(v["beta"], n), _flat(v["sigma"], n)], dim=-1)

    def from_params(p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"beta": p[:, :7], "sigma": p[:, 7]}

    return model, sites, to_params, from_params


# -- AR(K) ----------------------------------------------------------------------------------------
def _arK(data: dict, dtype: torch.dtype):
    K, T = int(data["K"]), int(data["T"])
    y = torch.tensor(data["y"], dtype=dtype)
    # lags[i, k - 1] = y[t - k] for the 0-based t = K + i (Stan's t = K + 1, ..., T)
    lags = torch.stack([y[K - k : T - k] for k in range(1, K + 1)], dim=-1)  # (T - K, K)
    target = y[K:]

    def model() -> None:
        alpha = pyro.sample("alpha", dist.Normal(torch.tensor(0.0, dtype=dtype), 10.0))
        beta = pyro.sample("beta", dist.Normal(torch.zeros(K, dtype=dtype), 10.0).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(2.5, dtype=dtype)))
        with pyro.plate("time", T - K):
            mean = (beta * lags).sum(-1)
            pyro.sample("y", dist.Normal(alpha + mean, sigma), obs=target)

    sites = {
        "alpha": (constraints.real, (), (1,)),
        "beta": (constraints.real_vector, (K,), (1, K)),
        "sigma": (constraints.positive, (), (1,)),
    }

    def to_params(v: dict[str, torch.Tensor]) -> torch.Tensor:
        n = v["sigma"].shape[0]
        return torch.cat([_flat(v["alpha"], n), _flat(v["beta"], n), _flat(v["sigma"], n)], -1)

    def from_params(p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"alpha": p[:, 0], "beta": p[:, 1 : K + 1], "sigma": p[:, K + 1]}

    return model, sites, to_params, from_params


_BUILDERS = {"eight_schools": _eight_schools, "kidiq": _kidiq, "mesquite": _mesquite, "arK": _arK}


def load(name: str, dtype: torch.dtype = torch.float32) -> Posterior:
    """The posterior ``name`` (a key of ``FOLDERS``) with its data as tensors of ``dtype``."""
    if name not in FOLDERS:
        raise ValueError(f"name: expected one of {sorted(FOLDERS)}; got {name!r}")
    folder = FOLDERS[name]
    data, names, draws = _read(folder)
    model, sites, to_params, from_params = _BUILDERS[name](data, dtype)
    return Posterior(name, folder, model, sites, names, draws, to_params, from_params)


def unconstrained_log_density(post: Posterior, params: torch.Tensor) -> torch.Tensor:
    """``log p(x, z)`` at reference-parameter rows, as a function of the unconstrained latents.

    Maps ``params`` (``(n, n_params)``, constrained, reference column order) to the model's
    latent sites, then to unconstrained coordinates ``u`` (``biject_to(support).inv``), and
    returns ``(log_p, us)``: ``log_p`` of shape ``(n,)`` (the model's joint log density plus the
    log |Jacobian| of ``u -> z``), differentiable with respect to each tensor in ``us`` (a dict
    site -> ``(n, *shape)``, leaf tensors with ``requires_grad``).
    """
    values = post.from_params(params)
    n = params.shape[0]
    us, constrained = {}, {}
    log_det = params.new_zeros(n)
    for name, (support, shape, vec_shape) in post.sites.items():
        t = biject_to(support)
        u = t.inv(values[name].reshape(n, *shape)).detach().requires_grad_(True)
        z = t(u)
        ld = t.log_abs_det_jacobian(u, z)
        log_det = log_det + ld.reshape(n, -1).sum(-1)
        us[name] = u
        constrained[name] = z.reshape(n, *vec_shape)
    with pyro.plate("particles", n, dim=-2):
        trace = poutine.trace(poutine.condition(post.model, data=constrained)).get_trace()
    trace = prune_subsample_sites(trace)
    trace.compute_log_prob()
    log_p = log_det
    for site in trace.nodes.values():
        if site["type"] == "sample":
            log_p = log_p + site["log_prob"].reshape(n, -1).sum(-1)
    return log_p, us
