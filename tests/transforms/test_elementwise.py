import io

import pytest
import torch

import pyroflows as pf
from pyroflows.transforms import ActNorm, ElementwiseAffine, LeakyReLU, Logit, Sigmoid, SinhArcsinh


def test_elementwise_affine_starts_at_identity():
    t = ElementwiseAffine(3)
    x = torch.randn(4, 3)
    y, ladj = t.forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(4))


@pytest.mark.parametrize("direction", ["inverse", "forward"])
def test_actnorm_standardises_the_first_batch_in_its_direction(direction):
    data = torch.tensor([3.0, -2.0, 0.5]) + torch.tensor([5.0, 0.1, 1.0]) * torch.randn(500, 3)
    t = ActNorm(3)
    out = t.inv(data) if direction == "inverse" else t(data)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    assert bool(t.initialized)
    # later batches do not re-initialise
    before = t.log_scale.detach().clone()
    t.inv(torch.randn(100, 3))
    t(torch.randn(100, 3))
    assert torch.equal(t.log_scale.detach(), before)


def test_actnorm_waits_for_a_batch_of_two_and_floors_the_std():
    t = ActNorm(2, min_std=1e-2)
    t.inv(torch.randn(1, 2))
    assert not bool(t.initialized)
    constant = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 4.0]])
    z = t.inv(constant)
    assert bool(t.initialized) and torch.isfinite(z).all()
    assert t.log_scale[0].item() == pytest.approx(torch.tensor(1e-2).log().item())


def test_actnorm_loaded_state_is_not_reinitialised():
    t = ActNorm(2)
    t.inv(3 + torch.randn(100, 2))
    buffer = io.BytesIO()
    torch.save(t.state_dict(), buffer)
    buffer.seek(0)
    fresh = ActNorm(2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert "initialized=True" in repr(fresh)
    x = 10 * torch.randn(50, 2)  # would give a different initialisation
    torch.testing.assert_close(fresh.inv(x), t.inv(x))


def test_actnorm_rejects_bad_min_std():
    with pytest.raises(ValueError, match="min_std: expected a positive number"):
        ActNorm(2, min_std=0.0)


@pytest.mark.parametrize("slope", [0.0, -1.0, "0.1"])
def test_leaky_relu_rejects_bad_slopes(slope):
    with pytest.raises(ValueError, match="negative_slope: expected a positive number"):
        LeakyReLU(slope)


def test_leaky_relu_log_det_counts_negative_inputs():
    t = LeakyReLU(0.5)
    x = torch.tensor([[-1.0, -2.0, 3.0], [1.0, 1.0, 1.0]])
    y, ladj = t.forward_and_log_det(x)
    assert y.tolist() == [[-0.5, -1.0, 3.0], [1.0, 1.0, 1.0]]
    torch.testing.assert_close(ladj, torch.tensor([2 * torch.log(torch.tensor(0.5)), 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sigmoid_and_logit_stay_finite_at_the_edges(dtype):
    x = torch.tensor([[-200.0, -40.0, 0.0, 40.0, 200.0]], dtype=dtype)
    y, ladj = Sigmoid().forward_and_log_det(x)
    assert ((y > 0) & (y < 1)).all() and torch.isfinite(ladj).all()
    back, ladj_inv = Sigmoid().inverse_and_log_det(y)
    assert torch.isfinite(back).all() and torch.isfinite(ladj_inv).all()
    edges = torch.tensor([[0.0, 1.0, 0.5]], dtype=dtype)
    z, ladj_logit = Logit().forward_and_log_det(edges)
    assert torch.isfinite(z).all() and torch.isfinite(ladj_logit).all()


def test_sigmoid_and_logit_are_inverse_of_each_other():
    x = torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(Logit()(Sigmoid()(x)), x)
    assert Sigmoid().codomain.event_dim == 1 and Logit().domain.event_dim == 1
    assert Sigmoid().codomain.check(Sigmoid()(x)).all()


@pytest.mark.parametrize("cls", [Sigmoid, Logit])
def test_sigmoid_and_logit_refuse_a_context(cls):
    """They have no parameters to condition: a context_dim is refused at construction, not
    accepted and then demanded on every call."""
    message = rf"{cls.__name__}: expected no context_dim .*got context_dim=3"
    with pytest.raises(ValueError, match=message):
        cls(context_dim=3)
    with pytest.raises(TypeError, match=f"{cls.__name__}: expected no arguments; got event_shape"):
        cls(event_shape=(2,))
    t = cls(context_dim=0)  # asks for nothing: accepted, as before
    assert t.context_dim == 0
    x = torch.full((3, 2), 0.25)
    # in a conditional stack it passes the context by, as every unconditional transform does
    assert torch.equal(t.condition(torch.randn(3, 5))(x), t(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sinh_arcsinh_is_finite_far_in_the_tails(dtype):
    torch.manual_seed(0)
    t = SinhArcsinh(3).to(dtype)
    with torch.no_grad():
        t.raw_tail.copy_(torch.tensor([10.0, -10.0, 0.3]))  # beyond the soft bound both ways
        t.skew.copy_(torch.tensor([2.0, -1.0, 0.5]))
    x = torch.tensor([[1e3, -1e3, 1e6], [-1e6, 1e6, 0.0]], dtype=dtype, requires_grad=True)
    y, ladj = t.forward_and_log_det(x)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    (y.sum() + ladj.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(t.raw_tail.grad).all()
    back, _ = t.inverse_and_log_det(y.detach())
    assert torch.isfinite(back).all()


@pytest.mark.parametrize("cls", [ElementwiseAffine, ActNorm, SinhArcsinh])
@pytest.mark.parametrize("dim", [0, -2, 2.5, True])
def test_bad_dims_are_value_errors(cls, dim):
    with pytest.raises(ValueError, match="dim: expected a positive integer"):
        cls(dim)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_tracing_a_flow_with_an_uninitialised_actnorm_says_to_initialise_it_first():
    class Scored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flow = pf.NSF(2, layers=1, hidden=(8,), bins=4)  # ActNorm after each layer

        def forward(self, x):
            return self.flow().log_prob(x)

    module, x = Scored(), torch.randn(16, 2) * 3
    with pytest.raises(RuntimeError, match=r"ActNorm is not initialised yet.*before tracing"):
        torch.jit.trace(module, x, check_trace=False)
    with torch.no_grad():
        module(x)  # the first batch initialises ActNorm
    traced = torch.jit.trace(module, x, check_trace=False)
    y = torch.randn(5, 2)
    torch.testing.assert_close(traced(y), module(y))
