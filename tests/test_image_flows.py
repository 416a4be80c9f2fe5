"""Multi-scale image flows: Squeezed / FactorOut, Glow and ImageRealNVP as distributions."""

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from torch.autograd.functional import jacobian

import pyroflows as pf
from pyroflows.flows import ImageRealNVP
from pyroflows.transforms import ActNorm2d, ImageAffineCoupling, InvConv1x1
from pyroflows.transforms.multiscale import FactorOut, Squeezed


def perturbed(module, scale=0.1):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def wrappers():
    torch.manual_seed(0)
    inner = [ImageAffineCoupling((4, 2, 2), channels=4, blocks=1, mask="channel"), InvConv1x1(4)]
    squeezed = Squeezed((1, 4, 4), inner)
    factor = FactorOut((4, 2, 2), kept=2, transforms=[InvConv1x1(2), ActNorm2d(2)])
    return {"squeezed": squeezed, "factor_out": factor}


@pytest.mark.parametrize("name", ["squeezed", "factor_out"])
def test_wrappers_log_det_equals_the_autograd_jacobian_and_round_trip(name):
    t = perturbed(wrappers()[name]).double()
    shape = t.event_shape
    x = torch.randn(shape, dtype=torch.float64)
    t.forward_and_log_det(x.unsqueeze(0))  # initialises ActNorm2d from a batch
    y, ladj = t.forward_and_log_det(x)
    jac = jacobian(lambda v: t.forward_and_log_det(v.view(shape))[0].flatten(), x.flatten())
    assert ladj.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-8)
    back, inverse_ladj = t.inverse_and_log_det(y)
    torch.testing.assert_close(back, x)
    assert inverse_ladj.item() == pytest.approx(-ladj.item(), abs=1e-10)
    batch = torch.randn(3, 5, *shape, dtype=torch.float64)
    yb, lb = t.forward_and_log_det(batch)
    assert yb.shape == batch.shape and lb.shape == (3, 5)
    torch.testing.assert_close(yb[1, 2], t.forward_and_log_det(batch[1, 2])[0])


def test_factor_out_passes_the_other_channels_through_and_checks_its_arguments():
    t = perturbed(wrappers()["factor_out"])
    x = torch.randn(6, 4, 2, 2)
    y, _ = t.forward_and_log_det(x)
    assert torch.equal(y[:, 2:], x[:, 2:]) and not torch.allclose(y[:, :2], x[:, :2])
    with pytest.raises(ValueError, match="kept"):
        FactorOut((4, 2, 2), kept=4, transforms=[])
    with pytest.raises(ValueError, match="keep the shape"):
        FactorOut((4, 4, 4), kept=2, transforms=[pf.transforms.Squeeze((2, 4, 4))])
    with pytest.raises(TypeError, match="image transforms"):
        FactorOut((4, 2, 2), kept=2, transforms=[pf.transforms.Reverse(2)])


def builders():
    return {
        "glow": lambda **kw: pf.Glow((1, 8, 8), levels=2, steps=2, channels=8, **kw),
        "realnvp": lambda **kw: ImageRealNVP((2, 4, 4), scales=2, channels=8, blocks=1, **kw),
    }


@pytest.mark.parametrize("name", ["glow", "realnvp"])
def test_image_flows_are_one_distribution_over_the_image(name):
    flow = perturbed(builders()[name]())
    shape = flow.event_shape
    assert flow.dim == np.prod(shape)
    x = torch.rand(5, *shape)
    d = flow()
    assert d.event_shape == shape and d._simple
    lp = d.log_prob(x)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    # the fast path equals Pyro's generic TransformedDistribution
    generic = dist.TransformedDistribution(d.base_dist, [t.with_cache(0) for t in d.transforms])
    torch.testing.assert_close(lp, generic.log_prob(x), atol=1e-4, rtol=1e-5)
    # own samples are scored from the caches, and equal a fresh evaluation
    z = d.rsample((4,))
    assert z.shape == (4, *shape)
    torch.testing.assert_close(
        d.log_prob(z), flow().log_prob(z.detach().clone()), atol=1e-3, rtol=1e-4
    )
    z.sum().backward()
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)


def test_glow_structure_factor_out_and_split_prior():
    flow = pf.Glow((1, 8, 8), levels=3, steps=1, channels=4)
    top = flow.transforms[0]
    assert isinstance(top, Squeezed) and isinstance(top.inner[0], FactorOut)
    assert isinstance(top.inner[1], ImageAffineCoupling)  # the split prior
    second = top.inner[0].inner[0]
    assert isinstance(second, Squeezed) and second.event_shape == (2, 4, 4)
    without = pf.Glow((1, 8, 8), levels=3, steps=1, channels=4, split_prior=False)
    assert sum(p.numel() for p in without.parameters()) < sum(p.numel() for p in flow.parameters())
    with pytest.raises(ValueError, match="divisible by 8"):
        pf.Glow((1, 12, 12), levels=3)
    with pytest.raises(ValueError, match="divisible by 2"):
        ImageRealNVP((1, 5, 5), scales=2)
    with pytest.raises(ValueError, match="not both"):
        pf.RealNVP(4, shape=(1, 4, 4))


def test_class_conditional_glow():
    flow = perturbed(pf.Glow((1, 4, 4), levels=1, steps=2, channels=4, context_dim=3))
    classes = torch.eye(3)
    d = flow(classes)
    assert d.batch_shape == (3,)
    x = torch.rand(3, 1, 4, 4)
    lp = d.log_prob(x)
    assert not torch.allclose(lp[0], flow(classes[1]).log_prob(x[0]))
    with pytest.raises(ValueError, match="context"):
        flow()


def test_fit_and_save_load_an_image_flow(tmp_path):
    torch.manual_seed(0)
    # 4x4 "images" in [0, 1]: bright top half, dark bottom half, with noise
    x = torch.rand(400, 1, 4, 4) * 0.3
    x[:, :, :2] += 0.6
    flow = ImageRealNVP((1, 4, 4), scales=2, channels=8, blocks=1)
    history = pf.fit(flow, x, steps=60, batch_size=64, lr=3e-3, progress=False, seed=0)
    assert history.best_valid_nll < history.valid_nll[0] - 1.0
    with pytest.raises(ValueError, match=r"\(N, 1, 4, 4\)"):
        pf.fit(flow, torch.rand(10, 16), steps=1, progress=False)
    pf.save(flow, tmp_path / "m")
    loaded = pf.load(tmp_path / "m")
    assert type(loaded) is ImageRealNVP and loaded.event_shape == (1, 4, 4)
    assert loaded.config["builder"] == "image_realnvp"
    torch.testing.assert_close(loaded().log_prob(x[:5]), flow().log_prob(x[:5]))


@pytest.mark.cuda
def test_glow_on_cuda():
    flow = pf.Glow((1, 8, 8), levels=2, steps=2, channels=8, context_dim=2).cuda()
    d = flow(torch.randn(4, 2, device="cuda"))
    x = d.sample()
    assert x.device.type == "cuda" and torch.isfinite(d.log_prob(x)).all()
    cold = flow(torch.randn(4, 2, device="cuda"), temperature=0.7)
    assert cold.sample().device.type == "cuda" and torch.isfinite(cold.log_prob(x)).all()
    history = pf.fit(
        flow.cpu().cuda(),
        torch.rand(64, 1, 8, 8),
        context=torch.randn(64, 2),
        steps=5,
        device="cuda",
        progress=False,
    )
    assert np.isfinite(history.train_loss).all()


def test_fit_dequantizes_integer_images_and_bits_per_dim_reports_them():
    torch.manual_seed(0)
    x = torch.randint(0, 64, (300, 1, 4, 4))  # 8-bit images using only the darkest quarter
    flow = pf.Glow((1, 4, 4), levels=1, steps=2, channels=8)
    before = pf.images.bits_per_dim(flow, x[:100])
    history = pf.fit(
        flow, x, steps=80, batch_size=64, lr=3e-3, dequantize=8, progress=False, seed=0
    )
    after = pf.images.bits_per_dim(flow, x[:100])
    assert np.isfinite(history.train_loss).all()
    # A uniform model of [0, 1) costs 8 bits per pixel; these images need at most 6.
    assert after < before and after < 7.0
    with pytest.raises(ValueError):
        pf.fit(flow, x.float() + 0.5, steps=1, dequantize=8, progress=False)
