"""The one way sptun runs an external command: log the argv, capture stderr, raise with both."""

from __future__ import annotations

import logging
import shlex
import subprocess

from sptun.errors import CommandError, SptunError

log = logging.getLogger("sptun")


def run(argv: list[str], input: str | None = None, check: bool = True, timeout: float = 30,
        env: dict[str, str] | None = None) -> str:
    """Run argv, return its stdout. Raise CommandError (with stderr) on failure."""
    log.debug("[#] %s", shlex.join(argv))
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise SptunError(f"{argv[0]} not found", hint=f"install the package that provides {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise SptunError(f"{argv[0]} did not finish in {timeout:g} s") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr, proc.stdout)
    return proc.stdout
