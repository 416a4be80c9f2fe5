"""Variational inference with flows: guides, objectives, training and evidence."""

from .objectives import IWAE, STL_ELBO, log_importance_weights

__all__ = ["IWAE", "STL_ELBO", "log_importance_weights"]
