"""One error hierarchy: every failure a user can meet carries a message and a fix."""

from __future__ import annotations


class SptunError(Exception):
    """A failure with a one-line message and, where there is one, a hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(SptunError):
    """Bad command line."""

    exit_code = 2


class ConfigError(SptunError):
    """Bad configuration file; names the file, the key and the fix."""

    exit_code = 2


class CommandError(SptunError):
    """An external command (nft, wireguard-go, ...) failed."""

    def __init__(self, argv: list[str], returncode: int, stderr: str, stdout: str = "") -> None:
        detail = stderr.strip().splitlines()
        last = detail[-1] if detail else f"exit status {returncode}"
        super().__init__(f"{argv[0]} failed: {last}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout


class WireGuardUnavailable(SptunError):
    """Neither the requested nor any WireGuard backend can be used."""


class ProtocolError(SptunError):
    """A registration or control message was malformed or refused."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def printable(text: object, limit: int = 120) -> str:
    """`text` safe for one log line: every non-printable character (newlines, C0 and C1 controls,
    DEL, lone surrogates, bidi overrides and other format characters) escaped as \\xNN, \\uNNNN or
    \\UNNNNNNNN, and cut to at most `limit` characters, the last one "…" when cut."""
    s = str(text)
    pieces: list[str] = []
    for ch in s[: limit + 1]:  # each gives at least one character, so the rest cannot fit
        code = ord(ch)
        pieces.append(ch if ch.isprintable() else f"\\x{code:02x}" if code < 0x100
                      else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    if len(s) <= limit and sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    out: list[str] = []
    size = 0
    for piece in pieces:  # whole escapes only, with room for the "…"
        if size + len(piece) > limit - 1:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out) + "…"
