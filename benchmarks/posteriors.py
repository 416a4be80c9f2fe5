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
* ``diamonds``: log-log regression with 24 collinear, centred predictors (26 dimensions).
* ``gp_pois_regr``: latent Gaussian-process Poisson regression (latent ``f_tilde``; the
  reference draws hold ``f = L f_tilde`` with ``L`` the kernel's Cholesky factor, computed in
  float64 whatever the model's dtype: with the model's jitter of 1e-10 it fails in float32).
* ``low_dim_gauss_mix``: two-component normal mixture with ordered means (``mu`` has
  ``ordered_vector`` support; its prior, two independent normals restricted to ``mu[1] <
  mu[2]``, is the law of two sorted independent normals, :class:`SortedNormal`).
* ``garch``: GARCH(1,1) with flat priors (``ImproperUniform`` on ``mu`` and ``alpha0 > 0``), the
  flat prior on the triangle ``alpha1 + beta1 < 1`` written as ``alpha1 ~ Beta(1, 2)`` and
  ``beta1 = (1 - alpha1) beta1_unit`` with ``beta1_unit ~ Uniform(0, 1)`` (the joint density of
  ``(alpha1, beta1)`` is then the constant 2 on the triangle: Stan's flat prior, Jacobian
  ``log(1 - alpha1)`` included).

``load(name)`` returns a :class:`Posterior`: the model, the reference draws (constrained, in the
Stan parameter order), and maps between a dict of latent site values and those columns.
:func:`unconstrained_log_density` evaluates ``log p(x, z)`` at unconstrained points, Jacobians
included (for the score-identity check in ``tests/test_benchmark_models.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to

__all__ = [
    "DATA_ROOT",
    "FOLDERS",
    "Posterior",
    "SortedNormal",
    "available",
    "garch_variances",
    "gp_cholesky",
    "load",
    "unconstrained_log_density",
]

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "posteriordb"
FOLDERS = {
    "eight_schools": "eight_schools-eight_schools_noncentered",
    "kidiq": "kidiq-kidscore_interaction",
    "mesquite": "mesquite-logmesquite_logvas",
    "arK": "arK-arK",
    "diamonds": "diamonds-diamonds",
    "gp_pois_regr": "gp_pois_regr-gp_pois_regr",
    "low_dim_gauss_mix": "low_dim_gauss_mix-low_dim_gauss_mix",
    "garch": "garch-garch11",
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


def _unplate(x: torch.Tensor, event_dim: int = 1) -> torch.Tensor:
    """Drop the singleton dim a global site carries under a particle plate at dim -2.

    A global vector computed from global sites has shape ``(n, 1, *event)`` under the particle
    plate and ``event`` without it; data plates at dim -1 need ``(n, *event)``.
    """
    return x.squeeze(-1 - event_dim) if x.dim() > event_dim else x


# -- diamonds (24 collinear predictors, centred) --------------------------------------------------
def _diamonds(data: dict, dtype: torch.dtype):
    X = torch.tensor(data["X"], dtype=dtype)[:, 1:]  # without the intercept column
    Xc = X - X.mean(0)
    y = torch.tensor(data["Y"], dtype=dtype)
    N, K = Xc.shape
    zero = torch.tensor(0.0, dtype=dtype)

    def model() -> None:
        b = pyro.sample("b", dist.Normal(torch.zeros(K, dtype=dtype), 1.0).to_event(1))
        intercept = pyro.sample("Intercept", dist.StudentT(3.0, zero + 8.0, 10.0))
        # Stan's student_t(3, 0, 10) on sigma > 0: the half-t, density 2 t(sigma)
        sigma = pyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, zero, 10.0)))
        with pyro.plate("data", N):
            # a matrix product: (b * Xc).sum(-1) would hold n x N x K numbers
            mean = intercept + _unplate(b @ Xc.T)
            pyro.sample("Y", dist.Normal(mean, sigma), obs=y)

    sites = {
        "b": (constraints.real_vector, (K,), (1, K)),
        "Intercept": (constraints.real, (), (1,)),
        "sigma": (constraints.positive, (), (1,)),
    }

    def to_params(v: dict[str, torch.Tensor]) -> torch.Tensor:
        n = v["sigma"].shape[0]
        return torch.cat([_flat(v["b"], n), _flat(v["Intercept"], n), _flat(v["sigma"], n)], -1)

    def from_params(p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"b": p[:, :K], "Intercept": p[:, K], "sigma": p[:, K + 1]}

    return model, sites, to_params, from_params


# -- latent GP Poisson regression -----------------------------------------------------------------
def gp_cholesky(x: torch.Tensor, rho: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``alpha² exp(-(x_i - x_j)² / (2 rho²)) + 1e-10 I``.

    ``x`` has shape ``(N,)``, ``rho`` and ``alpha`` any common batch shape ``b``; returns
    ``(*b, N, N)``.
    """
    d2 = (x[:, None] - x[None, :]) ** 2
    rho, alpha = rho[..., None, None], alpha[..., None, None]
    K = alpha**2 * torch.exp(-d2 / (2 * rho**2))
    return torch.linalg.cholesky(K + 1e-10 * torch.eye(len(x), dtype=K.dtype))


def _gp_pois_regr(data: dict, dtype: torch.dtype):
    x = torch.tensor(data["x"], dtype=dtype)
    k = torch.tensor(data["k"], dtype=dtype)
    N = len(x)

    def model() -> None:
        rho = pyro.sample("rho", dist.Gamma(torch.tensor(25.0, dtype=dtype), 4.0))
        alpha = pyro.sample("alpha", dist.HalfNormal(torch.tensor(2.0, dtype=dtype)))
        f_tilde = pyro.sample("f_tilde", dist.Normal(torch.zeros(N, dtype=dtype), 1.0).to_event(1))
        # the factorisation in float64: in float32 it fails for rho > 7 (a third of the posterior)
        L = gp_cholesky(x.double(), rho.double(), alpha.double()).to(dtype)
        f = (L @ f_tilde.unsqueeze(-1)).squeeze(-1)
        with pyro.plate("data", N):
            pyro.sample("k", dist.Poisson(torch.exp(_unplate(f))), obs=k)

    sites = {
        "rho": (constraints.positive, (), (1,)),
        "alpha": (constraints.positive, (), (1,)),
        "f_tilde": (constraints.real_vector, (N,), (1, N)),
    }

    def to_params(v: dict[str, torch.Tensor]) -> torch.Tensor:
        n = v["rho"].shape[0]
        rho, alpha = v["rho"].reshape(n), v["alpha"].reshape(n)
        L = gp_cholesky(x.to(rho.dtype), rho, alpha)
        f = (L @ v["f_tilde"].reshape(n, N, 1)).squeeze(-1)
        return torch.cat([rho[:, None], alpha[:, None], f], dim=-1)

    def from_params(p: torch.Tensor) -> dict[str, torch.Tensor]:
        rho, alpha, f = p[:, 0], p[:, 1], p[:, 2:]
        L = gp_cholesky(x.to(p.dtype), rho, alpha)
        f_tilde = torch.linalg.solve_triangular(L, f.unsqueeze(-1), upper=False).squeeze(-1)
        return {"rho": rho, "alpha": alpha, "f_tilde": f_tilde}

    return model, sites, to_params, from_params


# -- two-component mixture with ordered means -----------------------------------------------------
class SortedNormal(dist.TorchDistribution):
    r"""``size`` independent ``Normal(loc, scale)`` draws, sorted ascending.

    The density is :math:`\text{size}! \prod_i \mathcal N(x_i; \text{loc}, \text{scale}^2)` on
    the ordered vectors: proportional to Stan's ``ordered[size] mu; mu ~ normal(loc, scale)``.
    Proper, so Pyro's autoguides can draw from it at initialisation.
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.ordered_vector

    def __init__(self, loc: torch.Tensor, scale: float, size: int, validate_args=None) -> None:
        self.loc, self.scale, self.size = loc, scale, size
        super().__init__(torch.Size(), torch.Size((size,)), validate_args=validate_args)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        base = dist.Normal(self.loc.expand(self.size), self.scale)
        return base.sample(sample_shape).sort(-1).values

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        normal = dist.Normal(self.loc, self.scale)
        return normal.log_prob(value).sum(-1) + math.lgamma(self.size + 1)


def _low_dim_gauss_mix(data: dict, dtype: torch.dtype):
    y = torch.tensor(data["y"], dtype=dtype)
    N = len(y)

    def model() -> None:
        mu = pyro.sample("mu", SortedNormal(torch.tensor(0.0, dtype=dtype), 2.0, 2))
        sigma = pyro.sample(
            "sigma", dist.HalfNormal(torch.full((2,), 2.0, dtype=dtype)).to_event(1)
        )
        theta = pyro.sample("theta", dist.Beta(torch.tensor(5.0, dtype=dtype), 5.0))
        with pyro.plate("data", N):
            weights = dist.Categorical(probs=torch.stack([theta, 1 - theta], dim=-1))
            mixture = dist.MixtureSameFamily(weights, dist.Normal(mu, sigma))
            pyro.sample("y", mixture, obs=y)

    sites = {
        "mu": (constraints.ordered_vector, (2,), (1, 2)),
        "sigma": (constraints.independent(constraints.positive, 1), (2,), (1, 2)),
        "theta": (constraints.unit_interval, (), (1,)),
    }

    def to_params(v: dict[str, torch.Tensor]) -> torch.Tensor:
        n = v["theta"].shape[0]
        return torch.cat([_flat(v["mu"], n), _flat(v["sigma"], n), _flat(v["theta"], n)], -1)

    def from_params(p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mu": p[:, :2], "sigma": p[:, 2:4], "theta": p[:, 4]}

    return model, sites, to_params, from_params


# -- GARCH(1,1), flat priors ----------------------------------------------------------------------
def garch_variances(
    y: torch.Tensor,
    sigma1: float,
    mu: torch.Tensor,
    alpha0: torch.Tensor,
    alpha1: torch.Tensor,
    beta1: torch.Tensor,
) -> torch.Tensor:
    r"""The GARCH(1,1) variances :math:`s_t^2`, ``t = 1..T``, without a loop over time.

    The recursion :math:`v_1 = \sigma_1^2`, :math:`v_t = c_t + \beta_1 v_{t-1}` with
    :math:`c_t = \alpha_0 + \alpha_1 (y_{t-1} - \mu)^2` is linear with a constant coefficient,
    :math:`v_t = \sum_{j \le t} \beta_1^{t-j} c_j` (:math:`c_1 = \sigma_1^2`), so a prefix scan
    by doubling computes it in :math:`\lceil \log_2 T \rceil` vectorised steps: after the step
    with shift :math:`s`, each :math:`v_t` holds the sum over the last :math:`2s` terms. ``y`` has
    shape ``(T,)``, the parameters any common batch shape ``b``; returns ``(*b, T)``.
    """
    mu, alpha0, alpha1 = mu[..., None], alpha0[..., None], alpha1[..., None]
    c = alpha0 + alpha1 * (y[:-1] - mu) ** 2  # (*b, T-1): c_2, ..., c_T
    v = torch.cat([torch.full_like(c[..., :1], sigma1**2), c], dim=-1)
    power, shift = beta1[..., None], 1  # power = beta1 ** shift
    while shift < v.shape[-1]:
        v = torch.cat([v[..., :shift], v[..., shift:] + power * v[..., :-shift]], dim=-1)
        power, shift = power * power, 2 * shift
    return v


def _garch(data: dict, dtype: torch.dtype):
    y = torch.tensor(data["y"], dtype=dtype)
    sigma1 = float(data["sigma1"])
    T = len(y)

    def model() -> None:
        mu = pyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
        alpha0 = pyro.sample("alpha0", dist.ImproperUniform(constraints.positive, (), ()))
        # flat on {alpha1, beta1 > 0, alpha1 + beta1 < 1}: alpha1's marginal is Beta(1, 2), and
        # beta1 | alpha1 is uniform on (0, 1 - alpha1)
        alpha1 = pyro.sample("alpha1", dist.Beta(torch.tensor(1.0, dtype=dtype), 2.0))
        unit = pyro.sample("beta1_unit", dist.Uniform(torch.tensor(0.0, dtype=dtype), 1.0))
        beta1 = (1 - alpha1) * unit
        s2 = garch_variances(y, sigma1, mu, alpha0, alpha1, beta1)
        with pyro.plate("time", T):
            pyro.sample("y", dist.Normal(mu, _unplate(s2).sqrt()), obs=y)

    sites = {
        "mu": (constraints.real, (), (1,)),
        "alpha0": (constraints.positive, (), (1,)),
        "alpha1": (constraints.unit_interval, (), (1,)),
        "beta1_unit": (constraints.unit_interval, (), (1,)),
    }

    def to_params(v: dict[str, torch.Tensor]) -> torch.Tensor:
        n = v["mu"].shape[0]
        alpha1 = _flat(v["alpha1"], n)
        beta1 = (1 - alpha1) * _flat(v["beta1_unit"], n)
        return torch.cat([_flat(v["mu"], n), _flat(v["alpha0"], n), alpha1, beta1], -1)

    def from_params(p: torch.Tensor) -> dict[str, torch.Tensor]:
        alpha1 = p[:, 2]
        return {
            "mu": p[:, 0],
            "alpha0": p[:, 1],
            "alpha1": alpha1,
            "beta1_unit": p[:, 3] / (1 - alpha1),
        }

    return model, sites, to_params, from_params


_BUILDERS = {
    "eight_schools": _eight_schools,
    "kidiq": _kidiq,
    "mesquite": _mesquite,
    "arK": _arK,
    "diamonds": _diamonds,
    "gp_pois_regr": _gp_pois_regr,
    "low_dim_gauss_mix": _low_dim_gauss_mix,
    "garch": _garch,
}


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
