"""The bearer token both sides use: ``Authorization: Bearer TOKEN``, read from a flag, a file or the environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

#: Environment variable holding the bearer token (kept off the command line, where `ps` shows it).
TOKEN_ENV: Final = "STABLESYNTH_TOKEN"


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token from --token, else --token-file, else $STABLESYNTH_TOKEN, else None."""
    if token is not None and token_file is not None:
        raise ValueError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--token-file {token_file}: {exc}") from None
        token = lines[0].strip() if lines else ""
    elif token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
        raise ValueError("the token must be non-empty printable ASCII without spaces")
    return token
