"""Generic-harness rows (see registry.py) for the sylvester transforms; merged into registry.CASES."""

from __future__ import annotations

CASES: dict = {}
