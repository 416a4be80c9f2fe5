"""Caches stay right when parameters change: every transform of ``registry.CASES``.

A view (``t.condition(context)``; for an unconditional transform the same as
``t.with_cache(1)``) keeps its latest ``(x, y, log|det J|)``. While nothing changes it serves that
pair (so a distribution scores its own samples without a second pass); after the parameters
change (in place, an Adam step, a fused Adam step, which bumps no version counter,
``load_state_dict``) or the grad mode does, it computes afresh, so that it agrees with a fresh
view. Float64, so that "agrees" is tight.
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from .registry import CASES, Case, normal

NAMES = sorted(CASES)


def build(case: Case, seed: int = 0):
    """The transform (initialised on a first batch and perturbed), a context and a batch."""
    torch.manual_seed(seed)
    t = case.make().double()
    context = torch.randn(5, case.context_dim, dtype=torch.float64) if case.context_dim else None
    with torch.no_grad():
        first = case.sample((5, *case.event_shape), torch.float64)
        if case.sample is normal:
            first = 1.5 + 2.0 * first  # so that ActNorm's initialisation is not the identity
        t.inverse_and_log_det(t.forward_and_log_det(first, context)[0], context)
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = case.sample((5, *case.event_shape), torch.float64)
    return t, context, x


def adam(t, fused: bool = False) -> None:
    optimizer = torch.optim.Adam(t.parameters(), lr=0.05, fused=fused)
    for p in t.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def in_place(t) -> None:
    with torch.no_grad():
        for p in t.parameters():
            p.mul_(1.1).add_(0.05)


def load_state_dict(t) -> None:
    names = {name for name, _ in t.named_parameters()}
    state = {k: v * 1.1 + 0.05 if k in names else v for k, v in t.state_dict().items()}
    t.load_state_dict(state)


CHANGES = {
    "in-place": in_place,
    "adam": adam,
    "fused-adam": lambda t: adam(t, fused=True),
    "load_state_dict": load_state_dict,
}


def with_parameters(name: str) -> Case:
    case = CASES[name]
    if not list(case.make().parameters()):
        pytest.skip(f"{name} has no parameters to change")
    return case


@pytest.mark.parametrize("name", NAMES)
def test_a_view_serves_its_pair_while_nothing_changes(name):
    t, context, x = build(CASES[name])
    view = t.condition(context)
    y = view(x)
    assert view(x) is y
    assert view.inv(y) is x
    x_back, ladj = view.inverse_pair(y)
    assert x_back is x
    assert view.log_abs_det_jacobian(x, y) is ladj


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("name", NAMES)
def test_a_view_computes_afresh_after_a_parameter_change(name, change):
    t, context, x = build(with_parameters(name))
    view = t.condition(context)
    y = view(x)
    CHANGES[change](t)
    fresh = t.condition(context)
    # The kept pair must not answer: the sample it drew came from other parameters.
    x_back = view.inv(y)
    assert x_back is not x
    torch.testing.assert_close(x_back, fresh.inv(y))
    x_back, ladj = view.inverse_pair(y)
    torch.testing.assert_close(x_back, fresh.inv(y))
    torch.testing.assert_close(ladj, fresh.log_abs_det_jacobian(x_back, y))
    y_now = view(x)
    assert y_now is not y
    torch.testing.assert_close(y_now, fresh(x))
    torch.testing.assert_close(
        view.log_abs_det_jacobian(x, y_now), fresh.log_abs_det_jacobian(x, fresh(x))
    )


@pytest.mark.parametrize("name", NAMES)
def test_a_pair_cached_in_one_grad_mode_does_not_serve_the_other(name):
    t, context, x = build(CASES[name])
    x = x.requires_grad_()
    view = t.condition(context)
    with torch.no_grad():
        y = view(x)
    assert not y.requires_grad
    y_grad = view(x)  # needs a graph: computed afresh
    assert y_grad is not y and y_grad.requires_grad
    torch.testing.assert_close(y_grad.detach(), y)
    with torch.no_grad():
        y_again = view(x)  # and back
    assert y_again is not y_grad and not y_again.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_a_kept_view_scores_the_same_tensor_across_optimiser_steps(name):
    """A distribution over a kept view, scored on one tensor every step, as a fresh one."""
    t, context, x = build(with_parameters(name))
    case = CASES[name]
    with torch.no_grad():
        data = t.condition(context)(x)  # a point in the codomain
    n = len(case.event_shape)
    base = dist.Normal(torch.zeros(case.event_shape, dtype=torch.float64), 1.0).to_event(n)
    kept = dist.TransformedDistribution(base, [t.condition(context)], validate_args=False)
    optimizer = torch.optim.Adam(t.parameters(), lr=0.02)
    params = list(t.parameters())
    for step in range(3):
        fresh = dist.TransformedDistribution(base, [t.condition(context)], validate_args=False)
        loss = -kept.log_prob(data).mean()
        expected = -fresh.log_prob(data).mean()
        torch.testing.assert_close(loss, expected, msg=lambda m, s=step: f"step {s}: {m}")
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
        for g, e in zip(grads, expected_grads, strict=True):
            if g is None or e is None:
                assert g is None and e is None
            else:
                torch.testing.assert_close(g, e)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
