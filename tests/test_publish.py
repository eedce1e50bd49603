"""Self-publication in DNS (issue 17): the TSIG key file, the planning of exactly this
server's own records, and signed RFC 2136 updates through a real Knot on loopback, whose
update policy keeps each key to its own names."""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sptun.config import DnsConfig, load_server
from sptun.errors import ConfigError, SptunError
from sptun.server import Server
from sptun.snapshot import PublicationStatus
from sptun.server.publish import (
    DomainRecords,
    RecordChange,
    plan_records,
    plan_removal,
    read_tsig_key,
    read_zone,
    send_update,
    server_txt,
    wanted_records,
)

PK1 = "A" * 43 + "="
PK2 = "B" * 43 + "="
OTHER = f"r=superprotocol;ip=198.51.100.99;pk={'C' * 43}="  # another server's record
SECRET = base64.b64encode(b"k" * 32).decode()
SECRET2 = base64.b64encode(b"m" * 32).decode()


def key_file(tmp_path: Path, text: str, mode: int = 0o600, name: str = "tsig.key") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


# --- the key file ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    f"# hmac-sha256:s1.example.test:{SECRET}\nkey:\n  - id: s1.example.test\n    algorithm: hmac-sha256\n    secret: {SECRET}\n",
    f'key "s1.example.test" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n',
    f"hmac-sha256:s1.example.test:{SECRET}\n",
], ids=["knot keymgr", "bind tsig-keygen", "kdig -y"])
def test_a_tsig_key_file_is_read_in_each_spelling(tmp_path: Path, text: str) -> None:
    key = read_tsig_key(key_file(tmp_path, text))
    assert (key.name, key.algorithm, key.secret) == ("s1.example.test", "hmac-sha256", SECRET)
    assert SECRET not in repr(key)


@pytest.mark.parametrize(("text", "mode", "problem"), [
    (f"hmac-sha256:s1:{SECRET}\n", 0o644, "is open to other users (mode 0644)"),
    (f"hmac-md5:s1:{SECRET}\n", 0o600, "algorithm 'hmac-md5' is not one of"),
    ("key:\n  - id: s1\n    algorithm: hmac-sha1\n    secret: " + SECRET + "\n", 0o600, "is not one of"),
    ("hmac-sha256:s1:c2hvcnQ=\n", 0o600, "the secret is not base64 of 16 bytes"),
    ("nothing here\n", 0o600, "holds no key"),
])
def test_a_bad_tsig_key_file_is_one_line_without_the_secret(tmp_path: Path, text: str, mode: int, problem: str) -> None:
    with pytest.raises(SptunError) as err:
        read_tsig_key(key_file(tmp_path, text, mode))
    assert problem in str(err.value) and SECRET not in str(err.value) + str(err.value.hint)


def test_a_missing_tsig_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(SptunError, match="does not exist") as err:
        read_tsig_key(tmp_path / "nope.key")
    assert "keymgr -t" in str(err.value.hint)


# --- the config -------------------------------------------------------------------------------


def server_config(tmp_path: Path, dns: str, listen: str = '["198.51.100.10"]', name: str = "app.example.test",
                  extra: str = "") -> Path:
    conf = tmp_path / "server.toml"
    conf.write_text(f'state_dir = "{tmp_path}/state"\n{extra}[[domains]]\nname = "{name}"\nlisten = {listen}\n'
                    f'token_file = "{tmp_path}/token"\n\n[dns]\n{dns}')
    return conf


def test_a_dns_table_is_read(tmp_path: Path) -> None:
    cfg = load_server(server_config(tmp_path, f'server = "192.0.2.53"\nzone = "Example.Test."\ntsig_key_file = "{tmp_path}/k"\nttl = 30\n'))
    assert cfg.dns is not None
    assert (str(cfg.dns.server), cfg.dns.zone, cfg.dns.tsig_key_file, cfg.dns.ttl, cfg.dns.port, cfg.dns.hold_down) == (
        "192.0.2.53", "example.test", tmp_path / "k", 30, 53, 30.0)


@pytest.mark.parametrize(("dns", "listen", "name", "message"), [
    ('zone = "example.test"\n', '["198.51.100.10"]', "app.example.test", "dns.server: is missing"),
    ('server = "ns1"\nzone = "example.test"\n', '["198.51.100.10"]', "app.example.test", "is not an IP address"),
    ('server = "192.0.2.53"\n', '["198.51.100.10"]', "app.example.test", "dns.zone: is missing"),
    ('server = "192.0.2.53"\nzone = "example.test"\nttl = 0\n', '["198.51.100.10"]', "app.example.test", "dns.ttl: 0 is out of range"),
    ('server = "192.0.2.53"\nzone = "example.test"\nhold_down = 0\n', '["198.51.100.10"]', "app.example.test",
     "dns.hold_down: 0 is out of range"),
    ('server = "192.0.2.53"\nzone = "example.test"\nkey = "x"\n', '["198.51.100.10"]', "app.example.test", "dns.key: unknown key"),
    ('server = "192.0.2.53"\nzone = "example.test"\n', '["198.51.100.10"]', "app.example.org", "is not in the [dns] zone"),
    ('server = "192.0.2.53"\nzone = "example.test"\n', "[]", "app.example.test", "lists none"),
])
def test_a_bad_dns_table_is_one_clear_error(tmp_path: Path, dns: str, listen: str, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_server(server_config(tmp_path, dns, listen, name))
    assert message in str(err.value), str(err.value)


# --- the plan -------------------------------------------------------------------------------------


def test_the_txt_record_carries_the_key_and_only_ports_that_are_not_the_defaults() -> None:
    assert server_txt("198.51.100.10", PK1) == f"r=superprotocol;ip=198.51.100.10;pk={PK1}"
    assert server_txt("2001:db8::10", PK1, 51900, 8443) == f"r=superprotocol;ip=2001:db8::10;port=51900;api=8443;pk={PK1}"


def test_the_endpoint_is_the_first_listen_address(tmp_path: Path) -> None:
    cfg = load_server(server_config(tmp_path, 'server = "192.0.2.53"\nzone = "example.test"\n',
                                    '["2001:db8::10", "198.51.100.10"]', extra='overlay6 = "fd99::/64"\n'))
    (want,) = wanted_records(cfg, PK1)
    assert want == DomainRecords("app.example.test", f"r=superprotocol;ip=2001:db8::10;pk={PK1}",
                                 ("2001:db8::10", "198.51.100.10"))
    (withdrawn,) = wanted_records(cfg, PK1, withdrawn={"app.example.test"})
    assert not withdrawn.publish_addresses


WANT = DomainRecords("app.example.test", f"r=superprotocol;ip=198.51.100.10;pk={PK1}", ("198.51.100.10", "2001:db8::10"))


def test_a_plan_adds_what_is_missing_and_is_empty_once_the_zone_has_it() -> None:
    assert plan_records(WANT, [OTHER], ["198.51.100.99"], PK1) == [
        RecordChange("add", WANT.name, "TXT", WANT.txt), RecordChange("add", WANT.name, "A", "198.51.100.10"),
        RecordChange("add", WANT.name, "AAAA", "2001:db8::10")]
    assert plan_records(WANT, [OTHER, WANT.txt], ["198.51.100.99", "198.51.100.10", "2001:DB8::10"], PK1) == []


def test_a_plan_replaces_its_own_stale_txt_and_never_touches_another_servers() -> None:
    stale = f"r=superprotocol;ip=198.51.100.10;port=51900;pk={PK1}"
    assert plan_records(WANT, [OTHER, stale], ["198.51.100.10", "2001:db8::10"], PK1) == [
        RecordChange("delete", WANT.name, "TXT", stale), RecordChange("add", WANT.name, "TXT", WANT.txt)]
    # Another key's record at the same name is someone else's, whatever it says.
    assert plan_records(WANT, [OTHER, WANT.txt.replace(PK1, PK2)], ["198.51.100.10", "2001:db8::10"], PK1) == [
        RecordChange("add", WANT.name, "TXT", WANT.txt)]


def test_a_withdrawal_takes_only_its_own_addresses_and_removal_takes_the_txt_last() -> None:
    withdrawn = DomainRecords(WANT.name, WANT.txt, WANT.addresses, publish_addresses=False)
    zone_addresses = ["198.51.100.99", "198.51.100.10", "2001:db8::10"]
    assert plan_records(withdrawn, [OTHER, WANT.txt], zone_addresses, PK1) == [
        RecordChange("delete", WANT.name, "A", "198.51.100.10"), RecordChange("delete", WANT.name, "AAAA", "2001:db8::10")]
    assert plan_removal(WANT, [OTHER, WANT.txt], zone_addresses, PK1, addresses_only=True) == [
        RecordChange("delete", WANT.name, "A", "198.51.100.10"), RecordChange("delete", WANT.name, "AAAA", "2001:db8::10")]
    assert plan_removal(WANT, [OTHER, WANT.txt], ["198.51.100.99"], PK1, addresses_only=False) == [
        RecordChange("delete", WANT.name, "TXT", WANT.txt)]


# --- through a real Knot ----------------------------------------------------------------------------

KNOT_CONF = """\
server:
    rundir: "{dir}/run"
    listen: 127.0.0.1@{port}
log:
  - target: stderr
    any: info
database:
    storage: "{dir}/db"
key:
  - id: s1.example.test
    algorithm: hmac-sha256
    secret: {s1}
  - id: s2.example.test
    algorithm: hmac-sha256
    secret: {s2}
acl:
  - id: s1
    key: s1.example.test
    action: update
    update-type: [TXT, A, AAAA]
    update-owner: name
    update-owner-match: equal
    update-owner-name: [app, blue]
  - id: s2
    key: s2.example.test
    action: update
    update-type: [TXT, A, AAAA]
    update-owner: name
    update-owner-match: equal
    update-owner-name: [app]
template:
  - id: default
    storage: "{dir}"
    zonefile-sync: -1
zone:
  - domain: example.test
    acl: [s1, s2]
"""

ZONE = f"""\
$ORIGIN example.test.
$TTL 60
@ SOA ns hostmaster 1 60 60 3600 60
@ NS ns
ns A 127.0.0.1
app TXT "{OTHER}"
app A 198.51.100.99
"""


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[int]:
    """A real knotd on loopback serving example.test: its port."""
    if shutil.which("knotd") is None:
        pytest.skip("knotd is not installed (scripts/setup --test installs it)")
    d = tmp_path / "knot"
    (d / "run").mkdir(parents=True)
    (d / "db").mkdir()
    (d / "example.test.zone").write_text(ZONE)
    port = free_port()
    conf = d / "knot.conf"
    conf.write_text(KNOT_CONF.format(dir=d, port=port, s1=SECRET, s2=SECRET2))
    log = open(d / "knotd.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(["knotd", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                read_zone(dns_of(tmp_path, port), "example.test")
                break
            except SptunError:
                assert proc.poll() is None and time.monotonic() < deadline, (d / "knotd.log").read_text()
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def free_port() -> int:
    """A loopback port free for TCP now (the kernel's pick: random would repeat, seeded per test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dns_of(tmp_path: Path, port: int, key: str = "s1") -> DnsConfig:
    cfg = load_server(server_config(tmp_path, f'server = "127.0.0.1"\nport = {port}\nzone = "example.test"\n'
                                              f'tsig_key_file = "{tmp_path}/{key}.key"\nttl = 30\n'))
    assert cfg.dns is not None
    return cfg.dns


def publish(conf: DnsConfig, key_path: Path, want: DomainRecords, public_key: str) -> list[RecordChange]:
    txts, addresses = read_zone(conf, want.name)
    changes = plan_records(want, txts, addresses, public_key)
    send_update(conf, read_tsig_key(key_path), changes)
    return changes


def test_a_server_publishes_exactly_its_own_records_through_knot(tmp_path: Path, knot: int) -> None:
    conf = dns_of(tmp_path, knot)
    key = key_file(tmp_path, f"hmac-sha256:s1.example.test:{SECRET}\n", name="s1.key")
    want = DomainRecords("app.example.test", server_txt("198.51.100.10", PK1), ("198.51.100.10",))
    assert len(publish(conf, key, want, PK1)) == 2
    txts, addresses = read_zone(conf, want.name)
    assert sorted(txts) == sorted([OTHER, want.txt]) and sorted(addresses) == ["198.51.100.10", "198.51.100.99"]
    assert publish(conf, key, want, PK1) == []  # idempotent: nothing left to change
    moved = DomainRecords(want.name, server_txt("198.51.100.10", PK1, 51900), want.addresses)
    assert [c.op for c in publish(conf, key, moved, PK1)] == ["delete", "add"]  # its own TXT replaced
    withdrawn = DomainRecords(want.name, moved.txt, want.addresses, publish_addresses=False)
    publish(conf, key, withdrawn, PK1)
    txts, addresses = read_zone(conf, want.name)
    assert sorted(txts) == sorted([OTHER, moved.txt]) and addresses == ["198.51.100.99"]  # the other's stays
    removal = plan_removal(want, txts, addresses, PK1, addresses_only=False)
    send_update(conf, read_tsig_key(key), removal)
    assert read_zone(conf, want.name) == ([OTHER], ["198.51.100.99"])


def test_a_wrong_key_is_refused_in_one_line_and_changes_nothing(tmp_path: Path, knot: int) -> None:
    conf = dns_of(tmp_path, knot)
    wrong = key_file(tmp_path, f"hmac-sha256:s1.example.test:{SECRET2}\n", name="s1.key")
    want = DomainRecords("app.example.test", server_txt("198.51.100.10", PK1), ("198.51.100.10",))
    with pytest.raises(SptunError) as err:
        publish(conf, wrong, want, PK1)
    assert "found the signature of key s1.example.test wrong (BADSIG)" in str(err.value), str(err.value)
    assert SECRET2 not in str(err.value)
    assert read_zone(conf, want.name) == ([OTHER], ["198.51.100.99"])


def test_the_update_policy_keeps_a_key_to_its_own_names(tmp_path: Path, knot: int) -> None:
    conf = dns_of(tmp_path, knot)
    key = key_file(tmp_path, f"hmac-sha256:s2.example.test:{SECRET2}\n", name="s2.key")
    app = DomainRecords("app.example.test", server_txt("198.51.100.11", PK2), ("198.51.100.11",))
    assert len(publish(conf, key, app, PK2)) == 2  # its own name: allowed
    blue = DomainRecords("blue.example.test", server_txt("198.51.100.11", PK2), ("198.51.100.11",))
    with pytest.raises(SptunError, match=r"refused key s2.example.test for this update \(BADKEY\)"):
        publish(conf, key, blue, PK2)  # Knot answers a name the policy does not allow as a wrong key
    assert read_zone(conf, blue.name) == ([], [])


# --- the publisher's timing and its rules ---------------------------------------------------------------


def test_a_domain_is_published_once_served_and_withdrawn_only_after_the_hold_down() -> None:
    from sptun.server.publish import Publisher

    HOLD_DOWN = 30.0
    pub = Publisher(DnsConfig(ipaddress.ip_address("192.0.2.53"), "example.test", Path("/k"), hold_down=HOLD_DOWN))
    assert pub.withdrawn({"app.example.test": False}, 90.0) == {"app.example.test"}  # never served yet
    assert pub.withdrawn({"app.example.test": True}, 95.0) == set()
    assert pub.withdrawn({"app.example.test": False}, 100.0) == set()
    assert pub.withdrawn({"app.example.test": False}, 100.0 + HOLD_DOWN - 1) == set()
    assert pub.withdrawn({"app.example.test": False}, 100.0 + HOLD_DOWN) == {"app.example.test"}
    assert pub.withdrawn({"app.example.test": True}, 200.0) == set()  # back at once
    assert pub.withdrawn({"app.example.test": False}, 201.0) == set()  # and the hold-down starts again
    # It counts from the last check a client passed, when that is known: it died before the checks said so.
    assert pub.withdrawn({"app.example.test": True}, 300.0) == set()
    assert pub.withdrawn({"app.example.test": False}, 303.0, {"app.example.test": 299.5}) == set()
    assert pub.withdrawn({"app.example.test": False}, 299.5 + HOLD_DOWN) == {"app.example.test"}


def test_a_failure_backs_off_and_a_changed_want_waits_for_it() -> None:
    from sptun.server.publish import RETRY_MAX, RETRY_MIN, Publisher

    pub = Publisher(DnsConfig(ipaddress.ip_address("192.0.2.53"), "example.test", Path("/k")))
    assert pub.needs_sync([WANT], 0.0)
    assert pub.failed("refused", 10.0) and not pub.failed("refused", 10.0 + RETRY_MIN)  # logged once
    assert not pub.needs_sync([WANT], 10.0 + RETRY_MIN)  # the backoff doubled
    assert pub.needs_sync([WANT], 10.0 + 3 * RETRY_MIN)
    for _ in range(20):
        pub.failed("refused", 0.0)
    assert pub.backoff == RETRY_MAX
    pub.succeeded([WANT], 50.0)
    assert not pub.needs_sync([WANT], 51.0) and pub.needs_sync([], 51.0)  # a change syncs at once


def test_the_last_server_of_a_domain_keeps_its_addresses(tmp_path: Path, knot: int) -> None:
    """Withdrawn, but no other server's address is in the zone: it stays (serving errors
    beats NXDOMAIN). With another server's address there, it goes."""
    from sptun.server.publish import Publisher

    conf = dns_of(tmp_path, knot)
    key = read_tsig_key(key_file(tmp_path, f"hmac-sha256:s1.example.test:{SECRET}\n", name="s1.key"))
    pub = Publisher(conf)
    blue = DomainRecords("blue.example.test", server_txt("198.51.100.10", PK1), ("198.51.100.10",))
    pub.sync([blue], PK1, key)
    withdrawn = DomainRecords(blue.name, blue.txt, blue.addresses, publish_addresses=False)
    assert pub.sync([withdrawn], PK1, key) == []  # blue has no other server
    assert read_zone(conf, blue.name)[1] == ["198.51.100.10"]
    assert pub.kept_as_last == {blue.name}  # status does not call it withdrawn
    app = DomainRecords("app.example.test", server_txt("198.51.100.10", PK1), ("198.51.100.10",), publish_addresses=False)
    assert [str(c) for c in pub.sync([app], PK1, key)] == [f"add app.example.test TXT {app.txt}"]
    assert read_zone(conf, app.name)[1] == ["198.51.100.99"]  # never published while withdrawn: s99 serves


def test_two_servers_losing_their_clients_at_once_never_both_withdraw(
        tmp_path: Path, knot: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """s1 reads the zone (s2's address is there), then s2 withdraws, relying on s1's, before
    s1 sends its own withdrawal, relying on s2's. The primary checks the addresses s1 read
    as the update's prerequisite, refuses it, and s1, reading again, stays: the domain
    keeps an address."""
    from sptun.server import publish as publish_module
    from sptun.server.publish import Publisher

    conf = dns_of(tmp_path, knot)
    key1 = read_tsig_key(key_file(tmp_path, f"hmac-sha256:s1.example.test:{SECRET}\n", name="s1.key"))
    key2 = read_tsig_key(key_file(tmp_path, f"hmac-sha256:s2.example.test:{SECRET2}\n", name="s2.key"))
    send_update(conf, key1, [RecordChange("delete", "app.example.test", "A", "198.51.100.99")])  # s1 and s2 only
    app1 = DomainRecords("app.example.test", server_txt("198.51.100.10", PK1), ("198.51.100.10",))
    app2 = DomainRecords("app.example.test", server_txt("198.51.100.11", PK2), ("198.51.100.11",))
    pub1, pub2 = Publisher(conf), Publisher(conf)
    pub1.sync([app1], PK1, key1)
    pub2.sync([app2], PK2, key2)
    assert zone(conf, "app.example.test")[1] == ["198.51.100.10", "198.51.100.11"]
    real_read, reads = publish_module.read_zone, []

    def s2_withdraws_meanwhile(c: DnsConfig, name: str) -> tuple[list[str], list[str]]:
        got = real_read(c, name)
        reads.append(got)
        if len(reads) == 1:
            pub2.sync([replace(app2, publish_addresses=False)], PK2, key2)
        return got

    monkeypatch.setattr(publish_module, "read_zone", s2_withdraws_meanwhile)
    assert pub1.sync([replace(app1, publish_addresses=False)], PK1, key1) == []
    assert zone(conf, "app.example.test")[1] == ["198.51.100.10"]  # s1 saw s2 leave, and stayed
    assert len(reads) == 3  # s1's read, s2's, and s1's again after its refused withdrawal


# --- the server daemon's publication, with a fake kernel and the real Knot -----------------------


def test_a_server_publishes_its_txt_then_its_address_withdraws_it_unserved_and_leaves_in_order_on_down(
        tmp_path: Path, knot: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from sptun.server.health import Health

    server = knot_server(tmp_path, knot)
    server.daemon = True
    server.check_config()  # reads the key: a start refuses an unusable one
    server.reconcile()
    assert server.cfg.dns is not None and server.public_key is not None
    dns = server.cfg.dns
    mine = server_txt("198.51.100.10", server.public_key)
    lease, _ = server.leases.acquire(PK1, "app.example.test")

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(server.publish_loop())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(run_for(2.5))  # no client healthy yet: the TXT, so that clients join, not the address
    assert zone(dns, "app.example.test") == (sorted([OTHER, mine]), ["198.51.100.99"])
    server.health.by_key[PK1] = Health(up=True)
    asyncio.run(run_for(2.5))  # passed, but not yet in the kernel's rotation: still not the address
    assert zone(dns, "app.example.test")[1] == ["198.51.100.99"]
    server.reconcile()  # the pass the flip wakes
    asyncio.run(run_for(2.5))
    assert zone(dns, "app.example.test") == (sorted([OTHER, mine]), ["198.51.100.10", "198.51.100.99"])
    assert server.publication() == PublicationStatus("example.test", True, None, [])
    server.health.by_key[PK1] = Health(up=False)  # no healthy client: its address goes, the TXT stays
    asyncio.run(run_for(3.5))  # after the hold-down of 1 s
    assert zone(dns, "app.example.test") == (sorted([OTHER, mine]), ["198.51.100.99"])
    assert server.publication() == PublicationStatus("example.test", True, None, ["app.example.test"])
    server.health.by_key[PK1] = Health(up=True)
    server.reconcile()
    asyncio.run(run_for(2.5))
    assert zone(dns, "app.example.test")[1] == ["198.51.100.10", "198.51.100.99"]
    server.set_down(True)
    seen: list[tuple[list[str], list[str]]] = []

    async def down() -> None:
        going = asyncio.create_task(server.go_down())
        await asyncio.sleep(0.5)  # within the TTL's wait: the address has gone, the TXT not yet
        seen.append(zone(dns, "app.example.test"))
        await going

    asyncio.run(down())
    assert seen == [(sorted([OTHER, mine]), ["198.51.100.99"])]
    assert zone(dns, "app.example.test") == ([OTHER], ["198.51.100.99"])


def test_a_one_shot_up_publishes_too(tmp_path: Path, knot: int) -> None:
    import asyncio

    server = knot_server(tmp_path, knot)
    changes = asyncio.run(server.up_once())
    assert server.public_key is not None and server.cfg.dns is not None
    mine = server_txt("198.51.100.10", server.public_key)
    assert f"DNS example.test: add app.example.test TXT {mine}" in changes
    assert zone(server.cfg.dns, "app.example.test") == (sorted([OTHER, mine]), ["198.51.100.10", "198.51.100.99"])

def test_a_refused_update_is_one_line_in_the_log_and_in_status_and_serving_goes_on(
        tmp_path: Path, knot: int, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    server = knot_server(tmp_path, knot)
    server.daemon = True
    server.reconcile()
    key_file(tmp_path, f"hmac-sha256:s1.example.test:{SECRET2}\n", name="s1.key")  # the zone's secret is another

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(server.publish_loop())
        await asyncio.sleep(seconds)
        task.cancel()

    asyncio.run(run_for(2.5))
    status = server.publication()
    assert status is not None and not status.published and "wrong (BADSIG)" in (status.error or "")
    lines = [r.getMessage() for r in caplog.records if "BADSIG" in r.getMessage()]
    assert len(lines) == 1 and SECRET2 not in lines[0]  # once, and no secret
    assert server.nft_table is not None and server.nft_table.exists  # the forwarding is untouched

def knot_server(tmp_path: Path, knot: int) -> Server:
    """A server (fake kernel) with [dns] on the test's knotd, its key s1's, a TTL and a
    hold-down of 1 s."""
    from fakes import FakeKernel

    from sptun.keys import new_token, write_file_atomic

    write_file_atomic(tmp_path / "token", new_token() + "\n")
    key_file(tmp_path, f"hmac-sha256:s1.example.test:{SECRET}\n", name="s1.key")
    conf = server_config(tmp_path, f'server = "127.0.0.1"\nport = {knot}\nzone = "example.test"\n'
                                   f'tsig_key_file = "{tmp_path}/s1.key"\nttl = 1\nhold_down = 1\n')
    k = FakeKernel()
    return Server(load_server(conf), edges=k.edges(), conntrack=lambda: k.connections)


def zone(dns: DnsConfig, name: str) -> tuple[list[str], list[str]]:
    txts, addresses = read_zone(dns, name)
    return sorted(txts), sorted(addresses)
