"""The ``stablesynth`` command: subcommands only parse arguments and delegate.

Each subsystem contributes its subcommands from a ``commands`` module with a
``register(subparsers)`` function, so this file never grows with the features.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from stablesynth.commandline import run_parsed
from stablesynth_device.argtypes import OneLineParser

# Nothing in this project may reach a model hub; tokenizers and weights load from local paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COMMAND_MODULES = (
    "stablesynth.data.commands",
    "stablesynth.experiment.commands",
    "stablesynth.cloud.commands",
    "stablesynth.bench.commands",
    "stablesynth.models.weights.commands",
)


def build_parser() -> argparse.ArgumentParser:
    from stablesynth import __version__

    parser = OneLineParser(
        prog="stablesynth",
        description=(
            "StableSynthNet: a cloud hypernetwork turns ONE uploaded 192-float frame feature into the "
            "weights of a device model's last layer. Start with `stablesynth demo --out runs/demo`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"stablesynth {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
