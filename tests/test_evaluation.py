"""pyroflows.evaluation: mean NLL with its standard error, and the KL gap to a known density."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pyroflows as pf
from pyroflows.datasets import toy
from pyroflows.evaluation import Evaluation, evaluate


def perturbed(flow: pf.Flow) -> pf.Flow:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow


def standard_normal(x: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)


def test_mean_nll_and_its_standard_error_in_float64_any_batch_size():
    flow = perturbed(pf.MAF(3, layers=2, hidden=(8,)))
    x = torch.randn(103, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll = -flow().log_prob(x).double()
    result = evaluate(flow, x)
    assert result == evaluate(flow, x, batch_size=10_000)
    small = evaluate(flow, x, batch_size=7)  # float32 kernels round by batch size
    assert small.nll == pytest.approx(result.nll, abs=1e-6)
    assert result.n == 103
    assert result.nll == pytest.approx(nll.mean().item(), abs=1e-12)
    assert result.nll_se == pytest.approx(nll.std().item() / math.sqrt(103), abs=1e-12)
    assert result.entropy is result.kl_gap is result.kl_gap_se is None
    assert evaluate(flow, x[:1]).nll_se is None  # one point: no spread to estimate
    assert all(p.grad is None for p in flow.parameters())


def test_the_kl_gap_is_zero_for_the_truth_and_matches_a_closed_form():
    flow = pf.RealNVP(2, layers=2, hidden=(8,))  # untrained: exactly its N(0, I) base
    x = 2.0 * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0))
    # points from the flow's own density: the gap is 0 up to float32 rounding
    same = evaluate(flow, x / 2.0, truth=standard_normal)
    assert abs(same.kl_gap) < 1e-5 and same.kl_gap_se < 1e-5
    # p = N(0, 4 I), q = N(0, I) in 2-D: KL(p || q) = 2 (log(1/2) + 4/2 - 1/2) = 1.6137 nats
    wide = torch.distributions.Normal(0.0, 2.0)
    result = evaluate(flow, x, truth=lambda v: wide.log_prob(v).sum(-1))
    exact = 2 * (math.log(0.5) + 2.0 - 0.5)
    assert abs(result.kl_gap - exact) < 4 * result.kl_gap_se  # a 4-sigma statistical check
    assert result.kl_gap == pytest.approx(result.nll - result.entropy, abs=1e-9)
    # entropy of N(0, 4 I): 2 (0.5 log(2 pi e) + log 2) = 4.2242 nats
    assert abs(result.entropy - 2 * (0.5 * math.log(2 * math.pi * math.e) + math.log(2.0))) < (
        4 * result.entropy_se
    )


def test_a_toy_is_a_truth_and_one_without_a_density_is_refused():
    ring = toy("ring", 500, seed=3)
    flow = perturbed(pf.RealNVP(2, layers=2, hidden=(8,)))
    by_toy = evaluate(flow, ring.samples, truth=ring)
    by_callable = evaluate(flow, ring.samples, truth=ring.log_prob)
    assert by_toy == by_callable and by_toy.kl_gap > 0
    with pytest.raises(ValueError, match="truth: expected a known log-density; the toy 'moons'"):
        evaluate(flow, ring.samples, truth=toy("moons", 10))
    with pytest.raises(TypeError, match="truth: expected a callable log-density or a Toy"):
        evaluate(flow, ring.samples, truth=3.0)
    with pytest.raises(ValueError, match=r"truth: expected log-densities of shape \(500,\)"):
        evaluate(flow, ring.samples, truth=lambda v: v)


def test_conditional_flows_take_a_context_per_point_or_one_for_all():
    flow = perturbed(pf.RealNVP(2, layers=2, hidden=(8,), context_dim=3))
    x, c = torch.randn(9, 2), torch.randn(9, 3)
    with torch.no_grad():
        expected = -flow(c).log_prob(x).double().mean().item()
        shared = -flow(c[0]).log_prob(x).double().mean().item()
    assert evaluate(flow, x, c, batch_size=4).nll == pytest.approx(expected, abs=1e-6)
    assert evaluate(flow, x, c[0], batch_size=4).nll == pytest.approx(shared, abs=1e-6)
    seen = []

    def truth(points, context):
        seen.append(context.shape)
        return standard_normal(points) + context[:, 0]

    gap = evaluate(flow, x, c, truth=truth, batch_size=4)
    assert seen == [(4, 3), (4, 3), (1, 3)] and math.isfinite(gap.kl_gap)
    with pytest.raises(ValueError, match=r"context: expected 9 rows, one per point .*\(3,\)"):
        evaluate(flow, x, c[:5])
    with pytest.raises(ValueError, match="context"):
        evaluate(flow, x)  # a conditional flow needs one


def test_dtypes_images_and_bad_data():
    flow = perturbed(pf.MAF(2, layers=1, hidden=(8,)))
    x = torch.randn(20, 2, dtype=torch.float64)
    assert evaluate(flow, x).nll == pytest.approx(evaluate(flow, x.float()).nll, abs=1e-12)
    assert evaluate(flow.double(), x).nll == pytest.approx(evaluate(flow, x).nll, abs=1e-5)
    image = pf.Glow((1, 4, 4), levels=1, steps=1, channels=4)
    assert evaluate(image, torch.rand(6, 1, 4, 4)).n == 6
    with pytest.raises(ValueError, match=r"data: expected a tensor of shape \(N, 1, 4, 4\)"):
        evaluate(image, torch.rand(6, 16))
    with pytest.raises(ValueError, match=r"data: expected a tensor of shape \(N, 2\) with N >= 1"):
        evaluate(flow, torch.zeros(0, 2))
    with pytest.raises(TypeError, match="flow: expected a pyroflows Flow"):
        evaluate(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        evaluate(flow, x, batch_size=0)


def test_an_evaluation_is_plain_data():
    result = evaluate(pf.NICE(2, layers=2, hidden=(8,)), torch.randn(10, 2), truth=standard_normal)
    assert isinstance(result, Evaluation)
    assert json.loads(json.dumps(result.as_dict())) == result.as_dict()
    assert set(result.as_dict()) == {
        "n", "nll", "nll_se", "entropy", "entropy_se", "kl_gap", "kl_gap_se"
    }  # fmt: skip
