"""Residual flows: the Lipschitz bound, both log-determinants, the inverse and a small fit.

The generic harness (rows in ``registry_residual.py``) checks the exact log-determinant against
the autograd Jacobian, round trips, shapes, gradients and saving; here are what is particular to
residual blocks: the contraction whatever the weights, the stochastic estimator's mean and
gradients, the fixed-point inverse's gradients and its failure, and training.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian
from torch.func import functional_call

from pyroflows.transforms import Inverted
from pyroflows.transforms.residual import EXACT_LOG_DET_MAX_DIM, Residual
from pyroflows.transforms.solvers import TOLERANCE, InverseNotConverged

F64 = torch.float64

CONFIGS = {
    "lipswish": {"hidden": (16, 16)},
    "elu": {"hidden": (16,), "activation": "elu"},
    "linear": {"hidden": ()},
    "context": {"hidden": (8, 8), "context_dim": 2},
}


def scrambled(dim: int, scale: float = 3.0, seed: int = 0, **kwargs) -> Residual:
    """A block in float64 whose raw weights are all far beyond ``coeff`` (spectral norms of
    several units): the normalisation alone keeps the branch contractive."""
    torch.manual_seed(seed)
    t = Residual(dim, **kwargs).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


def context_for(t: Residual, *batch: int) -> torch.Tensor | None:
    return torch.randn(*batch, t.context_dim, dtype=F64) if t.context_dim else None


@pytest.mark.parametrize("name", CONFIGS)
def test_branch_is_a_contraction_whatever_the_weights(name):
    """``Lip(g) <= coeff^L``: every layer's raw spectral norm exceeds ``coeff``, the largest
    singular value of ``J_g`` at random points (autograd) and the difference quotients of random
    pairs stay below the bound."""
    t = scrambled(4, coeff=0.9, **CONFIGS[name])
    assert all(torch.linalg.matrix_norm(lin.weight, 2) > 0.9 for lin in t.linears)
    bound = t.lipschitz_bound
    assert bound == pytest.approx(0.9 ** len(t.linears)) and bound <= 0.9
    context = context_for(t)
    for _ in range(20):
        x = 3 * torch.randn(4, dtype=F64)
        jac = jacobian(lambda v: t.residual_branch(v, context), x)
        assert torch.linalg.matrix_norm(jac, 2) <= bound * (1 + 1e-12)  # = for a linear g
    a, b = 3 * torch.randn(2, 500, 4, dtype=F64)
    c = context_for(t, 500)
    with torch.no_grad():
        ratio = (t.residual_branch(a, c) - t.residual_branch(b, c)).norm(dim=-1) / (a - b).norm(
            dim=-1
        )
    assert ratio.max() <= bound * (1 + 1e-12)


def test_normalised_weights_have_spectral_norm_coeff():
    t = scrambled(3, hidden=(8,), coeff=0.5)
    weights = t._params(None)[: len(t.linears)]
    for w in weights:
        torch.testing.assert_close(torch.linalg.matrix_norm(w, 2), torch.tensor(0.5, dtype=F64))
    # a layer already inside the bound is left as it is
    small = Residual(3, hidden=(8,), coeff=0.5).double()
    with torch.no_grad():
        small.linears[0].weight.mul_(0.1 / torch.linalg.matrix_norm(small.linears[0].weight, 2))
    assert torch.equal(small._params(None)[0], small.linears[0].weight)


@pytest.mark.parametrize("name", CONFIGS)
def test_exact_log_det_matches_autograd_slogdet(name):
    t = scrambled(5, logdet="exact", **CONFIGS[name])
    x = torch.randn(6, 5, dtype=F64)
    context = context_for(t, 6)
    _, ladj = t.forward_and_log_det(x, context)
    for i in range(6):
        c = None if context is None else context[i]
        jac = jacobian(lambda v, c=c: t.condition(c).with_cache(0)(v), x[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jac).logabsdet)
        assert torch.linalg.det(jac) > 0  # sign = +1


def test_auto_is_exact_up_to_the_threshold():
    assert Residual(EXACT_LOG_DET_MAX_DIM, hidden=(4,)).exact
    assert not Residual(EXACT_LOG_DET_MAX_DIM + 1, hidden=(4,)).exact
    assert Residual(40, hidden=(4,), logdet="exact").exact
    assert not Residual(2, hidden=(4,), logdet="roulette").exact


def rotation_block(neumann_grad: bool = True) -> Residual:
    """A 3-D block with ``J_g = 0.8 Q₂ diag(exp(a)) 0.8 Q₁`` (``Q`` orthogonal, ``a < 0`` the
    pre-activations near ``x = 0``, where ELU's slope ``exp(a)`` depends on ``x``): eigenvalues of
    modulus up to 0.64, two complex, a log-determinant far from its first-order term with a
    gradient in ``x``, and an estimator of finite variance (term k has weight up to 2^(k-3) and
    size up to 0.64^k; 2 · 0.64² < 1)."""
    t = Residual(
        3,
        hidden=(3,),
        coeff=0.8,
        activation="elu",
        logdet="roulette",
        neumann_grad=neumann_grad,
    ).double()
    generator = torch.Generator().manual_seed(1)
    q1, q2 = (torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=F64))[0] for _ in "ab")
    with torch.no_grad():
        t.linears[0].weight.copy_(5 * q1)  # normalised to 0.8 q1
        t.linears[0].bias.fill_(-0.3)
        t.linears[1].weight.copy_(5 * q2)
        t.linears[1].bias.zero_()
    return t


def exact_of(t: Residual, x: torch.Tensor) -> torch.Tensor:
    t.logdet = "exact"
    try:
        return t.forward_and_log_det(x)[1]
    finally:
        t.logdet = "roulette"


@pytest.mark.parametrize("neumann_grad", [True, False], ids=["neumann", "backprop"])
def test_roulette_estimate_and_its_gradient_are_unbiased(neumann_grad):
    """Over 4000 draws (one per row: each row has its own ``N`` and ``v``), the mean estimate
    and the mean gradient in ``x`` are within 4.5 standard errors of the exact ones (seeded;
    a correct estimator fails this with probability below 1e-4 per quantity)."""
    torch.manual_seed(0)
    t = rotation_block(neumann_grad)
    x = 0.3 * torch.randn(3, dtype=F64)
    x_exact = x.clone().requires_grad_()
    exact = exact_of(t, x_exact)
    (exact_grad,) = torch.autograd.grad(exact, x_exact)
    assert abs(exact.item()) > 0.3 and exact_grad.norm() > 0.2

    draws = 4000
    xs = x.expand(draws, 3).clone().requires_grad_()
    _, ladj = t.forward_and_log_det(xs)
    (grads,) = torch.autograd.grad(ladj.sum(), xs)  # row i: the gradient of draw i
    error = ladj.std() / math.sqrt(draws)
    assert error < 0.02
    assert abs(ladj.mean() - exact) < 4.5 * error
    grad_error = grads.std(0) / math.sqrt(draws)
    assert ((grads.mean(0) - exact_grad).abs() < 4.5 * grad_error + 1e-12).all()
    # stochastic: two calls differ
    assert not torch.equal(t.forward_and_log_det(x)[1], t.forward_and_log_det(x)[1])


def test_roulette_parameter_gradients_are_unbiased():
    """The Neumann-series gradient in the parameters: the mean of 30 batches of 400 draws is
    within 5 standard errors (spread across the batches) of the exact gradient."""
    torch.manual_seed(0)
    t = rotation_block()
    x = 0.3 * torch.randn(3, dtype=F64)
    params = list(t.parameters())
    # (the last bias moves g, not J_g: its gradient is zero)
    found = torch.autograd.grad(exact_of(t, x), params, materialize_grads=True)
    exact = torch.cat([g.flatten() for g in found])
    batches = []
    for _ in range(30):
        ladj = t.forward_and_log_det(x.expand(400, 3))[1].mean()
        found = torch.autograd.grad(ladj, params, materialize_grads=True)
        batches.append(torch.cat([g.flatten() for g in found]))
    batches = torch.stack(batches)
    error = batches.std(0) / math.sqrt(len(batches))
    assert ((batches.mean(0) - exact).abs() <= 5 * error + 1e-10).all()


def test_roulette_without_gradients_and_at_the_identity():
    t = Residual(20, hidden=(8,))  # auto: roulette above 16 dimensions
    assert not t.exact
    x = torch.randn(7, 20)
    with torch.no_grad():
        _, ladj = t.forward_and_log_det(x)
    assert torch.equal(ladj, torch.zeros(7))  # the identity at first: every term is zero
    with torch.no_grad():
        t.linears[-1].weight.normal_()
        _, ladj = t.forward_and_log_det(x)
    assert ladj.shape == (7,) and torch.isfinite(ladj).all() and not ladj.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_inverse_round_trip(name, dtype):
    """At the default ``coeff=0.97`` with every layer at its bound, near 0 and far from it: the
    error is within the documented ``tol · max(1, max|x|) · L / (1 - L)`` (``L`` the bound; a
    linear branch reaches it) plus rounding."""
    t = scrambled(4, **CONFIGS[name]).to(dtype)
    bound = t.lipschitz_bound
    for scale in (2.0, 1e3):
        x = scale * torch.randn(256, 4, dtype=dtype)
        context = context_for(t, 256)
        context = None if context is None else context.to(dtype)
        y, ladj = t.forward_and_log_det(x, context)
        x_back, ladj_inv = t.inverse_and_log_det(y, context)
        size = max(1.0, x.abs().max().item())
        allowed = TOLERANCE[dtype] * size * bound / (1 - bound) + 8 * torch.finfo(dtype).eps * size
        assert (x_back - x).abs().max() <= allowed
        assert (t.forward_and_log_det(x_back, context)[0] - y).abs().max() <= 2 * allowed
        torch.testing.assert_close(
            ladj_inv, -ladj, atol=1e-3 if dtype == torch.float32 else 1e-8, rtol=0
        )
        assert torch.isfinite(ladj).all()


def test_inverse_gradcheck():
    """Gradients of the inverse (the point and its log-determinant) by the implicit function
    theorem, against finite differences in ``y``, every parameter and the context."""
    t = scrambled(3, hidden=(5,), context_dim=2, scale=1.0)
    names = [n for n, _ in t.named_parameters()]

    class Inverse(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = t

        def forward(self, y, context):
            return self.t.inverse_and_log_det(y, context)

    inverse = Inverse()

    def f(y, context, *params):
        return functional_call(
            inverse, dict(zip(["t." + n for n in names], params, strict=True)), (y, context)
        )

    y = torch.randn(2, 3, dtype=F64, requires_grad=True)
    context = torch.randn(2, 2, dtype=F64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in t.parameters()]
    assert torch.autograd.gradcheck(f, (y, context, *params))


def test_inverse_not_converged_is_raised():
    t = scrambled(3, hidden=(8,), max_iter=2)
    y = torch.randn(5, 3, dtype=F64)
    with pytest.raises(InverseNotConverged, match=r"Residual.*did not converge in 2 iterations"):
        t.inverse_and_log_det(y)
    assert t._iterations(F64) == 2
    # the default follows the bound: log(1e-13) / log(0.97^2) iterations in float64
    assert Residual(3, hidden=(8,))._iterations(F64) == math.ceil(
        math.log(1e-13) / math.log(0.97**2)
    )


def test_forward_is_deterministic_in_train_and_eval_mode():
    t = scrambled(4, hidden=(8, 8))
    x = torch.randn(10, 4, dtype=F64)
    first = t.forward_and_log_det(x)
    for mode in (t.train, t.eval, t.train):
        mode()
        again = t.forward_and_log_det(x)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert not any(True for _ in t.buffers())


def test_finite_far_from_the_origin():
    t = scrambled(4, hidden=(8, 8)).float()
    base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
    d = dist.TransformedDistribution(base, [Inverted(t)])
    for radius in (10.0, 100.0, 1000.0):
        y = radius * torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 1.0]])
        assert torch.isfinite(d.log_prob(y)).all()
        assert torch.isfinite(t.inverse_and_log_det(y)[1]).all()


def test_argument_errors():
    with pytest.raises(ValueError, match="coeff: expected a number in"):
        Residual(3, coeff=1.0)
    with pytest.raises(ValueError, match="logdet: expected one of"):
        Residual(3, logdet="hutchinson")
    with pytest.raises(ValueError, match="activation: expected one of"):
        Residual(3, activation="relu")
    with pytest.raises(ValueError, match="geom_p: expected a probability"):
        Residual(3, geom_p=1.5)
    with pytest.raises(ValueError, match="tol: expected a positive number"):
        Residual(3, tol=0.0)
    with pytest.raises(ValueError, match="max_iter: expected a positive integer"):
        Residual(3, max_iter=0)
    with pytest.raises(ValueError, match="dim: expected a positive integer"):
        Residual(0)
    assert "coeff=0.97" in repr(Residual(3, hidden=(4,)))


def test_maximum_likelihood_fit():
    """Three blocks with exact log-determinants fitted to a 2-D banana by 200 Adam steps,
    data -> noise in the fast (forward) direction: the held-out NLL drops well below its
    value at the identity, and Pyro's distribution over ``Inverted`` blocks gives the same
    log-density."""
    torch.manual_seed(0)

    def banana(n: int) -> torch.Tensor:
        a = torch.randn(n)
        return torch.stack([a, 0.6 * a**2 - 1.0 + 0.3 * torch.randn(n)], -1)

    data, held_out = banana(2000), banana(1000)
    blocks = [Residual(2, hidden=(32, 32), logdet="exact") for _ in range(3)]
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)

    def nll(y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for block in blocks:
            y, ladj = block.forward_and_log_det(y)
            total = total + ladj
        return -(base.log_prob(y) + total).mean()

    with torch.no_grad():
        start = nll(held_out).item()
    optimiser = torch.optim.Adam([p for b in blocks for p in b.parameters()], lr=5e-3)
    for _ in range(200):
        batch = data[torch.randint(0, len(data), (256,))]
        loss = nll(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        end = nll(held_out).item()
        flow = dist.TransformedDistribution(base, [Inverted(b) for b in reversed(blocks)])
        torch.testing.assert_close(
            -flow.log_prob(held_out).mean().item(), end, rtol=1e-4, atol=1e-4
        )
    assert end < start - 0.5, (start, end)
