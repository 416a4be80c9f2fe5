"""A distribution that is kept stays right: ``d = flow()`` once, then optimiser steps.

Pyro users keep objects: ``d = flow()`` once and ``loss = -d.log_prob(x).mean()`` every step
(Pyro's flow tutorial does this with a ``TransformedDistribution``). The kept distribution must
give the values and gradients of a fresh ``flow()`` after any number of steps, for every builder,
every base, conditional flows and at a temperature, with the same tensor every step and with
fresh minibatches, and under ``torch.no_grad()`` after a parameter change. Float64 throughout,
so that "equal" can be checked tightly (a cached value and a recomputed one agree to round-off;
the scoring of a sample by inversion agrees with its cached pass to about 1e-10).
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyroflows as pf
from pyroflows.distribution import FlowDistribution
from pyroflows.nn import MADE, MLP

DIM = 3
H = (8,)
CONTEXT = 2
ROWS = 6


def realnvp_images(**kw):
    with warnings.catch_warnings():  # RealNVP(shape=...) may be deprecated for a new class
        warnings.simplefilter("ignore", DeprecationWarning)
        return pf.RealNVP(shape=(1, 4, 4), channels=4, blocks=1, **kw)


VECTORS = {
    "NICE": lambda **kw: pf.NICE(DIM, layers=2, hidden=H, **kw),
    "RealNVP": lambda **kw: pf.RealNVP(DIM, layers=2, hidden=H, actnorm=True, **kw),
    "MAF": lambda **kw: pf.MAF(DIM, layers=2, hidden=H, **kw),
    "IAF": lambda **kw: pf.IAF(DIM, layers=2, hidden=H, **kw),
    "NSF": lambda **kw: pf.NSF(DIM, layers=2, hidden=H, bins=4, **kw),
    "NSF-autoregressive": lambda **kw: pf.NSF(
        DIM, layers=2, hidden=H, bins=4, autoregressive=True, **kw
    ),
    "LinearFlow": lambda **kw: pf.LinearFlow(DIM, layers=2, hidden=H, **kw),
}
IMAGES = {
    "Glow": lambda **kw: pf.Glow((1, 4, 4), levels=2, steps=1, channels=4, **kw),
    "RealNVP-images": realnvp_images,
}
# (base, context_dim): every base kind, unconditional and conditional.
VECTOR_BASES = [
    ("normal", 0),
    ("diag_normal", 0),
    ("normal", CONTEXT),
    ("diag_normal", CONTEXT),
    ("conditional_normal", CONTEXT),
]
IMAGE_BASES = [("normal", 0), ("diag_normal", 0), ("normal", CONTEXT)]
CASES = [
    pytest.param(name, base, c, id=f"{name}-{base}-{'conditional' if c else 'unconditional'}")
    for builders, bases in ((VECTORS, VECTOR_BASES), (IMAGES, IMAGE_BASES))
    for name in builders
    for base, c in bases
]


def build(name: str, base: str, context_dim: int, **kw) -> pf.Flow:
    torch.manual_seed(0)
    make = {**VECTORS, **IMAGES}[name]
    flow = make(context_dim=context_dim, base=base, **kw).double()
    with torch.no_grad():  # away from the identity, so that every gradient is non-trivial
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


def data(flow: pf.Flow, rows: int = ROWS) -> torch.Tensor:
    x = torch.randn(rows, *flow.event_shape, dtype=torch.float64)
    if len(flow.event_shape) == 3:  # images in [0, 1] for the logit pre-processing
        x = torch.rand(rows, *flow.event_shape, dtype=torch.float64) * 0.9 + 0.05
    return x


def context_of(flow: pf.Flow, rows: int = ROWS) -> torch.Tensor | None:
    return torch.randn(rows, flow.context_dim, dtype=torch.float64) if flow.context_dim else None


def value_and_grads(flow: pf.Flow, log_prob: torch.Tensor) -> tuple[torch.Tensor, list]:
    params = [p for p in flow.parameters() if p.requires_grad]
    grads = torch.autograd.grad(log_prob.sum(), params, allow_unused=True)
    return log_prob.detach(), [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


def assert_same(kept, fresh, what: str) -> None:
    (v1, g1), (v2, g2) = kept, fresh
    torch.testing.assert_close(v1, v2, msg=lambda m: f"{what}, values: {m}")
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}, gradients: {m}")


# -- kept across optimiser steps ------------------------------------------------------------------
@pytest.mark.parametrize("same_tensor", [True, False], ids=["same-tensor", "fresh-minibatches"])
@pytest.mark.parametrize(("name", "base", "context_dim"), CASES)
def test_a_kept_distribution_equals_a_fresh_one_across_optimiser_steps(
    name, base, context_dim, same_tensor
):
    flow = build(name, base, context_dim)
    context = context_of(flow)
    x = data(flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    d = flow(context)  # kept: built once
    for step in range(4):
        if not same_tensor:
            x = data(flow)
        fresh = value_and_grads(flow, flow(context).log_prob(x))
        kept = value_and_grads(flow, d.log_prob(x))
        assert_same(kept, fresh, f"step {step}")
        # The pattern users write (it raised "backward through the graph a second time").
        optimizer.zero_grad()
        loss = -d.log_prob(x).mean()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize(("name", "base", "context_dim"), CASES)
def test_a_kept_distribution_scores_its_own_samples_after_optimiser_steps(name, base, context_dim):
    """The reverse-KL / VI pattern: rsample and score, every step, from one distribution.

    Image flows without their logit pre-processing: inverting a sigmoid at samples near 0 or 1
    (which grow common as training widens the flow) is ill-conditioned, which would test the
    inversion rather than the cache.
    """
    flow = build(name, base, context_dim, **({"logit": None} if name in IMAGES else {}))
    context = context_of(flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    d = flow(context)
    for step in range(3):
        z = d.rsample((4,))
        kept = d.log_prob(z)  # from the cached pass
        with torch.no_grad():
            fresh = flow(context).log_prob(z)  # by inversion
        torch.testing.assert_close(kept.detach(), fresh, msg=lambda m, s=step: f"step {s}: {m}")
        optimizer.zero_grad()
        (kept.mean() + z.square().mean()).backward()
        optimizer.step()


@pytest.mark.parametrize("name", ["IAF", "RealNVP", "NSF"])
def test_own_samples_cost_no_inversion_and_no_second_pass_after_steps(name):
    """Speed kept: every network (conditioners and the conditional base's) runs once."""
    flow = build(name, "conditional_normal", CONTEXT)
    nets = [m for m in flow.modules() if isinstance(m, (MADE, MLP))]
    calls = []
    for net in nets:
        net.register_forward_hook(lambda *_: calls.append(1))
    context = context_of(flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    d = flow(context)  # builds nothing yet: the base is built when first used
    assert not calls
    for _ in range(3):
        z = d.rsample()
        log_prob = d.log_prob(z)
        assert len(calls) == len(nets)  # all spent by rsample: no inversion, no second pass
        calls.clear()
        optimizer.zero_grad()
        log_prob.sum().backward()
        optimizer.step()


# -- no_grad after a parameter change -------------------------------------------------------------
def adam_step(flow, fused: bool = False):
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.1, fused=fused)
    for p in flow.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def in_place(flow):
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05)


def load_state_dict(flow):
    state = {k: v + 0.05 if v.is_floating_point() else v for k, v in flow.state_dict().items()}
    flow.load_state_dict(state)


CHANGES = {
    "adam": adam_step,
    "fused-adam": lambda flow: adam_step(flow, fused=True),  # bumps no version counter
    "in-place": in_place,
    "load_state_dict": load_state_dict,
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize(
    ("name", "base", "context_dim"),
    [
        ("IAF", "diag_normal", 0),
        ("MAF", "conditional_normal", CONTEXT),
        ("RealNVP", "normal", CONTEXT),
        ("Glow", "diag_normal", 0),
    ],
)
def test_never_stale_under_no_grad_after_a_parameter_change(name, base, context_dim, change):
    flow = build(name, base, context_dim)
    context = context_of(flow)
    x = data(flow)
    d = flow(context)
    with torch.no_grad():
        before = d.log_prob(x)
        z = d.sample()  # its pairs are cached, under no_grad
        torch.testing.assert_close(d.log_prob(z), flow(context).log_prob(z))
        assert d.base_dist.batch_shape == d.batch_shape  # the base is cached too
    CHANGES[change](flow)
    with torch.no_grad():
        after, fresh = d.log_prob(x), flow(context).log_prob(x)
        torch.testing.assert_close(after, fresh)
        assert not torch.allclose(after, before)  # the change mattered
        torch.testing.assert_close(d.log_prob(z), flow(context).log_prob(z))
        torch.testing.assert_close(d.base_dist.mean, flow(context).base_dist.mean)


def test_a_pair_cached_under_no_grad_is_not_handed_to_a_computation_that_needs_gradients():
    flow = build("IAF", "diag_normal", 0)
    d = flow()
    with torch.no_grad():
        z = d.sample((5,))
    kept = value_and_grads(flow, d.log_prob(z))
    fresh = value_and_grads(flow, flow().log_prob(z))
    assert_same(kept, fresh, "no_grad sample scored with gradients")
    assert any(g.abs().sum() > 0 for g in kept[1])


# -- temperature, expand, the base, Pyro ----------------------------------------------------------
@pytest.mark.parametrize("name", ["RealNVP", "IAF", "Glow"])
def test_a_kept_tempered_distribution_equals_a_fresh_one(name):
    flow = build(name, "diag_normal", 0)
    x = data(flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    d = flow(temperature=0.7)
    for step in range(3):
        fresh = value_and_grads(flow, flow(temperature=0.7).log_prob(x))
        assert_same(value_and_grads(flow, d.log_prob(x)), fresh, f"step {step}")
        z = d.rsample((3,))
        optimizer.zero_grad()
        (d.log_prob(z).mean() - d.log_prob(x).mean()).backward()
        optimizer.step()
    scale = flow.base().base_dist.scale
    torch.testing.assert_close(d.base_dist.base_dist.scale, 0.7 * scale)


def test_a_kept_expanded_distribution_follows_the_parameters():
    flow = build("RealNVP", "conditional_normal", CONTEXT)
    context = context_of(flow, 4)
    x = data(flow, 4)
    d = flow(context).expand((5, 4))
    assert d.batch_shape == (5, 4)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    for _ in range(2):
        fresh = flow(context).expand((5, 4))
        assert_same(
            value_and_grads(flow, d.log_prob(x)), value_and_grads(flow, fresh.log_prob(x)), "expand"
        )
        optimizer.zero_grad()
        (-d.log_prob(x).mean()).backward()
        optimizer.step()
    assert d.rsample().shape == (5, 4, DIM)


def test_base_dist_is_read_at_use():
    flow = build("RealNVP", "diag_normal", 0)
    d = flow()
    with torch.no_grad():
        flow.base.loc.fill_(2.0)
    torch.testing.assert_close(d.base_dist.base_dist.loc, flow.base.loc)
    assert isinstance(d, dist.TransformedDistribution) and d.has_rsample


def test_a_kept_flow_with_a_foreign_transform_follows_the_parameters():
    """Not every layer a pyroflows transform: the generic path of log_prob."""
    torch.manual_seed(0)
    coupling = pf.transforms.AffineCoupling(2, hidden=(8,))
    flow = pf.Flow([coupling, dist.transforms.ExpTransform()], dim=2, base="diag_normal").double()
    x = flow().sample((8,))
    d = flow()
    assert not d._simple
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.1)
    for _ in range(3):
        assert_same(
            value_and_grads(flow, d.log_prob(x)),
            value_and_grads(flow, flow().log_prob(x)),
            "foreign",
        )
        optimizer.zero_grad()
        (-d.log_prob(x).mean()).backward()
        optimizer.step()


def test_svi_with_a_kept_distribution_matches_svi_with_fresh_ones():
    """A guide that keeps its distribution trains exactly as one that calls the flow."""

    def model():
        pyro.sample("z", dist.Normal(torch.tensor([1.0, -1.0]), 0.5).to_event(1))

    def run(keep: bool) -> list[float]:
        pyro.clear_param_store()
        torch.manual_seed(0)
        flow = pf.IAF(2, layers=2, hidden=(8,), base="diag_normal")
        kept = flow()

        def guide():
            pyro.module("q", flow)
            pyro.sample("z", kept if keep else flow())

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
        pyro.set_rng_seed(1)
        return [svi.step() for _ in range(5)]

    torch.testing.assert_close(run(keep=True), run(keep=False))


# -- dtypes and shapes of what is scored ----------------------------------------------------------
def test_a_float64_context_is_converted_to_the_flows_dtype():
    torch.manual_seed(0)
    flow = pf.RealNVP(DIM, layers=2, hidden=H, context_dim=CONTEXT)  # float32
    context = torch.randn(4, CONTEXT, dtype=torch.float64)
    x = torch.randn(4, DIM)
    log_prob = flow(context).log_prob(x)  # was: "expected m1 and m2 to have the same dtype"
    assert log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob, flow(context.float()).log_prob(x))
    assert flow(context).sample().dtype == torch.float32
    conditional = pf.IAF(DIM, layers=1, hidden=H, context_dim=CONTEXT, base="conditional_normal")
    assert conditional(context).rsample().dtype == torch.float32
    with pytest.raises(TypeError, match="expected a real context"):
        flow(torch.randn(4, CONTEXT, dtype=torch.complex64))


def test_a_value_of_another_dtype_is_converted_to_the_flows_dtype():
    torch.manual_seed(0)
    flow = pf.MAF(DIM, layers=2, hidden=H)
    x = torch.randn(5, DIM, dtype=torch.float64)
    log_prob = flow().log_prob(x)  # was a raw matmul dtype error
    assert log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob, flow().log_prob(x.float()))
    torch.testing.assert_close(
        flow().log_prob(torch.ones(2, DIM, dtype=torch.int64)), flow().log_prob(torch.ones(2, DIM))
    )
    with pytest.raises(TypeError, match="expected a real value"):
        flow().log_prob(torch.randn(5, DIM, dtype=torch.complex64))


def test_a_value_whose_rows_do_not_match_the_context_gets_our_message():
    flow = pf.RealNVP(DIM, layers=2, hidden=H, context_dim=CONTEXT)
    d = flow(torch.randn(4, CONTEXT))
    with pytest.raises(
        ValueError, match=r"expected a value of shape \(\*sample, 4, 3\).*got shape \(5, 3\)"
    ):
        d.log_prob(torch.randn(5, DIM))  # was Pyro's "Value is not broadcastable"
    with pytest.raises(ValueError, match=r"\(event shape \(3,\)\); got shape \(4, 2\)"):
        d.log_prob(torch.randn(4, 2))
    # what broadcasts is accepted: leading sample dims, and rows of size 1
    assert d.log_prob(torch.randn(7, 4, DIM)).shape == (7, 4)
    assert d.log_prob(torch.randn(1, DIM)).shape == (4,)
    with pytest.raises(ValueError, match=r"expected a value of shape \(\*sample, 3\)"):
        pf.MAF(DIM, layers=1, hidden=H)().log_prob(torch.randn(DIM + 1))


def test_the_distribution_is_a_flow_distribution_with_a_documented_constructor():
    flow = pf.MAF(DIM, layers=1, hidden=H)
    d = flow()
    assert isinstance(d, FlowDistribution)
    # built by hand around a fixed base, it is an ordinary TransformedDistribution
    base = dist.Normal(torch.zeros(DIM), 1.0).to_event(1)
    by_hand = FlowDistribution(base, list(d.transforms), simple=True)
    x = torch.randn(4, DIM)
    torch.testing.assert_close(by_hand.log_prob(x), d.log_prob(x))
    assert by_hand.base_dist is base


def test_a_flow_moved_after_the_distribution_was_made_is_refused():
    flow = pf.RealNVP(DIM, layers=1, hidden=H, context_dim=CONTEXT)
    d = flow(torch.randn(4, CONTEXT))
    flow.double()  # the kept distribution's context is float32 still
    for use in (lambda: d.log_prob(torch.randn(4, DIM)), d.rsample, d.sample):
        with pytest.raises(ValueError, match=r"moved to torch.float64 on cpu: call the flow again"):
            use()
    d = flow(torch.randn(4, CONTEXT))  # called again, it is right
    assert d.log_prob(torch.randn(4, DIM)).dtype == torch.float64


def test_a_flow_whose_tensors_were_replaced_is_judged_by_its_tensors_now():
    # load_state_dict(assign=True) puts new Parameter objects in the modules: a dtype read from
    # the tensors the flow had before would be stale (the flow below was float64, not float32).
    flow = pf.RealNVP(DIM, layers=1, hidden=H)
    x = torch.randn(4, DIM)
    kept = flow()
    kept.log_prob(x)
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    flow.load_state_dict(state, assign=True)
    flow.double()
    assert flow().log_prob(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match=r"moved to torch.float64 on cpu: call the flow again"):
        kept.log_prob(x)


def test_a_kept_flow_with_a_one_way_foreign_transform_refuses_a_stale_sample():
    """Pyro's planar transform caches its last pass keyed on the input alone: after a
    parameter change it would score an old sample from that pass; a fresh flow cannot score it
    at all (no inverse), and the kept one says so."""
    torch.manual_seed(0)
    planar = dist.transforms.Planar(2)
    flow = pf.Flow([pf.transforms.AffineCoupling(2, hidden=(8,)), planar], dim=2)
    d = flow()
    z = d.rsample((4,))
    first = d.log_prob(z)
    torch.testing.assert_close(d.log_prob(z), first)  # its own sample, from the cache
    with torch.no_grad():
        planar.u.add_(0.5)
    with pytest.raises(NotImplementedError, match="Planar has no inverse, and the flow's param"):
        d.log_prob(z)
    fresh = flow()
    z = fresh.rsample((4,))
    assert torch.isfinite(fresh.log_prob(z)).all()


def test_a_base_given_to_the_flow_later_is_the_one_a_kept_distribution_uses():
    flow = build("RealNVP", "normal", 0)
    x = data(flow)
    d = flow()
    before = d.log_prob(x)
    flow.base = pf.bases.DiagNormal(DIM).double()
    with torch.no_grad():
        flow.base.loc.fill_(1.0)
    torch.testing.assert_close(d.log_prob(x), flow().log_prob(x))
    assert not torch.allclose(d.log_prob(x), before)


@pytest.mark.parametrize("name", ["RealNVP", "IAF", "Glow"])
def test_scoring_and_own_samples_compile_without_graph_breaks(name):
    """``torch.compile`` of a loss that calls the flow (as a compiled training step does): the
    caches' bookkeeping stays out of the graph (``fullgraph=True`` fails on a graph break)."""
    flow = build(name, "conditional_normal" if name == "IAF" else "normal", CONTEXT)
    context = context_of(flow)
    x = data(flow)
    flow(context).log_prob(x)  # initialise ActNorm before tracing

    def nll(x, context):
        return -flow(context).log_prob(x).mean()

    def reverse_kl(context):
        d = flow(context)
        return d.log_prob(d.rsample()).mean()

    # Without argument validation, whose checks of values are data-dependent branches (the
    # engine's compiled step turns it off too).
    with pyro.validation_enabled(False):
        compiled = torch.compile(nll, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, context), nll(x, context))
        compiled = torch.compile(reverse_kl, backend="eager", fullgraph=True)
        assert torch.isfinite(compiled(context))
