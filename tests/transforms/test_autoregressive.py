"""MaskedAffineAutoregressive (MAF / IAF): pass counts, caching, triangularity, conditioning.

The generic harness (``test_generic.py``) checks maths, shapes, gradients and save/load; here
are the properties particular to autoregressive transforms.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch.autograd.functional import jacobian

from pyroflows.nn import MADE
from pyroflows.transforms import Affine, MaskedAutoregressive
from pyroflows.transforms.autoregressive import MaskedAffineAutoregressive

from .registry import fitted_stack, rising_rays

DIM = 5
H = (16, 16)
ORIENTATIONS = ["maf", "iaf"]


def make(orientation="maf", seed=0, scale=0.3, **kwargs) -> MaskedAffineAutoregressive:
    """A float64 transform with its parameters perturbed away from the identity."""
    torch.manual_seed(seed)
    t = MaskedAffineAutoregressive(DIM, hidden=H, orientation=orientation, **kwargs).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


class CallCounter:
    """Counts forward calls of a module through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def base(dim: int = DIM) -> dist.Distribution:
    return dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1)


# -- identity at initialisation --------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_identity_at_initialisation(orientation):
    t = MaskedAffineAutoregressive(DIM, hidden=H, orientation=orientation, context_dim=2)
    x, c = torch.randn(6, DIM), torch.randn(6, 2)
    y, ladj = t.forward_and_log_det(x, c)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(6))
    x_back, ladj_inv = t.inverse_and_log_det(x, c)
    assert torch.equal(x_back, x) and torch.equal(ladj_inv, torch.zeros(6))


# -- cost of each direction ------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_conditioner_passes_per_direction(orientation):
    t = make(orientation)
    counter = CallCounter(t.conditioner)
    x = torch.randn(8, DIM, dtype=torch.float64)
    y, _ = t.forward_and_log_det(x)
    forward_calls = counter.take()
    x_back, _ = t.inverse_and_log_det(y)
    inverse_calls = counter.take()
    torch.testing.assert_close(x_back, x)
    if orientation == "iaf":
        assert (forward_calls, inverse_calls) == (1, DIM)
    else:
        assert (forward_calls, inverse_calls) == (DIM, 1)
    # log|det J| of a known pair is one pass in either orientation
    t.condition(None).with_cache(0).log_abs_det_jacobian(x, y)
    assert counter.take() == 1


def test_iaf_log_prob_of_own_samples_costs_no_extra_pass_and_gradients_flow_twice():
    t = make("iaf")
    counter = CallCounter(t.conditioner)
    for _ in range(2):  # two separate rounds: no stale graph, no "backward a second time"
        t.zero_grad()
        d = dist.TransformedDistribution(base(), [t.condition(None)])
        y = d.rsample((64,))
        assert counter.take() == 1
        log_prob = d.log_prob(y)
        assert counter.take() == 0  # served from the cache: no inversion, no second pass
        assert log_prob.shape == (64,)
        # the cached log|det J| is the one the uncached transform computes
        x_fresh = t.inverse_and_log_det(y.detach())[0]
        counter.take()
        expected = base().log_prob(x_fresh) - t.forward_and_log_det(x_fresh)[1]
        counter.take()
        torch.testing.assert_close(log_prob.detach(), expected.detach())
        (y.square().sum() - log_prob.sum()).backward()
        for name, p in t.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_maf_log_prob_of_data_is_one_pass():
    t = make("maf")
    counter = CallCounter(t.conditioner)
    d = dist.TransformedDistribution(base(), [t.condition(None)])
    y = torch.randn(32, DIM, dtype=torch.float64)
    assert d.log_prob(y).shape == (32,)
    assert counter.take() == 1
    assert d.sample((3,)).shape == (3, DIM)
    assert counter.take() == DIM


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_repeated_log_prob_on_the_same_tensor_across_optimiser_steps(orientation):
    t = make(orientation)
    data = 2.0 + torch.randn(128, DIM, dtype=torch.float64)
    optimiser = torch.optim.Adam(t.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        d = dist.TransformedDistribution(base(), [t.condition(None)])
        loss = -d.log_prob(data).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert len(set(losses)) == 3  # each step saw the updated parameters, not a stale cache


def test_iaf_guide_in_svi_over_several_steps():
    t = MaskedAffineAutoregressive(3, hidden=(8, 8), orientation="iaf")
    target = torch.tensor([1.0, -2.0, 0.5])

    def model():
        pyro.sample("z", dist.Normal(target, 0.5).to_event(1))

    def guide():
        pyro.module("iaf", t)
        base_float = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        pyro.sample("z", dist.TransformedDistribution(base_float, [t.condition(None)]))

    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is not None for p in t.parameters())


# -- the autoregressive structure ----------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("order", ["natural", "reversed", "random", [3, 0, 4, 2, 1]], ids=str)
def test_jacobian_is_triangular_in_the_order(orientation, order):
    t = make(orientation, order=order)
    position = t.order
    assert sorted(position.tolist()) == list(range(DIM))
    if not isinstance(order, str):
        assert position.tolist() == order
    for _ in range(3):
        x = torch.randn(DIM, dtype=torch.float64)
        jac = jacobian(lambda v: t.forward_and_log_det(v)[0], x)
        later = position[None, :] > position[:, None]  # later[i, j]: j comes after i
        assert torch.equal(jac[later], torch.zeros_like(jac[later]))
        earlier = position[None, :] < position[:, None]
        assert jac[earlier].abs().sum() > 0  # so the check above could fail
        assert (jac.diagonal() > 0).all()  # y_i increases with x_i (exp(s) > 0)


def test_conditioner_is_a_made_with_the_given_settings():
    t = MaskedAffineAutoregressive(4, hidden=(6, 7), context_dim=3, order="reversed")
    assert isinstance(t.conditioner, MADE)
    assert t.conditioner.out_per_dim == t.params_per_feature == 2
    assert t.conditioner.context_dim == 3 and t.conditioner.hidden == (6, 7)
    assert t.order.tolist() == [3, 2, 1, 0]
    assert "orientation='maf'" in repr(t) and "log_scale_bound=3.0" in repr(t)


# -- conditional use -------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_condition_with_a_batch_of_contexts(orientation):
    t = make(orientation, context_dim=3)
    contexts = torch.randn(6, 3, dtype=torch.float64)
    x = torch.randn(6, DIM, dtype=torch.float64)
    tc = t.condition(contexts)
    y = tc(x)
    ladj = tc.log_abs_det_jacobian(x, y)
    assert y.shape == (6, DIM) and ladj.shape == (6,)
    for i in range(6):  # row by row equals the batch
        y_i, ladj_i = t.forward_and_log_det(x[i], contexts[i])
        torch.testing.assert_close(y_i, y[i])
        torch.testing.assert_close(ladj_i, ladj[i])
    # one point broadcast against the batch of contexts: the map differs with the context
    y_shared = t.condition(contexts).with_cache(0)(x[0])
    assert y_shared.shape == (6, DIM)
    assert (y_shared[1:] - y_shared[0]).abs().amax(-1).min() > 0
    torch.testing.assert_close(
        t.condition(contexts).with_cache(0).inv(y_shared), x[0].expand(6, -1)
    )


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_conditional_distribution_has_the_context_batch_shape(orientation):
    t = make(orientation, context_dim=2)
    contexts = torch.randn(4, 2, dtype=torch.float64)
    d = dist.TransformedDistribution(base().expand([4]), [t.condition(contexts)])
    assert d.batch_shape == (4,) and d.event_shape == (DIM,)
    sample = d.rsample((3,))
    assert sample.shape == (3, 4, DIM)
    log_prob = d.log_prob(sample)
    assert log_prob.shape == (3, 4) and torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    assert all(p.grad is not None for p in t.parameters())


def test_the_first_feature_in_the_order_depends_on_the_context():
    t = make("maf", context_dim=2, order=[2, 0, 1, 3, 4])  # feature 1 comes first
    x = torch.randn(DIM, dtype=torch.float64)
    jac = jacobian(lambda c: t.forward_and_log_det(x, c)[0], torch.randn(2, dtype=torch.float64))
    assert jac[1].abs().sum() > 0


def test_dim_one_with_a_context():
    torch.manual_seed(0)
    t = MaskedAffineAutoregressive(1, hidden=(4,), context_dim=2, orientation="iaf").double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, c = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    y, ladj = t.forward_and_log_det(x, c)
    torch.testing.assert_close(t.inverse_and_log_det(y, c)[0], x)
    assert ladj.shape == (5,) and ladj.abs().sum() > 0


# -- far in the tails --------------------------------------------------------------------------
# (orientation, seed): trained this way, the unclamped layers' log-density rises again far out
# (see the second test).
FITTED = [("maf", 1), ("iaf", 0)]


@pytest.mark.parametrize(("orientation", "seed"), FITTED)
def test_log_density_decreases_far_in_the_tails(orientation, seed):
    """A MAF / IAF fitted for 50 steps: along every ray, the log-density keeps decreasing from
    radius 1e2 to 1e7. (Before the conditioner read clamped inputs it was, e.g., higher at
    1e6 * (-1, -1, -1, -1) than at 1e4 * (-1, -1, -1, -1).)"""
    d = fitted_stack(
        lambda i: MaskedAffineAutoregressive(4, hidden=(64, 64), orientation=orientation), seed
    )
    assert rising_rays(d) == []


@pytest.mark.parametrize(("orientation", "seed"), FITTED)
def test_unclamped_conditioners_give_log_densities_that_rise_again_far_out(orientation, seed):
    """The defect the clamp removes, reproduced with ``conditioner_bound=None``: the MADE's
    ReLU units grow linearly along a ray, each layer's soft-clamped log-scale sweeps across
    its range at a radius set by the weights, and while it sweeps ``|x|`` shrinks as ``|y|``
    grows."""
    d = fitted_stack(
        lambda i: MaskedAutoregressive(
            4, Affine(), hidden=(64, 64), orientation=orientation, conditioner_bound=None
        ),
        seed,
    )
    assert rising_rays(d) != []
    # and with the clamp, the same layers far out are fixed affine maps: the log-density of a
    # Gaussian, a quadratic in the radius, beyond a few bounds
    layer = d.transforms[-1]
    layer.conditioner_bound = 10.0
    far = torch.tensor([[-1e5] * 4, [-1e6] * 4], dtype=torch.float64)
    h = layer._params(far, None)
    torch.testing.assert_close(h[0], h[1], atol=0, rtol=0)


def test_the_clamp_changes_nothing_inside_the_bound():
    torch.manual_seed(0)
    clamped = MaskedAutoregressive(DIM, Affine(), hidden=H).double()
    with torch.no_grad():
        for p in clamped.parameters():
            p.add_(0.3 * torch.randn_like(p))
    free = MaskedAutoregressive(DIM, Affine(), hidden=H, conditioner_bound=None).double()
    free.load_state_dict(clamped.state_dict())
    y = 3.0 * torch.randn(64, DIM, dtype=torch.float64).clamp(-3, 3)
    for a, b in zip(clamped.inverse_and_log_det(y), free.inverse_and_log_det(y), strict=True):
        assert torch.equal(a, b)
    y[0, 0] = 50.0  # beyond it, the clamped conditioner reads 10
    assert not torch.equal(clamped.inverse_and_log_det(y)[0], free.inverse_and_log_det(y)[0])
    assert "conditioner_bound=None" in repr(free) and "conditioner_bound" not in repr(clamped)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"orientation": "forward"}, "orientation: expected 'maf' or 'iaf'; got 'forward'"),
        ({"dim": 0}, "dim: expected a positive integer; got 0"),
        ({"hidden": (2,)}, r"at least dim - 1 = 3 units.*got \(2,\)"),
        ({"hidden": (3,), "context_dim": 1}, r"at least dim = 4 units"),
        ({"order": "sorted"}, "order: expected 'natural', 'reversed', 'random'"),
        ({"order": [0, 1, 1, 2]}, "order: expected a permutation of 0..3"),
        ({"log_scale_bound": 0.0}, "log_scale_bound: expected a positive number; got 0.0"),
        ({"context_dim": -2}, "context_dim: expected a non-negative integer; got -2"),
    ],
)
def test_constructor_errors(kwargs, message):
    args = {"dim": 4, "hidden": (8,), **kwargs}
    with pytest.raises(ValueError, match=message):
        MaskedAffineAutoregressive(**args)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_input_errors(orientation):
    t = make(orientation, context_dim=2)
    x = torch.randn(3, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a context"):
        t(x)
    with pytest.raises(ValueError, match="needs a context"):
        t.inv(x)
    with pytest.raises(ValueError, match="expected a context with last dimension 2"):
        t.condition(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"expected an input with last dimension {DIM}"):
        t.forward_and_log_det(torch.randn(3, DIM + 1, dtype=torch.float64), torch.randn(3, 2))
    for method in (t.forward_and_log_det, t.inverse_and_log_det):
        with pytest.raises(
            ValueError, match="MaskedAffineAutoregressive: expected a context whose"
        ):
            method(x, torch.randn(4, 2, dtype=torch.float64))
