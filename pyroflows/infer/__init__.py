"""Variational inference with flows: guides, objectives, training and evidence."""

from .evidence import log_evidence
from .objectives import IWAE, STL_ELBO, log_importance_weights
from .svi import fit_svi, fit_target

__all__ = ["IWAE", "STL_ELBO", "fit_svi", "fit_target", "log_evidence", "log_importance_weights"]
