"""pyroflows: normalizing flows for Pyro.

Transforms are Pyro ``TransformModule``\\ s (:mod:`pyroflows.transforms`), conditioner networks
live in :mod:`pyroflows.nn`.
"""

from . import nn, transforms

__version__ = "0.1.0"

__all__ = ["__version__", "nn", "transforms"]
