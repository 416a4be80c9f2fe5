import io
import math

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from pyroflows.transforms import (
    ActNorm2d,
    ImageAdditiveCoupling,
    ImageAffineCoupling,
    ImageSigmoid,
    InvConv1x1,
    Squeeze,
    image_mask,
)
from pyroflows.transforms.elementwise import Logit, Sigmoid

SHAPE = (2, 4, 4)
CONV = {"channels": 4, "blocks": 1}


def perturb(t, scale=0.3):
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn_like(p))
    return t


# -- Squeeze -----------------------------------------------------------------------------------


def test_squeeze_is_a_permutation_of_the_entries_and_its_inverse_restores_them():
    c, h, w = 3, 4, 6
    x = torch.arange(2 * c * h * w, dtype=torch.float64).reshape(2, c, h, w)
    t = Squeeze((c, h, w))
    y, ladj = t.forward_and_log_det(x)
    assert y.shape == (2, 4 * c, h // 2, w // 2) and torch.equal(ladj, torch.zeros(2).double())
    assert torch.equal(y.flatten(1).sort().values, x.flatten(1))
    for ci in range(c):
        for i in range(2):
            for j in range(2):
                assert torch.equal(y[:, 4 * ci + 2 * i + j], x[:, ci, i::2, j::2])
    x_back, ladj_inv = t.inverse_and_log_det(y)
    assert torch.equal(x_back, x) and torch.equal(ladj_inv, ladj)
    assert torch.equal(t.inv(y), x)


def test_squeeze_changes_the_event_shape_of_a_distribution():
    t = Squeeze(SHAPE)
    base = dist.Normal(torch.zeros(SHAPE), 1.0).to_event(3)
    d = dist.TransformedDistribution(base, [t])
    assert d.event_shape == (8, 2, 2)
    x = d.sample((4,))
    assert x.shape == (4, 8, 2, 2)
    # volume preserving: the density is the base's at the unsqueezed point
    torch.testing.assert_close(d.log_prob(x), base.log_prob(t.inv(x)))
    # and back through the inverse
    d_inv = dist.TransformedDistribution(d, [t.inv])
    assert d_inv.event_shape == SHAPE


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 3, 4), r"expected an even height and width; got shape \(1, 3, 4\)"),
        ((1, 4, 5), r"expected an even height and width; got shape \(1, 4, 5\)"),
        ((4, 4), r"expected three integers \(channels, height, width\)"),
        ((1, 0, 2), "expected positive sizes"),
        (4, r"expected \(channels, height, width\)"),
    ],
)
def test_squeeze_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        Squeeze(shape)


def test_squeeze_shape_functions_check_the_event_shape():
    t = Squeeze(SHAPE)
    assert t.forward_shape((7, *SHAPE)) == (7, 8, 2, 2)
    assert t.inverse_shape((7, 8, 2, 2)) == (7, *SHAPE)
    with pytest.raises(ValueError, match=r"expected event shape \(2, 4, 4\)"):
        t.forward_shape((3, 4, 4))
    with pytest.raises(ValueError, match=r"expected event shape \(8, 2, 2\)"):
        t.inverse_shape(SHAPE)


# -- masks and couplings -----------------------------------------------------------------------


def test_image_masks():
    board = image_mask((2, 3, 3))
    assert board.shape == (2, 3, 3) and board.dtype == torch.bool
    assert board[0].int().tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert torch.equal(board[0], board[1])
    assert torch.equal(image_mask((2, 3, 3), flip=True), ~board)
    channel = image_mask((5, 2, 2), "channel")
    assert channel[:, 0, 0].tolist() == [True, True, False, False, False]
    assert channel[:2].all() and not channel[2:].any()
    assert torch.equal(image_mask((5, 2, 2), "channel", flip=True), ~channel)


@pytest.mark.parametrize(
    "shape, kind, match",
    [
        ((1, 4, 4), "channel", "a channel mask needs at least 2 channels"),
        ((3, 1, 1), "checkerboard", "a checkerboard needs at least 2 pixels"),
        ((2, 4, 4), "half", r"expected one of \('checkerboard', 'channel'\)"),
    ],
)
def test_bad_image_masks_are_value_errors(shape, kind, match):
    with pytest.raises(ValueError, match=match):
        image_mask(shape, kind)
    with pytest.raises(ValueError, match=match):
        ImageAffineCoupling(shape, mask=kind)


COUPLINGS = [
    (cls, mask, flip)
    for cls in (ImageAffineCoupling, ImageAdditiveCoupling)
    for mask in ("checkerboard", "channel")
    for flip in (False, True)
]
IDS = [f"{cls.__name__}-{mask}-{'flip' if flip else 'noflip'}" for cls, mask, flip in COUPLINGS]


@pytest.mark.parametrize("cls, mask, flip", COUPLINGS, ids=IDS)
def test_couplings_start_at_the_identity_and_keep_the_masked_entries(cls, mask, flip):
    torch.manual_seed(0)
    shape = (3, 4, 4)
    t = cls(shape, **CONV, mask=mask, flip=flip)
    x = torch.randn(6, *shape)
    y, ladj = t.forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(6))
    perturb(t)
    keep = t.mask
    assert torch.equal(keep, image_mask(shape, mask, flip))
    y, ladj = t.forward_and_log_det(x)
    assert torch.equal(y[:, keep], x[:, keep])
    assert (y[:, ~keep] != x[:, ~keep]).all()
    back = t.inv(y)
    assert torch.equal(back[:, keep], y[:, keep])
    torch.testing.assert_close(back, x)
    # the transformed entries depend on the kept entries only: changing the transformed
    # entries of the input changes nothing else (a triangular Jacobian)
    x2 = torch.where(keep, x, x + 1.0)
    y2 = t(x2)
    assert torch.equal(y2[:, keep], y[:, keep])
    if cls is ImageAdditiveCoupling:
        torch.testing.assert_close(y2[:, ~keep] - y[:, ~keep], torch.ones_like(y[:, ~keep]))


@pytest.mark.parametrize("cls", [ImageAffineCoupling, ImageAdditiveCoupling])
@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
def test_conditional_couplings_broadcast_the_context(cls, mask):
    torch.manual_seed(0)
    t = perturb(cls(SHAPE, **CONV, mask=mask, context_dim=2))
    # a zero-initialised conditional coupling is the identity for every context
    fresh = cls(SHAPE, **CONV, mask=mask, context_dim=2)
    x = torch.randn(3, 1, *SHAPE)
    assert torch.equal(fresh.condition(torch.randn(5, 2))(x), x.expand(3, 5, *SHAPE))
    context = torch.randn(5, 2)
    bound = t.condition(context)
    y = bound(x)
    assert y.shape == (3, 5, *SHAPE)
    assert bound.log_abs_det_jacobian(x, y).shape == (3, 5)
    assert not torch.allclose(y[:, 0], y[:, 1])  # each context gives its own map
    torch.testing.assert_close(t.condition(context).with_cache(0).inv(y), x.expand_as(y))
    with pytest.raises(ValueError, match="batch shape broadcasts"):
        t.condition(torch.randn(4, 2))(torch.randn(3, *SHAPE))
    with pytest.raises(ValueError, match="needs a context"):
        t(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_affine_coupling_is_finite_far_from_the_data(dtype):
    """The soft-clamped log-scale keeps each layer within exp(±3), even for huge inputs."""
    torch.manual_seed(0)
    t = perturb(ImageAffineCoupling(SHAPE, **CONV), scale=3.0).to(dtype)
    for r in (10.0, 100.0, 1000.0):
        x = r * torch.randn(4, *SHAPE, dtype=dtype)
        y, ladj = t.forward_and_log_det(x)
        back, ladj_inv = t.inverse_and_log_det(x)
        assert torch.isfinite(y).all() and torch.isfinite(back).all()
        assert ladj.abs().max() <= 3.0 * 16 and ladj_inv.abs().max() <= 3.0 * 16


def test_coupling_arguments_are_checked():
    with pytest.raises(ValueError, match="log_scale_bound: expected a positive number"):
        ImageAffineCoupling(SHAPE, log_scale_bound=0.0)
    with pytest.raises(ValueError, match="channels: expected a positive integer"):
        ImageAdditiveCoupling(SHAPE, channels=0)
    with pytest.raises(ValueError, match="blocks: expected a non-negative integer"):
        ImageAdditiveCoupling(SHAPE, blocks=-1)
    with pytest.raises(ValueError, match="context_dim: expected a non-negative integer"):
        ImageAffineCoupling(SHAPE, context_dim=-1)


# -- ActNorm2d ---------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["inverse", "forward"])
def test_actnorm2d_standardises_each_channel_of_the_first_batch(direction):
    scale = torch.tensor([5.0, 0.1, 1.0])[:, None, None]
    loc = torch.tensor([3.0, -2.0, 0.5])[:, None, None]
    data = loc + scale * torch.randn(20, 3, 5, 6)
    t = ActNorm2d(3)
    out = t.inv(data) if direction == "inverse" else t(data)
    dims = (0, 2, 3)
    torch.testing.assert_close(out.mean(dims), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dims, correction=0), torch.ones(3), atol=1e-5, rtol=0)
    assert bool(t.initialized)
    # log|det J| = H * W * sum(s)
    ladj = t.log_abs_det_jacobian(data, t(data))
    torch.testing.assert_close(ladj, (30 * t.log_scale.sum()).expand(20))
    # later batches do not re-initialise
    before = t.log_scale.detach().clone()
    t.inv(torch.randn(10, 3, 5, 6))
    t(torch.randn(10, 3, 2, 2))
    assert torch.equal(t.log_scale.detach(), before)


def test_actnorm2d_initialises_from_a_single_image_and_floors_the_std():
    t = ActNorm2d(2, min_std=1e-2)
    image = torch.stack([torch.ones(4, 4), torch.randn(4, 4)])  # channel 0 is constant
    z = t.inv(image)
    assert bool(t.initialized) and torch.isfinite(z).all()
    assert t.log_scale[0].item() == pytest.approx(torch.tensor(1e-2).log().item())
    one_number = ActNorm2d(2)
    one_number.inv(torch.randn(2, 1, 1))  # one number per channel: too few to initialise
    assert not bool(one_number.initialized)


def test_actnorm2d_loaded_state_is_not_reinitialised():
    t = ActNorm2d(2)
    t.inv(3 + torch.randn(8, 2, 4, 4))
    buffer = io.BytesIO()
    torch.save(t.state_dict(), buffer)
    buffer.seek(0)
    fresh = ActNorm2d(2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert "initialized=True" in repr(fresh)
    x = 10 * torch.randn(5, 2, 4, 4)  # would give a different initialisation
    torch.testing.assert_close(fresh.inv(x), t.inv(x))


def test_actnorm2d_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_std: expected a positive number"):
        ActNorm2d(2, min_std=0.0)
    with pytest.raises(ValueError, match="channels: expected a positive integer"):
        ActNorm2d(0)


# -- InvConv1x1 --------------------------------------------------------------------------------


@pytest.mark.parametrize("parametrization", ["lu", "matrix"])
def test_inv_conv_starts_at_a_rotation(parametrization):
    torch.manual_seed(1)
    t = InvConv1x1(6, parametrization)
    w = t.weight().detach()
    torch.testing.assert_close(w @ w.T, torch.eye(6), atol=1e-5, rtol=0)
    assert not torch.allclose(w, torch.eye(6))
    assert abs(t.log_abs_det_weight().item()) < 1e-5


@pytest.mark.parametrize("parametrization", ["lu", "matrix"])
def test_inv_conv_log_det_is_h_w_slogdet_of_its_weight(parametrization):
    torch.manual_seed(0)
    t = perturb(InvConv1x1(5, parametrization).double(), scale=0.5)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    y, ladj = t.forward_and_log_det(x)
    weight = t.weight()
    torch.testing.assert_close(ladj, (12 * torch.linalg.slogdet(weight)[1]).expand(2))
    # a 1x1 convolution with that weight
    torch.testing.assert_close(y, F.conv2d(x, weight[:, :, None, None]))
    torch.testing.assert_close(t.inverse_weight() @ weight, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(t.inv(y), x)


def test_inv_conv_rejects_an_unknown_parametrization():
    with pytest.raises(ValueError, match=r"parametrization: expected one of \('lu', 'matrix'\)"):
        InvConv1x1(3, "qr")


# -- a multi-layer image flow as a Pyro distribution --------------------------------------------


def image_stack(context_dim: int = 0) -> list:
    """Glow-like steps on (2, 4, 4), a squeeze to (8, 2, 2), channel couplings, and back."""
    c = {"context_dim": context_dim, **CONV}
    return [
        ActNorm2d(2),
        InvConv1x1(2),
        ImageAffineCoupling(SHAPE, **c),
        ImageAdditiveCoupling(SHAPE, **c, flip=True),
        Squeeze(SHAPE),
        InvConv1x1(8, "matrix"),
        ImageAffineCoupling((8, 2, 2), **c, mask="channel"),
        ImageAffineCoupling((8, 2, 2), **c, mask="channel", flip=True),
        Squeeze(SHAPE).inv,
    ]


def test_image_flow_scores_by_the_change_of_variables():
    torch.manual_seed(0)
    parts = image_stack()
    base = dist.Normal(torch.zeros(SHAPE, dtype=torch.float64), 1.0).to_event(3)
    data = 1.0 + 2.0 * torch.randn(16, *SHAPE, dtype=torch.float64)
    for p in parts:
        _module(p).double()
    parts[0].inv(data)  # initialise ActNorm2d before perturbing
    for p in parts:
        if isinstance(p, torch.nn.Module):
            perturb(p)
    d = dist.TransformedDistribution(base, parts)
    assert d.event_shape == SHAPE
    log_prob = d.log_prob(data)
    # by hand: invert layer by layer from the data side, adding each inverse log|det J|
    z, total = data, torch.zeros(16, dtype=torch.float64)
    for p in reversed(parts):
        z, ladj_inv = _inverse(p, z)
        total = total + ladj_inv
    torch.testing.assert_close(log_prob, base.log_prob(z) + total)
    # samples are scored finitely, with gradients to every parameter
    sample = d.rsample((8,))
    assert sample.shape == (8, *SHAPE)
    loss = -d.log_prob(sample).mean() - d.log_prob(data).mean()
    assert torch.isfinite(loss)
    loss.backward()
    params = [p for part in parts for p in _module(part).parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def _module(part):
    return part if isinstance(part, torch.nn.Module) else part.inv


def _inverse(part, y):
    """``(x, log|det ∂x/∂y|)`` for a module or for the inverse ``m.inv`` of one."""
    if isinstance(part, torch.nn.Module):
        return part.inverse_and_log_det(y)
    return part.inv.forward_and_log_det(y)


def test_conditional_image_flow_has_the_context_batch_shape():
    torch.manual_seed(0)
    parts = [perturb(p) if isinstance(p, torch.nn.Module) else p for p in image_stack(3)]
    context = torch.randn(4, 3)
    base = dist.Normal(torch.zeros(SHAPE), 1.0).to_event(3).expand((4,))
    d = dist.TransformedDistribution(base, [p.condition(context) for p in parts])
    assert d.batch_shape == (4,) and d.event_shape == SHAPE
    x = d.sample((2,))
    assert x.shape == (2, 4, *SHAPE)
    assert torch.isfinite(d.log_prob(x)).all() and d.log_prob(x).shape == (2, 4)


# -- ImageSigmoid --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("alpha", [0.05, 0.0, 0.3])
def test_image_sigmoid_inverts_its_forward_map_both_ways(alpha, dtype):
    t = ImageSigmoid(SHAPE, alpha=alpha)
    z = torch.linspace(-8.0, 8.0, 7 * 32, dtype=dtype).reshape(7, *SHAPE)
    y, ladj = t.forward_and_log_det(z)
    z_back, ladj_inv = t.inverse_and_log_det(y)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(z_back, z, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj_inv, -ladj, atol=tol, rtol=tol)
    pixels = torch.rand(7, *SHAPE, dtype=dtype)
    torch.testing.assert_close(t(t.inv(pixels)), pixels, atol=tol, rtol=tol)


@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_image_sigmoid_inverse_is_realnvp_logit_preprocessing(alpha):
    t = ImageSigmoid(SHAPE, alpha=alpha)
    y = torch.rand(5, *SHAPE, dtype=torch.float64)
    z, ladj_inv = t.inverse_and_log_det(y)
    u = alpha + (1 - 2 * alpha) * y
    torch.testing.assert_close(z, torch.logit(u))
    # log|dz/dy| = sum(log(1 - 2a) - log u - log(1 - u))
    expected = (math.log(1 - 2 * alpha) - u.log() - torch.log1p(-u)).sum((-3, -2, -1))
    torch.testing.assert_close(ladj_inv, expected)
    # at z = 0 every entry contributes log(1/4) - log(1 - 2a)
    _, ladj0 = t.forward_and_log_det(torch.zeros(SHAPE, dtype=torch.float64))
    torch.testing.assert_close(ladj0.item(), 32 * (math.log(0.25) - math.log(1 - 2 * alpha)))


@pytest.mark.parametrize("alpha", [0.05, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_image_sigmoid_is_finite_at_pixel_values_0_and_1(alpha, dtype):
    t = ImageSigmoid(SHAPE, alpha=alpha)
    y = torch.zeros(2, *SHAPE, dtype=dtype)
    y[1] = 1.0
    z, ladj_inv = t.inverse_and_log_det(y)
    assert torch.isfinite(z).all() and torch.isfinite(ladj_inv).all()
    assert (z[0] < 0).all() and (z[1] > 0).all()
    if alpha > 0:  # exactly logit(a) and logit(1 - a)
        logit = math.log(alpha / (1 - alpha))
        torch.testing.assert_close(z[0], torch.full(SHAPE, logit, dtype=dtype))
        torch.testing.assert_close(z[1], torch.full(SHAPE, -logit, dtype=dtype))
    y_back, ladj = t.forward_and_log_det(z)
    assert torch.isfinite(y_back).all() and torch.isfinite(ladj).all()
    torch.testing.assert_close(y_back, y, atol=1e-6, rtol=0)
    # and the forward map far in the tails stays finite, inside the codomain, and invertible
    far = torch.tensor([-1e4, -100.0, 100.0, 1e4], dtype=dtype).repeat(8).reshape(SHAPE)
    y_far, ladj_far = t.forward_and_log_det(far)
    assert torch.isfinite(y_far).all() and torch.isfinite(ladj_far).all()
    assert t.codomain.check(y_far).all()
    assert torch.isfinite(t.inv(y_far)).all()


@pytest.mark.parametrize("alpha", [0.05, 0.0])
def test_image_sigmoid_log_det_matches_autograd(alpha):
    t = ImageSigmoid(SHAPE, alpha=alpha)
    z = (6.0 * torch.randn(3, *SHAPE, dtype=torch.float64)).requires_grad_()
    y, ladj = t.forward_and_log_det(z)
    # elementwise: the Jacobian is diagonal, with the derivatives dy_i/dz_i
    (derivative,) = torch.autograd.grad(y.sum(), z)
    expected = derivative.log().sum((-3, -2, -1))
    torch.testing.assert_close(ladj, expected)
    torch.testing.assert_close(t.log_abs_det_jacobian(z, y), expected)


def test_image_sigmoid_with_alpha_0_is_the_vector_sigmoid():
    z = torch.cat(
        [
            20.0 * torch.randn(4, *SHAPE),
            torch.tensor([-200.0, 200.0]).repeat(16)[None].reshape(1, *SHAPE),
        ]
    )
    t = ImageSigmoid(SHAPE, alpha=0.0)
    y, ladj = t.forward_and_log_det(z)
    y_vec, ladj_vec = Sigmoid().forward_and_log_det(z.flatten(-3))
    assert torch.equal(y.flatten(-3), y_vec)
    torch.testing.assert_close(ladj, ladj_vec, atol=0, rtol=1e-6)
    z_back, ladj_inv = t.inverse_and_log_det(y)
    z_vec, ladj_inv_vec = Logit().forward_and_log_det(y_vec)
    assert torch.equal(z_back.flatten(-3), z_vec)
    torch.testing.assert_close(ladj_inv, ladj_inv_vec, atol=0, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.05, 0.0, 0.3])
def test_image_sigmoid_codomain_is_the_exact_image_interval(alpha):
    t = ImageSigmoid(SHAPE, alpha=alpha)
    interval = t.codomain.base_constraint
    assert t.domain.event_dim == 3 and t.codomain.event_dim == 3
    assert interval.lower_bound == pytest.approx(-alpha / (1 - 2 * alpha))
    assert interval.upper_bound == pytest.approx((1 - alpha) / (1 - 2 * alpha))
    # and a distribution built on it samples there and scores its samples
    base = dist.Normal(torch.zeros(SHAPE), 3.0).to_event(3)
    d = dist.TransformedDistribution(base, [t])
    x = d.sample((50,))
    assert d.support.check(x).all() and torch.isfinite(d.log_prob(x)).all()
    assert "alpha=" in repr(t)


@pytest.mark.parametrize("alpha", [-0.1, 0.5, 1.0, True, "0.05", float("nan")])
def test_image_sigmoid_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha: expected a number in \[0, 0.5\)"):
        ImageSigmoid(SHAPE, alpha=alpha)


def test_image_sigmoid_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="shape: expected"):
        ImageSigmoid((4, 4))
