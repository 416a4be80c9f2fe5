import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyroflows.images import bits_per_dim, dequantize
from pyroflows.transforms import ImageSigmoid

SHAPE = (2, 4, 4)
D = 32


def images(n, seed=0, bits=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (n, *SHAPE), generator=g, dtype=torch.uint8)


def uniform(shape=SHAPE, dtype=torch.float32):
    zero, one = torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)
    return dist.Uniform(zero, one).expand(shape).to_event(len(shape))


def logit_normal(loc=0.0, alpha=0.05, dtype=torch.float32):
    """Standard normal in logit space, pushed to pixels by ImageSigmoid."""
    base = dist.Normal(torch.full(SHAPE, loc, dtype=dtype), 1.0).to_event(3)
    return dist.TransformedDistribution(base, [ImageSigmoid(SHAPE, alpha)])


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


# -- dequantize ----------------------------------------------------------------------------------


def test_dequantize_puts_each_level_in_its_own_bin():
    x = torch.arange(256, dtype=torch.uint8).repeat(40).reshape(40, 1, 16, 16)
    y = dequantize(x, generator=gen())
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y >= 0).all() and (y < 1).all()
    assert torch.equal((y * 256).floor().to(torch.uint8), x)
    # the noise is uniform over each bin: its mean is 1/2 to within 4 standard errors
    u = y * 256 - x
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / u.numel())


@pytest.mark.parametrize("bits", [1, 4, 5])
def test_dequantize_with_fewer_bits(bits):
    x = images(20, bits=bits)
    y = dequantize(x, bits=bits, generator=gen())
    assert (y >= 0).all() and (y < 1).all()
    assert torch.equal((y * 2**bits).floor().to(torch.uint8), x)


def test_dequantize_dtypes_and_inputs():
    x = images(3)
    assert dequantize(x).dtype == torch.get_default_dtype()
    assert dequantize(x.long()).dtype == torch.get_default_dtype()
    assert dequantize(x.double()).dtype == torch.float64
    assert dequantize(x.float()).dtype == torch.float32
    assert dequantize(x.numpy()).dtype == torch.get_default_dtype()
    from_numpy = dequantize(x.numpy().astype(np.float64), generator=gen())
    assert from_numpy.dtype == torch.float64
    torch.testing.assert_close(from_numpy, dequantize(x.double(), generator=gen()))
    binary = dequantize(torch.tensor([True, False]), bits=1)
    assert ((binary * 2).floor() == torch.tensor([1.0, 0.0])).all()
    assert dequantize(x.numpy().astype(np.uint16)).shape == x.shape


def test_dequantize_stays_below_1_where_rounding_would_reach_it():
    # float16 spacing at 256 is 0.25, so (255 + u) rounds up to 256 for a quarter of the draws.
    y = dequantize(torch.full((2000,), 255.0, dtype=torch.float16), generator=gen())
    assert y.dtype == torch.float16 and (y < 1).all() and (y >= 255 / 256).all()


def test_dequantize_is_reproducible_with_a_generator():
    x = images(4)
    a = dequantize(x, generator=gen(3))
    assert torch.equal(a, dequantize(x, generator=gen(3)))
    assert not torch.equal(a, dequantize(x, generator=gen(4)))
    torch.manual_seed(5)
    b = dequantize(x)
    torch.manual_seed(5)
    assert torch.equal(b, dequantize(x))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.tensor([0, 256]), r"expected integers in \[0, 255\] \(bits=8\); got values from 0"),
        (torch.tensor([-1, 3]), r"got values from -1 to 3"),
        (torch.tensor([0.0, 0.5]), "non-integer values such as 0.5"),
        (torch.tensor([1.0, float("nan")]), "got NaN"),
        (torch.tensor([1.0, float("inf")]), "got values from 1.0 to inf"),
        (np.array([3, 300]), "got values from 3 to 300"),
    ],
)
def test_dequantize_rejects_values_that_are_not_pixel_levels(x, match):
    with pytest.raises(ValueError, match=match):
        dequantize(x)


def test_dequantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"expected integers in \[0, 15\]"):
        dequantize(torch.tensor([16]), bits=4)
    with pytest.raises(ValueError, match="bits: expected a positive integer"):
        dequantize(torch.tensor([1]), bits=0)
    with pytest.raises(TypeError, match="x: expected a tensor or a numpy array; got list"):
        dequantize([1, 2])
    with pytest.raises(TypeError, match="expected an integer or float array"):
        dequantize(np.array(["a"]))
    with pytest.raises(TypeError, match="expected integer or float values"):
        dequantize(torch.tensor([1 + 1j]))


# -- bits_per_dim --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_a_uniform_model_scores_exactly_bits(bits):
    x = images(50, bits=bits)
    mean, se = bits_per_dim(uniform(), x, bits=bits, samples=2, batch_size=16, return_se=True)
    assert mean == bits and se == 0.0
    # flattened images, scored by a vector model, and a callable returning the distribution
    flat = x.reshape(50, D)
    assert bits_per_dim(lambda context: uniform((D,)), flat, bits=bits) == bits


def hand_bpd(x, y, alpha=0.05, loc=0.0):
    """bits/dim of one image by hand, float64: standard normal logits, RealNVP pre-processing."""
    y = y.double()
    u = alpha + (1 - 2 * alpha) * y
    z = torch.log(u) - torch.log1p(-u)
    log_normal = -0.5 * (z - loc) ** 2 - 0.5 * math.log(2 * math.pi)
    log_dz_dy = math.log(1 - 2 * alpha) - torch.log(u) - torch.log1p(-u)
    log_p = (log_normal + log_dz_dy).sum()
    return -(log_p.item() - D * math.log(256)) / (D * math.log(2))


@pytest.mark.parametrize("alpha", [0.05, 0.0])
def test_a_logit_normal_model_matches_a_hand_computation(alpha):
    x = images(1)
    y = dequantize(x, generator=gen(7))  # the noise bits_per_dim draws with the same generator
    expected = hand_bpd(x, y[0], alpha)
    got = bits_per_dim(logit_normal(alpha=alpha), x, generator=gen(7))
    assert got == pytest.approx(expected, rel=1e-5)
    # a single image has no standard error
    _, se = bits_per_dim(logit_normal(alpha=alpha), x, generator=gen(7), return_se=True)
    assert math.isnan(se)


def test_samples_average_the_draws_of_each_image():
    x = images(2)
    u = torch.rand((2, 3, *SHAPE), generator=gen(2))  # image-major, as documented
    per_image = [
        sum(hand_bpd(x[i], (x[i] + u[i, s]) / 256) for s in range(3)) / 3 for i in range(2)
    ]
    mean, se = bits_per_dim(logit_normal(), x, samples=3, generator=gen(2), return_se=True)
    assert mean == pytest.approx(sum(per_image) / 2, rel=1e-5)
    assert se == pytest.approx(abs(per_image[0] - per_image[1]) / 2, rel=1e-3)


@pytest.mark.parametrize("samples", [1, 3])
def test_batching_does_not_change_the_result(samples):
    x = images(10)
    d = logit_normal()
    whole = bits_per_dim(d, x, samples=samples, batch_size=1000, generator=gen(), return_se=True)
    for batch_size in (1, 3, 7 * samples):
        split = bits_per_dim(
            d, x, samples=samples, batch_size=batch_size, generator=gen(), return_se=True
        )
        assert split == pytest.approx(whole, rel=1e-12)


def test_batch_dimensions_of_x_are_flattened():
    x = images(6)
    a = bits_per_dim(logit_normal(), x, generator=gen())
    b = bits_per_dim(logit_normal(), x.reshape(2, 3, *SHAPE), generator=gen())
    assert a == pytest.approx(b, rel=1e-12)


def test_a_conditional_callable_is_scored_with_one_context_per_image():
    def flow(context):
        loc = context.sum(-1)[..., None, None, None].expand(*context.shape[:-1], *SHAPE)
        base = dist.Normal(loc, 1.0).to_event(3)
        return dist.TransformedDistribution(base, [ImageSigmoid(SHAPE)])

    x = images(5)
    same = torch.full((5, 2), 0.25)
    got = bits_per_dim(flow, x, context=same, batch_size=2, generator=gen())
    assert got == pytest.approx(bits_per_dim(logit_normal(0.5), x, generator=gen()), rel=1e-6)
    other = bits_per_dim(flow, x, context=torch.randn(5, 2), batch_size=2, generator=gen())
    assert other != pytest.approx(got)
    with pytest.raises(ValueError, match=r"batch shape of x, \(5,\); got \(4, 2\)"):
        bits_per_dim(flow, x, context=torch.zeros(4, 2))


class Recording(nn.Module):
    """A flow-like module in float64 that records the inputs its distribution scores."""

    def __init__(self):
        super().__init__()
        self.register_buffer("loc", torch.zeros(SHAPE, dtype=torch.float64))
        self.seen = []

    def forward(self, context=None):
        module = self

        class Scored(dist.TransformedDistribution):
            def log_prob(self, value):
                module.seen.append((value.dtype, value.requires_grad, torch.is_grad_enabled()))
                return super().log_prob(value)

        base = dist.Normal(self.loc, 1.0).to_event(3)
        return Scored(base, [ImageSigmoid(SHAPE)])


def test_a_module_is_scored_without_gradients_in_its_own_dtype():
    flow = Recording()
    x = images(5)
    got = bits_per_dim(flow, x, batch_size=2, generator=gen())
    assert flow.seen == [(torch.float64, False, False)] * 3
    # float64 noise, as a float64 distribution gets
    expected = bits_per_dim(logit_normal(dtype=torch.float64), x, generator=gen())
    assert got == pytest.approx(expected, rel=1e-12)


class OneNumber(dist.TorchDistribution):
    """A broken conditional model: one log-density whatever the batch."""

    arg_constraints = {}  # noqa: RUF012

    def __init__(self):
        super().__init__(event_shape=SHAPE)

    def log_prob(self, value):
        return torch.zeros(1)


def test_bits_per_dim_rejects_bad_arguments():
    x = images(3)
    with pytest.raises(ValueError, match="a distribution is already conditioned"):
        bits_per_dim(uniform(), x, context=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"expected images of shape \(\*batch, 2, 4, 4\)"):
        bits_per_dim(uniform(), x[:, :1])
    with pytest.raises(ValueError, match="non-empty event shape"):
        bits_per_dim(dist.Uniform(0.0, 1.0), x)
    with pytest.raises(ValueError, match=r"expected a batch shape \(\) .*; got \(2,\)"):
        bits_per_dim(dist.Uniform(0.0, 1.0).expand((2, 4, 4)).to_event(2), x)
    with pytest.raises(ValueError, match=r"one number per image, shape \(3,\); got \(1,\)"):
        bits_per_dim(lambda c: OneNumber(), x, context=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="at least one image"):
        bits_per_dim(uniform(), x[:0])
    with pytest.raises(ValueError, match=r"expected integers in \[0, 255\]"):
        bits_per_dim(uniform(), x.float() + 0.5)
    with pytest.raises(TypeError, match="expected a distribution or a callable"):
        bits_per_dim("flow", x)
    with pytest.raises(TypeError, match="expected the callable to return a distribution"):
        bits_per_dim(lambda c: 1.0, x)
    for name in ("bits", "samples", "batch_size"):
        with pytest.raises(ValueError, match=f"{name}: expected a positive integer"):
            bits_per_dim(uniform(), x, **{name: 0})


@pytest.mark.cuda
def test_bits_per_dim_on_cuda_matches_cpu():
    x = images(9)
    cpu = bits_per_dim(logit_normal(), x, batch_size=4, generator=gen())
    base = dist.Normal(torch.zeros(SHAPE, device="cuda"), 1.0).to_event(3)
    on_gpu = dist.TransformedDistribution(base, [ImageSigmoid(SHAPE)])
    assert bits_per_dim(on_gpu, x, batch_size=4, generator=gen()) == pytest.approx(cpu, rel=1e-5)
    assert dequantize(x.cuda(), generator=gen()).device.type == "cuda"


@pytest.mark.parametrize("context_dim", [0, 3])
def test_a_pyroflows_flow_is_scored_like_its_log_prob(context_dim):
    from pyroflows import MAF

    torch.manual_seed(0)
    flow = MAF(D, layers=2, hidden=(40,), context_dim=context_dim).double()
    x = images(6).reshape(6, D)
    context = torch.randn(6, context_dim, dtype=torch.float64) if context_dim else None
    got = bits_per_dim(flow, x, context=context, batch_size=4, generator=gen())
    y = dequantize(x.double(), generator=gen())
    with torch.no_grad():
        log_p = flow(context).log_prob(y)
    expected = (8 - log_p / (D * math.log(2))).mean().item()
    assert got == pytest.approx(expected, rel=1e-10)
