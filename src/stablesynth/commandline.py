"""Running a parsed command the way every ``stablesynth`` entry point does.

Bad input (a config, a checkpoint, a preset, a file) is the user's to fix: it ends in one
clear line on stderr and exit status 2, never a traceback (set ``STABLESYNTH_DEBUG=1`` to see
one). Shared by ``stablesynth`` and the serving-only entry point, which must not import the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys


def run_parsed(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv``, call the chosen subcommand's ``func`` and turn user errors into one line."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's refusal (already printed) or --help: its status is ours
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as exc:
        if os.environ.get("STABLESYNTH_DEBUG"):
            raise
        print(f"stablesynth: error: {exc}", file=sys.stderr)
        return 2
