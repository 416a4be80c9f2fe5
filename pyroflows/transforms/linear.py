"""Linear transforms: learnable invertible matrices and fixed permutations of the features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.linalg import householder_product, solve_triangular

from .._checks import check_positive_int
from .base import FlowTransform
from .elementwise import _batch

__all__ = ["LULinear", "Permutation", "QRLinear", "Reverse"]


def random_rotation(dim: int) -> torch.Tensor:
    """A random ``dim × dim`` orthogonal matrix (torch's global generator), as Glow draws."""
    return torch.linalg.qr(torch.randn(dim, dim))[0]


def _init_lu(module: nn.Module, dim: int, init: str) -> None:
    """Register ``W = P L U``'s parameters on ``module``, at ``W = I`` or a random rotation.

    Parameters ``lower`` (below the diagonal), ``upper`` (above it) and ``log_diag``; buffers
    ``perm`` / ``inv_perm`` (``(P v)[i] = v[perm[i]]``) and ``diag_sign``. Shared by
    :class:`LULinear` and the image transform ``InvConv1x1``.
    """
    eye = torch.eye(dim)
    if init == "identity":
        perm, lower, upper = torch.arange(dim), eye, eye
    elif init == "rotation":
        p, lower, upper = torch.linalg.lu(random_rotation(dim))
        perm = p.argmax(dim=1)
    else:
        raise ValueError(f"init: expected 'identity' or 'rotation'; got {init!r}")
    diag = upper.diagonal()
    module.lower = nn.Parameter(lower.tril(-1).contiguous())
    module.upper = nn.Parameter(upper.triu(1).contiguous())
    module.log_diag = nn.Parameter(diag.abs().log())
    module.register_buffer("perm", perm)
    module.register_buffer("inv_perm", torch.argsort(perm))
    module.register_buffer("diag_sign", torch.sign(diag))


def _lu_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, U)`` of a module set up by :func:`_init_lu`."""
    eye = torch.eye(module.lower.shape[0], dtype=module.lower.dtype, device=module.lower.device)
    lower = module.lower.tril(-1) + eye
    upper = module.upper.triu(1) + torch.diag(module.diag_sign * module.log_diag.exp())
    return lower, upper


def _rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Flatten ``(*batch, dim)`` to ``(n, dim)`` for the triangular solves."""
    return v.reshape(-1, v.shape[-1]), v.shape


class LULinear(FlowTransform):
    """Linear map ``W = P L U`` with a fixed permutation and learnable triangular factors.

    ``P`` is a fixed permutation, ``L`` unit lower triangular and ``U`` upper triangular with
    diagonal ``diag_sign * exp(log_diag)`` (``diag_sign`` is fixed: all +1 unless initialised from a
    rotation).

    * map: ``y = W x``
    * inverse: ``x = U⁻¹ L⁻¹ Pᵀ y`` by two triangular solves, O(dim²) per point
    * log|det J|: ``sum(log_diag)``, O(dim) and independent of ``x``

    The forward direction is a matrix product, the inverse two triangular solves; both are one
    pass. ``init="identity"`` (the default) starts at ``W = I``; ``init="rotation"`` starts at a
    random rotation through its LU decomposition, as Glow does.

    Args:
        dim: number of features.
        init: ``"identity"`` or ``"rotation"`` (drawn from torch's global random generator).

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal, 2018).

    Example:
        >>> import torch
        >>> from pyroflows.transforms import LULinear
        >>> t = LULinear(3, init="rotation")
        >>> x = torch.randn(8, 3)
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
        True
    """

    def __init__(self, dim: int, init: str = "identity") -> None:
        super().__init__(event_shape=(check_positive_int("dim", dim),))
        self.init = init
        _init_lu(self, dim, init)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _lu_factors(self)

    def weight(self) -> torch.Tensor:
        """The matrix ``W = P L U`` (shape ``(dim, dim)``)."""
        lower, upper = self._factors()
        return (lower @ upper)[self.perm]

    def _forward_and_log_det(self, x, context):
        y = nn.functional.linear(x, self.weight())
        return y, self.log_diag.sum().expand(_batch(x))

    def _inverse_and_log_det(self, y, context):
        lower, upper = self._factors()
        z, shape = _rows(y[..., self.inv_perm])
        w = solve_triangular(lower.T, z, upper=True, left=False, unitriangular=True)
        x = solve_triangular(upper.T, w, upper=False, left=False)
        return x.reshape(shape), -self.log_diag.sum().expand(_batch(y))

    def _log_abs_det(self, x, y, context):
        return self.log_diag.sum().expand(_batch(x))

    def extra_repr(self) -> str:
        return f"dim={self.lower.shape[0]}, init={self.init!r}"


class QRLinear(FlowTransform):
    """Linear map ``W = Q R`` with ``Q`` a product of Householder reflections.

    ``Q = -H_1 H_2 ... H_dim`` with ``H_i = I - 2 v_i v_iᵀ / |v_i|²``, each ``v_i`` having a 1 in
    position ``i``, zeros above it and learnable entries below (one LAPACK call,
    ``torch.linalg.householder_product``); the leading sign makes ``Q = I`` when all ``v_i`` are
    unit vectors, so the map starts at the identity. ``R`` is upper triangular with diagonal
    ``exp(log_diag)``.

    * map: ``y = Q R x``
    * inverse: ``x = R⁻¹ Qᵀ y`` by one matrix product and one triangular solve
    * log|det J|: ``sum(log_diag)`` (``Q`` preserves volume), independent of ``x``

    Both directions are one pass of O(dim²) per point, plus O(dim³) per call to form ``Q``.

    Args:
        dim: number of features.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import QRLinear
        >>> t = QRLinear(4)
        >>> q = t.orthogonal()
        >>> torch.allclose(q, torch.eye(4))
        True
    """

    def __init__(self, dim: int) -> None:
        super().__init__(event_shape=(check_positive_int("dim", dim),))
        self.reflections = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))

    def orthogonal(self) -> torch.Tensor:
        """The orthogonal factor ``Q`` (shape ``(dim, dim)``)."""
        v = self.reflections.tril(-1)
        tau = 2.0 / (1.0 + v.square().sum(0))
        return -householder_product(v, tau)

    def _triangular(self) -> torch.Tensor:
        return self.upper.triu(1) + torch.diag(self.log_diag.exp())

    def weight(self) -> torch.Tensor:
        """The matrix ``W = Q R`` (shape ``(dim, dim)``)."""
        return self.orthogonal() @ self._triangular()

    def _forward_and_log_det(self, x, context):
        y = nn.functional.linear(x, self.weight())
        return y, self.log_diag.sum().expand(_batch(x))

    def _inverse_and_log_det(self, y, context):
        z, shape = _rows(y @ self.orthogonal())
        x = solve_triangular(self._triangular().T, z, upper=False, left=False)
        return x.reshape(shape), -self.log_diag.sum().expand(_batch(y))

    def _log_abs_det(self, x, y, context):
        return self.log_diag.sum().expand(_batch(x))

    def extra_repr(self) -> str:
        return f"dim={self.log_diag.shape[0]}"


class Permutation(FlowTransform):
    """Fixed permutation of the features (volume preserving, no parameters).

    * map: ``y_i = x_{perm[i]}``
    * inverse: ``x_j = y_{perm⁻¹[j]}``
    * log|det J|: ``0``

    Both directions are one gather. The permutation is a buffer, so it is saved in the
    ``state_dict`` and moves with ``.to(device)``.

    Args:
        dim: number of features.
        perm: the permutation (a sequence or 1-D integer tensor holding ``0..dim-1`` once each);
            random (torch's global generator) when ``None``.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Permutation
        >>> Permutation(3, perm=[2, 0, 1])(torch.tensor([10.0, 11.0, 12.0]))
        tensor([12., 10., 11.])
    """

    def __init__(self, dim: int, perm: Sequence[int] | torch.Tensor | None = None) -> None:
        super().__init__(event_shape=(check_positive_int("dim", dim),))
        if perm is None:
            perm = torch.randperm(dim)
        perm = torch.as_tensor(perm)
        if perm.dtype.is_floating_point or perm.dtype == torch.bool:
            raise ValueError(f"perm: expected integers; got dtype {perm.dtype}")
        perm = perm.long().cpu()
        if perm.shape != (dim,) or not torch.equal(perm.sort().values, torch.arange(dim)):
            raise ValueError(f"perm: expected a permutation of 0..{dim - 1}; got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    # index_select rather than x[..., perm]: advanced indexing costs several times more, and
    # so does its backward (index_put against index_add).
    def _forward_and_log_det(self, x, context):
        return x.index_select(-1, self.perm), x.new_zeros(_batch(x))

    def _inverse_and_log_det(self, y, context):
        return y.index_select(-1, self.inv_perm), y.new_zeros(_batch(y))

    def _log_abs_det(self, x, y, context):
        return x.new_zeros(_batch(x))

    def extra_repr(self) -> str:
        return f"dim={self.perm.shape[0]}"


class Reverse(Permutation):
    """Reverse the order of the features: ``y_i = x_{dim-1-i}`` (its own inverse, log|det J| = 0).

    Args:
        dim: number of features.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import Reverse
        >>> Reverse(3)(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])
    """

    def __init__(self, dim: int) -> None:
        super().__init__(check_positive_int("dim", dim), perm=torch.arange(dim - 1, -1, -1))

    # Eagerly, flip is a plain strided copy, cheaper still than a gather. Compiled, Permutation's
    # gather is faster: torch.compile fuses a flip into the next layer's elementwise work (its
    # conditioner's input clamp and its backward) with reversed reads that cost a compiled MAF
    # step at dim 64 about 9% on a CPU.
    def _forward_and_log_det(self, x, context):
        if torch.compiler.is_compiling():
            return super()._forward_and_log_det(x, context)
        return x.flip(-1), x.new_zeros(_batch(x))

    def _inverse_and_log_det(self, y, context):
        if torch.compiler.is_compiling():
            return super()._inverse_and_log_det(y, context)
        return y.flip(-1), y.new_zeros(_batch(y))
