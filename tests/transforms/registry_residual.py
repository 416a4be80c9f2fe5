"""Generic-harness rows (see registry.py) for the residual transforms; merged into registry.CASES.

The rows use the exact log-determinant (the harness compares it with the autograd Jacobian);
the stochastic estimator is checked in ``test_residual.py``. ``build`` perturbs every raw
weight by 0.3, which pushes every layer's spectral norm past ``coeff``: the normalisation, not
the initialisation, keeps the branch contractive there.
"""

from __future__ import annotations

from pyroflows.transforms.residual import Residual

from .registry import Case, D, H

CASES: dict = {
    "Residual": Case(lambda: Residual(D, hidden=H, logdet="exact"), identity=True),
    "Residual-context": Case(
        lambda: Residual(D, hidden=H, context_dim=3, logdet="exact"), context_dim=3, identity=True
    ),
    "Residual-elu-context": Case(
        lambda: Residual(D, hidden=(8,), context_dim=3, activation="elu", logdet="exact"),
        context_dim=3,
        identity=True,
    ),
}
