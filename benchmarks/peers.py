"""The peer libraries' versions of MAF, IAF, RealNVP and NSF, behind one small interface.

Used by ``benchmarks/speed.py`` to compare train-step, ``log_prob`` and sampling throughput::

    import peers

    for library in peers.available():  # "Pyro" first, then zuko / nflows / normflows if importable
        flow = peers.build(library, "MAF", dim=8, device="cpu")  # None: no such flow there
        peers.perturb(flow.module)
        loss = -flow.log_prob(x).mean()

    python benchmarks/peers.py  # self-check: shapes, normalisation, fused paths, parameter counts

Every library builds the same architecture, as far as it can: a standard Normal base of ``dim``
features and 5 layers, each conditioner a ReLU MLP (or MADE) with hidden widths ``hidden``
(default (128, 128)), no batch or layer norm, no residual blocks, no dropout, no learned
permutations; the feature order reversed, or the coupling mask flipped, between layers.

==========  ================================================================================
kind        what each library builds, per layer (``h = hidden``, ``n`` = transformed half)
==========  ================================================================================
MAF         one masked affine autoregressive layer, density direction one MADE pass,
            sampling sequential (``dim`` passes).
            Pyro: ``AffineAutoregressive(AutoRegressiveNN(dim, h, permutation=arange))`` used
            through ``.inv``, ``Permute(reversed)`` between layers.
            zuko: ``zuko.flows.MAF(dim, transforms=5, hidden_features=h)`` (orders alternate).
            nflows: ``MaskedAffineAutoregressiveTransform(dim, h[0], num_blocks=len(h) - 1,
            use_residual_blocks=False)``, ``ReversePermutation`` between layers.
            normflows: ``Reverse(MaskedAffineAutoregressive(...same...))``, ``Permute`` whose
            permutation is set to the reversal between layers.
IAF         the same layers in the other orientation: sampling one pass per layer, the density
            of arbitrary points sequential, the density of the flow's own samples fused.
            Pyro: the same transform used directly (its cache scores ``rsample`` for free).
            zuko: ``Flow([t.inv for t in MAF(...).transform.transforms], base)``.
            nflows: ``InverseTransform(MaskedAffineAutoregressiveTransform(...))``.
            normflows: ``MaskedAffineAutoregressive(...)`` used directly (that *is* normflows'
            natural orientation of this class: its forward, the sampling direction, is one pass).
RealNVP     affine coupling, conditioner ``MLP(dim - n, h, 2 n)``.
            Pyro: ``T.affine_coupling(dim, hidden_dims=h)`` (first half kept), ``Permute``
            reversal between layers.
            zuko: ``zuko.flows.RealNVP(dim, transforms=5, hidden_features=h)`` (checkered
            masks, alternating).
            nflows: ``AffineCouplingTransform(alternating mask, MLP((dim - n,), (2 n,), h))``.
            normflows: ``AffineCouplingBlock(MLP([dim - n, *h, 2 n]), scale_map="exp")``,
            ``split_mode`` alternating between "channel" and "channel_inv".
NSF         rational-quadratic spline coupling, ``bins`` bins on ``[-bound, bound]``, identity
            (linear) tails, conditioner ``MLP(dim - n, h, n (3 bins - 1))``; masks as RealNVP.
            Pyro: ``SplineCoupling(dim, dim // 2, DenseNN(...), bins, bound, order="quadratic",
            identity=True)`` -- not ``T.spline_coupling``, whose splines are linear-rational
            (``order="linear"``, one more parameter per bin) and which also passes the kept half
            through a learned element-wise spline (``identity=False``).
            zuko: ``zuko.flows.NICE(dim, transforms=5, hidden_features=h, univariate=
            MonotonicRQSTransform(bound=bound), shapes=[(bins,), (bins,), (bins - 1,)])``, i.e.
            its ``GeneralCouplingTransform``. (``zuko.flows.NSF(passes=2)`` would be a coupling
            flow too, but with a MADE over all ``dim`` inputs and outputs: ~2x the parameters.)
            nflows: ``PiecewiseRationalQuadraticCouplingTransform(alternating mask, MLP,
            num_bins=bins, tails="linear", tail_bound=bound)``.
            normflows: ``Reverse(PiecewiseRationalQuadraticCoupling(...same...))`` (the
            orientation that its ``CoupledRationalQuadraticSpline`` wrapper uses).
==========  ================================================================================

Differences that remain, all element-wise or bookkeeping, none changing the matrix products:

- Scale parameterisation of the affine layers (``s`` the conditioner's output): Pyro
  ``exp(clamp(s, -5, 3))``; zuko ``exp(s / (1 + |s| / 6.9))`` (a soft clip to about +-6.9); nflows
  ``softplus(s) + 1e-3`` (MAF) and ``sigmoid(s + 2) + 1e-3`` (coupling); normflows
  ``sigmoid(s + 2) + 1e-3`` (MAF) and ``exp(s)`` unclamped (``AffineCouplingBlock``, "exp").
- nflows' and normflows' non-residual MADE applies no activation after its first masked layer
  (``initial_layer``, then blocks of "linear, activation"); we append a ReLU to that layer so all
  four compute ``W1 -> ReLU -> W2 -> ReLU -> W3``. Their MADE has one width for every hidden layer,
  so for unequal ``hidden`` widths they have no MAF/IAF here (``build`` returns None).
- nflows and normflows divide the spline's width and height logits by ``sqrt(hidden[-1])``,
  as they do with their own conditioner nets (we give ours the ``hidden_features`` attribute they
  look for); Pyro and zuko do not.
- Spline details: Pyro fixes the boundary derivatives at ``1 - 1e-3`` (nflows, normflows, zuko:
  1); minimum bin sizes and slopes differ slightly. Pyro's ``SplineCoupling`` builds the (unused,
  with ``identity=True``) element-wise spline of the kept half anyway: ``dim // 2 * (3 bins - 1)``
  extra parameters per layer, counted but never given a gradient.
- Sequential directions: zuko's autoregressive inverse (MAF sampling, IAF density of new points)
  makes ``dim + 1`` conditioner passes per layer, the last one for the log-det; the others ``dim``.
- Masks: Pyro's couplings keep the first ``dim // 2`` features and reverse the order in between;
  the others flip an alternating (checkered) mask, or normflows the halves. Pyro's MADE is given
  the identity order (``T.affine_autoregressive`` would draw a random one; the cost is the same).
- Pyro's transforms cache the last ``(x, y)`` pair, keyed on tensor identity: ``PeerFlow`` clears
  those caches at the start of each call, so a data tensor reused after an optimiser step is
  scored afresh rather than from a stale graph; within ``rsample_and_log_prob`` the cache is what
  makes scoring the samples free.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import sys
import time
from importlib import metadata

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN, DenseNN
from torch import Tensor, nn

LIBRARIES = ("Pyro", "zuko", "nflows", "normflows")
KINDS = ("MAF", "IAF", "RealNVP", "NSF")


class PeerFlow:
    """One library's flow, behind the interface the speed benchmark uses.

    Attributes:
        library: "Pyro", "zuko", "nflows" or "normflows".
        module: holds every trainable parameter (hand ``module.parameters()`` to the optimiser);
            already on the device asked for.
    """

    library: str
    module: nn.Module

    def log_prob(self, x: Tensor) -> Tensor:
        """Differentiable log-density of ``x`` of shape (batch, dim); returns (batch,)."""
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        """``n`` samples, (n, dim); the caller wraps it in ``torch.no_grad()``."""
        raise NotImplementedError

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        """Reparametrised samples (n, dim) and their log-density (n,), through the library's
        fused or cached path; differentiable (reverse-KL training steps)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.library})"


# Pyro ---------------------------------------------------------------------------------------


class _PyroFlow(PeerFlow):
    library = "Pyro"

    def __init__(self, parts: list, cached: list, module: nn.Module, dim: int, device) -> None:
        self.parts, self.cached, self.module = parts, cached, module
        zeros = torch.zeros(dim, device=device)
        self.base = dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def _dist(self) -> dist.TransformedDistribution:
        # A fresh distribution does not renew the transforms' caches, which live on the
        # transforms themselves and answer by tensor identity; clear them.
        for t in self.cached:
            t._cached_x_y = None, None
        return dist.TransformedDistribution(self.base, self.parts)

    def log_prob(self, x: Tensor) -> Tensor:
        return self._dist().log_prob(x)

    def sample(self, n: int) -> Tensor:
        return self._dist().sample((n,))

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        d = self._dist()
        x = d.rsample((n,))
        return x, d.log_prob(x)  # served from the transforms' caches: no further network pass


def _pyro(kind: str, dim: int, hidden, layers: int, bins: int, bound: float, device):
    parts, cached, module = [], [], nn.ModuleList()
    reverse = torch.arange(dim - 1, -1, -1, device=device)
    for i in range(layers):
        if i > 0:
            cached.append(T.Permute(reverse))
            parts.append(cached[-1])
        if kind in ("MAF", "IAF"):
            arn = AutoRegressiveNN(dim, list(hidden), permutation=torch.arange(dim))
            t = T.AffineAutoregressive(arn)
        elif kind == "RealNVP":
            t = T.affine_coupling(dim, hidden_dims=list(hidden))
        else:  # NSF
            split = dim // 2
            n = dim - split
            net = DenseNN(split, list(hidden), param_dims=[n * bins, n * bins, n * (bins - 1)])
            t = T.SplineCoupling(dim, split, net, bins, bound, order="quadratic", identity=True)
        module.append(t)
        cached.append(t)
        parts.append(t.inv if kind == "MAF" else t)
    return _PyroFlow(parts, cached, module.to(device), dim, device)


# zuko ---------------------------------------------------------------------------------------


class _ZukoFlow(PeerFlow):
    library = "zuko"

    def __init__(self, flow: nn.Module) -> None:
        self.module = flow

    def log_prob(self, x: Tensor) -> Tensor:
        return self.module().log_prob(x)

    def sample(self, n: int) -> Tensor:
        return self.module().sample((n,))

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        return self.module().rsample_and_log_prob((n,))


def _zuko(zuko, kind: str, dim: int, hidden, layers: int, bins: int, bound: float):
    common = {"transforms": layers, "hidden_features": tuple(hidden)}
    if kind == "MAF":
        return zuko.flows.MAF(dim, **common)
    if kind == "IAF":
        maf = zuko.flows.MAF(dim, **common)
        return zuko.flows.Flow([t.inv for t in maf.transform.transforms], maf.base)
    if kind == "RealNVP":
        return zuko.flows.RealNVP(dim, **common)
    rqs = functools.partial(zuko.transforms.MonotonicRQSTransform, bound=bound)
    return zuko.flows.NICE(dim, univariate=rqs, shapes=[(bins,), (bins,), (bins - 1,)], **common)


# nflows and normflows -----------------------------------------------------------------------


class _Conditioner(nn.Module):
    """An MLP called the way nflows' and normflows' coupling layers call theirs, ``net(x, ctx)``.

    ``hidden_features`` is what their spline couplings look for to scale the bin logits, as they
    do with their own ``ResidualNet``.
    """

    def __init__(self, mlp: nn.Module, hidden_features: int) -> None:
        super().__init__()
        self.mlp = mlp
        self.hidden_features = hidden_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.mlp(x)


def _relu_after_first_layer(made: nn.Module) -> None:
    """nflows' (and normflows' copy of it) non-residual MADE has no activation after its first
    masked layer; add the ReLU that every other library has there."""
    made.initial_layer = nn.Sequential(made.initial_layer, nn.ReLU())


class _NflowsFlow(PeerFlow):
    library = "nflows"

    def __init__(self, flow: nn.Module) -> None:
        self.module = flow

    def log_prob(self, x: Tensor) -> Tensor:
        return self.module.log_prob(x)

    def sample(self, n: int) -> Tensor:
        return self.module.sample(n)

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        return self.module.sample_and_log_prob(n)


def _nflows(nflows, kind: str, dim: int, hidden, layers: int, bins: int, bound: float):
    tr = nflows.transforms
    mask = nflows.utils.torchutils.create_alternating_binary_mask

    def net(n_in: int, n_out: int) -> nn.Module:
        mlp = nflows.nn.nets.MLP((n_in,), (n_out,), list(hidden))
        return _Conditioner(mlp, hidden[-1])

    transforms = []
    for i in range(layers):
        if kind in ("MAF", "IAF"):
            if i > 0:
                transforms.append(tr.ReversePermutation(dim))
            t = tr.MaskedAffineAutoregressiveTransform(
                dim, hidden[0], num_blocks=len(hidden) - 1, use_residual_blocks=False
            )
            _relu_after_first_layer(t.autoregressive_net)
            transforms.append(t if kind == "MAF" else tr.InverseTransform(t))
        elif kind == "RealNVP":
            transforms.append(tr.AffineCouplingTransform(mask(dim, even=i % 2 == 0), net))
        else:  # NSF
            transforms.append(
                tr.PiecewiseRationalQuadraticCouplingTransform(
                    mask(dim, even=i % 2 == 0),
                    net,
                    num_bins=bins,
                    tails="linear",
                    tail_bound=bound,
                )
            )
    base = nflows.distributions.StandardNormal([dim])
    return nflows.flows.Flow(tr.CompositeTransform(transforms), base)


class _NormflowsFlow(PeerFlow):
    library = "normflows"

    def __init__(self, flow: nn.Module) -> None:
        self.module = flow

    def log_prob(self, x: Tensor) -> Tensor:
        return self.module.log_prob(x)

    def sample(self, n: int) -> Tensor:
        return self.module.sample(n)[0]

    def rsample_and_log_prob(self, n: int) -> tuple[Tensor, Tensor]:
        return self.module.sample(n)  # normflows' sample always returns (x, log q(x))


def _normflows(nf, kind: str, dim: int, hidden, layers: int, bins: int, bound: float):
    # normflows' layers map base to data in ``forward`` (its sampling direction).
    flows = []
    for i in range(layers):
        if kind in ("MAF", "IAF"):
            if i > 0:
                permute = nf.flows.Permute(dim, mode="shuffle")
                permute.perm = permute.inv_perm = torch.arange(dim - 1, -1, -1)
                flows.append(permute)
            t = nf.flows.MaskedAffineAutoregressive(
                dim, hidden[0], num_blocks=len(hidden) - 1, use_residual_blocks=False
            )
            _relu_after_first_layer(t.autoregressive_net)
            flows.append(nf.flows.Reverse(t) if kind == "MAF" else t)
        elif kind == "RealNVP":
            first, second = (dim + 1) // 2, dim // 2  # torch.chunk's split
            kept, moved = (first, second) if i % 2 == 0 else (second, first)
            mlp = nf.nets.MLP([kept, *hidden, 2 * moved])
            split = "channel" if i % 2 == 0 else "channel_inv"
            flows.append(nf.flows.AffineCouplingBlock(mlp, scale_map="exp", split_mode=split))
        else:  # NSF
            mask = nf.utils.masks.create_alternating_binary_mask(dim, even=i % 2 == 0)
            coupling = nf.flows.neural_spline.coupling.PiecewiseRationalQuadraticCoupling(
                mask,
                lambda n_in, n_out: _Conditioner(nf.nets.MLP([n_in, *hidden, n_out]), hidden[-1]),
                num_bins=bins,
                tails="linear",
                tail_bound=bound,
            )
            flows.append(nf.flows.Reverse(coupling))
    base = nf.distributions.DiagGaussian(dim, trainable=False)
    return nf.NormalizingFlow(base, flows)


# Interface ----------------------------------------------------------------------------------


@functools.cache
def _load(library: str):
    """The library's top-level module, or None where it (or something it needs) is missing."""
    try:
        if library == "nflows":
            importlib.import_module("nflows.flows")
            importlib.import_module("nflows.nn.nets")
        elif library == "normflows":
            importlib.import_module("normflows.flows.neural_spline.coupling")
        return importlib.import_module(library)
    except ImportError:
        return None


def available() -> list[str]:
    """The peer libraries importable here, "Pyro" first."""
    return ["Pyro"] + [lib for lib in LIBRARIES[1:] if _load(lib) is not None]


def build(
    library: str,
    kind: str,
    dim: int,
    hidden=(128, 128),
    layers: int = 5,
    bins: int = 8,
    bound: float = 5.0,
    device="cpu",
) -> PeerFlow | None:
    """``library``'s version of flow ``kind`` (see the module docstring for the exact classes).

    Args:
        library: one of ``available()``.
        kind: "MAF", "IAF", "RealNVP" or "NSF".
        dim: number of features (at least 2).
        hidden: hidden widths of every conditioner.
        layers: number of flow layers (not counting permutations).
        bins: spline bins (NSF).
        bound: splines act on ``[-bound, bound]``, the identity outside (NSF).
        device: where the parameters and buffers go.

    Returns:
        The flow, or None where ``library`` has no equivalent of ``kind`` (nflows and normflows
        MAF/IAF with unequal hidden widths).
    """
    if library not in LIBRARIES:
        raise ValueError(f"expected a library in {LIBRARIES}; got {library!r}")
    if kind not in KINDS:
        raise ValueError(f"expected a kind in {KINDS}; got {kind!r}")
    if dim < 2:
        raise ValueError(f"expected dim >= 2; got {dim}")
    hidden = tuple(hidden)
    args = (kind, dim, hidden, layers, bins, bound)
    if library == "Pyro":
        return _pyro(*args, device)
    lib = _load(library)
    if lib is None:
        raise ValueError(f"{library} is not importable here; available: {available()}")
    if library == "zuko":
        return _ZukoFlow(_zuko(lib, *args).to(device))
    if kind in ("MAF", "IAF") and len(set(hidden)) > 1:
        return None  # their MADE has a single hidden width
    if library == "nflows":
        return _NflowsFlow(_nflows(lib, *args).to(device))
    return _NormflowsFlow(_normflows(lib, *args).to(device))


def perturb(module: nn.Module) -> None:
    """Move every parameter off its initial value by ``0.05 * randn``, so that no zero-initialised
    weights (last layers, identity splines) shortcut the work."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


# Self-check ---------------------------------------------------------------------------------

_DISTRIBUTIONS = {"Pyro": "pyro-ppl", "zuko": "zuko", "nflows": "nflows", "normflows": "normflows"}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _mass(flow: PeerFlow, n: int = 481) -> tuple[float, float]:
    """Trapezoid integral of a 2-D flow's density over ``[-L, L]^2`` and ``L``: 6, or wider where
    the flow's samples reach further (a flow that starts broad, e.g. nflows' MAF at init)."""
    with torch.no_grad():
        reach = flow.sample(20_000).abs().max().item()
        lim = max(6.0, math.ceil(reach))
        g = torch.linspace(-lim, lim, n)
        p = flow.log_prob(torch.cartesian_prod(g, g)).exp().reshape(n, n)
    return torch.trapezoid(torch.trapezoid(p, g, dim=1), g).item(), lim


def _fused_error(flow: PeerFlow, n: int = 200) -> float:
    """Max |log-density from ``rsample_and_log_prob`` - ``log_prob`` of the same samples|."""
    with torch.no_grad():
        x, lp = flow.rsample_and_log_prob(n)
        return (lp - flow.log_prob(x.clone())).abs().max().item()  # a new tensor: no cache hit


def _check_one(library: str, kind: str, dim: int) -> tuple[int | None, list[str], float, float]:
    """Parameter count, problems found, and the fused-path error in float32 and float64."""
    flow = build(library, kind, dim)
    if flow is None:
        return None, [], math.nan, math.nan
    perturb(flow.module)
    # In float32 a perturbed flow can be ill-conditioned enough (Pyro's NSF at dim 64: steep
    # splines, unscaled bin logits) that rounding grows through the layers; float64 tests the
    # fused path itself. (Pyro's autoregressive inverse starts from the default dtype.)
    err32 = _fused_error(flow)
    with _default_dtype(torch.float64):
        twin = build(library, kind, dim)
        twin.module.load_state_dict(flow.module.state_dict())
        err64 = _fused_error(twin)
    problems = []
    if err64 > 1e-4:
        problems.append(f"fused log_prob differs from log_prob by {err64:.1e}")
    x = torch.randn(256, dim)
    lp = flow.log_prob(x)
    if lp.shape != (256,) or not lp.isfinite().all():
        problems.append(f"log_prob: shape {tuple(lp.shape)} or not finite")
    (-lp.mean()).backward()
    unused = sum(p.numel() for p in flow.module.parameters() if p.grad is None)
    with torch.no_grad():
        s = flow.sample(100)
        perturb(flow.module)  # stands for an optimiser step: the same x must be scored afresh
        if torch.equal(lp, flow.log_prob(x)):
            problems.append("log_prob of a reused tensor unchanged after a parameter update")
    if s.shape != (100, dim) or not s.isfinite().all():
        problems.append(f"sample: shape {tuple(s.shape)} or not finite")
    flow.module.zero_grad()
    xs, lps = flow.rsample_and_log_prob(100)
    lps.mean().backward()
    if xs.shape != (100, dim) or lps.shape != (100,):
        problems.append(f"rsample_and_log_prob: shapes {tuple(xs.shape)}, {tuple(lps.shape)}")
    if all(p.grad is None for p in flow.module.parameters()):
        problems.append("rsample_and_log_prob: no gradient")
    if unused:
        problems.append(f"(note: {unused} parameters unused by log_prob)")
    return _count(flow.module), problems, err32, err64


def _self_check() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    libs = available()
    versions = ", ".join(f"{lib} {metadata.version(_DISTRIBUTIONS[lib])}" for lib in libs)
    print(f"torch {torch.__version__}; {versions}")
    failures = 0

    print("\n2-D density mass over [-L, L]^2 (hidden (32, 32), perturbed; L = 6 unless wider):")
    for kind in KINDS:
        cells = []
        for lib in libs:
            flow = build(lib, kind, 2, hidden=(32, 32))
            perturb(flow.module)
            mass, lim = _mass(flow)
            bad = abs(mass - 1) > 0.02
            failures += bad
            cells.append(
                f"{lib} {mass:.4f}" + (f" (L={lim:.0f})" if lim > 6 else "") + bad * " FAIL"
            )
        print(f"  {kind:<8}" + "  ".join(cells))

    counts: dict[tuple[str, int, str], int | None] = {}
    print("\nShapes, gradients, fresh scoring; max |fused - log_prob| in float32 / float64:")
    for dim in (8, 64):
        for kind in KINDS:
            for lib in libs:
                count, problems, err32, err64 = _check_one(lib, kind, dim)
                counts[kind, dim, lib] = count
                if count is None:
                    print(f"  {kind:<8}{dim:>3}  {lib:<10} n/a")
                    continue
                failures += sum(not p.startswith("(note") for p in problems)
                status = "; ".join(problems) if problems else ""
                print(f"  {kind:<8}{dim:>3}  {lib:<10} {err32:8.1e} / {err64:8.1e}  {status}")

    print("\nParameter counts (difference from Pyro):")
    print(f"  {'kind':<8}{'dim':>4}" + "".join(f"{lib:>20}" for lib in libs))
    for dim in (8, 64):
        for kind in KINDS:
            ref = counts[kind, dim, "Pyro"]
            cells = []
            for lib in libs:
                n = counts[kind, dim, lib]
                cells.append("n/a" if n is None else f"{n:,} ({n / ref - 1:+.1%})")
            print(f"  {kind:<8}{dim:>4}" + "".join(f"{cell:>20}" for cell in cells))
    print(f"\n{failures} failure(s); {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_self_check())
