"""The continuous flow (pyroflows.transforms.CNF and pyroflows.CNF).

The generic harness (registry_continuous.py) checks the fixed-step rows against autograd
Jacobians; here: closed forms of linear fields under the adaptive solver, the Hutchinson
estimate against the exact trace, the adjoint against back-propagation, conditional shapes,
options and paths.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pyroflows as pf
from pyroflows.transforms import CNF, VelocityField
from pyroflows.transforms.continuous import EXACT_TRACE_MAX_DIM, exact_trace

TIGHT = {"atol": 1e-10, "rtol": 1e-10}


class Linear(nn.Module):
    """``v(x, t) = A x``: the flow map is ``exp(A)``, ``log|det| = tr(A)``."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, x, t, context=None):
        return x @ self.A.T


class TimeLinear(nn.Module):
    """``v(x, t) = t B x`` with ``B`` symmetric: the flow map is ``exp(B / 2)``."""

    def __init__(self, B: torch.Tensor) -> None:
        super().__init__()
        self.B = nn.Parameter(B)

    def forward(self, x, t, context=None):
        return t * (x @ self.B.T)


def perturbed(t: CNF, scale: float = 0.3, seed: int = 0) -> CNF:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


def test_a_linear_field_gives_the_matrix_exponential_and_a_gaussian():
    torch.manual_seed(0)
    A = torch.tensor([[0.3, 0.5, 0.0], [-0.2, -0.4, 0.1], [0.3, 0.0, 0.2]], dtype=torch.float64)
    t = CNF(3, field=Linear(A), **TIGHT)
    x = torch.randn(10, 3, dtype=torch.float64)
    y, ladj = t.forward_and_log_det(x)
    M = torch.linalg.matrix_exp(A)
    torch.testing.assert_close(y, x @ M.T, atol=1e-8, rtol=0)
    torch.testing.assert_close(ladj, torch.full((10,), float(A.trace()), dtype=torch.float64))
    # base N(0, I) pushed through exp(A): N(0, M Mᵀ)
    flow = pf.Flow([t], dim=3).double()
    gaussian = torch.distributions.MultivariateNormal(torch.zeros(3).double(), M @ M.T)
    points = 2 * torch.randn(20, 3, dtype=torch.float64)
    torch.testing.assert_close(
        flow().log_prob(points), gaussian.log_prob(points), atol=1e-8, rtol=0
    )


def test_a_time_dependent_linear_field_integrates_over_time():
    B = torch.tensor([[0.8, 0.3], [0.3, -0.6]], dtype=torch.float64)
    t = CNF(2, field=TimeLinear(B), **TIGHT)
    x = torch.randn(6, 2, dtype=torch.float64)
    y, ladj = t.forward_and_log_det(x)
    torch.testing.assert_close(y, x @ torch.linalg.matrix_exp(B / 2).T, atol=1e-8, rtol=0)
    torch.testing.assert_close(ladj, torch.full((6,), float(B.trace()) / 2, dtype=torch.float64))
    x_back, ladj_inv = t.inverse_and_log_det(y)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj)


# dopri5 controls the local error per step: the round trip's global error is a small multiple
# of the tolerance (about 4e-4 at the default 1e-5, float32).
ROUND_TRIPS = {
    "float32-default": (torch.float32, {}, 2e-3),
    "float64-tight": (torch.float64, {"atol": 1e-9, "rtol": 1e-9}, 1e-6),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_sample_then_inverse_round_trips_under_the_adaptive_solver(case):
    dtype, tolerances, tol = ROUND_TRIPS[case]
    flow = pf.CNF(3, hidden=(16, 16), **tolerances)
    perturbed(flow.transform)
    flow = flow.to(dtype)
    d = flow()
    y = d.sample((200,))
    assert y.dtype == dtype and torch.isfinite(y).all()
    x_back, ladj_inv = flow.transform.inverse_and_log_det(y)
    x, ladj = flow.transform.forward_and_log_det(x_back)
    torch.testing.assert_close(x, y, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj, -ladj_inv, atol=tol, rtol=tol)
    # a sample's log_prob comes from the draw (no solve); a fresh point's from the inverse
    torch.testing.assert_close(d.log_prob(y), flow().log_prob(y.clone()), atol=tol, rtol=tol)


def test_hutchinson_agrees_with_the_exact_trace_within_monte_carlo_error():
    t = perturbed(CNF(3, hidden=(16,), trace="exact")).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        exact = t.forward_and_log_det(x)[1]
        with t.options(trace="hutchinson"):
            # 400 copies of the points in one solve: one independent probe vector each
            draws = t.forward_and_log_det(x.expand(400, 4, 3))[1]
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert (draws.std(0) > 1e-3).all()  # a stochastic estimate
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    # the points do not depend on the estimator (with a fixed-step solver: an adaptive one
    # controls the error of the log-determinant too, so its steps depend on the estimate)
    with torch.no_grad(), t.options(solver="rk4", steps=8):
        exact = t.forward_and_log_det(x)[0]
        with t.options(trace="hutchinson"):
            assert torch.equal(t.forward_and_log_det(x)[0], exact)


def test_auto_trace_is_exact_up_to_the_threshold_and_exact_trace_forces_it():
    small, large = CNF(EXACT_TRACE_MAX_DIM, hidden=(8,)), CNF(EXACT_TRACE_MAX_DIM + 1, hidden=(8,))
    assert small.exact_trace and not large.exact_trace
    flow = pf.CNF(EXACT_TRACE_MAX_DIM + 1, hidden=(8,), solver="rk4", steps=4)
    perturbed(flow.transform)
    x = torch.randn(5, EXACT_TRACE_MAX_DIM + 1)
    with torch.no_grad():
        estimates = [flow().log_prob(x) for _ in range(2)]
        assert not torch.equal(*estimates)
        with exact_trace(flow):
            assert flow.transform.trace == "exact"
            exact = [flow().log_prob(x) for _ in range(2)]
        assert flow.transform.trace == "auto"
    torch.testing.assert_close(exact[0], exact[1])


def test_the_adjoint_gives_the_gradients_of_back_propagation():
    t = perturbed(CNF(3, hidden=(16,), context_dim=2, **TIGHT)).double()
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    context = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    leaves = [x, context, *t.parameters()]

    def grads(adjoint: bool):
        with t.options(adjoint=adjoint):
            y, ladj = t.forward_and_log_det(x, context)
            return torch.autograd.grad((y.square().sum() + ladj.sum()), leaves)

    for direct, adjoint in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(adjoint, direct, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("sample_shape", [(), (7,), (2, 3)], ids=str)
def test_conditional_shapes(sample_shape):
    flow = pf.CNF(2, hidden=(8,), context_dim=3, solver="rk4", steps=4)
    perturbed(flow.transform)
    context = torch.randn(5, 3)
    d = flow(context)
    assert d.batch_shape == (5,) and d.event_shape == (2,)
    y = d.rsample(sample_shape)
    assert y.shape == (*sample_shape, 5, 2)
    assert d.log_prob(y).shape == (*sample_shape, 5)
    # one context for a batch of points, and one point for a batch of contexts
    assert flow(context[0]).log_prob(torch.randn(4, 2)).shape == (4,)
    assert flow.transform.forward_and_log_det(torch.randn(2), context)[0].shape == (5, 2)
    paths = flow.sample_paths((4,), times=3, context=context)
    assert paths.shape == (3, 4, 5, 2)
    with pytest.raises(ValueError, match="context_dim=3 and needs a context"):
        flow()
    with pytest.raises(ValueError, match="last dimension 3"):
        flow(torch.randn(5, 2))


def test_the_velocity_field_reads_the_context_and_the_time():
    field = VelocityField(2, hidden=(8,), context_dim=1)
    perturbed(field)
    x = torch.randn(4, 2)
    zero, one = torch.zeros(4, 1), torch.ones(4, 1)
    assert not torch.allclose(field(x, 0.5, zero), field(x, 0.5, one))
    assert not torch.allclose(field(x, 0.1, zero), field(x, 0.9, zero))
    # one time per point, as flow matching draws them
    times = torch.rand(4)
    rows = torch.stack([field(x[i], times[i], zero[i]) for i in range(4)])
    torch.testing.assert_close(field(x, times, zero), rows)


def test_a_fresh_flow_is_the_identity_and_fixed_step_solvers_count_their_evaluations():
    t = CNF(2, solver="rk4", steps=8)
    x = torch.randn(3, 2)
    y, ladj = t.forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(3))
    assert t.evaluations == 4 * 8  # rk4: four evaluations per step
    with t.options(solver="euler", steps=5):
        t.forward_and_log_det(x)
        assert t.evaluations == 5


def test_paths_start_at_the_input_and_end_at_the_forward_map():
    t = perturbed(CNF(2, hidden=(16,), solver="rk4", steps=16))
    x = torch.randn(10, 2)
    with torch.no_grad():
        y = t.forward_and_log_det(x)[0]
        path = t.path(x, times=[0.0, 0.5, 1.0])
        back = t.path(y, times=torch.linspace(1, 0, 5))
    assert path.shape == (3, 10, 2)
    torch.testing.assert_close(path[0], x)
    torch.testing.assert_close(path[-1], y)
    torch.testing.assert_close(back[-1], x, atol=1e-5, rtol=1e-5)
    for bad in ([0.0], [0.0, 1.5], [0.0, 0.7, 0.3]):
        with pytest.raises(ValueError, match="times: expected"):
            t.path(x, times=bad)


def test_options_are_checked_and_restored():
    t = CNF(2)
    for bad, match in [
        ({"solver": "rk45"}, "solver: expected one of"),
        ({"trace": "approx"}, "trace: expected one of"),
        ({"atol": 0.0}, "atol: expected a positive number"),
        ({"steps": 0}, "steps"),
        ({"adjoint": 1}, "adjoint: expected True or False"),
    ]:
        with pytest.raises(ValueError, match=match):
            CNF(2, **bad)
        with pytest.raises(ValueError, match=match), t.options(**bad):
            pass
    with pytest.raises(TypeError, match="unexpected option 'tol'"), t.options(tol=1e-3):
        pass
    with t.options(solver="euler", steps=3, trace="hutchinson"):
        assert (t.solver, t.steps, t.trace) == ("euler", 3, "hutchinson")
    assert (t.solver, t.steps, t.trace) == ("dopri5", 32, "auto")
    with pytest.raises(ValueError, match="activation: expected one of"):
        CNF(2, activation="relu")


def test_gradients_reach_the_field_through_log_prob_and_rsample():
    flow = pf.CNF(2, hidden=(8,))
    d = flow()
    y = d.rsample((16,))
    loss = d.log_prob(y).mean() + y.square().mean() + flow().log_prob(torch.randn(4, 2)).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())
    assert flow.transform.field.net[-1].weight.grad.abs().sum() > 0


def test_a_flow_moves_with_to_and_keeps_its_options_through_save_and_load(tmp_path):
    flow = pf.CNF(2, hidden=(8,), solver="midpoint", steps=6, trace="exact", context_dim=1)
    perturbed(flow.transform)
    flow = flow.double()
    pf.save(flow, tmp_path / "m")
    loaded = pf.load(tmp_path / "m")
    assert loaded.transform.solver == "midpoint" and loaded.transform.steps == 6
    c, x = torch.randn(3, 1, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    assert torch.equal(loaded(c).log_prob(x), flow(c).log_prob(x))
    assert "solver='midpoint'" in repr(flow) and "steps=6" in repr(flow)


@pytest.mark.cuda
def test_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    flow = perturbed(pf.CNF(2, hidden=(16,))).to("cuda")
    d = flow()
    y = d.rsample((64,))
    assert y.device.type == "cuda" and d.log_prob(y).device.type == "cuda"
    assert flow().log_prob(y.detach().clone()).device.type == "cuda"


def test_sampling_without_gradients_defers_the_trace_until_log_prob_is_asked():
    flow = pf.CNF(2, hidden=(16,), solver="rk4", steps=8)
    perturbed(flow.transform)
    d = flow()
    calls = []
    original = flow.transform._solve
    flow.transform._solve = lambda x, c, reverse: calls.append(reverse) or original(x, c, reverse)
    samples = d.sample((300,))
    assert calls == []  # the path alone: no trace integrated
    with torch.no_grad():
        scored = d.log_prob(samples)  # the trace now, by a forward solve from the draw
    assert calls == [False]
    with torch.no_grad():
        torch.testing.assert_close(scored, flow().log_prob(samples.clone()), atol=1e-4, rtol=1e-4)
        assert torch.equal(d.log_prob(samples), scored)  # computed once, then kept
    assert calls == [False, True]  # the fresh distribution inverted; the kept value reused
    # with gradients, sampling integrates the trace with the path, as the ELBO needs
    y = d.rsample((4,))
    assert calls[-1] is False and d.log_prob(y).requires_grad


def test_paths_from_any_times_start_at_the_right_end():
    t = perturbed(CNF(2, hidden=(16,), solver="rk4", steps=16))
    x = torch.randn(5, 2)
    with torch.no_grad():
        full = t.path(x, times=[0.0, 0.5, 1.0])
        torch.testing.assert_close(t.path(x, times=[0.5, 1.0]), full[1:])  # x is x(0)
        back = t.path(full[-1], times=[1.0, 0.5, 0.0])
        torch.testing.assert_close(t.path(full[-1], times=[0.5, 0.0]), back[1:])  # x is x(1)


def test_a_refused_option_leaves_the_others_as_they_were():
    t = CNF(2)
    with pytest.raises(ValueError, match="steps"), t.options(trace="exact", steps=0):
        pass
    assert (t.trace, t.steps) == ("auto", 32)


def test_inference_mode_scores_as_no_grad_does():
    flow = pf.CNF(2, hidden=(16,), solver="rk4", steps=8)
    perturbed(flow.transform)
    y = torch.randn(7, 2)
    with torch.no_grad():
        expected = flow().log_prob(y)
    with torch.inference_mode():
        got = flow().log_prob(y)
        samples = flow().sample((3,))
    torch.testing.assert_close(got, expected)
    assert samples.shape == (3, 2)


@pytest.mark.parametrize("steps", [49, 61, 98])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fixed_step_solvers_take_exactly_their_steps(steps, dtype):
    t = CNF(2, hidden=(4,), solver="rk4", steps=steps).to(dtype)
    t.forward_and_log_det(torch.randn(3, 2, dtype=dtype))
    assert t.evaluations == 4 * steps


def test_a_field_that_ignores_x_has_a_zero_trace():
    class Drift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.tensor([1.0, -2.0]))

        def forward(self, x, t, context=None):
            return self.b.expand_as(x)

    t = CNF(2, field=Drift())
    for trace in ("exact", "hutchinson"):
        with t.options(trace=trace):
            y, ladj = t.forward_and_log_det(torch.zeros(3, 2))
        torch.testing.assert_close(y, torch.tensor([[1.0, -2.0]]).expand(3, 2))
        assert torch.equal(ladj, torch.zeros(3))


def test_a_deferred_log_det_uses_the_options_the_sample_was_drawn_with():
    flow = pf.CNF(20, hidden=(16,), solver="rk4", steps=32)  # Hutchinson by default at 20-D
    perturbed(flow.transform)
    d = flow()
    with flow.options(trace="exact"):
        samples = d.sample((5,))
    with torch.no_grad():
        scored = d.log_prob(samples)
        with exact_trace(flow):
            exact = flow().log_prob(samples.clone())  # by the inverse solve
    # the discretisation's difference between the two solves; Hutchinson's would be nats
    torch.testing.assert_close(scored, exact, atol=1e-3, rtol=1e-4)
