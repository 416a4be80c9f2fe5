"""Conditioner networks: MLP and MADE (the autoregressive property checked by autograd)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from pyroflows.nn import MADE, MLP

# -- MLP ---------------------------------------------------------------------------------------


def test_mlp_shapes_and_zero_init():
    net = MLP(3, 4, hidden=(16, 8))
    x = torch.randn(2, 5, 3)
    out = net(x)
    assert out.shape == (2, 5, 4)
    assert torch.equal(out, torch.zeros_like(out))
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 16), (16, 8), (8, 4)]


def test_mlp_without_zero_init_and_without_hidden_layers():
    torch.manual_seed(0)
    net = MLP(3, 2, hidden=(), zero_init=False)
    assert len(net) == 1 and isinstance(net[0], nn.Linear)
    assert net(torch.randn(4, 3)).abs().sum() > 0


def test_mlp_activation_is_instantiated_between_layers():
    net = MLP(2, 2, hidden=(4, 4), activation=nn.Tanh)
    assert sum(isinstance(m, nn.Tanh) for m in net) == 2


def test_mlp_errors():
    with pytest.raises(ValueError, match="expected input with last dimension 3; got shape"):
        MLP(3, 2)(torch.randn(5, 4))
    with pytest.raises(ValueError, match="in_features: expected a positive integer; got 0"):
        MLP(0, 2)
    with pytest.raises(ValueError, match="out_features: expected a positive integer"):
        MLP(2, True)
    with pytest.raises(ValueError, match="hidden: expected a positive integer; got -1"):
        MLP(2, 2, hidden=(4, -1))


# -- MADE --------------------------------------------------------------------------------------

DIM = 5
ORDERS = {
    "natural": ("natural", list(range(DIM))),
    "reversed": ("reversed", list(range(DIM - 1, -1, -1))),
    "given": ([2, 0, 4, 1, 3], [2, 0, 4, 1, 3]),
    "given-tensor": (torch.tensor([4, 2, 0, 3, 1]), [4, 2, 0, 3, 1]),
}


def perturbed(net: nn.Module, scale: float = 0.5) -> nn.Module:
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def output_jacobian(net: MADE, x: torch.Tensor, context=None) -> torch.Tensor:
    """``J[i, p, j] = ∂ out[i, p] / ∂ x[j]`` for a single point (feature i, parameter p)."""
    if net.param_major:  # out[p, i]
        return jacobian(lambda v: net(v, context).transpose(-1, -2), x)
    return jacobian(lambda v: net(v, context), x)


def check_autoregressive(net: MADE, order: torch.Tensor, require_all_allowed: bool) -> None:
    context = torch.randn(net.context_dim, dtype=torch.float64) if net.context_dim else None
    for _ in range(3):
        x = torch.randn(net.dim, dtype=torch.float64)
        jac = output_jacobian(net, x, context)  # (dim, out_per_dim, dim)
        assert jac.shape == (net.dim, net.out_per_dim, net.dim)
        allowed = order[None, :] < order[:, None]  # allowed[i, j]: j comes before i
        size = jac.abs().sum(1)  # (dim, dim)
        assert torch.equal(size[~allowed], torch.zeros_like(size[~allowed]))
        assert size[allowed].sum() > 0  # so the check above could fail
        if require_all_allowed:
            assert (size[allowed] > 0).all()


@pytest.mark.parametrize("key", sorted(ORDERS))
@pytest.mark.parametrize("context_dim", [0, 3])
def test_made_is_autoregressive_in_the_given_order(key, context_dim):
    order_arg, expected = ORDERS[key]
    torch.manual_seed(0)
    net = perturbed(
        MADE(DIM, hidden=(16, 16), out_per_dim=3, context_dim=context_dim, order=order_arg)
    )
    assert net.order.tolist() == expected
    check_autoregressive(net, net.order, require_all_allowed=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_made_random_order_is_a_permutation_and_autoregressive(seed):
    torch.manual_seed(seed)
    net = perturbed(MADE(DIM, hidden=(16, 16), out_per_dim=2, order="random"))
    assert sorted(net.order.tolist()) == list(range(DIM))
    check_autoregressive(net, net.order, require_all_allowed=False)


@pytest.mark.parametrize("param_major", [False, True], ids=["feature-major", "param-major"])
@pytest.mark.parametrize("hidden", [(), (4,), (16, 16, 16)])
@pytest.mark.parametrize("key", ["natural", "given"])
def test_made_connects_every_allowed_pair(key, hidden, param_major):
    # tanh keeps every unit alive, so every dependency the masks allow is realised: hidden layers
    # of width dim - 1 (the minimum accepted) already connect each output to all earlier inputs.
    torch.manual_seed(0)
    net = MADE(
        DIM,
        hidden=hidden,
        out_per_dim=2,
        order=ORDERS[key][0],
        activation=nn.Tanh,
        param_major=param_major,
    )
    check_autoregressive(perturbed(net), net.order, require_all_allowed=True)


def test_param_major_made_lays_parameters_out_in_contiguous_rows():
    net = MADE(DIM, hidden=(8,), out_per_dim=2, context_dim=3, param_major=True)
    h = net(torch.randn(6, DIM), torch.randn(6, 3))
    assert h.shape == (6, 2, DIM) and h.is_contiguous()


@pytest.mark.parametrize("hidden", [(), (DIM,), (16, DIM)], ids=str)
def test_made_depends_on_the_context_in_every_block(hidden):
    torch.manual_seed(0)
    net = MADE(DIM, hidden, out_per_dim=2, context_dim=3, order=[3, 1, 4, 0, 2], activation=nn.Tanh)
    net = perturbed(net)
    check_autoregressive(net, net.order, require_all_allowed=True)
    x = torch.randn(DIM, dtype=torch.float64)
    jac = jacobian(lambda c: net(x, c), torch.randn(3, dtype=torch.float64))
    assert jac.shape == (DIM, 2, 3)
    assert (jac.abs().sum((1, 2)) > 0).all()  # the first feature in the order too


def test_made_dim_one():
    torch.manual_seed(0)
    net = perturbed(MADE(1, hidden=(4,), out_per_dim=2, context_dim=2, activation=nn.Tanh))
    x, c = torch.randn(1, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    assert net(x, c).shape == (1, 2)
    assert torch.equal(output_jacobian(net, x, c), torch.zeros(1, 2, 1, dtype=torch.float64))
    assert jacobian(lambda v: net(x, v), c).abs().sum() > 0
    # without a context the output is a learnt constant
    plain = perturbed(MADE(1, hidden=(4,), out_per_dim=3))
    a, b = plain(torch.randn(6, 1, dtype=torch.float64)).unbind(0)[:2]
    assert torch.equal(a, b)


def test_made_shapes_and_context_broadcasting():
    torch.manual_seed(0)
    net = perturbed(MADE(3, hidden=(8, 8), out_per_dim=4, context_dim=2))
    x = torch.randn(7, 3, dtype=torch.float64)
    c = torch.randn(7, 2, dtype=torch.float64)
    assert net(x, c).shape == (7, 3, 4)
    assert net(x[0], torch.randn(5, 2, dtype=torch.float64)).shape == (5, 3, 4)
    assert net(torch.randn(4, 1, 3, dtype=torch.float64), c[:5]).shape == (4, 5, 3, 4)
    # a shared context equals the same context repeated per point
    torch.testing.assert_close(net(x, c[0]), net(x, c[0].expand(7, 2)))
    assert MADE(3, hidden=(8,)).double()(torch.randn(2, 6, 3, dtype=torch.float64)).shape == (
        2,
        6,
        3,
        2,
    )


def test_made_zero_init():
    net = MADE(4, hidden=(8, 8), out_per_dim=3, context_dim=2)
    out = net(torch.randn(10, 4), torch.randn(10, 2))
    assert torch.equal(out, torch.zeros(10, 4, 3))
    assert torch.equal(net.layers[-1].weight, torch.zeros_like(net.layers[-1].weight))
    assert torch.equal(net.layers[-1].bias, torch.zeros_like(net.layers[-1].bias))


def test_made_state_dict_round_trip_restores_order_and_masks():
    torch.manual_seed(0)
    net = perturbed(MADE(6, hidden=(8, 8), out_per_dim=2, context_dim=1, order="random"))
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "order" in state and all(f"layers.{i}.mask" in state for i in range(3))

    torch.manual_seed(5)  # a different random order
    fresh = MADE(6, hidden=(8, 8), out_per_dim=2, context_dim=1, order="random").double()
    assert not torch.equal(fresh.order, net.order)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.order, net.order)
    x, c = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    assert torch.equal(fresh(x, c), net(x, c))


def test_made_buffers_follow_to():
    net = MADE(3, hidden=(4,)).to(torch.float64)
    assert all(layer.mask.dtype == torch.float64 for layer in net.layers)
    assert net.order.dtype == torch.long
    assert net(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_made_repr():
    text = repr(MADE(3, hidden=(4,), context_dim=2))
    assert "MADE(" in text and "hidden=(4,)" in text and "context_dim=2" in text


def test_made_input_errors():
    net = MADE(3, hidden=(4,), context_dim=2)
    with pytest.raises(ValueError, match="expected input with last dimension 3; got shape"):
        net(torch.randn(5, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"expected a context of shape \(\*batch, 2\).*got None"):
        net(torch.randn(5, 3))
    with pytest.raises(ValueError, match="expected a context with last dimension 2; got shape"):
        net(torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="batch shape broadcasts"):
        net(torch.randn(5, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"expected no context \(context_dim=0\)"):
        MADE(3, hidden=(4,))(torch.randn(5, 3), torch.randn(5, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "dim: expected a positive integer; got 0"),
        ({"out_per_dim": 0}, "out_per_dim: expected a positive integer"),
        ({"context_dim": -1}, "context_dim: expected a non-negative integer; got -1"),
        ({"hidden": (8, 3)}, r"at least dim - 1 = 4 units.*got \(8, 3\)"),
        ({"hidden": (5, 4), "context_dim": 1}, r"at least dim = 5 units.*got \(5, 4\)"),
        ({"order": "sideways"}, "order: expected 'natural', 'reversed', 'random'"),
        ({"order": [0, 1, 2]}, r"order: expected shape \(5,\); got shape \(3,\)"),
        ({"order": [0, 1, 2, 3, 3]}, r"expected a permutation of 0..4; got \[0, 1, 2, 3, 3\]"),
        ({"order": [0.0, 1.0, 2.0, 3.0, 4.0]}, "order: expected integers; got dtype"),
        ({"order": object()}, "order: expected a permutation of 0..4 as integers"),
    ],
)
def test_made_constructor_errors(kwargs, message):
    args = {"dim": DIM, "hidden": (8, 8), **kwargs}
    with pytest.raises(ValueError, match=message):
        MADE(**args)
