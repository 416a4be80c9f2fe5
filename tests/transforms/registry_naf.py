"""Generic-harness rows (see registry.py) for the neural autoregressive flows in
:mod:`pyroflows.transforms.naf`; merged into ``registry.CASES``.

DSF and DDSF are elementwise maps: each has rows in Coupling, MaskedAutoregressive (both
orientations, with and without a context) and ImageCoupling, all the identity when freshly
built (zero conditioner output is the identity map). BNAF starts near the identity, not at it,
so its rows are not marked ``identity``.
"""

from __future__ import annotations

from pyroflows.transforms import Coupling, ImageCoupling, MaskedAutoregressive
from pyroflows.transforms.naf import BNAF, DDSF, DSF

from .registry import CONV, IMG, IMG3, Case, D, H

CASES: dict[str, Case] = {
    "Coupling-DSF": Case(lambda: Coupling(D, DSF(4), hidden=H), identity=True),
    "Coupling-DDSF-alternate-context": Case(
        lambda: Coupling(5, DDSF(4, 2), hidden=H, mask="alternate", context_dim=2),
        dim=5,
        context_dim=2,
        identity=True,
    ),
    "MaskedAutoregressive-DSF": Case(
        lambda: MaskedAutoregressive(D, DSF(4), hidden=H), identity=True
    ),
    "MaskedAutoregressive-DSF-iaf-context": Case(
        lambda: MaskedAutoregressive(D, DSF(4), hidden=H, context_dim=2, orientation="iaf"),
        context_dim=2,
        identity=True,
    ),
    "MaskedAutoregressive-DDSF-iaf": Case(
        lambda: MaskedAutoregressive(D, DDSF(4, 2), hidden=H, orientation="iaf", order="random"),
        identity=True,
    ),
    "MaskedAutoregressive-DDSF-context": Case(
        lambda: MaskedAutoregressive(D, DDSF(3, 3), hidden=H, context_dim=2),
        context_dim=2,
        identity=True,
    ),
    "ImageCoupling-DSF-checkerboard": Case(
        lambda: ImageCoupling(IMG, DSF(4), **CONV), shape=IMG, identity=True
    ),
    "ImageCoupling-DDSF-channel-flip-context": Case(
        lambda: ImageCoupling(IMG3, DDSF(4, 2), **CONV, mask="channel", flip=True, context_dim=2),
        shape=IMG3,
        context_dim=2,
        identity=True,
    ),
    "BNAF": Case(lambda: BNAF(D, hidden_factor=4, layers=2)),
    "BNAF-context": Case(lambda: BNAF(D, hidden_factor=3, layers=1, context_dim=2), context_dim=2),
    "BNAF-dim1": Case(lambda: BNAF(1, hidden_factor=4, layers=3), dim=1),
}
