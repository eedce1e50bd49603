"""`python -m sptun` as a user runs it: exit codes, one-line errors, keygen and token files.
Nothing here needs root or touches the network."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sptun.keys import public_key

ROOT = Path(__file__).resolve().parent.parent


def sptun(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "sptun", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sptun: ")
    return lines[0]


def server_config(tmp_path: Path, extra: str = "") -> tuple[Path, Path]:
    token_file = tmp_path / "secrets" / "tokens" / "app.example.test"
    path = tmp_path / "server.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n{extra}\n'
                    f'[[domains]]\nname = "app.example.test"\nlisten = ["198.51.100.10"]\n'
                    f'token_file = "{token_file}"\n')
    return path, token_file


# --- keygen -------------------------------------------------------------------------------------------


def test_keygen() -> None:
    proc = sptun("keygen")
    assert proc.returncode == 0 and proc.stderr == ""
    text = proc.stdout.strip()
    assert proc.stdout == text + "\n"
    raw = base64.b64decode(text, validate=True)
    assert len(raw) == 32
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40  # clamped as `wg genkey` does
    assert len(base64.b64decode(public_key(text))) == 32
    assert sptun("keygen").stdout != proc.stdout


# --- bad usage ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["server"], ["token", "new"], ["status", "--bogus"], ["lab", "sideways"],
], ids=lambda a: " ".join(a) or "nothing")
def test_bad_usage(args: list[str]) -> None:
    proc = sptun(*args)
    line = one_error_line(proc, 2)
    assert "hint" in line and "--help" in line
    assert proc.stdout == ""


def test_help_and_version() -> None:
    proc = sptun("--help")
    assert proc.returncode == 0 and "token" in proc.stdout and "keygen" in proc.stdout
    proc = sptun("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("sptun ")


# --- configuration errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ('listen_port = "51820"\n', "listen_port"),
    ('colour = "blue"\n', "colour"),
    ('[[domains]]\nname = "app.example.test"\nports = ["sctp/1"]\n', "domains[0].ports"),
], ids=["wrong-type", "unknown-key", "bad-port"])
def test_broken_config(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "BROKEN.toml"
    path.write_text(text)
    line = one_error_line(sptun("token", "new", "app.example.test", "-c", str(path)), 2)
    assert str(path) in line and key in line and "(hint: " in line


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "absent.toml",
    lambda tmp: (tmp / "bin.toml", (tmp / "bin.toml").write_bytes(b"\xff\xfe\x00garbage"))[0],
], ids=["missing", "not-utf8"])
def test_unreadable_config(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    path = make(tmp_path)
    line = one_error_line(sptun("token", "new", "app.example.test", "-c", str(path)), 2)
    assert str(path) in line


# --- token new -----------------------------------------------------------------------------------------


def test_token_new(tmp_path: Path) -> None:
    config, token_file = server_config(tmp_path)
    proc = sptun("token", "new", "app.example.test", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert proc.stdout == token + "\n" and len(token) >= 32
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert token not in proc.stderr


def test_token_new_domain_is_case_insensitive(tmp_path: Path) -> None:
    config, token_file = server_config(tmp_path)
    assert sptun("token", "new", "App.Example.TEST.", "-c", str(config)).returncode == 0
    assert token_file.exists()


def test_token_new_refuses_to_overwrite(tmp_path: Path) -> None:
    config, token_file = server_config(tmp_path)
    first = sptun("token", "new", "app.example.test", "-c", str(config)).stdout.strip()
    proc = sptun("token", "new", "app.example.test", "-c", str(config))
    line = one_error_line(proc, 1)
    assert str(token_file) in line and "--force" in line
    assert proc.stdout == "" and first not in proc.stderr
    assert token_file.read_text().strip() == first

    proc = sptun("token", "new", "app.example.test", "--force", "-c", str(config))
    assert proc.returncode == 0
    second = proc.stdout.strip()
    assert second != first and token_file.read_text().strip() == second
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_token_new_leaves_an_existing_directory_alone(tmp_path: Path) -> None:
    """`token_file = "/etc/app.token"` must not make /etc 0700: only what sptun creates is its own."""
    config, token_file = server_config(tmp_path)
    token_file.parent.mkdir(parents=True)
    token_file.parent.chmod(0o755)
    assert sptun("token", "new", "app.example.test", "-c", str(config)).returncode == 0
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_token_new_unknown_domain(tmp_path: Path) -> None:
    config, token_file = server_config(tmp_path)
    line = one_error_line(sptun("token", "new", "other.example.test", "-c", str(config)), 2)
    assert "other.example.test" in line and "app.example.test" in line and str(config) in line
    assert not token_file.exists()


def test_token_new_needs_a_server_config(tmp_path: Path) -> None:
    agent = tmp_path / "agent.toml"
    agent.write_text('domain = "app.example.test"\n')
    line = one_error_line(sptun("token", "new", "app.example.test", "-c", str(agent)), 2)
    assert str(agent) in line and "domain" in line


@pytest.mark.parametrize("where, force", [("parent-is-a-file", False), ("token-file-is-a-directory", True)])
def test_token_new_unwritable_place(tmp_path: Path, where: str, force: bool) -> None:
    """Where the token cannot be written: one line naming the place, exit 1, no traceback."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    token_file = tmp_path / "afile" / "token" if where == "parent-is-a-file" else tmp_path / "adir"
    config = tmp_path / "server.toml"
    config.write_text(f'[[domains]]\nname = "app.example.test"\ntoken_file = "{token_file}"\n')
    proc = sptun("token", "new", "app.example.test", "-c", str(config), *(["--force"] if force else []))
    line = one_error_line(proc, 1)
    assert str(token_file.parent if where == "parent-is-a-file" else token_file) in line
    assert proc.stdout == ""
