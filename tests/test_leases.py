"""sptun.leases: overlay addresses for client keys, and the file that keeps them across restarts."""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sptun.errors import SptunError
from sptun.keys import generate_private_key, public_key
from sptun.leases import Lease, Leases, LeaseStore, dumps, loads

FUZZ = settings.get_profile("sptun")

KEYS = [public_key(generate_private_key()) for _ in range(12)]
K1, K2, K3, K4, K5, K6 = KEYS[:6]
NET = ipaddress.IPv4Network("10.99.0.0/16")
SMALL = ipaddress.IPv4Network("10.99.0.0/29")  # .1 server, .2-.6 clients, .7 broadcast


def lease(key: str, ip: str, domain: str = "app.example.test") -> Lease:
    return Lease(key, domain, ip, 1700000000.0)


# --- allocation -----------------------------------------------------------------------------------


def test_first_client_gets_the_second_address() -> None:
    leases = Leases(NET)
    got, changed = leases.acquire(K1, "app.example.test")
    assert (got.overlay_ip, got.public_key, got.domain, changed) == ("10.99.0.2", K1, "app.example.test", True)
    assert leases.acquire(K2, "app.example.test")[0].overlay_ip == "10.99.0.3"


def test_used_addresses_are_skipped() -> None:
    leases = Leases(NET, [lease(K1, "10.99.0.2"), lease(K2, "10.99.0.3"), lease(K3, "10.99.0.5")])
    assert leases.acquire(K4, "app.example.test")[0].overlay_ip == "10.99.0.4"
    assert leases.acquire(K5, "app.example.test")[0].overlay_ip == "10.99.0.6"


def test_a_key_keeps_its_address() -> None:
    leases = Leases(NET)
    first, _ = leases.acquire(K1, "app.example.test")
    leases.acquire(K2, "app.example.test")
    again, changed = leases.acquire(K1, "app.example.test")
    assert again == first and changed is False


def test_a_key_moving_to_another_domain_keeps_its_address() -> None:
    leases = Leases(NET)
    first, _ = leases.acquire(K1, "a.example.test")
    moved, changed = leases.acquire(K1, "b.example.test")
    assert changed is True and moved.overlay_ip == first.overlay_ip and moved.domain == "b.example.test"
    assert leases.for_domain("a.example.test") == [] and leases.for_domain("b.example.test") == [moved]
    assert leases.acquire(K2, "a.example.test")[0].overlay_ip != first.overlay_ip


def test_release_frees_the_address() -> None:
    leases = Leases(SMALL)
    for key in KEYS[:5]:
        leases.acquire(key, "app.example.test")
    released = leases.release(K3)
    assert released is not None and released.overlay_ip == "10.99.0.4"
    assert leases.release(K3) is None  # twice is harmless
    assert leases.release(KEYS[11]) is None
    assert leases.acquire(K6, "app.example.test")[0].overlay_ip == "10.99.0.4"
    assert K3 not in leases.by_key


def test_full_overlay() -> None:
    leases = Leases(SMALL)
    got = [leases.acquire(key, "app.example.test")[0].overlay_ip for key in KEYS[:5]]
    assert got == ["10.99.0.2", "10.99.0.3", "10.99.0.4", "10.99.0.5", "10.99.0.6"]  # never .1 nor .7
    with pytest.raises(SptunError) as info:
        leases.acquire(K6, "app.example.test")
    assert "10.99.0.0/29" in info.value.message and "full" in info.value.message and info.value.hint
    assert leases.acquire(K1, "app.example.test")[1] is False  # existing keys still fine when full


def test_for_domain_and_all_are_sorted_by_address() -> None:
    leases = Leases(NET, [lease(K1, "10.99.0.10"), lease(K2, "10.99.0.9", "b.test"), lease(K3, "10.99.0.2")])
    assert [x.overlay_ip for x in leases.all()] == ["10.99.0.2", "10.99.0.9", "10.99.0.10"]
    assert [x.public_key for x in leases.for_domain("app.example.test")] == [K3, K1]


def test_at_finds_the_leases_of_some_addresses_and_follows_changes() -> None:
    leases = Leases(NET, [lease(K1, "10.99.0.10"), lease(K2, "10.99.0.9"), lease(K3, "10.99.0.2")])
    assert [x.public_key for x in leases.at({"10.99.0.10", "10.99.0.2", "10.99.0.77"})] == [K3, K1]
    leases.release(K3)
    moved, _ = leases.acquire(K4, "b.test")
    assert leases.at({"10.99.0.2"}) == [moved]  # the index is not stale after a change


@pytest.mark.parametrize("bad_ip", ["10.99.0.0", "10.99.0.1", "10.99.255.255", "10.100.0.2", "192.168.1.2"],
                         ids=["network", "server", "broadcast", "outside", "elsewhere"])
def test_loading_drops_out_of_range_leases(bad_ip: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sptun"):
        leases = Leases(NET, [lease(K1, bad_ip), lease(K2, "10.99.0.3")])
    assert list(leases.by_key) == [K2]
    assert any(K1 in r.getMessage() for r in caplog.records)
    assert leases.acquire(K1, "app.example.test")[0].overlay_ip == "10.99.0.2"


def test_loading_drops_a_second_lease_of_the_same_address() -> None:
    leases = Leases(SMALL, [lease(K1, "10.99.0.2"), lease(K2, "10.99.0.2")])
    assert list(leases.by_key) == [K1]
    assert leases.acquire(K2, "app.example.test")[0].overlay_ip == "10.99.0.3"


def test_loading_drops_a_second_lease_of_the_same_key() -> None:
    """The first lease of a key wins, and the address of the dropped one stays free."""
    leases = Leases(SMALL, [lease(K1, "10.99.0.2"), lease(K1, "10.99.0.3")])
    assert leases.by_key[K1].overlay_ip == "10.99.0.2"
    got = [leases.acquire(key, "app.example.test")[0].overlay_ip for key in KEYS[1:5]]
    assert sorted(got) == ["10.99.0.3", "10.99.0.4", "10.99.0.5", "10.99.0.6"]


@settings(FUZZ, max_examples=FUZZ.max_examples // 8)  # costly to draw: up to 40 operations each
@given(st.lists(st.tuples(st.sampled_from(["acquire", "release"]), st.integers(0, 7), st.sampled_from("ab")),
                max_size=40))
def test_fuzz_allocation(ops: list[tuple[str, int, str]]) -> None:
    """Any sequence of acquire/release: addresses unique and usable, a key keeps its address while it
    holds it, and reloading the leases changes nothing."""
    leases, held = Leases(SMALL), dict[str, str]()
    usable = {str(ip) for ip in SMALL.hosts()} - {"10.99.0.1"}
    for op, i, domain in ops:
        key = KEYS[i]
        if op == "release":
            leases.release(key)
            held.pop(key, None)
            continue
        try:
            got, _ = leases.acquire(key, domain)
        except SptunError:
            assert key not in held and len(held) == 5
            continue
        if key in held:
            assert got.overlay_ip == held[key]
        held[key] = got.overlay_ip
        assert got.domain == domain
    assert {k: x.overlay_ip for k, x in leases.by_key.items()} == held
    assert len(set(held.values())) == len(held) and set(held.values()) <= usable
    again = Leases(SMALL, loads(dumps(leases)))
    assert again.by_key == leases.by_key


# --- the file -------------------------------------------------------------------------------------


def some_leases() -> Leases:
    leases = Leases(NET)
    leases.acquire(K1, "a.example.test")
    leases.acquire(K2, "b.example.test")
    return leases


def test_missing_file_is_no_leases(tmp_path: Path) -> None:
    assert LeaseStore(tmp_path).load() == []


def test_save_and_load(tmp_path: Path) -> None:
    store, leases = LeaseStore(tmp_path), some_leases()
    store.save(leases)
    assert store.load() == leases.all()
    assert Leases(NET, store.load()).by_key == leases.by_key
    assert (tmp_path / "leases.json").stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "leases.json").read_text())["format"] == 2


def test_save_keeps_the_previous_version(tmp_path: Path) -> None:
    store, leases = LeaseStore(tmp_path), some_leases()
    store.save(leases)
    before = leases.all()
    leases.acquire(K3, "a.example.test")
    store.save(leases)
    assert loads((tmp_path / "leases.json.bak").read_text()) == before
    assert (tmp_path / "leases.json.bak").stat().st_mode & 0o777 == 0o600
    assert store.load() == leases.all()
    assert not list(tmp_path.glob(".*.tmp"))


VALID_LEASE = {"public_key": K1, "domain": "a.test", "overlay_ip": "10.99.0.2", "since": 1.0}
DAMAGED = [
    ("truncated", '{"format": 1, "leases": ['),
    ("empty", ""),
    ("binary", "\x00\x01\x02"),
    ("not-object", "[]"),
    ("other-format", json.dumps({"format": 99, "leases": []})),
    ("no-format", json.dumps({"leases": []})),
    ("leases-not-list", json.dumps({"format": 1, "leases": {}})),
    ("lease-not-object", json.dumps({"format": 1, "leases": [1]})),
    ("lease-missing-field", json.dumps({"format": 1, "leases": [{k: v for k, v in VALID_LEASE.items() if k != "since"}]})),
    ("lease-bad-key", json.dumps({"format": 1, "leases": [{**VALID_LEASE, "public_key": "nope"}]})),
    ("lease-bad-ip", json.dumps({"format": 1, "leases": [{**VALID_LEASE, "overlay_ip": "10.99.0.300"}]})),
    ("lease-ipv6", json.dumps({"format": 1, "leases": [{**VALID_LEASE, "overlay_ip": "fd00::2"}]})),
    ("lease-since-list", json.dumps({"format": 1, "leases": [{**VALID_LEASE, "since": [1]}]})),
    ("lease-since-text", json.dumps({"format": 1, "leases": [{**VALID_LEASE, "since": "yesterday"}]})),
]


@pytest.mark.parametrize("text", [t for _, t in DAMAGED], ids=[i for i, _ in DAMAGED])
def test_damaged_file_falls_back_to_the_backup(tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture) -> None:
    store, leases = LeaseStore(tmp_path), some_leases()
    store.save(leases)
    store.save(leases)  # now leases.json.bak holds them too
    (tmp_path / "leases.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="sptun"):
        assert store.load() == leases.all()
    assert any("damaged" in r.getMessage() for r in caplog.records)
    # Reading changes nothing on disk (`sptun status` reads too) ...
    assert (tmp_path / "leases.json").read_text() == text and not list(tmp_path.glob("*.damaged-*"))
    # ... the next save sets the damaged file aside, not deleted, and keeps the good backup.
    store.save(leases)
    damaged = list(tmp_path.glob("leases.json.damaged-*"))
    assert len(damaged) == 1 and damaged[0].read_text() == text
    assert LeaseStore(tmp_path).load() == leases.all()
    assert loads((tmp_path / "leases.json.bak").read_text()) == leases.all()


def test_damaged_file_and_no_backup(tmp_path: Path) -> None:
    (tmp_path / "leases.json").write_text("{oops")
    store = LeaseStore(tmp_path)
    assert store.load() == []
    store.save(Leases(NET))
    assert [p.read_text() for p in tmp_path.glob("leases.json.damaged-*")] == ["{oops"]


def test_both_damaged(tmp_path: Path) -> None:
    (tmp_path / "leases.json").write_text("{oops")
    (tmp_path / "leases.json.bak").write_text("[]")
    store = LeaseStore(tmp_path)
    assert store.load() == []
    store.save(Leases(NET))
    assert [p.read_text() for p in tmp_path.glob("leases.json.damaged-*")] == ["{oops"]


def test_crash_between_backup_and_write(tmp_path: Path) -> None:
    """save() moves leases.json to .bak before it writes the new one: a crash there leaves only .bak."""
    store, leases = LeaseStore(tmp_path), some_leases()
    store.save(leases)
    (tmp_path / "leases.json").rename(tmp_path / "leases.json.bak")
    assert store.load() == leases.all()


def test_a_saved_file_with_a_dropped_lease_still_loads(tmp_path: Path) -> None:
    """A lease outside a (changed) overlay is dropped by Leases, not by the file: the rest survive."""
    store = LeaseStore(tmp_path)
    store.save(Leases(NET, [lease(K1, "10.99.0.2"), lease(K2, "10.99.200.2")]))
    smaller = Leases(ipaddress.IPv4Network("10.99.0.0/24"), store.load())
    assert list(smaller.by_key) == [K1]
