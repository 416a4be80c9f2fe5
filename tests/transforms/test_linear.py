import pytest
import torch

from pyroflows.transforms import LULinear, Permutation, QRLinear, Reverse


def test_lu_identity_init_is_the_identity():
    t = LULinear(4)
    torch.testing.assert_close(t.weight(), torch.eye(4))


def test_lu_rotation_init_is_a_rotation_with_zero_log_det():
    torch.manual_seed(1)
    t = LULinear(6, init="rotation").double()
    w = t.weight()  # drawn in float32: orthogonal to float32 precision
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    x = torch.randn(3, 6, dtype=torch.float64)
    ladj = t.log_abs_det_jacobian(x, t(x))
    torch.testing.assert_close(ladj, torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert not torch.allclose(w, torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("make", [lambda: LULinear(5, init="rotation"), lambda: QRLinear(5)])
def test_log_det_is_the_slogdet_of_the_weight(make):
    t = make().double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(2, 5, dtype=torch.float64)
    expected = torch.linalg.slogdet(t.weight())[1]
    torch.testing.assert_close(t.log_abs_det_jacobian(x, t(x)), expected.expand(2))
    torch.testing.assert_close(t(x), x @ t.weight().T)


def test_qr_factor_stays_orthogonal_and_starts_at_identity():
    t = QRLinear(5).double()
    torch.testing.assert_close(t.weight(), torch.eye(5, dtype=torch.float64))
    with torch.no_grad():
        t.reflections.add_(torch.randn(5, 5, dtype=torch.float64))
    q = t.orthogonal()
    torch.testing.assert_close(q @ q.T, torch.eye(5, dtype=torch.float64))
    assert torch.linalg.det(q).item() == pytest.approx(1.0)


def test_lu_rejects_unknown_init():
    with pytest.raises(ValueError, match="init: expected 'identity' or 'rotation'"):
        LULinear(3, init="random")


@pytest.mark.parametrize(
    "perm, match",
    [
        ([0, 0, 1], "expected a permutation of 0..2"),
        ([0, 1], "expected a permutation of 0..2"),
        ([0.0, 1.0, 2.0], "expected integers"),
    ],
)
def test_permutation_rejects_bad_perms(perm, match):
    with pytest.raises(ValueError, match=match):
        Permutation(3, perm=perm)


def test_permutation_given_and_reverse():
    x = torch.arange(4.0)
    assert Permutation(4, perm=torch.tensor([1, 3, 0, 2]))(x).tolist() == [1.0, 3.0, 0.0, 2.0]
    assert Reverse(4)(x).tolist() == [3.0, 2.0, 1.0, 0.0]
    assert torch.equal(Reverse(4).inv(Reverse(4)(x)), x)
