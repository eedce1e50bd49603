"""sptun.keys and the files that hold secrets: directories sptun did not make keep their mode,
a write cannot be redirected by a planted symlink, and a token file that is missing, open to
others, too short or not text is refused with one line (never showing the token), at the
start of a daemon or `sptun up` as a config error. No root needed, no kernel touched."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from fakes import FakeDiscovery, FakeKernel, FakeSockets
from sptun import keys
from sptun.agent import Agent
from sptun.config import load_agent
from sptun.errors import ConfigError, SptunError
from sptun.keys import MIN_TOKEN_CHARS, ensure_private_dir, new_token, read_token, write_file_atomic


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- ensure_private_dir -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o755, 0o1777, 0o750], ids=["0755", "1777", "0750"])
def test_an_existing_directory_keeps_its_mode(tmp_path: Path, mode: int) -> None:
    """As /etc for token_file = "/etc/app.token": not sptun's directory, so not its to chmod."""
    etc = tmp_path / "etc"
    etc.mkdir()
    etc.chmod(mode)
    ensure_private_dir(etc)
    assert mode_of(etc) == mode
    write_file_atomic(etc / "app.token", new_token() + "\n")  # as `sptun token new`
    assert mode_of(etc) == mode


def test_missing_directories_and_parents_are_made_0700(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        ensure_private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old_umask)
    assert [mode_of(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3


def test_a_file_in_the_way_is_one_error(tmp_path: Path) -> None:
    """(A guard for the rewrite: this was one error before the fix too.)"""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SptunError) as info:
        ensure_private_dir(tmp_path / "afile" / "sub")
    assert str(tmp_path / "afile") in str(info.value)


# --- write_file_atomic --------------------------------------------------------------------------------


def test_a_symlink_at_the_old_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / ".private.key.tmp").symlink_to(victim)  # where the write used to go first
    write_file_atomic(tmp_path / "private.key", "secret\n")
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "private.key").read_text() == "secret\n"
    assert mode_of(tmp_path / "private.key") == 0o600 and not (tmp_path / "private.key").is_symlink()


@pytest.mark.parametrize("plant", ["symlink", "dangling-symlink", "file"])
def test_nothing_planted_at_the_temporary_name_is_followed_or_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    plant: str) -> None:
    """Even an attacker who guessed the random name gets a refused write, not a redirected one."""
    monkeypatch.setattr(keys.secrets, "token_hex", lambda n=None: "guessed")
    planted = tmp_path / ".token.guessed.tmp"
    victim = tmp_path / "victim"
    if plant == "file":
        planted.write_text("theirs\n")
        planted.chmod(0o644)
    else:
        if plant == "symlink":
            victim.write_text("precious\n")
        planted.symlink_to(victim)
    with pytest.raises(SptunError) as info:
        write_file_atomic(tmp_path / "token", "secret\n")
    assert str(tmp_path / "token") in str(info.value) and "secret" not in str(info.value)
    assert not (tmp_path / "token").exists()
    if plant == "symlink":
        assert victim.read_text() == "precious\n"
    elif plant == "dangling-symlink":
        assert not victim.exists()  # not created through the link
    else:
        assert planted.read_text() == "theirs\n" and mode_of(planted) == 0o644
    assert planted.is_symlink() == (plant != "file")  # someone else's file: left where it is


def test_the_temporary_name_is_random_and_gone_after_the_write(tmp_path: Path) -> None:
    names: set[str] = set()
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        names.add(os.fspath(path))
        assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_CREAT and flags & os.O_CLOEXEC
        return real_open(path, flags, mode)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(keys.os, "open", spy)
        for _ in range(2):
            write_file_atomic(tmp_path / "leases.json", "{}\n")
    assert len(names) == 2 and all(Path(n).parent == tmp_path for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leases.json"]


# --- read_token ---------------------------------------------------------------------------------------


def token_file(tmp_path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def refused(path: Path) -> str:
    """read_token's error: one line, naming the file, without the file's content."""
    with pytest.raises(SptunError) as info:
        read_token(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    return text


def test_a_good_token_is_the_first_line_stripped(tmp_path: Path) -> None:
    """(A guard: good tokens are still taken, as before the fix.)"""
    token = new_token()
    assert len(token) >= MIN_TOKEN_CHARS and len(token) == 43
    assert read_token(token_file(tmp_path, f"  {token}\r\n")) == token
    assert read_token(token_file(tmp_path, "x" * MIN_TOKEN_CHARS)) == "x" * MIN_TOKEN_CHARS


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    short = new_token()[: MIN_TOKEN_CHARS - 1]  # 126 bits
    text = refused(token_file(tmp_path, short + "\n"))
    assert short not in text and "sptun token new DOMAIN --force" in text


@pytest.mark.parametrize("data", [b"\xff\xfe" + b"t" * 30 + b"\n", "tökén".encode("latin-1") * 8])
def test_a_token_file_that_is_not_utf8_is_refused(tmp_path: Path, data: bytes) -> None:
    assert "UTF-8" in refused(token_file(tmp_path, data))


@pytest.mark.parametrize("token", ["abcdefghijkl mnopqrstuvwxyz", "abcdefghijkl\tmnopqrstuvwxyz",
                                   "abcdefghijkl\x00mnopqrstuvwxyz", "abcdefghijkl\x1b[2Jmnopqrstuvwxyz",
                                   "abcdefghijkl\u202emnopqrstuvwxyz", "abcdefghijkl\x0bmnopqrstuvwxyz"])
def test_whitespace_or_control_characters_inside_the_token_are_refused(tmp_path: Path, token: str) -> None:
    text = refused(token_file(tmp_path, token + "\n"))
    assert "mnopqrstuvwxyz" not in text


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602], ids=["0644", "0640", "0604", "0620", "0602"])
def test_a_token_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    token = new_token()
    text = refused(token_file(tmp_path, token + "\n", mode))
    assert f"chmod 600 {tmp_path / 'token'}" in text and token not in text


def test_a_token_file_that_is_a_directory_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir(mode=0o700)
    refused(tmp_path / "token")


@pytest.mark.parametrize("make", ["missing", "empty", "huge"])
def test_missing_empty_or_huge_token_files_are_still_one_error(tmp_path: Path, make: str) -> None:
    """(A guard for the rewrite: these were refused before the fix too.)"""
    if make != "missing":
        token_file(tmp_path, "" if make == "empty" else "x" * 100_000)
    refused(tmp_path / "token")


# --- at the start: check_token_files (see also tests/test_config.py) ---------------------------------


def make_agent(tmp_path: Path, token: Path, read_only: bool = False) -> Agent:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'domain = "app.example.test"\ntoken_file = "{token}"\nstate_dir = "{tmp_path}/state"\n')
    return Agent(load_agent(conf), edges=FakeKernel().edges(), sockets=FakeSockets(), discovery=FakeDiscovery([]),
                 read_only=read_only)


def test_a_daemon_or_up_does_not_start_without_a_usable_token(tmp_path: Path) -> None:
    """`sptun agent run` (serve) and `sptun up` (cli.cmd_up) both pass Role.preflight first."""
    missing = tmp_path / "tokens" / "token"
    agent = make_agent(tmp_path, missing)
    with pytest.raises(ConfigError) as info:
        agent.preflight()
    assert info.value.exit_code == 2 and str(missing) in str(info.value) and "token_file" in str(info.value)
    with pytest.raises(ConfigError):
        asyncio.run(asyncio.wait_for(agent.serve(), 10))
    assert not agent.control_path.exists()  # nothing started


def test_status_and_down_need_no_token(tmp_path: Path) -> None:
    """(A guard that the check is not too wide: they worked before the fix too.)"""
    missing = tmp_path / "tokens" / "token"
    make_agent(tmp_path, missing)  # makes the key, as a first start would
    asyncio.run(make_agent(tmp_path, missing, read_only=True).status())
    asyncio.run(make_agent(tmp_path, missing).go_down())
