"""The daemon machinery with a fake role: control socket, lasting down, sd_notify."""

from __future__ import annotations

import asyncio
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeKernel
from sptun.control import control_request
from sptun.daemon import Role, sd_notify
from sptun.errors import SptunError


@dataclass(frozen=True)
class FakeStatus:
    role: str
    reconciles: int
    down: bool


class FakeRole(Role):
    interval = 0.05

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, "userspace", FakeKernel().edges("userspace"))
        self.reconciles = 0
        self.teardowns = 0
        self.fail = False
        self.status_bug = False

    def reconcile(self, undo: list[str] | None = None) -> list[str]:
        if self.fail:
            raise SptunError("broken on purpose")
        self.reconciles += 1
        return ["did a thing"] if self.reconciles == 1 else []

    def teardown(self) -> list[str]:
        self.teardowns += 1
        return ["removed everything"]

    def read_status(self) -> FakeStatus:  # type: ignore[override]
        if self.status_bug:  # as pyroute2's NetlinkError once came out of a device read
            raise OSError(104, "Connection reset by peer")
        return FakeStatus("fake", self.reconciles, self.is_down())


async def ask(state_dir: Path, cmd: str) -> dict[str, Any] | None:
    return await asyncio.to_thread(control_request, state_dir, cmd, 10)


def run_daemon(role: FakeRole, scenario: Any) -> None:
    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(role.serve(ready))
        await ready.wait()
        try:
            await scenario()
        finally:
            os.kill(os.getpid(), 15)  # the daemon's own SIGTERM handler stops it
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="the control socket answers root only")
def test_control_socket_up_down_status_and_down_lasts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    role = FakeRole(state)

    async def scenario() -> None:
        await asyncio.sleep(0.2)
        reply = await ask(state, "status")
        assert reply and reply["ok"] and reply["status"]["reconciles"] >= 1
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        assert (state / "control.sock").stat().st_mode & 0o077 == 0

        reply = await ask(state, "down")
        assert reply == {"ok": True, "changes": ["removed everything"]}
        count = role.reconciles
        await asyncio.sleep(0.3)
        assert role.reconciles == count  # down lasts: the loop no longer reconciles

        reply = await ask(state, "frobnicate")
        assert reply and not reply["ok"] and "unknown control command" in reply["error"]

    run_daemon(role, scenario)
    assert role.teardowns == 1 and (state / "down").exists()
    assert not (state / "control.sock").exists()

    # ...even across a restart of the daemon, until `up`
    again = FakeRole(state)

    async def scenario2() -> None:
        await asyncio.sleep(0.3)
        assert again.reconciles == 0
        reply = await ask(state, "up")
        assert reply and reply["ok"] and reply["status"]["down"] is False
        await asyncio.sleep(0.2)
        assert again.reconciles >= 2

    run_daemon(again, scenario2)


@pytest.mark.skipif(os.geteuid() != 0, reason="the control socket answers root only")
def test_a_failing_pass_is_reported_and_the_daemon_goes_on(tmp_path: Path) -> None:
    state = tmp_path / "state"
    role = FakeRole(state)
    role.fail = True

    async def scenario() -> None:
        await asyncio.sleep(0.3)
        assert role.failed_passes >= 2  # logged and retried, never fatal
        reply = await ask(state, "up")
        assert reply == {"ok": False, "error": "broken on purpose"}
        role.fail = False
        await asyncio.sleep(0.2)
        assert role.reconciles >= 1 and role.last_error == ""

    run_daemon(role, scenario)


@pytest.mark.skipif(os.geteuid() != 0, reason="the control socket answers root only")
def test_a_bug_in_status_is_answered_in_one_line_and_the_daemon_goes_on(tmp_path: Path) -> None:
    state = tmp_path / "state"
    role = FakeRole(state)
    role.status_bug = True

    async def scenario() -> None:
        await asyncio.sleep(0.2)
        reply = await ask(state, "status")
        assert reply is not None and reply["ok"] is False
        assert "'status'" in reply["error"] and "Connection reset by peer" in reply["error"]
        role.status_bug = False
        reply = await ask(state, "status")
        assert reply and reply["ok"] and reply["status"]["role"] == "fake"

    run_daemon(role, scenario)


def test_no_daemon_means_no_answer(tmp_path: Path) -> None:
    assert control_request(tmp_path, "status") is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "control.sock"))  # bound but never listening: a dead daemon's socket
    try:
        assert control_request(tmp_path, "status") is None
    finally:
        stale.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_speaks_to_a_real_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  abstract: bool) -> None:
    name = f"\0sptun-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name[1:] if abstract else name)
        assert sd_notify("READY=1")
        assert sock.recv(100) == b"READY=1"
        assert sd_notify("WATCHDOG=1")
        assert sock.recv(100) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False


@pytest.mark.skipif(os.geteuid() != 0, reason="the control socket answers root only")
def test_the_daemon_tells_systemd_it_is_ready_after_the_first_pass(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        role = FakeRole(tmp_path / "state")
        got: list[bytes] = []

        async def scenario() -> None:
            while len(got) < 3:
                got.append(await asyncio.to_thread(sock.recv, 100))

        run_daemon(role, scenario)
    assert got[0] == b"READY=1" and set(got[1:]) == {b"WATCHDOG=1"}


@pytest.mark.parametrize("journal", [False, True])
def test_log_lines_have_levels_and_no_timestamps_under_systemd(journal: bool, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from sptun.cli import setup_logging

    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging(verbose=False)
    logging.getLogger("sptun").warning("one event")
    line = capsys.readouterr().err.strip()
    assert line.endswith("WARNING one event") and "\n" not in line
    assert (line == "WARNING one event") is journal  # the journal stamps the time itself


def test_a_flood_of_scrapes_makes_one_status(tmp_path: Path) -> None:
    """Metrics scrapes (another thread each) share one status per SCRAPE_MAX_AGE: a scrape
    flood must not turn into a flood of nft and conntrack reads."""
    role = FakeRole(tmp_path)
    made = []
    real = role.read_status

    def counting() -> FakeStatus:
        made.append(1)
        return real()

    role.read_status = counting  # type: ignore[method-assign]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # Threads of their own, as the metrics server's are (not the loop's executor, which
        # the status itself needs).
        with ThreadPoolExecutor(40) as scrapers:
            results = await asyncio.gather(*(loop.run_in_executor(scrapers, role.status_from_thread) for _ in range(40)))
            assert len(made) == 1 and len({id(r) for r in results}) == 1
            await loop.run_in_executor(scrapers, role.status_from_thread, 30, 0.0)  # max_age 0: made afresh
        assert len(made) == 2

    run_daemon(role, scenario)


def test_metrics_given_a_port_alone_listen_on_loopback(tmp_path: Path) -> None:
    from sptun.config import load_agent

    conf = tmp_path / "agent.toml"
    conf.write_text('domain = "app.example.test"\nmetrics = "9586"\n')
    assert load_agent(conf).metrics == ("127.0.0.1", 9586)
