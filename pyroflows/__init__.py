"""pyroflows: normalizing flows for Pyro.

Transforms are Pyro ``TransformModule``\\ s (:mod:`pyroflows.transforms`); flows
(:mod:`pyroflows.flows`) own a base distribution and a stack of transforms, and calling one gives
a Pyro distribution: ``flow()`` or, for a conditional flow, ``flow(context)``.
"""

from . import bases, flows, nn, transforms
from .flows import IAF, MAF, NICE, NSF, Flow, LinearFlow, RealNVP

__version__ = "0.1.0"

__all__ = [
    "IAF",
    "MAF",
    "NICE",
    "NSF",
    "Flow",
    "LinearFlow",
    "RealNVP",
    "__version__",
    "bases",
    "flows",
    "nn",
    "transforms",
]
