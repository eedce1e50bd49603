"""WireGuard keys (Curve25519, as NaCl uses them) and the files that hold secrets."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from nacl.public import PrivateKey

from sptun.errors import SptunError

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
    """Create a directory for secrets, and any missing parents, at 0700. A directory that
    already exists is left exactly as it is: it may be /etc, which is not sptun's to change."""
    try:
        _make_private_dir(path)
    except OSError as e:  # a file in the way, read-only, not root, ...: one line, not a traceback
        raise SptunError(f"cannot create the directory {path}: {e.strerror or e}",
                         hint="check the path and its parents") from None


def _make_private_dir(path: Path) -> None:
    if path.is_dir():  # the root always is, which ends the recursion
        return
    _make_private_dir(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():  # a file in the way (a directory made meanwhile is fine)
            raise


def write_file_atomic(path: Path, data: str, mode: int = 0o600) -> None:
    """Write via a temporary file, fsync and rename, so a crash leaves the old file or the new one.
    The temporary file has a random name and is created exclusively, never through a symlink,
    so nothing planted in the directory can redirect the write."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), mode)  # the umask may have taken bits off
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
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


MIN_TOKEN_CHARS = 22  # 128 random bits in base64url
MAX_TOKEN_CHARS = 256
_TOKEN_FILE_MAX = 4096  # bytes read at most: a token file is one short line


class TokenFileError(SptunError):
    """A token file that cannot be used. `problem` says why, never showing the token."""

    def __init__(self, path: Path, problem: str, hint: str) -> None:
        super().__init__(f"token file {path} {problem}", hint=hint)
        self.path, self.problem = path, problem


def read_token(path: Path, domain: str = "DOMAIN") -> str:
    """A join token: the first line of its file, stripped. TokenFileError (an SptunError) if
    the file is missing, open to other users, or holds no token of at least MIN_TOKEN_CHARS
    characters; the token itself never appears in an error. domain: for the hints."""
    remake = f"make a new one with `sptun token new {domain} --force`"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o077:
                raise TokenFileError(path, f"is open to other users (mode {mode & 0o777:04o})", hint=f"chmod 600 {path}")
            data = f.read(_TOKEN_FILE_MAX + 1)
    except FileNotFoundError:
        raise TokenFileError(path, "does not exist", hint=f"create it with `sptun token new {domain}` on the server") from None
    except PermissionError:
        raise TokenFileError(path, "is not readable", hint="run as root") from None
    except OSError as e:  # a directory, ...: one line, not a traceback
        raise TokenFileError(path, f"cannot be read: {e.strerror or e}", hint="check token_file") from None
    try:
        token = data.decode("utf-8").partition("\n")[0].strip()
    except UnicodeDecodeError:
        raise TokenFileError(path, "is not text (not UTF-8)", hint=remake) from None
    if not token or len(data) > _TOKEN_FILE_MAX or len(token) > MAX_TOKEN_CHARS:
        raise TokenFileError(path, "does not hold a token", hint=remake)
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise TokenFileError(path, "holds a token with spaces or control characters in it", hint=remake)
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(path, f"holds a token shorter than {MIN_TOKEN_CHARS} characters (128 bits)", hint=remake)
    return token


def new_token() -> str:
    """A join token of 256 random bits (43 base64url characters)."""
    return secrets.token_urlsafe(32)
