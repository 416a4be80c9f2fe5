"""Generic-harness rows (see registry.py) for the planar, radial and Sylvester transforms;
merged into ``registry.CASES``. Every one starts at the identity (zero-initialised ``u``,
``β_raw`` and ``R``, or the head's rows for them when amortised)."""

from __future__ import annotations

from pyroflows.transforms.sylvester import Planar, Radial, Sylvester

from .registry import Case, D

C = 3  # the context size of the amortised rows

CASES: dict = {
    "Planar": Case(lambda: Planar(D), identity=True),
    "Planar-context": Case(lambda: Planar(D, context_dim=C), context_dim=C, identity=True),
    "Radial": Case(lambda: Radial(D), identity=True),
    "Radial-context": Case(lambda: Radial(D, context_dim=C), context_dim=C, identity=True),
    "Sylvester-orthogonal": Case(lambda: Sylvester(D), identity=True),
    "Sylvester-orthogonal-columns2": Case(lambda: Sylvester(D, columns=2), identity=True),
    "Sylvester-orthogonal-context": Case(
        lambda: Sylvester(D, "orthogonal", context_dim=C, columns=3), context_dim=C, identity=True
    ),
    "Sylvester-householder": Case(lambda: Sylvester(D, "householder"), identity=True),
    "Sylvester-householder-context": Case(
        lambda: Sylvester(D, "householder", context_dim=C, reflections=2),
        context_dim=C,
        identity=True,
    ),
    "Sylvester-triangular": Case(lambda: Sylvester(D, "triangular"), identity=True),
    "Sylvester-triangular-flip-context": Case(
        lambda: Sylvester(D, "triangular", context_dim=C, flip=True), context_dim=C, identity=True
    ),
}
