"""The one error of weight loading and import (a ``ValueError``: the command line prints it as one line)."""

from __future__ import annotations


class WeightLoadError(ValueError):
    """A weight file is missing, unreadable, of another model, or does not fit the encoder."""


class UnsafePickleError(WeightLoadError):
    """A pickle names something outside the allow-list; it was refused before anything of it ran."""
