"""The FlowTransform contract: conditioning, caching and Pyro integration."""

import copy
import pickle
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformedDistribution
from pyro.infer import SVI, Trace_ELBO

import pyroflows as pf
from pyroflows.transforms import (
    AffineCoupling,
    ConditionedTransform,
    FlowTransform,
    LULinear,
    Permutation,
    coupling_mask,
)
from pyroflows.transforms.base import has_inverse


def perturbed(t, scale=0.3):
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def base(dim=4):
    return dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)


def test_a_conditioned_view_scores_its_own_samples_without_a_second_conditioner_pass():
    t = perturbed(AffineCoupling(4, hidden=(8,)))
    calls = count_calls(t.conditioner)
    d = dist.TransformedDistribution(base(), [t.condition(None)])
    x = d.rsample((16,))
    assert len(calls) == 1
    log_prob = d.log_prob(x)
    assert len(calls) == 1
    # the fused value equals the recomputed one
    t2 = dist.TransformedDistribution(base(), [t])
    torch.testing.assert_close(log_prob, t2.log_prob(x))
    assert len(calls) == 3  # the bare module (no cache): one inverse pass, one for log|det J|


def test_log_prob_of_rsample_backpropagates_twice_in_a_row():
    t = perturbed(AffineCoupling(4, hidden=(8,), context_dim=2))
    context = torch.randn(16, 2)
    for _ in range(2):
        d = dist.TransformedDistribution(base(), [t.condition(context)])
        x = d.rsample()
        d.log_prob(x).sum().backward()
        assert all(p.grad is not None for p in t.parameters())


def test_scoring_the_same_tensor_across_optimiser_steps_is_never_stale():
    """A distribution over a kept view, built once and scored on the same tensor every step
    (as Pyro's flow tutorial does), gives a fresh distribution's values and gradients."""
    t = AffineCoupling(4, hidden=(8,))
    optimizer = torch.optim.Adam(t.parameters(), lr=0.1)
    data = 3 * torch.randn(64, 4)
    kept = dist.TransformedDistribution(base(), [t.condition(None)])
    losses = []
    for _ in range(3):
        loss = -kept.log_prob(data).mean()
        fresh = -dist.TransformedDistribution(base(), [t.condition(None)]).log_prob(data).mean()
        torch.testing.assert_close(loss, fresh)
        grads = torch.autograd.grad(loss, list(t.parameters()), retain_graph=True)
        fresh_grads = torch.autograd.grad(fresh, list(t.parameters()))
        for g, f in zip(grads, fresh_grads, strict=True):
            torch.testing.assert_close(g, f)
        optimizer.zero_grad()
        loss.backward()  # raised "backward through the graph a second time" at step 2
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] != losses[1] != losses[2]  # the parameters moved, and the loss with them


def test_views_share_parameters_and_cache():
    t = AffineCoupling(4, hidden=(8,), context_dim=2)
    view = t.condition(torch.randn(2))
    assert isinstance(view, ConditionedTransform)
    assert view.module is t and view.context.shape == (2,)
    assert "AffineCoupling" in repr(view)
    assert view._cache_size == 1 and view.with_cache(0)._cache_size == 0
    x = torch.randn(4)
    assert view(x) is view(x)
    assert view.with_cache(0)(x) is not view.with_cache(0)(x)
    with pytest.raises(ValueError, match=r"use t\.condition"):
        t.with_cache(1)


def test_unconditional_transforms_ignore_a_context_and_cache_on_request():
    t = LULinear(3)
    view = t.condition(torch.randn(7))
    assert view.context is None
    cached = t.with_cache(1)
    assert isinstance(cached, ConditionedTransform) and t.with_cache(0) is t
    x = torch.randn(2, 3)
    assert cached.inv(cached(x)) is x


def test_inverse_of_a_conditional_transform_can_be_conditioned():
    t = perturbed(AffineCoupling(4, hidden=(8,), context_dim=2))
    context = torch.randn(5, 2)
    x = torch.randn(5, 4)
    y = t.condition(context)(x)
    torch.testing.assert_close(t.inv.condition(context)(y), x)
    assert t.inv.inv is t


def test_in_a_conditional_distribution_inside_a_plate():
    t1 = perturbed(AffineCoupling(4, hidden=(8,), context_dim=3))
    t2 = Permutation(4)
    t3 = perturbed(AffineCoupling(4, hidden=(8,), mask=coupling_mask(4, flip=True), context_dim=3))
    cond = ConditionalTransformedDistribution(base(), [t1, t2, t3])
    context = torch.randn(10, 3)

    def model():
        with pyro.plate("data", 10):
            return pyro.sample("x", cond.condition(context).expand([10]))

    x = model()
    assert x.shape == (10, 4)
    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    assert trace.nodes["x"]["log_prob"].shape == (10,)


def test_deepcopy_and_pickle_after_a_cached_call():
    t = perturbed(AffineCoupling(4, hidden=(8,)))
    view = t.with_cache(1)
    view(torch.randn(3, 4, requires_grad=True))
    t(torch.randn(3, 4))
    copied = copy.deepcopy(view)
    x = torch.randn(2, 4)
    torch.testing.assert_close(copied(x), view(x))
    restored = pickle.loads(pickle.dumps(t))
    torch.testing.assert_close(restored(x), t(x))


def test_svi_with_a_flow_guide_over_several_steps():
    """A coupling-flow guide learns a correlated Gaussian posterior by SVI."""
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]])
    target = dist.MultivariateNormal(torch.tensor([1.0, -1.0]), cov)

    def model():
        pyro.sample("z", target)

    layers = torch.nn.ModuleList(
        [AffineCoupling(2, hidden=(16,), mask=coupling_mask(2, flip=i % 2)) for i in range(4)]
    )

    def guide():
        pyro.module("flow", layers)
        views = [layer.condition(None) for layer in layers]
        pyro.sample("z", dist.TransformedDistribution(base(2), views))

    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), elbo)
    losses = [svi.step() for _ in range(300)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert set(pyro.get_param_store().keys()) == {
        f"flow$$${name}" for name, _ in layers.named_parameters()
    }
    with torch.no_grad():
        samples = dist.TransformedDistribution(base(2), list(layers)).sample((4000,))
    # Monte Carlo error on the mean is ~0.02; the flow must have moved from N(0, I) to the target.
    torch.testing.assert_close(samples.mean(0), target.mean, atol=0.15, rtol=0)
    assert torch.corrcoef(samples.T)[0, 1] > 0.5


# -- one-way transforms, has_inverse, sign and torch.jit.trace ------------------------------------
class OneWayShift(FlowTransform):
    """``y = x + shift``, declared one-way: the contract's example of a transform without an
    inverse (it implements the forward map only)."""

    inverse_kind = "none"

    def __init__(self, dim: int) -> None:
        super().__init__(event_shape=(dim,))
        self.shift = torch.nn.Parameter(torch.zeros(dim))

    def _forward_and_log_det(self, x, context):
        return x + self.shift, x.new_zeros(x.shape[:-1])


def test_a_one_way_transform_scores_its_own_samples_and_refuses_other_points():
    t = OneWayShift(2)
    flow = pf.Flow([t], dim=2)
    d = flow()
    z = d.rsample((4,))
    torch.testing.assert_close(d.log_prob(z), d.base_dist.log_prob(z - t.shift))
    with pytest.raises(NotImplementedError, match=r"OneWayShift has no inverse \(inverse_kind"):
        d.log_prob(torch.randn(3, 2))
    with torch.no_grad():
        t.shift.add_(1.0)
    with pytest.raises(NotImplementedError, match="changed since it drew this point"):
        d.log_prob(z)
    with pytest.raises(NotImplementedError, match="OneWayShift has no inverse"):
        t.inverse_and_log_det(torch.randn(3, 2))
    with pytest.raises(NotImplementedError, match="OneWayShift has no inverse"):
        t.inv(torch.randn(3, 2))


def test_has_inverse():
    from pyro.distributions import transforms as T

    ours = AffineCoupling(2, hidden=(8,))
    assert has_inverse(ours) and has_inverse(ours.condition(None)) and has_inverse(ours.inv)
    assert not has_inverse(OneWayShift(2)) and not has_inverse(OneWayShift(2).with_cache(1))
    one_way = [
        T.planar(2),
        T.radial(2),
        T.sylvester(2),
        T.polynomial(2),
        T.block_autoregressive(2),
        T.neural_autoregressive(2),
        T.conditional_planar(2, 3),
        T.conditional_radial(2, 3),
        T.conditional_neural_autoregressive(2, 3),
    ]
    for t in one_way:
        assert not has_inverse(t), type(t).__name__
    assert not has_inverse(dist.transforms.ComposeTransform([T.ExpTransform(), T.Planar(2)]))
    assert has_inverse(T.Planar(2).inv)  # its inverse is the planar forward map
    invertible = [T.ExpTransform(), T.affine_coupling(2), T.conditional_affine_coupling(2, 3)]
    assert all(has_inverse(t) for t in invertible)
    with pytest.raises(TypeError, match="has_inverse: expected a torch or Pyro transform"):
        has_inverse(torch.nn.Linear(2, 2))


def test_sign_is_absent_rather_than_raising():
    t = AffineCoupling(2, hidden=(8,))
    assert not hasattr(t, "sign")  # torch's Transform.sign raised NotImplementedError


def test_jit_trace_of_a_module_holding_a_flow():
    """``torch.jit.trace`` probes every attribute of every module (``hasattr``): a transform's
    ``sign`` raised NotImplementedError there."""

    class Density(torch.nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.flow = flow

        def forward(self, x):
            return self.flow().log_prob(x)

    torch.manual_seed(0)
    for flow in (pf.RealNVP(2, layers=2, hidden=(8,)), pf.MAF(3, layers=2, hidden=(8,))):
        module = Density(perturbed(flow))
        x = torch.randn(5, flow.dim)
        with warnings.catch_warnings():
            # torch.jit.trace is deprecated, and warns about Python-side shape checks
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, x)
        other = torch.randn(7, flow.dim)
        torch.testing.assert_close(traced(other), module(other))
