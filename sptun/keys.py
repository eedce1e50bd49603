"""WireGuard keys (Curve25519, as NaCl uses them) and the files that hold secrets."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from pathlib import Path

from nacl.public import PrivateKey

from sptun.errors import SptunError

log = logging.getLogger("sptun")
_warned: set[Path] = set()

KEY_LEN = 32


def generate_private_key() -> str:
    """A new private key, base64, clamped as `wg genkey` does."""
    raw = bytearray(secrets.token_bytes(KEY_LEN))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return base64.b64encode(bytes(raw)).decode()


def decode_key(text: str) -> bytes | None:
    """The 32 raw bytes of a base64 WireGuard key, or None if it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return None
    return raw if len(raw) == KEY_LEN else None


def public_key(private: str) -> str:
    raw = decode_key(private)
    if raw is None:
        raise SptunError("the private key is not a base64 WireGuard key")
    return base64.b64encode(bytes(PrivateKey(raw).public_key)).decode()


def ensure_private_dir(path: Path) -> None:
    """Create a directory for secrets at 0700 (and tighten it if it was looser)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as e:  # a file in the way, read-only, not root, ...: one line, not a traceback
        raise SptunError(f"cannot create the directory {path}: {e.strerror or e}",
                         hint="check the path and its parents") from None


def write_file_atomic(path: Path, data: str, mode: int = 0o600) -> None:
    """Write via a temporary file, fsync and rename, so a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:  # a directory in the way, disk full, read-only, ...: one line, not a traceback
        raise SptunError(f"cannot write {path}: {e.strerror or e}", hint="check the path, its directory and free space") from None


PRIVATE_KEY_FILE = "private.key"  # in the state dir


def load_private_key(state_dir: Path, name: str = PRIVATE_KEY_FILE) -> str | None:
    """This host's WireGuard private key, or None if there is none yet. Only reads: creates
    and changes nothing (not even the state dir)."""
    path = state_dir / name
    not_a_key = SptunError(f"{path} does not hold a WireGuard private key", hint="move it away; a new one is made on the next start")
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise SptunError(f"{path} is not readable", hint="run as root") from None
    except UnicodeDecodeError:
        raise not_a_key from None
    except OSError as e:  # a directory in the way, ...: one line, not a traceback
        raise SptunError(f"cannot read {path}: {e.strerror or e}", hint="check state_dir and its parents") from None
    if decode_key(text) is None:
        raise not_a_key
    return text


def load_or_create_private_key(state_dir: Path, name: str = PRIVATE_KEY_FILE) -> str:
    """This host's WireGuard private key, created at 0600 on first use."""
    ensure_private_dir(state_dir)
    path = state_dir / name
    text = load_private_key(state_dir, name)
    if text is None:
        text = generate_private_key()
        write_file_atomic(path, text + "\n")
        return text
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return text


def read_token(path: Path) -> str:
    """A join token from its file; the token itself never appears in an error."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise SptunError(f"token file {path} does not exist", hint="create it with `sptun token new DOMAIN` on a server") from None
    except PermissionError:
        raise SptunError(f"token file {path} is not readable", hint="run as root") from None
    if not token or len(token) > 256:
        raise SptunError(f"token file {path} does not hold a token", hint="create it with `sptun token new DOMAIN` on a server")
    if path.stat().st_mode & 0o077 and path not in _warned:
        _warned.add(path)
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token


def new_token() -> str:
    return secrets.token_urlsafe(32)
