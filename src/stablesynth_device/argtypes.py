"""argparse ``type`` functions whose errors name the flag, and a parser whose refusals are one
line; shared by both command lines.

The device package may not import ``stablesynth``, so the one copy lives here and the full
package's command line imports it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that refuses bad input in one line naming the flag, exit status 2
    (argparse prints its usage block first; ``--help`` still shows it). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def non_negative_float(flag: str) -> Callable[[str], float]:
    """A finite number >= 0 (milliseconds, waits)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: not a number") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: must be a finite number >= 0")
        return v

    return parse


def port(flag: str = "--port") -> Callable[[str], int]:
    """A TCP port, 1-65535 (argparse would take 99999, and the OS bind another port)."""
    as_int = int_at_least(flag, 1)

    def parse(text: str) -> int:
        v = as_int(text)
        if v > 65535:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: must be a port number in 1..65535")
        return v

    return parse


def existing_dir(flag: str) -> Callable[[str], Path]:
    """A folder that exists."""

    def parse(text: str) -> Path:
        p = Path(text)
        if not p.is_dir():
            what = "is a file, not a folder" if p.exists() else "no such folder"
            raise argparse.ArgumentTypeError(f"{flag} {text}: {what}")
        return p

    return parse


def existing_file(flag: str) -> Callable[[str], Path]:
    """A readable regular file."""

    def parse(text: str) -> Path:
        p = Path(text)
        if not p.is_file():
            what = "is a folder, not a file" if p.is_dir() else "no such file"
            raise argparse.ArgumentTypeError(f"{flag} {text}: {what}")
        return p

    return parse


def existing_path(flag: str) -> Callable[[str], Path]:
    """A file or a folder that exists (a checkpoint file, or a model folder)."""

    def parse(text: str) -> Path:
        p = Path(text)
        if not p.exists():
            raise argparse.ArgumentTypeError(f"{flag} {text}: no such file or folder")
        return p

    return parse


def output_dir(flag: str) -> Callable[[str], Path]:
    """A folder to write into: absent (it is created) or a folder, not a file, under a folder."""

    def parse(text: str) -> Path:
        p = Path(text)
        if p.exists() and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {text}: exists and is not a folder")
        parent = next((a for a in p.absolute().parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {text}: {parent} is a file, not a folder")
        return p

    return parse


def output_file(flag: str) -> Callable[[str], Path]:
    """A file to write: absent or a regular file, in a folder that is not a file."""

    def parse(text: str) -> Path:
        p = Path(text)
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {text}: is a folder, not a file")
        parent = next((a for a in p.absolute().parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{flag} {text}: {parent} is a file, not a folder")
        return p

    return parse
