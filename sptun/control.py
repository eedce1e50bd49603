"""The client side of a daemon's control socket: light on purpose (no pyroute2, no psutil),
so that `sptun status` and `sptun up`/`down` start fast when a daemon answers for them."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from sptun.errors import SptunError

CONTROL_MAX = 65536  # the longest request line the daemon reads
CONTROL_TIMEOUT = 120.0


def control_request(state_dir: Path, cmd: str, timeout: float = CONTROL_TIMEOUT, arg: str | None = None) -> dict[str, Any] | None:
    """Ask the running daemon of this state dir; None if no daemon is listening."""
    path = state_dir / "control.sock"
    if not path.exists():
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps({"cmd": cmd, "arg": arg}).encode() + b"\n")
            chunks: list[bytes] = []
            while not chunks or not chunks[-1].endswith(b"\n"):  # the reply is one line
                chunk = s.recv(CONTROL_MAX)
                if not chunk:
                    break
                chunks.append(chunk)
    except (ConnectionRefusedError, FileNotFoundError):
        return None  # a stale socket of a daemon that died
    except OSError as e:
        raise SptunError(f"the daemon did not answer on {path}: {e}") from None
    try:
        reply: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        raise SptunError(f"the daemon gave a garbled answer on {path}") from None
    return reply
