"""Exceptions the CLI reports as one line, kept free of heavy imports so that the CLI can name them
without importing torch or timm (``iis --help`` and ``iis analyze`` need neither for this)."""

from __future__ import annotations


class WeightsError(Exception):
    """Weights that are missing, unreadable or do not fit the model. The message says how to fix it."""
