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

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        detail = stderr.strip().splitlines()
        last = detail[-1] if detail else f"exit status {returncode}"
        super().__init__(f"{argv[0]} failed: {last}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


class WireGuardUnavailable(SptunError):
    """Neither the requested nor any WireGuard backend can be used."""


class ProtocolError(SptunError):
    """A registration or control message was malformed or refused."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason
