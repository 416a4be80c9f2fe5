"""``python -m pyroflows``: the ``pyroflows`` command (what ``torchrun -m pyroflows`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
