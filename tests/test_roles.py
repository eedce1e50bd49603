"""The agent and the server as whole roles, against the fake edges of tests/fakes.py: their
passes, the registration protocol between them over loopback, drains, restarts, rollback
of a half-done `up`, and a black-holed server. No kernel is touched; only the tests that go
through the control socket (root's only) need root."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeDiscovery, FakeKernel, FakeSockets
from sptun import nft
from sptun.agent import Agent, interface_name
from sptun.agent.registration import Registration
from sptun.config import load_agent, load_server
from sptun.control import control_request
from sptun.discovery import ServerRecord
from sptun.proto import Assignment
from sptun.errors import SptunError
from sptun.keys import ensure_private_dir, new_token, write_file_atomic
from sptun.server import Server
from sptun.server.health import Health
from sptun.server.plan import peer_of
from sptun.snapshot import RegistrationCounts
from sptun.wg import PeerChange

DOMAIN = "app.example.test"


def token(tmp_path: Path) -> Path:
    path = tmp_path / "secrets" / "token"
    if not path.exists():
        ensure_private_dir(path.parent)
        write_file_atomic(path, new_token() + "\n")
    return path


def make_server(tmp_path: Path, kernel: FakeKernel, name: str = "s1", tables: str = "") -> Server:
    conf = tmp_path / f"{name}.toml"
    conf.write_text(f'state_dir = "{tmp_path}/{name}"\n[[domains]]\nname = "{DOMAIN}"\n'
                    f'listen = ["198.51.100.10"]\ntoken_file = "{token(tmp_path)}"\n{tables}')
    server = Server(load_server(conf), edges=kernel.edges(), conntrack=lambda: kernel.connections)
    server.daemon = True
    return server


def make_agent(tmp_path: Path, kernel: FakeKernel, servers: list[ServerRecord], sockets: FakeSockets | None = None,
               read_only: bool = False, state: str = "agent") -> Agent:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'domain = "{DOMAIN}"\ntoken_file = "{token(tmp_path)}"\nstate_dir = "{tmp_path}/{state}"\n'
                    f'drain_timeout = 1\n')
    agent = Agent(load_agent(conf), edges=kernel.edges(), sockets=sockets or FakeSockets(),
                  discovery=FakeDiscovery(servers), read_only=read_only)
    agent.interval = 0.1
    return agent


@asynccontextmanager
async def serving(server: Server, host: str = "127.0.0.1") -> AsyncIterator[ServerRecord]:
    """The server's registration API on loopback, after its first pass made the interface."""
    await server.run_pass()
    api = await asyncio.start_server(server.api.handle_api, host, 0)
    port = api.sockets[0].getsockname()[1]
    try:
        yield ServerRecord(host, api=port)
    finally:
        api.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))  # type: ignore[arg-type]


# --- server ------------------------------------------------------------------------------------


def test_server_first_pass_builds_everything_and_the_next_finds_nothing_to_do(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    changes = server.reconcile()
    assert changes[0] == "create interface sptun0 "
    assert "sysctl net/ipv4/ip_forward=1" in changes and changes[-1].startswith("load table inet sptun")
    assert k.sysctls["net/ipv4/ip_forward"] == "1" and k.links["sptun0"].addresses == ["10.99.0.1/16"]
    writes = len(k.writes)
    assert server.reconcile() == [] and len(k.writes) == writes  # converged: not even an nft call


def add_healthy_backend(server: Server, key: str) -> str:
    lease, _ = server.leases.acquire(key, DOMAIN)
    server.health.by_key[key] = Health(up=True)
    return lease.overlay_ip


def two_healthy_backends(server: Server) -> tuple[str, str]:
    """A server's first pass, two healthy backends (keys A... and B...), and the pass that puts
    them in its rotation: their overlay addresses."""
    server.reconcile()
    ip = add_healthy_backend(server, "A" * 43 + "=")
    other = add_healthy_backend(server, "B" * 43 + "=")
    server.reconcile()
    return ip, other


def test_a_server_publishes_its_addresses_only_once_the_kernel_carries_a_client(tmp_path: Path) -> None:
    """A check that passes wakes the pass that puts the client in the rotation; an address
    published before it would send browsers where nothing is behind 443: refused (seen in CI
    as a third server joined under load)."""
    k = FakeKernel()
    dns = f'[dns]\nserver = "192.0.2.53"\nzone = "example.test"\ntsig_key_file = "{tmp_path}/tsig.key"\n'
    server = make_server(tmp_path, k, tables=dns)
    server.reconcile()
    add_healthy_backend(server, "A" * 43 + "=")  # passed its checks; no pass since
    assert [w.publish_addresses for w in server.dns_wanted()] == [False]
    server.reconcile()
    assert [w.publish_addresses for w in server.dns_wanted()] == [True]


def test_the_rotation_is_believed_only_once_the_kernel_has_it(tmp_path: Path) -> None:
    """status (another thread) reports in_rotation from this belief: it must never run ahead."""
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    ip = add_healthy_backend(server, "A" * 43 + "=")
    seen_during: list[list[str]] = []
    firewall = server.edges.firewall
    real_write = firewall.write

    def write(text: str) -> None:
        assert server.nft_table is not None
        seen_during.append(list(server.nft_table.maps.get("rr0", [])))
        real_write(text)

    firewall.write = write  # type: ignore[method-assign]
    changes = server.reconcile()
    assert changes == [f"sptun0: add peer {'A' * 43}= allowed-ips {ip}/32",
                       f"rotation {DOMAIN} 198.51.100.10 tcp/443: 1 backends +{ip}"]
    assert seen_during == [[]]  # not in rotation while the transaction runs
    assert server.nft_table is not None and server.nft_table.maps["rr0"] == [ip] and k.maps["rr0"] == [ip]


def test_a_failed_transaction_leaves_no_false_picture(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    add_healthy_backend(server, "A" * 43 + "=")
    k.fail_nft = "refused"
    with pytest.raises(SptunError, match="refused"):
        server.reconcile()
    assert server.nft_table is None  # read back from the kernel on the next pass
    assert server.reconcile()[-1].startswith("rotation ")


def test_a_restarted_server_adopts_the_kernel_and_its_rotation(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    ip = add_healthy_backend(server, "A" * 43 + "=")
    server.store.save(server.leases)
    server.reconcile()
    again = make_server(tmp_path, k)
    assert again.reconcile() == []  # nothing to redo, and nobody taken out of rotation
    assert again.health.is_up("A" * 43 + "=") and k.maps["rr0"] == [ip]


# --- agent and server together -----------------------------------------------------------------


def test_an_agent_joins_converges_and_leaves_when_the_server_leaves_dns(tmp_path: Path) -> None:
    sk, ak = FakeKernel(), FakeKernel()
    server = make_server(tmp_path, sk)

    async def scenario() -> None:
        async with serving(server) as record:
            agent = make_agent(tmp_path, ak, [record])
            changes = await agent.up_once()
            name = interface_name("127.0.0.1")
            assert changes[0] == f"create interface {name} to 127.0.0.1"
            assert changes[-1] == f"{name}: add peer {server.public_key} allowed-ips 0.0.0.0/0 at 127.0.0.1:51820"
            assert ak.links[name].addresses == ["10.99.0.2/32"]
            mark = nft.client_mark(ak.links[name].index)
            assert ak.rules == [{"priority": 5170, "fwmark": mark, "src": "10.99.0.2/32", "table": mark},
                                {"priority": 5171, "fwmark": 0, "src": "10.99.0.2/32", "table": mark}]  # the fallback
            assert ak.routes == {mark: ak.links[name].index}
            assert agent.public_key in sk.devices["sptun0"].peers  # committed before the agent heard back
            agent.last_wanted = None  # force a full read of the kernel
            assert agent.reconcile() == []  # converged

            status = await agent.status()
            (tunnel,) = status.tunnels
            assert (tunnel.server, tunnel.overlay_ip, tunnel.registered, tunnel.up) == ("127.0.0.1", "10.99.0.2", True, True)

            assert isinstance(agent.discovery, FakeDiscovery)
            agent.discovery.servers = []  # the server left DNS
            await agent.prepare()
            await asyncio.gather(*agent.draining.values())
            assert agent.public_key in server.draining  # it deregistered: out of rotation at once
            # Drained, its interface not yet removed: status still shows the tunnel, as it is.
            assert name in ak.links and [t.server for t in (await agent.status()).tunnels] == ["127.0.0.1"]
            changes = await agent.run_pass()
            assert changes[0] == f"delete interface {name} (no tunnel wants it)"
            assert not ak.links and not ak.rules
            assert '"tunnels": []' in (tmp_path / "agent" / "agent.json").read_text()

    run(scenario)


def test_a_half_done_up_is_undone(tmp_path: Path) -> None:
    sk, ak = FakeKernel(), FakeKernel()
    server = make_server(tmp_path, sk)

    async def scenario() -> None:
        async with serving(server) as record:
            agent = make_agent(tmp_path, ak, [record])
            ak.fail_nft = "Could not process rule: No such file or directory"
            with pytest.raises(SptunError, match="undid: delete interface sptun-7f000001"):
                await agent.up_once()
            assert not ak.links and not ak.rules and ak.table is None

    run(scenario)


def test_status_without_a_daemon_writes_nothing(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeKernel(), [], read_only=True, state="nothing-here")
    status = asyncio.run(agent.status())
    assert status.public_key is None and status.tunnels == []
    assert not (tmp_path / "nothing-here").exists()
    server = Server(load_server(_server_conf(tmp_path)), edges=FakeKernel().edges(), read_only=True)
    assert asyncio.run(server.status()).public_key is None
    assert not (tmp_path / "server-state").exists()


def _server_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "ro.toml"
    conf.write_text(f'state_dir = "{tmp_path}/server-state"\n[[domains]]\nname = "{DOMAIN}"\n'
                    f'token_file = "{token(tmp_path)}"\n')
    return conf


# --- a black-holed server ----------------------------------------------------------------------


async def ask(state: Path, cmd: str) -> tuple[dict[str, Any] | None, float]:
    started = time.monotonic()
    reply = await asyncio.to_thread(control_request, state, cmd, 30)
    return reply, time.monotonic() - started


@pytest.mark.skipif(os.geteuid() != 0, reason="the control socket answers root only")
def test_a_black_holed_server_holds_up_neither_status_nor_down_nor_the_others(tmp_path: Path) -> None:
    """It accepts TCP and never answers. The registration with it times out on its own task;
    `status` answers meanwhile, the other server's tunnel comes up, and `down` is quick."""
    sk, ak = FakeKernel(), FakeKernel()
    server = make_server(tmp_path, sk)
    hole = socket.socket()
    hole.bind(("127.0.0.2", 0))
    hole.listen(16)  # the kernel completes the handshakes; nobody ever reads or writes

    async def scenario() -> None:
        async with serving(server) as good:
            black = ServerRecord("127.0.0.2", api=hole.getsockname()[1])
            agent = make_agent(tmp_path, ak, [black, good])
            state = agent.state_dir
            ready = asyncio.Event()
            daemon = asyncio.create_task(agent.serve(ready))
            await ready.wait()
            deadline = time.monotonic() + 10
            while True:  # the good server's tunnel comes up while the black hole still has our request
                reply, took = await ask(state, "status")
                assert reply and reply["ok"] and took < 1.0, (reply, took)
                tunnels = {t["server"]: t for t in reply["status"]["tunnels"]}
                if tunnels.get("127.0.0.1", {}).get("up"):
                    break
                assert time.monotonic() < deadline, reply
                await asyncio.sleep(0.1)
            assert not tunnels["127.0.0.2"]["registered"]
            assert interface_name("127.0.0.1") in ak.links and interface_name("127.0.0.2") not in ak.links
            reply, took = await ask(state, "status")
            assert reply and reply["ok"] and took < 1.0
            reply, took = await ask(state, "down")
            assert reply and reply["ok"] and took < 3.0, (reply, took)
            assert not ak.links and not ak.rules
            assert agent.public_key in server.draining
            os.kill(os.getpid(), 15)
            await asyncio.wait_for(daemon, 10)

    try:
        run(scenario)
    finally:
        hole.close()


def test_a_registration_cancelled_at_shutdown_logs_no_traceback(tmp_path: Path) -> None:
    """At shutdown asyncio cancels the API's open exchanges. Python 3.11's stream protocol then
    asks the cancelled task for its exception, and the loop logged a traceback per exchange."""
    server = make_server(tmp_path, FakeKernel())
    errors: list[dict[str, Any]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        async with serving(server) as record:
            reader, writer = await asyncio.open_connection(record.ip, record.api)
            await reader.readline()  # the server's hello: its handler now waits for our request
            (handler,) = [t for t in asyncio.all_tasks() if "handle_api" in repr(t.get_coro())]
            handler.cancel()
            await asyncio.sleep(0.1)
            writer.close()
        assert handler.done()

    run(scenario)
    assert errors == []


def test_a_registration_that_lands_during_a_pass_is_acted_on_by_the_next(tmp_path: Path) -> None:
    """Registrations finish on the event loop while a pass reads the kernel in a thread. The
    next pass must not take the new tunnel for converged (it waited 10 s for the kernel check)."""
    sk, ak = FakeKernel(), FakeKernel()
    server = make_server(tmp_path, sk)

    async def scenario() -> None:
        async with serving(server) as record:
            agent = make_agent(tmp_path, ak, [record])
            await agent.up_once()
            late = ServerRecord("127.0.0.9")
            links = agent.edges.links
            real_names = links.names

            def names(prefix: str) -> list[str]:  # a registration lands while the pass observes
                agent.registrations["127.0.0.9"] = Registration(late, Assignment("10.99.0.7", "10.99.0.1", S9, 16))
                return real_names(prefix)

            links.names = names  # type: ignore[method-assign]
            agent.last_wanted = None
            agent.reconcile()
            links.names = real_names  # type: ignore[method-assign]
            changes = agent.reconcile()
            assert f"create interface {interface_name('127.0.0.9')} to 127.0.0.9" in changes

    run(scenario)


S9 = "A" * 43 + "="


def test_server_status_is_the_last_pass_view_with_fresh_counters(tmp_path: Path) -> None:
    """Made from what the last pass saw and applied (no lock, however big the device), plus
    the nft counters and conntrack counts read at the time."""
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    ip = add_healthy_backend(server, S9)
    k.connections[ip] = 3
    assert asyncio.run(server.status()).domains[0].backends == []  # no pass has seen it yet
    server.reconcile()
    k.counters[f"{DOMAIN} 198.51.100.10 tcp/443"] = (7, 420)
    status = asyncio.run(server.status())
    (backend,) = status.domains[0].backends
    assert backend.healthy and backend.in_rotation and backend.active_connections == 3
    assert status.domains[0].forwards[0].connections == 7 and status.table_loaded and status.up
    server.teardown()
    down = asyncio.run(server.status())
    assert not down.up and not down.table_loaded and not down.domains[0].backends[0].in_rotation


def test_a_backend_unanswered_over_ipv6_leaves_only_its_ipv6_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Health is per family: the kernel saw a client's IPv6 twin leave SYNs unanswered (its
    web server stopped answering IPv6, say). It leaves the IPv6 rotation and is released
    there; its IPv4 rotation keeps it, and status says why for each family."""
    from sptun.server import health as health_module

    async def probe(cfg: Any, lease: Any, address: str) -> tuple[bool, str]:
        return (":" not in address), "tcp/443 answers" if ":" not in address else "tcp/443 timed out"

    monkeypatch.setattr(health_module, "probe", probe)
    k = FakeKernel()
    conf = tmp_path / "s1.toml"
    conf.write_text(f'state_dir = "{tmp_path}/s1"\noverlay6 = "fd99::/64"\n[[domains]]\nname = "{DOMAIN}"\n'
                    f'listen = ["198.51.100.10", "2001:db8::10"]\ntoken_file = "{token(tmp_path)}"\n')
    server = Server(load_server(conf), edges=k.edges(), conntrack=lambda: k.connections)
    server.daemon = True
    server.reconcile()
    ips = []
    for key in ("A" * 43 + "=", "B" * 43 + "="):
        lease, _ = server.leases.acquire(key, DOMAIN)
        server.health.by_key[key], server.health.by_key6[key] = Health(up=True), Health(up=True)
        k.handshakes[key] = time.time()
        ips.append(lease.overlay_ip)
    server.reconcile()
    a, b = ips
    a6, b6 = (server.cfg.ip6_of(ip) for ip in ips)
    assert sorted(k.maps["rr0"]) == sorted(ips) and sorted(k.maps["rr1"]) == sorted([a6, b6])
    k.suspects, k.answered = {a6}, {a, b, b6}  # type: ignore[attr-defined]

    async def round_() -> None:
        await server.check_health()
        assert server.probes is not None
        await server.probes

    asyncio.run(round_())
    assert server.health.is_up("A" * 43 + "=") and not server.health.is_up("A" * 43 + "=", 6)
    # Out of the IPv6 rotation by the check round itself (no pass), and its SYNs released.
    assert sorted(k.maps["rr0"]) == sorted(ips) and k.maps["rr1"] == [b6] and k.released == [a6]
    assert server.reconcile() == []  # the pass it woke finds nothing left to do
    status = server.status_of(server.make_view(), {}, None, RegistrationCounts(0, {}))
    backend = next(x for x in status.domains[0].backends if x.overlay_ip == a)
    assert backend.healthy and backend.healthy6 is False and backend.reason6 == "tcp/443 timed out"
    assert not backend.in_rotation  # not in every rotation it belongs in


def test_a_backend_the_kernel_saw_leave_syns_unanswered_is_out_and_its_syns_released(tmp_path: Path) -> None:
    """Passive health: the table's SUSPECTS set (a SYN retransmitted to a backend that never
    answered) takes the backend out in the next round, before any probe fails; its unanswered
    connections are released once it is out of the rotation."""
    k = FakeKernel()
    server = make_server(tmp_path, k)
    ip, other = two_healthy_backends(server)
    assert sorted(k.maps["rr0"]) == sorted([ip, other])
    k.suspects, k.unreplied = {ip}, {ip: 3}
    flipped = server.health.suspect(server.leases.all(), server.edges.firewall.suspects())
    assert flipped and not server.health.is_up("A" * 43 + "=")
    changes = server.reconcile()
    assert changes == [f"rotation {DOMAIN} 198.51.100.10 tcp/443: 1 backends -{ip}",
                       f"release the unanswered connections to {ip}"]
    assert k.maps["rr0"] == [other] and k.released == [ip] and k.unreplied == {}


def test_a_suspect_is_out_between_health_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's SUSPECTS sets are read ten times a second, not once a round: a backend
    whose SYN was retransmitted leaves within a poll, though the next round is a minute away."""
    from sptun.server import health as health_module

    async def probe(cfg: Any, lease: Any, address: str) -> tuple[bool, str]:
        return True, "tcp/443 answers"

    monkeypatch.setattr(health_module, "probe", probe)
    k = FakeKernel()
    server = make_server(tmp_path, k, tables="[health]\ninterval = 60\n")
    ip, other = two_healthy_backends(server)

    async def run() -> float:
        loop = asyncio.create_task(server.health_loop())
        try:
            await asyncio.sleep(0.3)  # the first round is done; the next is a minute away
            k.suspects = {ip}  # type: ignore[attr-defined]
            started = time.monotonic()
            while ip in k.maps["rr0"]:
                assert time.monotonic() - started < 2, "the suspect waited for the next round"
                await asyncio.sleep(0.01)
            return time.monotonic() - started
        finally:
            loop.cancel()

    took = asyncio.run(run())
    assert took < 0.5 and k.maps["rr0"] == [other]


def slow_device_reads(server: Server, monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[float]:
    """Each read of the server's device takes `seconds` (10k peers on wireguard-go: about 0.5);
    returns the times at which reads began."""
    began: list[float] = []
    read = server.edges.wg.device

    def slow(ifname: str) -> Any:
        began.append(time.monotonic())
        time.sleep(seconds)
        return read(ifname)

    monkeypatch.setattr(server.edges.wg, "device", slow)
    return began


def test_a_flip_does_not_wait_for_a_pass_reading_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass reads the device before it takes the lock: a backend the kernel saw fail
    leaves the rotation at once, not after half a second of reading 10k peers."""
    k = FakeKernel()
    server = make_server(tmp_path, k)
    ip, other = two_healthy_backends(server)
    server.passes = 1  # past the first pass, which also reads the device for orphan peers
    began = slow_device_reads(server, monkeypatch, 0.6)

    async def run() -> float:
        a_pass = asyncio.create_task(server.run_pass())
        while not began:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        server.health.suspect(server.leases.all(), {ip})
        await server.apply_flips()
        took = time.monotonic() - started
        await a_pass
        return took

    took = asyncio.run(run())
    assert took < 0.3, f"the flip waited {took:.2f} s for the pass"
    assert k.maps["rr0"] == [other] and len(began) == 1  # a rotation change leaves the read good


def test_a_device_change_during_the_read_ahead_makes_the_pass_read_again(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A registration's commit that lands while the pass reads ahead: the read may miss its
    peer, so the pass reads the device again under the lock."""
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    server.passes = 1  # past the first pass, which also reads the device for orphan peers
    began = slow_device_reads(server, monkeypatch, 0.3)
    key = "C" * 43 + "="

    async def run() -> None:
        a_pass = asyncio.create_task(server.run_pass())
        while not began:
            await asyncio.sleep(0.01)
        async with server.lock:
            server.leases.acquire(key, DOMAIN)
            server.api.pending_peers[key] = PeerChange("add", peer_of(server.leases.by_key[key], server.cfg))
            await asyncio.to_thread(server.api._commit, list(server.api.pending_peers.values()))
        await a_pass

    asyncio.run(run())
    assert len(began) == 2 and key in server.device.peers
