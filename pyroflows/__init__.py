"""pyroflows: normalizing flows for Pyro.

Transforms are Pyro ``TransformModule``\\ s (:mod:`pyroflows.transforms`); flows
(:mod:`pyroflows.flows`) own a base distribution and a stack of transforms, and calling one gives
a Pyro distribution: ``flow()`` or, for a conditional flow, ``flow(context)``.
"""

__version__ = "0.6.0"

from . import bases, datasets, diagnostics, engine, flows, images, infer, nn, transforms
from .engine import CheckpointError, History, TrainingDiverged, TrainStep
from .evaluation import evaluate
from .flows import (
    BNAF,
    CNF,
    IAF,
    MAF,
    NAF,
    NICE,
    NSF,
    Flow,
    Glow,
    ImageRealNVP,
    LinearFlow,
    RealNVP,
    ResidualFlow,
    SylvesterFlow,
)
from .io import load, save
from .train import fit

__all__ = [
    "BNAF",
    "CNF",
    "IAF",
    "MAF",
    "NAF",
    "NICE",
    "NSF",
    "CheckpointError",
    "Flow",
    "Glow",
    "History",
    "ImageRealNVP",
    "LinearFlow",
    "RealNVP",
    "ResidualFlow",
    "SylvesterFlow",
    "TrainStep",
    "TrainingDiverged",
    "__version__",
    "bases",
    "datasets",
    "diagnostics",
    "engine",
    "evaluate",
    "fit",
    "flows",
    "images",
    "infer",
    "load",
    "nn",
    "save",
    "transforms",
]
