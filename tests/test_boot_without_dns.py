"""An agent that boots while its DNS server does not answer is ready (systemd's READY=1)
after its first pass, says why it serves nothing, and joins once DNS answers: a DNS
failure at boot is not a failed start."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fakes import FakeKernel, FakeSockets
from sptun import discovery
from sptun.agent import Agent, interface_name
from sptun.config import load_agent
from sptun.control import control_request
from sptun.discovery import RETRY_AFTER_FAILURE, Discovery, DnsTxtSource
from sptun.errors import SptunError
from sptun.status import view
from test_roles import DOMAIN, make_server, serving, token

NO_ANSWER = f"no answer from 192.0.2.53 for TXT {DOMAIN} within 3 s"


class SilentDns:
    """A TXT source that times out, as a black-holed nameserver does, until it gets records."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.records: list[str] = []
        self.asking = threading.Event()  # set while a query waits for its timeout

    def txt(self, name: str) -> tuple[list[str], int]:
        if self.records:
            return self.records, 60
        self.asking.set()
        time.sleep(self.timeout)
        self.asking.clear()
        raise SptunError(NO_ANSWER, hint="check the nameservers")


async def ask(state: Path, cmd: str) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    reply = await asyncio.to_thread(control_request, state, cmd, 30)
    assert reply is not None and reply["ok"], reply
    return reply, time.monotonic() - started


def notified(sock: socket.socket, message: bytes, within: float) -> bool:
    """Whether `message` comes on the notify socket within that many seconds (after WATCHDOG=1s, say)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(100) == message:
                return True
        except TimeoutError:
            break
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="the control socket answers root only")
def test_an_agent_that_boots_without_dns_is_ready_says_why_and_joins_once_dns_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The server listens on loopback, which a TXT record may not name: let it stand in for a
    # public address.
    monkeypatch.setattr(discovery, "server_address", lambda text, excluded=(): ipaddress.ip_address(text))
    sk, ak = FakeKernel(), FakeKernel()
    server = make_server(tmp_path, sk)
    conf = tmp_path / "agent.toml"
    conf.write_text(f'domain = "{DOMAIN}"\ntoken_file = "{token(tmp_path)}"\nstate_dir = "{tmp_path}/agent"\n'
                    f'nameservers = ["192.0.2.53"]\n')
    dns = SilentDns(timeout=1.5)
    skew = [0.0]  # the discovery's clock runs ahead by this much: "5 s later" at once
    d = Discovery(DOMAIN, dns, clock=lambda: time.monotonic() + skew[0])
    agent = Agent(load_agent(conf), edges=ak.edges(), sockets=FakeSockets(), discovery=d)
    agent.interval = 0.1
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))

    async def scenario() -> None:
        async with serving(server) as record:
            started = time.monotonic()
            daemon = asyncio.create_task(agent.serve())
            # The first query waits for its timeout; `status` answers meanwhile.
            assert await asyncio.to_thread(dns.asking.wait, 5)
            reply, took = await ask(agent.state_dir, "status")
            assert dns.asking.is_set() and took < 1.0, took

            # READY=1 once the first pass has run, after that one timeout: not after DNS answers.
            assert await asyncio.to_thread(notified, notify, b"READY=1", 10), "no READY=1"
            assert time.monotonic() - started < dns.timeout + 2
            status = (await ask(agent.state_dir, "status"))[0]["status"]
            assert status["tunnels"] == [] and status["last_error"] is None  # no pass failed
            assert status["dns"]["error"] == f"{NO_ANSWER} (check the nameservers); retrying every 5 s"
            out = Console(width=200, record=True, file=io.StringIO())
            out.print(view(status))
            assert f"not serving: DNS: {NO_ANSWER}" in out.export_text()

            # DNS answers, and 5 s later the agent asks again: it joins the server and its
            # tunnel comes up, with no restart.
            dns.records = [f"r=superprotocol;ip=127.0.0.1;api={record.api}"]
            skew[0] += RETRY_AFTER_FAILURE
            deadline = time.monotonic() + 10
            while not any(t["up"] for t in status["tunnels"]):
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.1)
                status = (await ask(agent.state_dir, "status"))[0]["status"]
            assert status["dns"]["servers"] == ["127.0.0.1"] and status["dns"]["error"] is None
            assert interface_name("127.0.0.1") in ak.links and agent.public_key in sk.devices["sptun0"].peers
            os.kill(os.getpid(), 15)  # the daemon's own SIGTERM handler stops it
            await asyncio.wait_for(daemon, 10)

    try:
        with caplog.at_level(logging.ERROR, logger="sptun"):
            asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        notify.close()
    # Said once, not on each of the passes (ten a second) that found no servers.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == \
        [f"no servers from DNS yet: {NO_ANSWER} (check the nameservers)"]


def test_a_one_shot_up_without_dns_says_why(tmp_path: Path) -> None:
    """With no daemon, and no tunnels from before, `sptun up` fails and says why."""
    conf = tmp_path / "agent.toml"
    conf.write_text(f'domain = "{DOMAIN}"\ntoken_file = "{token(tmp_path)}"\nstate_dir = "{tmp_path}/agent"\n')
    dns = SilentDns(timeout=0.0)
    agent = Agent(load_agent(conf), edges=FakeKernel().edges(), sockets=FakeSockets(), discovery=Discovery(DOMAIN, dns))
    with pytest.raises(SptunError, match=NO_ANSWER):
        asyncio.run(agent.up_once())


def test_a_black_holed_nameserver_times_out_with_a_short_error() -> None:
    """dnspython's own message (every attempt, the time to the millisecond) is too long for a
    status line: it names the nameserver, the name and the timeout."""
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.1", 0))  # it receives the queries and never answers
    try:
        source = DnsTxtSource(("127.0.0.1",), timeout=0.5)
        source.resolver.port = hole.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SptunError) as info:
            source.txt(DOMAIN)
        assert time.monotonic() - started < 2.0  # the resolver's lifetime bounds the whole query
        assert info.value.message == f"no answer from 127.0.0.1 for TXT {DOMAIN} within 0.5 s"
    finally:
        hole.close()
