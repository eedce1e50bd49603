"""Health checks at scale: a backend the kernel saw answer one of its forwarded connections
(the server table's ANSWERED set) passes its check without a probe, unless the kernel also
saw it leave one unanswered (SUSPECTS win); only the others get a TCP connect. No root: the
probes are counted, not made, and the firewall is the fake one of tests/fakes.py.
(bench/healthscale.py measures what this saves, with real connects, in a namespace.)"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Set
from pathlib import Path

import pytest

from fakes import FakeKernel
from sptun.config import Domain, Port, ServerConfig, load_server
from sptun.keys import ensure_private_dir, new_token, write_file_atomic
from sptun.leases import Lease
from sptun.nft import parse_set_dump, set_dump_request
from sptun.server import Server
from sptun.server import health as health_module
from sptun.server.health import ANSWERING, NO_HANDSHAKE, Health, HealthChecks
from sptun.wg import Device, Peer, PeerState

DOMAIN = "app.example.test"
CFG = ServerConfig(path=Path("/dev/null"), domains=(Domain(DOMAIN, (), (Port("tcp", 443),), Path("/nonexistent")),))


def backends(n: int, handshake: float | None = None) -> tuple[list[Lease], Device]:
    """n leases, and a device on which each has a peer with a fresh handshake (or the given one)."""
    now = time.time()
    base = int(ipaddress.IPv4Address("10.99.0.2"))
    leases = [Lease(f"key{i:05d}", DOMAIN, str(ipaddress.IPv4Address(base + i)), now) for i in range(n)]
    peers = {lease.public_key: PeerState(Peer(lease.public_key, (f"{lease.overlay_ip}/32",)),
                                         now if handshake is None else handshake) for lease in leases}
    return leases, Device("server-key", 51820, peers)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The overlay addresses probed, in order; every probe passes (tcp/443 answers)."""
    probed: list[str] = []

    async def probe(cfg: ServerConfig, lease: Lease, address: str) -> tuple[bool, str]:
        probed.append(address)
        return True, "tcp/443 answers"

    monkeypatch.setattr(health_module, "probe", probe)
    return probed


def check(checks: HealthChecks, leases: list[Lease], device: Device, answered: Set[str] = frozenset(),
          suspects: Set[str] = frozenset()) -> bool:
    return asyncio.run(checks.check(CFG, leases, device, answered=answered, suspects=suspects))


def test_only_the_backends_the_kernel_did_not_see_answer_are_probed(probes: list[str]) -> None:
    leases, device = backends(10)
    answered = {lease.overlay_ip for lease in leases[:7]}
    checks = HealthChecks()
    check(checks, leases, device, answered)
    assert sorted(probes) == sorted(lease.overlay_ip for lease in leases[7:])
    for lease in leases[:7]:
        assert checks.by_key[lease.public_key].reason == ANSWERING
    for lease in leases[7:]:
        assert checks.by_key[lease.public_key].reason == "tcp/443 answers"


def test_a_backend_in_both_sets_is_probed_suspects_win(probes: list[str]) -> None:
    leases, device = backends(3)
    a, b, c = (lease.overlay_ip for lease in leases)
    checks = HealthChecks()
    check(checks, leases, device, answered={a, b}, suspects={b})
    assert sorted(probes) == sorted([b, c])
    assert checks.by_key[leases[1].public_key].reason == "tcp/443 answers"


def test_a_backend_answering_with_no_fresh_handshake_fails_unprobed(probes: list[str]) -> None:
    """The handshake comes first, as before: ANSWERED does not override it."""
    leases, device = backends(2, handshake=0.0)
    checks = HealthChecks()
    check(checks, leases, device, answered={lease.overlay_ip for lease in leases})
    assert probes == []
    assert all(h.reason == NO_HANDSHAKE and not h.up for h in checks.by_key.values())


def test_answering_is_a_passing_check_with_the_same_hysteresis(probes: list[str]) -> None:
    """A new backend comes in after `rise` answering rounds, not at the first; one that stops
    answering (out of ANSWERED: idle, say) is probed again, and a failed probe counts."""
    leases, device = backends(1)
    (lease,) = leases
    checks = HealthChecks()
    assert not check(checks, leases, device, {lease.overlay_ip})
    assert not checks.is_up(lease.public_key)
    assert check(checks, leases, device, {lease.overlay_ip})  # rise = 2
    assert checks.is_up(lease.public_key) and probes == []
    check(checks, leases, device)  # idle now: out of ANSWERED
    assert probes == [lease.overlay_ip] and checks.is_up(lease.public_key)


def test_ten_thousand_backends_answering_cost_no_probe(probes: list[str]) -> None:
    leases, device = backends(10_000)
    answered = {lease.overlay_ip for lease in leases}
    checks = HealthChecks()
    check(checks, leases, device, answered)
    assert check(checks, leases, device, answered)  # all up after rise = 2 rounds
    assert probes == [] and all(checks.is_up(lease.public_key) for lease in leases)
    half = {lease.overlay_ip for lease in leases[::2]}
    check(checks, leases, device, half)
    assert len(probes) == 5_000 and set(probes) == answered - half


# --- through the server's round, with the fake firewall ---------------------------------


def make_server(tmp_path: Path, kernel: FakeKernel) -> Server:
    token = tmp_path / "secrets" / "token"
    ensure_private_dir(token.parent)
    write_file_atomic(token, new_token() + "\n")
    conf = tmp_path / "s1.toml"
    conf.write_text(f'state_dir = "{tmp_path}/s1"\n[[domains]]\nname = "{DOMAIN}"\n'
                    f'listen = ["198.51.100.10"]\ntoken_file = "{token}"\n')
    server = Server(load_server(conf), edges=kernel.edges(), conntrack=lambda: kernel.connections)
    server.daemon = True
    return server


def test_check_health_reads_both_sets_and_probes_only_the_others(tmp_path: Path, probes: list[str]) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    server.reconcile()
    keys = [c * 43 + "=" for c in "ABCD"]
    ips = []
    for key in keys:
        lease, _ = server.leases.acquire(key, DOMAIN)
        server.health.by_key[key] = Health(up=True)
        k.handshakes[key] = time.time()
        ips.append(lease.overlay_ip)
    server.reconcile()  # the peers, and a device read with their handshakes
    a, b, c, d = ips
    k.answered = {a, b, c}  # type: ignore[attr-defined]  # the fake's ANSWERED set
    k.suspects = {c}
    reads = 0
    passive = server.edges.firewall.passive

    def counted() -> tuple[set[str], set[str]]:
        nonlocal reads
        reads += 1
        return passive()

    server.edges.firewall.passive = counted  # type: ignore[method-assign]
    async def round_() -> None:
        await server.check_health()
        assert server.probes is not None
        await server.probes  # the probes run beside the passive read

    asyncio.run(round_())
    assert reads == 1  # one read of the kernel per round, for both sets
    assert sorted(probes) == sorted([c, d])  # c: a suspect, even though it answered; d: idle
    assert server.health.by_key[keys[0]].reason == server.health.by_key[keys[1]].reason == ANSWERING
    assert not server.health.is_up(keys[2])  # the suspect is out at once ...
    assert c not in k.maps["rr0"] and sorted(k.maps["rr0"]) == sorted([a, b, d])  # ... of the kernel's map too, with no pass
    assert server.edges.firewall.passive() == ({c}, {a, b, c})


# --- the reader: one netlink socket, a dump of each set ------------------------------------


def nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def element(ip: str, key_first: bool = True) -> bytes:
    key = nla(1, nla(1, socket.inet_aton(ip)))  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }
    timers = nla(4, struct.pack(">Q", 2000)) + nla(5, struct.pack(">Q", 1500))  # TIMEOUT, EXPIRATION
    return nla(1, key + timers if key_first else timers + key)  # NFTA_LIST_ELEM


def reply(seq: int, ips: list[str], key_first: bool = True) -> bytes:
    """One NFT_MSG_NEWSETELEM message of a dump, as the kernel writes it."""
    body = struct.pack("=BBH", 1, 0, 0) + nla(1, b"sptun\0") + nla(2, b"answered\0") + \
        nla(3, b"".join(element(ip, key_first) for ip in ips))
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | 12, 2, seq, 0) + body


def control(seq: int, kind: int, error: int = 0) -> bytes:
    body = struct.pack("=i", -error) + b"\0" * 16 if kind == 2 else struct.pack("=i", 0)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def test_a_dump_parses_into_the_set_of_its_addresses() -> None:
    found: set[str] = set()
    assert not parse_set_dump(reply(1, ["10.99.0.2", "10.99.0.3"]) + reply(1, ["10.99.0.4"], key_first=False), 1, found)
    assert found == {"10.99.0.2", "10.99.0.3", "10.99.0.4"}
    assert parse_set_dump(reply(2, ["10.99.9.9"]) + control(1, 3), 1, found)  # another request's reply: not ours; done
    assert found == {"10.99.0.2", "10.99.0.3", "10.99.0.4"}
    assert parse_set_dump(control(1, 2), 1, found)  # an ack (error 0) ends it too
    assert not parse_set_dump(reply(1, ["10.99.0.5"])[:30], 1, found)  # a truncated message is left alone


@pytest.mark.parametrize("error, raised", [(errno.ENOENT, FileNotFoundError), (errno.EPERM, PermissionError)])
def test_an_error_reply_raises(error: int, raised: type[OSError]) -> None:
    with pytest.raises(raised):
        parse_set_dump(control(1, 2, error), 1, set())


def test_the_request_names_the_table_and_the_set() -> None:
    request = set_dump_request("sptun", "answered", 7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq) == (len(request), (10 << 8) | 13, 0x301, 7)
    assert request[16] == 1  # NFPROTO_INET
    assert nla(1, b"sptun\0") + nla(2, b"answered\0") == request[20:]


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft for a scratch namespace")
def test_the_real_reader_in_a_namespace() -> None:
    """Nft.passive against the kernel: no table, the server table with elements in both sets
    (and 3,000 in ANSWERED: several dump messages), an older table with no ANSWERED, and a
    dual-stack table with IPv6 sets."""
    ns = f"spth{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    read = [sys.executable, "-c", "from sptun.nft import Nft; print([sorted(s) for s in Nft().passive()])"]

    def in_ns(argv: list[str], stdin: str | None = None) -> str:
        proc = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    try:
        assert in_ns(read) == "[[], []]"
        golden = (Path(__file__).parent / "golden" / "server_listen_tcp443_3_backends.nft").read_text()
        in_ns(["nft", "-f", "-"], golden)
        many = [f"10.99.{i // 250}.{i % 250 + 2}" for i in range(3000)]
        in_ns(["nft", "-f", "-"], "add element inet sptun suspects { 10.99.0.3 timeout 1h }\n"
                                  f"add element inet sptun answered {{ {', '.join(f'{ip} timeout 1h' for ip in many)} }}\n")
        assert in_ns(read) == str([["10.99.0.3"], sorted(many)])
        older = "\n".join(line for line in golden.splitlines() if "answered" not in line) + "\n"
        in_ns(["nft", "-f", "-"], older + "add element inet sptun suspects { 10.99.0.4 timeout 1h }\n")
        assert in_ns(read) == "[['10.99.0.4'], []]"
        # A dual-stack server: the IPv6 sets' elements come back beside the IPv4 ones.
        dual = (Path(__file__).parent / "golden" / "server_dual_stack.nft").read_text()
        in_ns(["nft", "-f", "-"], dual + "add element inet sptun suspects6 { fd99::3 timeout 1h }\n"
                                         "add element inet sptun answered6 { fd99::2 timeout 1h, fd99::4 timeout 1h }\n"
                                         "add element inet sptun answered { 10.99.0.2 timeout 1h }\n")
        assert in_ns(read) == "[['fd99::3'], ['10.99.0.2', 'fd99::2', 'fd99::4']]"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_a_client_registered_again_comes_back_only_by_its_own_probes(probes: list[str]) -> None:
    """After a deregistration and a registration again (`sptun down`, `sptun up`), the kernel's
    record of its old connections (ANSWERED) does not bring it back: `rise` probes through its
    tunnel do. Then ANSWERED counts again."""
    leases, device = backends(1)
    (lease,) = leases
    checks = HealthChecks()
    check(checks, leases, device, {lease.overlay_ip})
    check(checks, leases, device, {lease.overlay_ip})
    assert checks.is_up(lease.public_key) and probes == []
    checks.rejoin(lease.public_key)
    assert not checks.is_up(lease.public_key)
    check(checks, leases, device, {lease.overlay_ip})
    assert probes == [lease.overlay_ip] and not checks.is_up(lease.public_key)
    assert check(checks, leases, device, {lease.overlay_ip})  # rise = 2 probes
    assert checks.is_up(lease.public_key) and len(probes) == 2
    check(checks, leases, device, {lease.overlay_ip})
    assert len(probes) == 2  # up again: answering passes without a probe, as for any backend


def test_probes_in_flight_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A round of a thousand probes keeps at most PROBES_IN_FLIGHT connects open at once, and
    still checks every backend: a thousand at once on a busy server all miss the timeout."""
    in_flight, most = 0, 0

    async def probe(cfg: ServerConfig, lease: Lease, address: str) -> tuple[bool, str]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return True, "tcp/443 answers"

    monkeypatch.setattr(health_module, "probe", probe)
    leases, device = backends(1000)
    checks = HealthChecks()
    asyncio.run(checks.check(CFG, leases, device))
    assert most == health_module.PROBES_IN_FLIGHT
    assert all(checks.by_key[lease.public_key].reason == "tcp/443 answers" for lease in leases)
