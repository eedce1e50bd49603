"""The registration path under attack, with whole roles over loopback and fake kernels: a
bounded pool, leases that expire, token rotation with a grace period, eviction, trust on
first use, hostile assignments and a registration flood."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest

from fakes import FakeKernel
from sptun import proto
from sptun.agent.registration import KnownServers, Registrar, Registration, check_assignment
from sptun.config import load_server
from sptun.discovery import ServerRecord
from sptun.errors import ProtocolError, SptunError
from sptun.keys import generate_private_key, public_key
from sptun.server import Server
from sptun.tokens import old_path, rotate
from test_roles import DOMAIN, make_agent, run, serving, token

OTHER = "other.example.test"


def make_server(tmp_path: Path, kernel: FakeKernel, extra: str = "", domain_extra: str = "", name: str = "s1") -> Server:
    conf = tmp_path / f"{name}.toml"
    other_token = token(tmp_path).with_name("other")
    if not other_token.exists():
        rotate(other_token, 0)
    conf.write_text(f'state_dir = "{tmp_path}/{name}"\n{extra}\n'
                    f'[[domains]]\nname = "{DOMAIN}"\nlisten = ["198.51.100.10"]\ntoken_file = "{token(tmp_path)}"\n'
                    f'{domain_extra}\n'
                    f'[[domains]]\nname = "{OTHER}"\nlisten = ["198.51.100.11"]\ntoken_file = "{other_token}"\n')
    server = Server(load_server(conf), edges=kernel.edges(), conntrack=lambda: kernel.connections)
    server.daemon = True
    return server


async def register(record: ServerRecord, secret: str, op: str = "register", domain: str = DOMAIN,
                   key: str | None = None) -> tuple[str, proto.Assignment | None]:
    """One registration of a client key (a fresh one by default) with the token `secret`."""
    key = key or generate_private_key()
    request = proto.Request(op, domain, secret, public_key(key))
    _, assignment = await proto.exchange_async(record.ip, record.api, request, key, timeout=5)
    return key, assignment


def secret_of(path: Path) -> str:
    return path.read_text().strip()


async def refused(reason: str, record: ServerRecord, secret: str, **kw: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        await register(record, secret, **kw)
    assert info.value.reason == reason, info.value
    return info.value


# --- the pool is bounded per domain ------------------------------------------------------------


def test_one_token_holder_cannot_take_the_pool(tmp_path: Path) -> None:
    server = make_server(tmp_path, FakeKernel(), domain_extra="max_clients = 3")

    async def scenario() -> None:
        async with serving(server) as record:
            secret = secret_of(token(tmp_path))
            keys = [(await register(record, secret))[0] for _ in range(3)]
            await refused("full", record, secret)
            await register(record, secret, key=keys[0])  # a client it holds still refreshes
            # Another domain's client still gets an address.
            _, assignment = await register(record, secret_of(tmp_path / "secrets" / "other"), domain=OTHER)
            assert assignment is not None
            assert server.leases.count[DOMAIN] == 3 and server.leases.count[OTHER] == 1
            assert server.api.limiter.failures == {}  # a full domain is no fault of the client

    run(scenario)


def test_a_full_overlay_refuses_clearly_and_blames_no_client(tmp_path: Path) -> None:
    """The server's capacity, not the client's fault: refused as "full", with no penalty for the
    address (behind one NAT, many clients share it), and a refresh of a held lease still works."""
    server = make_server(tmp_path, FakeKernel(), extra='overlay = "10.99.0.0/29"')  # 10.99.0.2 .. .6

    async def scenario() -> None:
        async with serving(server) as record:
            secret = secret_of(token(tmp_path))
            keys = [(await register(record, secret))[0] for _ in range(5)]
            for _ in range(12):  # more than the failure limiter allows a source
                error = await refused("full", record, secret)
            assert "10.99.0.0/29 is full" in str(error)
            assert server.api.limiter.failures == {}
            await register(record, secret, key=keys[0])  # a held lease still refreshes

    run(scenario)


# --- leases expire -----------------------------------------------------------------------------


def test_a_silent_client_loses_its_lease_and_peer_and_a_live_one_keeps_it(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k, extra='lease_ttl = "60s"')

    async def scenario() -> None:
        async with serving(server) as record:
            secret = secret_of(token(tmp_path))
            silent, _ = await register(record, secret)
            live, _ = await register(record, secret)
            await server.run_pass()
            silent_pub, live_pub = public_key(silent), public_key(live)
            assert {silent_pub, live_pub} <= set(k.devices["sptun0"].peers)
            long_ago = time.time() - 120  # both last registered two minutes ago ...
            for pub in (silent_pub, live_pub):
                server.leases.by_key[pub] = dataclasses.replace(server.leases.by_key[pub], seen=long_ago)
            k.handshakes[live_pub] = time.time() - 5  # ... but one's tunnel still handshakes
            await server.run_pass()  # reads the handshakes
            server.last_expiry = 0.0
            changes = await server.run_pass()
            assert any(c.startswith("release ") and silent_pub in c and "silent for" in c for c in changes), changes
            assert silent_pub not in server.leases.by_key and silent_pub not in k.devices["sptun0"].peers
            assert live_pub in server.leases.by_key and live_pub in k.devices["sptun0"].peers
            assert silent_pub not in (tmp_path / "s1" / "leases.json").read_text()

    run(scenario)


def test_a_short_lease_ttl_keeps_a_client_that_registers(tmp_path: Path) -> None:
    """`seen` moves in steps well under lease_ttl: with 30 s, a client that registers every
    10 s must never look silent (a 60 s step would release it)."""
    server = make_server(tmp_path, FakeKernel(), extra='lease_ttl = "30s"')

    async def scenario() -> None:
        async with serving(server) as record:
            key, _ = await register(record, secret_of(token(tmp_path)))
            pub = public_key(key)
            server.leases.by_key[pub] = dataclasses.replace(server.leases.by_key[pub], seen=time.time() - 10)
            await register(record, secret_of(token(tmp_path)), key=key)  # its next registration
            assert time.time() - server.leases.by_key[pub].seen < 2
            server.last_expiry = 0.0
            await server.run_pass()
            server.last_expiry = 0.0
            assert not [c for c in await server.run_pass() if c.startswith("release")]

    run(scenario)


def test_lease_ttl_has_a_floor(tmp_path: Path) -> None:
    from sptun.errors import ConfigError

    with pytest.raises(ConfigError, match="lease_ttl"):
        make_server(tmp_path, FakeKernel(), extra='lease_ttl = "5s"')


# --- token rotation ----------------------------------------------------------------------------


def test_a_rotation_with_grace_keeps_old_clients_until_it_ends(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    path = token(tmp_path)

    async def scenario() -> None:
        async with serving(server) as record:
            old_secret = secret_of(path)
            old_client, _ = await register(record, old_secret)
            new_secret = rotate(path, grace=3600)
            assert new_secret != old_secret and secret_of(path) == new_secret
            await register(record, old_secret, key=old_client)  # still good, within the grace
            new_client, _ = await register(record, new_secret)
            await server.run_pass()
            server.last_expiry = 0.0
            assert not [c for c in await server.run_pass() if c.startswith("release")]

            # The grace ends.
            old_path(path).write_text(f"{old_secret}\nuntil {time.time() - 1:.0f}\n")
            server.last_expiry = 0.0
            changes = await server.run_pass()
            assert [c for c in changes if "rotated" in c] == [
                next(c for c in changes if public_key(old_client) in c)]
            assert public_key(old_client) not in k.devices["sptun0"].peers
            assert public_key(new_client) in server.leases.by_key
            await refused("bad-token", record, old_secret)

    run(scenario)


def test_a_rotation_without_grace_evicts_at_once(tmp_path: Path) -> None:
    server = make_server(tmp_path, FakeKernel())
    path = token(tmp_path)

    async def scenario() -> None:
        async with serving(server) as record:
            client, _ = await register(record, secret_of(path))
            rotate(path, grace=0)
            assert not old_path(path).exists()
            server.last_expiry = 0.0
            await server.run_pass()
            server.last_expiry = 0.0
            await server.run_pass()
            assert public_key(client) not in server.leases.by_key

    run(scenario)


# --- evict -------------------------------------------------------------------------------------


def test_evict_removes_a_client_now_and_keeps_it_out_until_the_token_changes(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)
    path = token(tmp_path)

    async def scenario() -> None:
        async with serving(server) as record:
            secret = secret_of(path)
            client, _ = await register(record, secret)
            await server.run_pass()
            pub = public_key(client)
            assert pub in k.devices["sptun0"].peers
            changes = server.evict(pub)
            assert changes[0].startswith(f"evict {pub}")
            assert pub not in server.leases.by_key and pub not in k.devices["sptun0"].peers
            await refused("evicted", record, secret, key=client)
            with pytest.raises(SptunError, match="no client"):
                server.evict(pub)
            # A new token is a new start: with it, the key may join again.
            fresh = rotate(path, grace=0)
            _, assignment = await register(record, fresh, key=client)
            assert assignment is not None

    run(scenario)


def test_the_evicted_list_survives_a_restart(tmp_path: Path) -> None:
    k = FakeKernel()
    server = make_server(tmp_path, k)

    async def scenario() -> None:
        async with serving(server) as record:
            client, _ = await register(record, secret_of(token(tmp_path)))
            server.evict(public_key(client))
        again = make_server(tmp_path, k)
        async with serving(again) as record:
            await refused("evicted", record, secret_of(token(tmp_path)), key=client)

    run(scenario)


def test_evict_without_a_daemon_does_not_adopt_the_evicted_peer_back(tmp_path: Path) -> None:
    """`sptun evict` with no daemon: a fresh role, whose first pass adopts peers that have no
    lease, must not take the evicted one back."""
    k = FakeKernel()
    server = make_server(tmp_path, k)
    clients = []

    async def scenario() -> None:
        async with serving(server) as record:
            clients.append((await register(record, secret_of(token(tmp_path))))[0])
            await server.run_pass()

    run(scenario)
    pub = public_key(clients[0])
    assert pub in k.devices["sptun0"].peers
    one_shot = make_server(tmp_path, k)
    one_shot.daemon = False
    one_shot.evict(pub)
    assert pub not in k.devices["sptun0"].peers and pub not in one_shot.leases.by_key


# --- trust on first use ------------------------------------------------------------------------


def test_a_server_without_pk_is_trusted_on_first_use_until_forget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = make_server(tmp_path, FakeKernel(), name="first")
    rekeyed = make_server(tmp_path, FakeKernel(), name="rekeyed")
    assert first.public_key != rekeyed.public_key
    known = KnownServers(tmp_path / "known.json")
    agent_key = generate_private_key()
    registrar = Registrar(DOMAIN, token(tmp_path), agent_key, public_key(agent_key), lambda: None, known)

    async def scenario() -> None:
        async with serving(first) as record:
            with caplog.at_level(logging.WARNING, logger="sptun"):
                await registrar.exchange(record, "register", 5)
            assert known.keys == {"127.0.0.1": first.public_key}
            assert "no pk= in its TXT record" in caplog.text
        async with serving(rekeyed) as record:  # the same address now presents another key
            with pytest.raises(ProtocolError, match="sptun forget 127.0.0.1") as info:
                await registrar.exchange(record, "register", 5)
            assert info.value.reason == "wrong-server-key"
            assert KnownServers(tmp_path / "known.json").keys["127.0.0.1"] == first.public_key  # it lasts
            assert known.forget("127.0.0.1")[0].startswith("forget the key of 127.0.0.1")
            await registrar.exchange(record, "register", 5)
            assert known.keys == {"127.0.0.1": rekeyed.public_key}

    run(scenario)


def test_forget_through_the_agent(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeKernel(), [])
    agent.known.keys["192.0.2.7"] = public_key(generate_private_key())
    assert agent.forget("192.0.2.7") == ["forget the key of 192.0.2.7: its next key is trusted on first use"]
    with pytest.raises(SptunError, match="no key is remembered"):
        agent.forget("192.0.2.7")


def test_forget_takes_an_address_in_any_spelling_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeKernel(), [])
    agent.known.keys["2001:db8::10"] = public_key(generate_private_key())  # as discovery keeps it
    agent.registrations["2001:db8::10"] = Registration(ServerRecord("2001:db8::10"), next_at=time.monotonic() + 10)
    assert agent.forget(" 2001:DB8::0010") == ["forget the key of 2001:db8::10: its next key is trusted on first use"]
    assert agent.known.keys == {}
    assert agent.registrations["2001:db8::10"].next_at == 0.0  # it registers again at once
    with pytest.raises(SptunError, match="is not an IP address"):
        agent.forget("server.example\n")


# --- what a server assigns ---------------------------------------------------------------------

SERVER = ServerRecord("198.51.100.10")
KEY = public_key(generate_private_key())
GOOD = proto.Assignment("10.99.0.2", "10.99.0.1", KEY, 16)
V6 = {"overlay_ip6": "fd99::2", "server_ip6": "fd99::1", "prefixlen6": 64}


@pytest.mark.parametrize("change, taken, problem", [
    ({"server_key": public_key(generate_private_key())}, (), "not the one it proved"),
    ({"prefixlen": 0}, (), "prefix of /0"),
    ({"prefixlen": 32}, (), "prefix of /32"),
    ({"overlay_ip": "169.254.169.254", "server_ip": "169.254.0.1"}, (), "special address"),
    ({"overlay_ip": "127.0.0.2", "server_ip": "127.0.0.1"}, (), "special address"),
    ({"overlay_ip": "192.0.2.53"}, (), "not a client address"),  # the resolver, outside its overlay
    ({"overlay_ip": "10.99.0.1"}, (), "not a client address"),  # the server's own
    ({"overlay_ip": "10.99.255.255"}, (), "not a client address"),  # the broadcast
    ({"overlay_ip": "198.51.100.11", "server_ip": "198.51.100.1", "prefixlen": 24}, (), "holds its own endpoint"),
    ({"overlay_ip": "fd00::2"}, (), "not IPv4"),
    ({}, ("10.99.0.2",), "already uses"),
    # The IPv6 half, from a dual-stack server:
    ({**V6, "prefixlen6": 128}, (), "IPv6 overlay prefix of /128"),
    ({**V6, "prefixlen6": None}, (), "IPv6 overlay prefix"),
    ({**V6, "overlay_ip6": "10.99.0.3"}, (), "not IPv6"),
    ({**V6, "overlay_ip6": "fe80::2", "server_ip6": "fe80::1"}, (), "special address"),
    ({**V6, "overlay_ip6": "::ffff:10.99.0.2"}, (), "special address"),
    ({**V6, "overlay_ip6": "2001:db8::53"}, (), "not a client address in its IPv6 overlay"),
    ({**V6, "overlay_ip6": "fd99::1"}, (), "not a client address in its IPv6 overlay"),  # the server's own
    ({**V6}, ("fd99::2",), "already uses"),
])
def test_a_hostile_assignment_is_refused(change: dict[str, object], taken: tuple[str, ...], problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem) as info:
        check_assignment(dataclasses.replace(GOOD, **change), SERVER, KEY, taken)  # type: ignore[arg-type]
    assert info.value.reason == "bad-assignment"


def test_a_sane_assignment_passes() -> None:
    check_assignment(GOOD, SERVER, KEY, ("192.0.2.53", "10.99.0.3"))
    check_assignment(dataclasses.replace(GOOD, **V6), SERVER, KEY, ("192.0.2.53", "fd99::3"))  # type: ignore[arg-type]
    endpoint_inside = ServerRecord("fd99::7")  # an IPv6 endpoint inside the IPv6 overlay it assigns
    with pytest.raises(ProtocolError, match="holds its own endpoint"):
        check_assignment(dataclasses.replace(GOOD, **V6), endpoint_inside, KEY, ())  # type: ignore[arg-type]


def test_a_rogue_server_fails_only_its_own_tunnel(tmp_path: Path) -> None:
    """A server that assigns the metadata address: its tunnel fails with one clear line, the
    host gets nothing from it, and the good server's tunnel comes up."""
    good, rogue = make_server(tmp_path, FakeKernel(), name="good"), make_server(tmp_path, FakeKernel(), name="rogue")
    real_register = rogue.api.register

    def hostile(claim: proto.Claim, generation: str) -> proto.Assignment:
        return dataclasses.replace(real_register(claim, generation), overlay_ip="169.254.169.254", prefixlen=0)

    rogue.api.register = hostile  # type: ignore[method-assign]
    ak = FakeKernel()

    async def scenario() -> None:
        async with serving(good) as g, serving(rogue, host="127.0.0.2") as r:
            agent = make_agent(tmp_path, ak, [g, r])
            await agent.up_once()
            regs = agent.registrations
            assert regs["127.0.0.1"].assignment is not None and regs["127.0.0.2"].assignment is None
            assert "refusing it" in regs["127.0.0.2"].error
            assert [link.addresses for link in ak.links.values()] == [["10.99.0.2/32"]]

    run(scenario)


# --- floods and bugs ---------------------------------------------------------------------------


def test_a_registration_flood_writes_few_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = make_server(tmp_path, FakeKernel())

    async def garbage(record: ServerRecord) -> None:
        reader, writer = await asyncio.open_connection(record.ip, record.api)
        await reader.readline()
        writer.write(b"{\"key\": \"x\\n<0>forged\"}\n")
        await writer.drain()
        await reader.readline()
        writer.close()

    async def scenario() -> None:
        async with serving(server) as record:
            with caplog.at_level(logging.INFO, logger="sptun"):
                for _ in range(4):
                    await asyncio.gather(*(garbage(record) for _ in range(50)))
        assert sum(server.api.rejected.values()) == 200

    run(scenario)
    lines = [r for r in caplog.records if "reject" in r.getMessage()]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_a_bug_in_the_handler_is_answered_and_counted(tmp_path: Path) -> None:
    server = make_server(tmp_path, FakeKernel())
    calls = []

    def broken(claim: proto.Claim, challenge: bytes) -> str:
        calls.append(claim)
        raise UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed")

    async def scenario() -> None:
        async with serving(server) as record:
            real = server.api.authorize
            server.api.authorize = broken  # type: ignore[method-assign]
            await refused("error", record, secret_of(token(tmp_path)))
            server.api.authorize = real  # type: ignore[method-assign]
            await register(record, secret_of(token(tmp_path)))  # and the next is served
        assert server.api.rejected["error"] == 1 and calls

    run(scenario)
