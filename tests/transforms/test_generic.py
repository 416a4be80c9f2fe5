"""The generic harness: every transform in ``registry.CASES`` gets every check here.

Each transform is built under a fixed seed, sent a first batch (which initialises data-dependent
transforms such as ActNorm) and has every parameter perturbed away from its identity
initialisation, so that the checks see a non-trivial map. Events are vectors ``(dim,)`` or, for
image transforms, ``(C, H, W)``; Jacobians are taken of the flattened maps, so transforms that
change the event shape (Squeeze) are checked like the others.

The registry itself is checked too: every transform class that :mod:`pyroflows.transforms`
exports has a row, every exported elementwise map has a row in each generic transform, and the
rows marked ``identity`` are the identity when freshly built.
"""

from __future__ import annotations

import functools
import io
import re

import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian

import pyroflows.transforms
from pyroflows.transforms import (
    Coupling,
    ElementwiseMap,
    FlowTransform,
    ImageCoupling,
    MaskedAutoregressive,
)

from .registry import CASES, Case, normal

NAMES = sorted(CASES)
IMAGE_NAMES = [n for n in NAMES if CASES[n].shape is not None]
BATCH_SHAPES = [(), (7,), (3, 5)]
DTYPES = [torch.float32, torch.float64]
# Round trips are exact up to rounding: a few hundred ulps of float64 is ample, float32 gets
# the precision a chain of exp/log/solves leaves.
ROUND_TRIP_TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def build(case: Case, dtype: torch.dtype = torch.float64, seed: int = 0):
    """The transform, perturbed, and a context of batch shape () (or None)."""
    torch.manual_seed(seed)
    t = case.make().to(dtype)
    context = torch.randn(case.context_dim, dtype=dtype) if case.context_dim else None
    with torch.no_grad():
        first = case.sample((64, *case.event_shape), dtype)
        if case.sample is normal:
            first = 1.5 + 2.0 * first  # so that ActNorm's initialisation is not the identity
        t.inverse_and_log_det(t.forward_and_log_det(first, context)[0], context)
        for p in t.parameters():
            p.add_(case.perturbation * torch.randn_like(p))
    return t, context


@functools.cache
def built_types() -> dict[str, tuple[type, type | None]]:
    """For each row, the class of what ``make()`` builds and the class of its map (or None)."""
    types = {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        t = case.make()
        elementwise = getattr(t, "map", None)
        types[name] = (type(t), None if elementwise is None else type(elementwise))
    return types


def exported(base: type) -> list[type]:
    """The subclasses of ``base`` (not ``base`` itself) in ``pyroflows.transforms.__all__``."""
    objects = (getattr(pyroflows.transforms, n) for n in pyroflows.transforms.__all__)
    return [o for o in objects if isinstance(o, type) and issubclass(o, base) and o is not base]


def test_every_exported_transform_has_a_row():
    classes = exported(FlowTransform)
    assert len(classes) > 20  # so that the check below could fail
    covered = {cls for cls, _ in built_types().values()}
    missing = sorted(cls.__name__ for cls in classes if cls not in covered)
    assert not missing, (
        f"no row in tests/transforms/registry.py builds {', '.join(missing)}: add a Case to CASES"
    )


@pytest.mark.parametrize("transform", [Coupling, MaskedAutoregressive, ImageCoupling], ids=str)
def test_every_exported_map_has_a_row_in_every_generic_transform(transform):
    maps = exported(ElementwiseMap)
    assert len(maps) >= 4
    covered = {m for cls, m in built_types().values() if cls is transform}
    missing = sorted(m.__name__ for m in maps if m not in covered)
    assert not missing, (
        f"no row in tests/transforms/registry.py builds {transform.__name__}(..., map) with "
        f"map {', '.join(missing)}: add a Case to CASES"
    )


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].identity])
def test_starts_at_the_identity(name):
    """Freshly built (before ``build`` perturbs anything), the transform is the identity map
    with log|det J| = 0, in both directions: exactly for affine and additive maps, up to
    rounding for splines."""
    case = CASES[name]
    torch.manual_seed(0)
    t = case.make().double()
    x = 3.0 * case.sample((32, *case.event_shape), torch.float64)
    context = contexts(case, (32,), torch.float64)
    for fn in (t.forward_and_log_det, t.inverse_and_log_det):
        y, ladj = fn(x, context)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(ladj, torch.zeros(32, dtype=torch.float64), atol=1e-12, rtol=0)


def flat_jacobian(f, v: torch.Tensor) -> torch.Tensor:
    """The Jacobian of ``f`` at ``v`` as a square matrix (inputs and outputs flattened)."""
    return jacobian(lambda u: f(u.reshape(v.shape)).reshape(-1), v.reshape(-1))


def contexts(case: Case, batch_shape, dtype):
    if not case.context_dim:
        return None
    return torch.randn(*batch_shape, case.context_dim, dtype=dtype)


@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_autograd_jacobian(name):
    case = CASES[name]
    t, context = build(case)
    for _ in range(3):
        x = case.sample(case.event_shape, torch.float64)
        y, ladj = t.forward_and_log_det(x, context)
        jac = flat_jacobian(lambda v: t.forward_and_log_det(v, context)[0], x)
        expected = torch.log(torch.abs(torch.det(jac)))
        assert ladj.shape == ()
        torch.testing.assert_close(ladj, expected, atol=1e-6, rtol=0)

        # the inverse, fused and through Pyro's interface
        _, ladj_inv = t.inverse_and_log_det(y, context)
        jac_inv = flat_jacobian(lambda v: t.inverse_and_log_det(v, context)[0], y)
        expected_inv = torch.log(torch.abs(torch.det(jac_inv)))
        torch.testing.assert_close(ladj_inv, expected_inv, atol=1e-6, rtol=0)
        torch.testing.assert_close(ladj_inv, -ladj, atol=1e-6, rtol=0)

        bound = t.condition(context).with_cache(0)
        torch.testing.assert_close(bound.log_abs_det_jacobian(x, y), ladj, atol=1e-9, rtol=0)
        torch.testing.assert_close(bound.inv.log_abs_det_jacobian(y, x), -ladj, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_inverse_gradients_match_finite_differences_of_the_forward(name):
    """The implicit function theorem, checked for every inverse (numerical ones included):
    ``x = f⁻¹(y; θ)`` has ``dx/dy = J⁻¹`` and ``dx/dθ = -J⁻¹ ∂f/∂θ`` with ``J = ∂f/∂x`` at
    ``x``. The autograd gradients of a loss of the inverse must equal those built from central
    finite differences of the *forward* map, in ``y`` and along a random direction of every
    parameter."""
    case = CASES[name]
    t, context = build(case)
    x = case.sample(case.event_shape, torch.float64)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return t.forward_and_log_det(x, context)[0].reshape(-1)

    eps = 1e-6
    columns = []
    for i in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=torch.float64)
        step[i] = eps
        plus = t.forward_and_log_det(x + step.reshape(x.shape), context)[0].reshape(-1)
        minus = t.forward_and_log_det(x - step.reshape(x.shape), context)[0].reshape(-1)
        columns.append((plus - minus).detach() / (2 * eps))
    jac = torch.stack(columns, dim=1)  # d f / d x, flattened
    y = forward().reshape(t.forward_shape(x.shape)).requires_grad_()
    weights = torch.randn(x.numel(), dtype=torch.float64)
    params = [p for p in t.parameters() if p.requires_grad]
    x_back = t.inverse_and_log_det(y, context)[0]
    grads = torch.autograd.grad((weights * x_back.reshape(-1)).sum(), [y, *params])
    adjoint = torch.linalg.solve(jac.T, weights)  # dL/dy = J⁻ᵀ w
    torch.testing.assert_close(grads[0].reshape(-1), adjoint, atol=1e-6, rtol=1e-5)
    for p, grad in zip(params, grads[1:], strict=True):
        direction = torch.randn_like(p)
        with torch.no_grad():
            p.add_(eps * direction)
            plus = forward()
            p.sub_(2 * eps * direction)
            minus = forward()
            p.add_(eps * direction)
        expected = -(adjoint * (plus - minus) / (2 * eps)).sum()
        got = (grad * direction).sum()
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name, dtype):
    case = CASES[name]
    t, _ = build(case, dtype)
    x = case.sample((256, *case.event_shape), dtype)
    context = contexts(case, (256,), dtype)
    y, ladj = t.forward_and_log_det(x, context)
    assert y.dtype == dtype and ladj.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    x_back, ladj_inv = t.inverse_and_log_det(y, context)
    tol = ROUND_TRIP_TOL[dtype]
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj_inv, -ladj, atol=tol, rtol=tol)
    # and the other way round, through Pyro's Transform interface without a cache
    bound = t.condition(context).with_cache(0)
    torch.testing.assert_close(bound(bound.inv(y)), y, atol=tol, rtol=tol)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_batch_shapes(name, batch_shape):
    case = CASES[name]
    t, _ = build(case)
    x = case.sample((*batch_shape, *case.event_shape), torch.float64)
    context = contexts(case, batch_shape, torch.float64)
    bound = t.condition(context).with_cache(0)
    y = bound(x)
    out_event = tuple(bound.forward_shape(case.event_shape))
    assert y.shape == (*batch_shape, *out_event) == bound.forward_shape(x.shape)
    assert bound.inv.forward_shape(y.shape) == x.shape
    assert bound.log_abs_det_jacobian(x, y).shape == batch_shape
    assert bound.inv(y).shape == x.shape
    assert bound.inv.log_abs_det_jacobian(y, x).shape == batch_shape
    # the batched result equals the point-by-point one
    ladj = bound.log_abs_det_jacobian(x, y).reshape(-1)
    flat_x = x.reshape(-1, *case.event_shape)
    flat_c = None if context is None else context.reshape(-1, case.context_dim)
    for i in range(min(len(flat_x), 4)):
        c = None if flat_c is None else flat_c[i]
        y_i, ladj_i = t.forward_and_log_det(flat_x[i], c)
        torch.testing.assert_close(y_i, y.reshape(-1, *out_event)[i])
        torch.testing.assert_close(ladj_i, ladj[i])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    case = CASES[name]
    t, _ = build(case)
    x = case.sample((32, *case.event_shape), torch.float64).requires_grad_()
    context = contexts(case, (32,), torch.float64)
    y, ladj = t.forward_and_log_det(x, context)
    x_back, ladj_inv = t.inverse_and_log_det(y.detach(), context)
    (y.square().sum() + ladj.sum() + x_back.sum() + ladj_inv.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in t.named_parameters():
        assert p.grad is not None, f"no gradient reached {pname}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    case = CASES[name]
    t, context = build(case, seed=0)
    buffer = io.BytesIO()
    torch.save(t.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # a fresh module draws a different random init
    fresh = case.make().double()
    fresh.load_state_dict(state)
    x = case.sample((16, *case.event_shape), torch.float64)
    y, ladj = t.forward_and_log_det(x, context)
    y2, ladj2 = fresh.forward_and_log_det(x, context)
    assert torch.equal(y, y2) and torch.equal(ladj, ladj2)
    assert torch.equal(
        t.inverse_and_log_det(y, context)[0], fresh.inverse_and_log_det(y, context)[0]
    )


@pytest.mark.parametrize("name", NAMES)
def test_in_a_pyro_transformed_distribution(name):
    """Both orientations of the transform score and sample inside Pyro's distribution."""
    case = CASES[name]
    t, context = build(case)
    x = case.sample((10, *case.event_shape), torch.float64)
    y = t.forward_and_log_det(x, context)[0].detach()
    bound = t.condition(context)
    if case.sample is normal:
        zeros = torch.zeros(case.event_shape, dtype=torch.float64)
        base = dist.Normal(zeros, 1.0).to_event(case.event_dim)
        d = dist.TransformedDistribution(base, [bound])
        assert d.event_shape == y.shape[1:]
        assert torch.isfinite(d.log_prob(y)).all()
        sample = d.rsample((5,))
        assert sample.shape == (5, *y.shape[1:]) and torch.isfinite(d.log_prob(sample)).all()
    # repr names the class (nn.Module's repr, not Transform's empty one)
    assert type(t).__name__ in repr(t)


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].sized and CASES[n].shape is None])
def test_wrong_last_dimension_is_a_value_error(name):
    case = CASES[name]
    t, context = build(case)
    bad = torch.randn(5, case.dim + 1, dtype=torch.float64)
    c = None if context is None else context.expand(5, -1)
    with pytest.raises(ValueError, match=f"expected an input with last dimension {case.dim}"):
        t.forward_and_log_det(bad, c)
    with pytest.raises(ValueError, match=f"last dimension {case.dim}"):
        t.condition(c).inv(bad)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_wrong_event_shape_is_a_value_error(name):
    """Image transforms name the event shape (or the channels) they expect, in both directions."""
    case = CASES[name]
    t, context = build(case)
    c = None if context is None else context.expand(5, -1)
    shape_in = case.event_shape
    shape_out = tuple(t.forward_shape(shape_in))
    for what, f, shape in [
        ("input", t.condition(c), shape_in),
        ("input of the inverse", t.condition(c).inv, shape_out),
    ]:
        bad = torch.randn(5, shape[0] + 1, *shape[1:], dtype=torch.float64)
        if case.any_size:
            expected = f"expected an {what} with {shape[0]} channels"
        else:
            expected = f"expected an {what} with event shape {shape}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            f(bad)
        with pytest.raises(ValueError, match="at least 3 dimension"):
            f(torch.randn(shape[1:], dtype=torch.float64))
    if case.any_size:  # any height and width
        x = torch.randn(5, shape_in[0], 3, 6, dtype=torch.float64)
        y = t.condition(c)(x)
        assert y.shape == x.shape
        torch.testing.assert_close(t.condition(c).inv(y), x)


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].context_dim])
def test_missing_or_mis_sized_context_is_a_value_error(name):
    case = CASES[name]
    t, _ = build(case)
    x = torch.randn(5, *case.event_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a context"):
        t(x)
    with pytest.raises(ValueError, match="needs a context"):
        t.inv(x)
    with pytest.raises(ValueError, match="needs a context"):
        t.condition(None)
    with pytest.raises(ValueError, match=f"context with last dimension {case.context_dim}"):
        t.condition(torch.randn(5, case.context_dim + 1, dtype=torch.float64))


def _check_device(name: str, device: str) -> None:
    case = CASES[name]
    t, context = build(case)
    x = case.sample((8, *case.event_shape), torch.float64)
    y, ladj = t.forward_and_log_det(x, context)
    t_dev = t.to(device)
    c_dev = None if context is None else context.to(device)
    y_dev, ladj_dev = t_dev.forward_and_log_det(x.to(device), c_dev)
    assert y_dev.device.type == device
    torch.testing.assert_close(y_dev.cpu(), y)
    torch.testing.assert_close(ladj_dev.cpu(), ladj)
    torch.testing.assert_close(t_dev.inverse_and_log_det(y_dev, c_dev)[0].cpu(), x)


@pytest.mark.parametrize("name", NAMES)
def test_to_device_cpu(name):
    _check_device(name, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_to_device_cuda(name):
    _check_device(name, "cuda")
