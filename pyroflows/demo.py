"""``python -m pyroflows.demo``: the same as ``pyroflows demo`` (see :func:`pyroflows.cli.demo`).

Fits :class:`pyroflows.NSF` to a ring of eight Gaussians, whose density is known exactly, prints
the KL gap to the truth and writes ``model/``, ``metrics.json`` and ``density.png`` to
``./pyroflows-demo`` (or ``--out``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .cli import run_demo


def main(argv: Sequence[str] | None = None) -> float:
    """Run the demo with command-line options ``argv``; returns the KL gap KL(p || q) in nats."""
    return run_demo(argv)["kl_gap"]


if __name__ == "__main__":
    main()
