import pyro.distributions as dist
import pytest
import torch

from pyroflows.transforms import AdditiveCoupling, Affine, AffineCoupling, Coupling, coupling_mask

from .registry import fitted_stack, rising_rays


def test_masks():
    assert coupling_mask(4).tolist() == [True, True, False, False]
    assert coupling_mask(3).tolist() == [True, False, False]
    assert coupling_mask(4, "alternate", flip=True).tolist() == [False, True, False, True]
    explicit = torch.tensor([False, True, False])
    assert torch.equal(coupling_mask(3, explicit), explicit)


@pytest.mark.parametrize(
    "dim, mask, match",
    [
        (1, "half", "at least 2 features"),
        (3, "checkerboard", "expected 'half', 'alternate' or a boolean tensor"),
        (3, torch.tensor([1, 0, 1]), "expected a boolean tensor"),
        (3, torch.tensor([True, False]), r"expected shape \(3,\)"),
        (3, torch.tensor([True, True, True]), "at least one feature passing through"),
    ],
)
def test_bad_masks_are_value_errors(dim, mask, match):
    with pytest.raises(ValueError, match=match):
        AffineCoupling(dim, mask=mask)


@pytest.mark.parametrize("cls", [AdditiveCoupling, AffineCoupling])
def test_starts_at_the_identity_and_keeps_the_masked_features(cls):
    t = cls(5, hidden=(8,), mask="alternate")
    x = torch.randn(6, 5)
    y, ladj = t.forward_and_log_det(x)
    assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(6))
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p))
    y = t(x)
    assert torch.equal(y[:, t.mask], x[:, t.mask])
    assert not torch.allclose(y[:, ~t.mask], x[:, ~t.mask])


@pytest.mark.parametrize("cls", [AdditiveCoupling, AffineCoupling])
def test_context_broadcasts_against_the_batch(cls):
    t = cls(4, hidden=(8,), context_dim=2)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 1, 4)
    context = torch.randn(5, 2)
    bound = t.condition(context)
    y = bound(x)
    assert y.shape == (3, 5, 4)
    assert bound.log_abs_det_jacobian(x, y).shape == (3, 5)
    # each context gives its own map
    assert not torch.allclose(y[:, 0], y[:, 1])
    with pytest.raises(ValueError, match="batch shape broadcasts"):
        t.condition(torch.randn(4, 2))(torch.randn(3, 4))


def test_log_scale_is_soft_clamped_and_far_inputs_stay_finite():
    torch.manual_seed(0)
    layers = []
    for i in range(8):
        layer = AffineCoupling(2, hidden=(16, 16), mask=coupling_mask(2, flip=i % 2))
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(2.0 * torch.randn_like(p))  # large weights: raw log-scales far past 3
        layers.append(layer)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    d = dist.TransformedDistribution(base, layers)
    for r in (10.0, 100.0, 1000.0):
        x = r * torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.7, 0.7]])
        assert torch.isfinite(d.log_prob(x)).all(), r
    h = layers[0]._conditioner_output(1000 * torch.ones(1, 1), None)
    log_scale = layers[0].map.log_scale(h[..., 1, :])
    assert log_scale.abs().max() <= 3.0


def test_bad_log_scale_bound():
    with pytest.raises(ValueError, match="log_scale_bound: expected a positive number"):
        AffineCoupling(4, log_scale_bound=0)


def test_log_density_decreases_far_in_the_tails():
    """A RealNVP-like stack fitted for 50 steps: the log-density keeps decreasing from radius
    1e2 to 1e7 along every ray; with the conditioner reading unclamped features (as before)
    it rose again along one of them."""

    def layer(clamped):
        bound = {} if clamped else {"conditioner_bound": None}
        return lambda i: Coupling(
            4, Affine(), hidden=(64, 64), mask=coupling_mask(4, flip=i % 2), **bound
        )

    assert rising_rays(fitted_stack(layer(True), seed=0)) == []
    assert rising_rays(fitted_stack(layer(False), seed=0)) != []
