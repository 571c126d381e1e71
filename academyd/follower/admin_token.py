"""The llama.cpp endpoint's admin token: generated into the data directory at first use, like the NATS
passwords (academyd.nats_auth): `<data_dir>/follower/endpoint.token`, mode 0600 in a 0700 directory.

The follower starts its endpoint with `--token-file` (the token never passes through a child's
environment) and sends it as `Authorization: Bearer <token>` on every admin call. An endpoint started by
hand is given the same file (`python -m academyd.follower.endpoint ... --token-file <data_dir>/follower/
endpoint.token`); one started without a token has its admin API closed (every admin call: 401).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from academyd.files import atomic_write_text

TOKEN_FILE = "endpoint.token"


def read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_token(path: Path) -> str:
    """The token in `path`, generated (0600, its directory 0700) when there is none yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    token = read_token(path)
    if token is None:
        token = secrets.token_urlsafe(32)
        atomic_write_text(path, token + "\n", mode=0o600)
    os.chmod(path, 0o600)
    return token
