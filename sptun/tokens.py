"""A domain's join tokens: the current one, and while a rotation's grace period lasts, the
one before it. Each has a generation (a fingerprint that reveals nothing of the token),
which the leases record, so that a rotation can evict the old token's clients.

    token_file       the current token (`sptun token new DOMAIN`)
    token_file.old   the previous token and the end of its grace, written by
                     `sptun token new DOMAIN --force --grace D`:  TOKEN\\nuntil UNIX_TIME\\n
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from sptun.errors import SptunError
from sptun.keys import new_token, read_token, write_file_atomic


@dataclass(frozen=True)
class Token:
    secret: str
    generation: str
    until: float | None = None  # wall-clock end of its grace; None: the current token

    def __repr__(self) -> str:  # never show the secret
        return f"Token(generation={self.generation!r}, until={self.until!r})"


def generation_of(secret: str) -> str:
    return hashlib.sha256(b"sptun token generation\0" + secret.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def old_path(token_file: Path) -> Path:
    return token_file.with_name(token_file.name + ".old")


def valid_tokens(token_file: Path, now: float | None = None) -> list[Token]:
    """The tokens a client may join with now: the current one first. SptunError if the
    current one cannot be read (the caller then changes nothing)."""
    now = time.time() if now is None else now
    current = read_token(token_file)
    tokens = [Token(current, generation_of(current))]
    old = _read_old(token_file)
    if old is not None and now < (old.until or 0) and old.generation != tokens[0].generation:
        tokens.append(old)
    return tokens


def _read_old(token_file: Path) -> Token | None:
    path = old_path(token_file)
    try:
        secret_line, until_line = path.read_text().splitlines()[:2]
        until = float(until_line.removeprefix("until "))
    except FileNotFoundError:
        return None
    except (ValueError, OSError, UnicodeDecodeError):  # damaged: no grace for anyone
        return None
    secret = secret_line.strip()
    return Token(secret, generation_of(secret), until) if secret else None


def rotate(token_file: Path, grace: float, now: float | None = None) -> str:
    """A new current token. With a grace period, the previous one stays valid until it ends;
    without, it is invalid at once. Returns the new token."""
    now = time.time() if now is None else now
    try:
        previous: str | None = read_token(token_file)
    except SptunError:
        previous = None  # missing or unusable: nothing to keep
    if previous is not None and grace > 0:
        write_file_atomic(old_path(token_file), f"{previous}\nuntil {now + grace:.0f}\n")
    else:
        old_path(token_file).unlink(missing_ok=True)
    token = new_token()
    write_file_atomic(token_file, token + "\n")
    return token
