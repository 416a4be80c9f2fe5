"""Built-in data: toy densities with exact log-densities, loaders for local files, image data.

* :func:`toy` draws samples from a named toy distribution (:data:`TOYS`) and, where the density is
  known in closed form, returns its exact log-density too, so a fitted flow can be scored by
  ``KL(p || q) = E_p[log p - log q]`` rather than by eye.
* :func:`load_array` reads a data matrix ``(N, D)`` from ``.npy``, ``.npz``, ``.csv`` or ``.txt``;
  :func:`load_data` resolves the strings the command line takes (``"builtin:ring"`` or a path).
* :func:`digits` (scikit-learn's bundled 8x8 digits, offline), :func:`mnist` and
  :func:`binarized_mnist` give standard image data. The MNIST files live under a data folder
  (:func:`data_home`) and are downloaded once, with checksums, when missing.

Sampling never touches the global RNG: each call uses its own ``torch.Generator``.
"""

from .files import load_array, load_data
from .images import (
    DataIntegrityError,
    DataUnavailableError,
    binarized_mnist,
    data_home,
    digits,
    mnist,
)
from .toys import TOYS, Toy, toy

__all__ = [
    "TOYS",
    "DataIntegrityError",
    "DataUnavailableError",
    "Toy",
    "binarized_mnist",
    "data_home",
    "digits",
    "load_array",
    "load_data",
    "mnist",
    "toy",
]
