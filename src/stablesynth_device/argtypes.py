"""argparse ``type`` functions whose errors name the flag; shared by both command lines.

The device package may not import ``stablesynth``, so the one copy lives here and the full
package's command line imports it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive_float(flag: str) -> Callable[[str], float]:
    """A finite number > 0."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: not a number") from None
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: must be a finite number > 0")
        return v

    return parse


def int_at_least(flag: str, minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: must be >= {minimum}")
        return v

    return parse
