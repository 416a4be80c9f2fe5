"""Variational inference with flows: guides, objectives, training and evidence."""

from .evidence import ImportanceDraws, importance_draws, log_evidence
from .exact import NeuTraModel, PSISDraws, neutra, psis_draws
from .fast import FastPathUnavailable
from .guides import AmortizedFlow, AutoFlowGuide, WarmStart, init_to_unconstrained_zero
from .mixture import AutoFlowMixture, FlowMixture
from .objectives import IWAE, STL_ELBO, log_importance_weights
from .potential import NotTraceable, Potential
from .svi import fit_svi
from .target import fit_target

__all__ = [
    "IWAE",
    "STL_ELBO",
    "AmortizedFlow",
    "AutoFlowGuide",
    "AutoFlowMixture",
    "FastPathUnavailable",
    "FlowMixture",
    "ImportanceDraws",
    "NeuTraModel",
    "NotTraceable",
    "PSISDraws",
    "Potential",
    "WarmStart",
    "fit_svi",
    "fit_target",
    "importance_draws",
    "init_to_unconstrained_zero",
    "log_evidence",
    "log_importance_weights",
    "neutra",
    "psis_draws",
]
