"""Generic-harness rows (see registry.py) for the continuous flow; merged into registry.CASES.

The rows integrate with torchdiffeq's fixed-step Runge-Kutta 4 (64 steps): a smooth map of
the input and the parameters, so that the harness's finite differences and autograd Jacobians
see the solver's map, and its error (order h⁴, about 1e-9 here) stays below the harness's
tolerances. The adaptive solver, Hutchinson's estimate and the adjoint are checked in
``test_continuous.py``.
"""

from __future__ import annotations

from pyroflows.transforms.continuous import CNF

from .registry import Case, D, H

RK4 = {"solver": "rk4", "steps": 64}
CASES: dict = {
    "CNF": Case(lambda: CNF(D, hidden=H, **RK4), identity=True),
    "CNF-context": Case(
        lambda: CNF(D, hidden=H, context_dim=3, **RK4), context_dim=3, identity=True
    ),
    "CNF-tanh-exact": Case(
        lambda: CNF(D, hidden=(8,), activation="tanh", trace="exact", **RK4), identity=True
    ),
}
