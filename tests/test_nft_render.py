"""sptun.nft rendering: golden rulesets, the self-hash in the table comment, and no injection.

Rewrite the golden files after an intended change with UPDATE_GOLDEN=1, then read the diff.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sptun import nft
from sptun.config import Port
from sptun.nft import (
    DNAT_MARK,
    MARK_BASE,
    MARK_MASK,
    Forward,
    comment_of,
    _q,
    client_mark,
    next_rotation,
    parse_table,
    render_client,
    render_server,
    rotation_update,
    server_comment,
)

FUZZ = settings.get_profile("sptun")

GOLDEN = Path(__file__).parent / "golden"
TCP443, UDP443, TCP80 = Port("tcp", 443), Port("udp", 443), Port("tcp", 80)
APP = "app.example.test"
B3 = ("10.99.0.2", "10.99.0.3", "10.99.0.4")
B3_6 = ("fd99::2", "fd99::3", "fd99::4")  # the same clients in the IPv6 overlay

# Each case: the interface, and each forward with the backends in its rotation.
SERVER_CASES: dict[str, tuple[str, list[tuple[Forward, tuple[str, ...]]]]] = {
    "server_listen_tcp443_3_backends": ("sptun0", [(Forward(APP, "198.51.100.10", TCP443), B3)]),
    "server_any_address": ("sptun0", [(Forward(APP, None, TCP443), B3)]),
    "server_udp443": ("sptun0", [(Forward(APP, "198.51.100.10", UDP443), B3)]),
    "server_1_backend": ("sptun0", [(Forward(APP, "198.51.100.10", TCP443), ("10.99.0.7",))]),
    "server_0_backends": ("sptun0", [(Forward(APP, "198.51.100.10", TCP443), ())]),
    "server_two_domains": ("wg-pub", [
        (Forward(APP, "198.51.100.10", TCP443), B3),
        (Forward(APP, "198.51.100.10", TCP80), B3),
        (Forward("shop.example.test", "198.51.100.11", TCP443), ("10.99.0.9", "10.99.0.5")),
        (Forward("idle.example.test", None, Port("tcp", 8443)), ()),
    ]),
    "server_dual_stack": ("sptun0", [
        (Forward(APP, "198.51.100.10", TCP443), B3),
        (Forward(APP, "2001:db8::10", TCP443, 6), B3_6),
        (Forward(APP, None, TCP80, 4), B3),
        (Forward(APP, None, TCP80, 6), ()),
    ]),
}


def server(interface: str, cases: list[tuple[Forward, tuple[str, ...]]]) -> str:
    return render_server(interface, [f for f, _ in cases], [list(b) for _, b in cases], overlays=overlays_of(cases))


def overlays_of(cases: list[tuple[Forward, tuple[str, ...]]]) -> tuple[str, ...]:
    return ("10.99.0.0/16", "fd99::/64") if any(f.family == 6 for f, _ in cases) else ("10.99.0.0/16",)
CLIENT_CASES = {
    "client_2_interfaces": ({"sptun-s1": client_mark(5), "sptun-s2": client_mark(12)}, (TCP443,)),
    "client_no_interfaces": ({}, (TCP443,)),
    "client_several_ports": ({"sptun-s1": client_mark(5)}, (UDP443, TCP80, TCP443, Port("tcp", 8080))),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.nft"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{path} differs: if the change is intended, run with UPDATE_GOLDEN=1 and review the diff"


@pytest.mark.parametrize("name", SERVER_CASES)
def test_server_golden(name: str) -> None:
    check_golden(name, server(*SERVER_CASES[name]))


@pytest.mark.parametrize("name", CLIENT_CASES)
def test_client_golden(name: str) -> None:
    marks, ports = CLIENT_CASES[name]
    check_golden(name, render_client(marks, ports))


def test_every_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*.nft")} == set(SERVER_CASES) | set(CLIENT_CASES)


# --- what the goldens must say, checked independently of them ------------------------------------


def chain(ruleset: str, name: str) -> list[str]:
    m = re.search(rf"^\tchain {name} {{\n(.*?)^\t}}$", ruleset, re.M | re.S)
    assert m, f"no chain {name}"
    return [line.strip() for line in m.group(1).splitlines()[1:]]  # without the hook line


def dnat_rules(ruleset: str) -> list[str]:
    """Each forward's prerouting rule, with the rules of the chain it jumps to appended."""
    rules = []
    for r in chain(ruleset, "prerouting"):
        m = re.search(r"\bjump (fwd\d+)\b", r)
        target = " ".join(chain(ruleset, m.group(1))) if m else ""
        if "dnat" in target:
            rules.append(f"{r} {target}")
    return rules


def test_an_ipv6_forward_dnats_into_the_ipv6_overlay() -> None:
    text = server(*SERVER_CASES["server_dual_stack"])
    assert 'iifname != "sptun0" ip6 daddr 2001:db8::10 tcp dport 443 counter jump fwd1' in text
    assert "map rr1 { typeof numgen inc mod 2 : ip6 daddr; elements = { 0 : fd99::2, 1 : fd99::3, 2 : fd99::4 } }" in text
    assert "dnat ip6 to numgen inc mod 3 map @rr1" in text
    assert 'iifname != "sptun0" meta nfproto ipv6 fib daddr type local tcp dport 80 counter jump fwd3 comment "app.example.test *6 tcp/80"' in text
    # Per family: the MSS clamp (IPv6's header is 20 bytes longer) and the passive-health sets.
    assert "meta nfproto ipv6 tcp flags syn / syn,rst tcp option maxseg size > 1360 tcp option maxseg size set 1360" in text
    assert "meta nfproto ipv4 tcp flags syn / syn,rst tcp option maxseg size > 1380 tcp option maxseg size set 1380" in text
    assert "set suspects6 { type ipv6_addr;" in text and "update @answered6 { ip6 saddr }" in text
    assert "update @suspects6 { ip6 daddr }" in text
    # An IPv4-only server renders no IPv6 at all: its digest, and so its table, stay as they were.
    v4 = server(*SERVER_CASES["server_two_domains"])
    assert "ip6" not in v4 and "suspects6" not in v4 and "nfproto ipv4 tcp flags" not in v4


def test_an_ipv6_rotation_update() -> None:
    lines = rotation_update(1, ["fd99::2", "fd99::3"], ["fd99::2"], 6)
    assert lines[-1] == "add rule inet sptun fwd1 ct mark set ct mark or 0x08000000 dnat ip6 to numgen inc mod 1 map @rr1"


def test_round_robin_over_the_backends_in_order() -> None:
    ruleset = server(*SERVER_CASES["server_listen_tcp443_3_backends"])
    (rule,) = dnat_rules(ruleset)
    assert "ip daddr 198.51.100.10 tcp dport 443" in rule
    assert "ct mark set ct mark or 0x08000000 dnat ip to numgen inc mod 3 map @rr0" in rule
    assert f'jump fwd0 comment "{APP} 198.51.100.10 tcp/443"' in rule
    assert "\tmap rr0 { typeof numgen inc mod 2 : ip daddr; elements = { 0 : 10.99.0.2, 1 : 10.99.0.3, 2 : 10.99.0.4 } }" \
        in ruleset


def test_any_address_matches_local_addresses() -> None:
    (rule,) = dnat_rules(server(*SERVER_CASES["server_any_address"]))
    assert "fib daddr type local" in rule and "ip daddr" not in rule and f'"{APP} * tcp/443"' in rule


def test_one_backend_is_a_rotation_of_one() -> None:
    (rule,) = dnat_rules(server(*SERVER_CASES["server_1_backend"]))
    assert "numgen inc mod 1 map @rr0" in rule


def test_no_backends_no_dnat_but_the_rule_stays_for_updates() -> None:
    ruleset = server(*SERVER_CASES["server_0_backends"])
    assert chain(ruleset, "prerouting") == [
        f'iifname != "sptun0" ip daddr 198.51.100.10 tcp dport 443 counter jump fwd0 comment "{APP} 198.51.100.10 tcp/443"']
    assert chain(ruleset, "fwd0") == []
    assert "dnat ip to" not in ruleset and "\tmap rr0 { typeof numgen inc mod 2 : ip daddr; }" in ruleset


def test_udp_forward() -> None:
    (rule,) = dnat_rules(server(*SERVER_CASES["server_udp443"]))
    assert " udp dport 443 " in rule and "tcp" not in rule


@pytest.mark.parametrize("name", SERVER_CASES)
def test_clients_cannot_use_the_forwarding_from_inside_the_overlay(name: str) -> None:
    """Isolation: a client that sends to the server's overlay address (a local address) or to the
    public address through its tunnel must not be DNATed on to another client."""
    interface, cases = SERVER_CASES[name]
    for rule in chain(server(interface, cases), "prerouting"):
        assert rule.startswith(f'iifname != "{interface}" '), rule


def test_server_isolation_rules() -> None:
    ruleset = server(*SERVER_CASES["server_listen_tcp443_3_backends"])
    assert chain(ruleset, "forward") == [
        'oifname "sptun0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu',
        'iifname "sptun0" tcp flags syn / syn,rst tcp option maxseg size > 1380 tcp option maxseg size set 1380',
        'oifname "sptun0" ct mark & 0x08000000 == 0x08000000 tcp flags syn / syn,ack '
        'ct status confirmed / confirmed,seen-reply update @suspects { ip daddr }',
        'iifname "sptun0" ct mark & 0x08000000 == 0x08000000 tcp flags & rst == rst ct status & assured == 0 '
        'update @suspects { ip saddr }',
        'iifname "sptun0" ct mark & 0x08000000 == 0x08000000 tcp flags syn,ack / syn,ack update @answered { ip saddr }',
        'iifname "sptun0" ct mark & 0x08000000 == 0x08000000 accept',
        'iifname "sptun0" counter drop comment "clients reach only their forwarded connections"',
        'oifname "sptun0" ct mark & 0x08000000 == 0x08000000 accept',
        'oifname "sptun0" counter drop comment "nothing else enters the overlay"',
    ]
    assert chain(ruleset, "input")[-1].startswith('iifname "sptun0" counter drop')


@pytest.mark.parametrize("name", SERVER_CASES)
def test_passive_health_sets_and_the_rule_that_fills_answered(name: str) -> None:
    """The kernel keeps two short-lived sets of backends: SUSPECTS (connections left
    unanswered) and ANSWERED (a SYN-ACK from the backend on one of sptun's own connections,
    through the tunnel). Both are declared the same way; ANSWERED's rule comes before the
    accepts, or it would never run."""
    interface, cases = SERVER_CASES[name]
    ruleset = server(interface, cases)
    for set_name, timeout in ((nft.SUSPECTS, nft.SUSPECT_FOR), (nft.ANSWERED, nft.ANSWERED_FOR)):
        assert (f"\tset {set_name} {{ type ipv4_addr; flags dynamic, timeout; timeout {timeout}s; size 65536; }}\n"
                in ruleset)
    assert (nft.ANSWERED, nft.ANSWERED_FOR) == ("answered", 2)
    rules = chain(ruleset, "forward")
    updates = [i for i, rule in enumerate(rules) if f"@{nft.ANSWERED} " in rule]
    assert [rules[i] for i in updates] == [
        f'iifname "{interface}" ct mark & {DNAT_MARK:#010x} == {DNAT_MARK:#010x} '
        f"tcp flags syn,ack / syn,ack update @answered {{ ip saddr }}"]
    first_accept = min(i for i, rule in enumerate(rules) if rule.endswith(" accept"))
    assert updates[0] < first_accept
    assert ruleset.count("@answered ") == 1  # nothing else reads or writes it


@pytest.mark.parametrize("name", SERVER_CASES)
def test_the_forward_chain_trusts_only_sptuns_own_mark(name: str) -> None:
    """Isolation rests on sptun's marks only: `ct status dnat` is set by any DNAT (Docker's,
    kube-proxy's), so it must not open the overlay; the mark is set by sptun's DNAT alone,
    with an OR that keeps the ct mark's other bits, before the DNAT (which ends the rule)."""
    interface, cases = SERVER_CASES[name]
    ruleset = server(interface, cases)
    assert "ct status dnat" not in ruleset
    accepts = [r for r in chain(ruleset, "forward") if r.endswith(" accept")]
    assert accepts == [f'{d}ifname "{interface}" ct mark & {DNAT_MARK:#010x} == {DNAT_MARK:#010x} accept' for d in "io"]
    for rule in dnat_rules(ruleset):
        assert "jump fwd" in rule and re.search(f" ct mark set ct mark or {DNAT_MARK:#010x} dnat ip6? to ", rule), rule
    assert ruleset.count("ct mark set") == len(dnat_rules(ruleset))  # only where sptun DNATs


def test_the_dnat_mark_is_one_bit_no_client_mark_carries() -> None:
    assert bin(DNAT_MARK).count("1") == 1
    assert DNAT_MARK & MARK_MASK and not DNAT_MARK & MARK_BASE
    for ifindex in (1, 5, 0x7FFFF, 0xFFFFF):
        assert not client_mark(ifindex) & DNAT_MARK
        assert (client_mark(ifindex) | DNAT_MARK) & MARK_MASK != MARK_BASE  # never taken for a client's mark


def test_only_the_sptun_table() -> None:
    for ruleset in [server("sptun0", c) for _, c in SERVER_CASES.values()] + \
                   [render_client(m, p) for m, p in CLIENT_CASES.values()]:
        tables = re.findall(r"^(?:delete )?table (\S+ \S+)", ruleset, re.M)
        assert tables == ["inet sptun", "inet sptun", "inet sptun"]
        assert ruleset.startswith("table inet sptun {}\ndelete table inet sptun\ntable inet sptun {\n")
        assert "flush ruleset" not in ruleset


def test_client_marks() -> None:
    ruleset = render_client(*CLIENT_CASES["client_2_interfaces"])
    assert chain(ruleset, "prerouting") == [
        'ct state new ct mark set iifname map { "sptun-s1" : 0x53700005, "sptun-s2" : 0x5370000c }']
    assert chain(ruleset, "output") == ["ct mark & 0xfff00000 == 0x53700000 meta mark set ct mark"]
    assert chain(render_client(*CLIENT_CASES["client_no_interfaces"]), "prerouting") == []


@pytest.mark.parametrize("name", CLIENT_CASES)
def test_a_server_reaches_nothing_behind_the_client(name: str) -> None:
    """Through a tunnel, only the client itself (its published ports, in input): whatever
    would be forwarded (its LAN, its containers) is dropped; other forwarding is left alone."""
    ruleset = render_client(*CLIENT_CASES[name])
    assert "type filter hook forward priority filter; policy accept;" in ruleset
    assert chain(ruleset, "forward") == [
        'iifname "sptun-*" counter drop comment "the server reaches nothing behind the client"']
    assert all(r.startswith('iifname "sptun-*" ') for r in chain(ruleset, "input"))  # the same tunnels


def test_client_ports_sorted() -> None:
    ruleset = render_client(*CLIENT_CASES["client_several_ports"])
    assert 'meta l4proto . th dport { tcp . 80, tcp . 443, tcp . 8080, udp . 443 } accept' in ruleset


def test_client_mark() -> None:
    assert client_mark(5) == 0x53700005
    assert client_mark(5) & MARK_MASK == MARK_BASE


# --- the hash in the comment ----------------------------------------------------------------------


def body_and_digest(ruleset: str) -> tuple[str, str]:
    m = re.search(r'\tcomment "sptun (server|agent) ([0-9a-f]{16})"\n'
                  r'\tchain digest {\n\t\treturn comment "sptun (server|agent) ([0-9a-f]{16})"\n\t}\n(.*)\n}\n\Z', ruleset, re.S)
    assert m
    assert m.group(1, 2) == m.group(3, 4)  # the table's comment, and the one a JSON listing shows
    return m.group(5), m.group(2)


@pytest.mark.parametrize("ruleset", [render_client(m, p) for m, p in CLIENT_CASES.values()])
def test_client_digest_is_the_hash_of_the_body(ruleset: str) -> None:
    body, digest = body_and_digest(ruleset)
    assert hashlib.sha256(body.encode()).hexdigest()[:16] == digest
    assert comment_of(ruleset) == f"sptun agent {digest}"


@pytest.mark.parametrize("name", SERVER_CASES)
def test_server_digest_is_the_hash_of_the_structure(name: str) -> None:
    """Who is in rotation changes in place, so it is not part of the table's identity."""
    interface, cases = SERVER_CASES[name]
    empty = server(interface, [(f, ()) for f, _ in cases])
    body, digest = body_and_digest(server(interface, cases))
    assert hashlib.sha256(body_and_digest(empty)[0].encode()).hexdigest()[:16] == digest
    assert server_comment(interface, [f for f, _ in cases], overlays=overlays_of(cases)) == f"sptun server {digest}"


def test_digest_is_stable() -> None:
    cases = SERVER_CASES["server_two_domains"][1]
    assert server("wg-pub", cases) == server("wg-pub", list(cases))
    a = render_client({"sptun-s1": 0x53700005, "sptun-s2": 0x53700006}, (TCP443, UDP443))
    b = render_client({"sptun-s2": 0x53700006, "sptun-s1": 0x53700005}, (UDP443, TCP443))
    assert a == b  # dict and tuple order do not matter


def test_digest_is_stable_across_processes() -> None:
    """A fresh daemon must recognise the table the previous one loaded (no hash randomisation)."""
    code = ("from sptun.nft import *; from sptun.config import Port; import sys; "
            "sys.stdout.write(render_client({'sptun-b': 2, 'sptun-a': 1}, (Port('udp', 443), Port('tcp', 443))))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {render_client({"sptun-a": 1, "sptun-b": 2}, (TCP443, UDP443))}


BASE = Forward(APP, "198.51.100.10", TCP443)


@pytest.mark.parametrize("change", [
    lambda: server("sptun0", [(Forward(APP, "198.51.100.11", TCP443), B3)]),
    lambda: server("sptun0", [(Forward(APP, "198.51.100.10", TCP80), B3)]),
    lambda: server("sptun1", [(BASE, B3)]),
    lambda: server("sptun0", [(Forward("b.test", "198.51.100.10", TCP443), B3)]),
    lambda: server("sptun0", []),
], ids=["other-address", "other-port", "other-interface", "other-domain", "none"])
def test_digest_changes_with_the_structure(change: Callable[[], str]) -> None:
    assert body_and_digest(change())[1] != body_and_digest(server("sptun0", [(BASE, B3)]))[1]


@pytest.mark.parametrize("backends", [B3[:2], B3[::-1], ()])
def test_digest_does_not_change_with_the_rotation(backends: tuple[str, ...]) -> None:
    assert body_and_digest(server("sptun0", [(BASE, backends)]))[1] == body_and_digest(server("sptun0", [(BASE, B3)]))[1]


# --- changing a rotation in place -------------------------------------------------------------------

A, B, C, D = "10.99.0.2", "10.99.0.3", "10.99.0.4", "10.99.0.5"


@pytest.mark.parametrize("current, wanted, expected", [
    ([A, B, C], {A, B, C}, [A, B, C]),  # converged: nothing moves
    ([A, B, C], {A, C}, [A, C]),  # the last one takes the leaver's slot
    ([A, B, C], {A, B}, [A, B]),  # the last one leaves: nothing else moves
    ([A, B, C], {B, C}, [C, B]),
    ([A, B, C], {A, B, C, D}, [A, B, C, D]),  # newcomers are appended
    ([A, B], {B, D, C}, [B, C, D]),
    ([A, B, C], set(), []),
    ([], {C, A}, [A, C]),
])
def test_next_rotation_moves_as_little_as_possible(current: list[str], wanted: set[str], expected: list[str]) -> None:
    assert next_rotation(current, wanted) == expected


def test_rotation_update_of_one_leaver_touches_two_slots_and_the_rule() -> None:
    many = [f"10.99.{i // 250}.{i % 250 + 2}" for i in range(10_000)]
    new = next_rotation(many, set(many) - {many[17]})
    lines = rotation_update(3, many, new)
    assert lines == [
        "delete element inet sptun rr3 { 17, 9999 }",
        f"add element inet sptun rr3 {{ 17 : {many[-1]} }}",
        "flush chain inet sptun fwd3",
        "add rule inet sptun fwd3 ct mark set ct mark or 0x08000000 dnat ip to numgen inc mod 9999 map @rr3",
    ]


def test_rotation_update_to_empty_and_back() -> None:
    assert rotation_update(0, [A], []) == [
        "delete element inet sptun rr0 { 0 }", "flush chain inet sptun fwd0"]
    assert rotation_update(0, [], [A]) == [
        "add element inet sptun rr0 { 0 : 10.99.0.2 }", "flush chain inet sptun fwd0",
        "add rule inet sptun fwd0 ct mark set ct mark or 0x08000000 dnat ip to numgen inc mod 1 map @rr0"]
    assert rotation_update(0, [A, B], [A, B]) == []


def test_client_digest_changes_with_the_body() -> None:
    base = body_and_digest(render_client({"sptun-s1": 0x53700005}, (TCP443,)))[1]
    assert body_and_digest(render_client({"sptun-s1": 0x53700006}, (TCP443,)))[1] != base
    assert body_and_digest(render_client({"sptun-s2": 0x53700005}, (TCP443,)))[1] != base
    assert body_and_digest(render_client({"sptun-s1": 0x53700005}, (TCP80,)))[1] != base
    assert body_and_digest(render_client({}, (TCP443,)))[1] != base


# `nft -a -j list table inet sptun` of a loaded server table, as nft 1.0.6 prints it (trimmed):
# no comment on the table object, so the digest comes from the digest chain's rule.
LISTING = {"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "sptun", "handle": 1}},
    {"map": {"family": "inet", "name": "rr0", "table": "sptun", "type": "integer", "handle": 2, "map": "ipv4_addr",
             "elem": [[1, "10.99.0.3"], [0, "10.99.0.2"]]}},
    {"map": {"family": "inet", "name": "rr1", "table": "sptun", "type": "integer", "handle": 3, "map": "ipv4_addr"}},
    {"chain": {"family": "inet", "table": "sptun", "name": "digest", "handle": 1}},
    {"rule": {"family": "inet", "table": "sptun", "chain": "digest", "handle": 4, "comment": "sptun server 0123456789abcdef",
              "expr": [{"return": None}]}},
    {"rule": {"family": "inet", "table": "sptun", "chain": "prerouting", "handle": 9, "comment": "app 198.51.100.10 tcp/443",
              "expr": [{"counter": {"packets": 7, "bytes": 420}}, {"jump": {"target": "fwd0"}}]}},
    {"rule": {"family": "inet", "table": "sptun", "chain": "forward", "handle": 11, "expr": [{"accept": None}]}},
]}


def test_one_json_listing_gives_digest_handles_rotations_and_counters() -> None:
    table = parse_table(LISTING)
    assert table.exists and table.comment == "sptun server 0123456789abcdef"
    assert table.handles == {"app 198.51.100.10 tcp/443": 9}
    assert table.counters == {"app 198.51.100.10 tcp/443": (7, 420)}
    fwds = [Forward("app", "198.51.100.10", TCP443), Forward("app", "198.51.100.10", TCP80), Forward("b", None, TCP80)]
    assert table.rotations(fwds) == [["10.99.0.2", "10.99.0.3"], [], []]  # by slot; a map not there is empty


def test_a_table_without_the_digest_chain_is_not_recognised() -> None:
    """An older sptun's table, or someone else's: reloaded, never trusted."""
    listing = {"nftables": [item for item in LISTING["nftables"] if item.get("rule", {}).get("chain") != "digest"]}
    assert parse_table(listing).comment is None
    assert comment_of("table inet sptun {\n}\n") is None


# --- injection --------------------------------------------------------------------------------------

BAD_NAMES = ['sptun0"', "a;b", "a\nb", "a\tb", "", 'x" ; flush ruleset ; "', "a}b", "a{b", "a'b", "a$b",
             "a#b", "a\\b", "a@b", "a\x00b", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_quote_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(ValueError):
        _q(name)


@pytest.mark.parametrize("name", ["sptun0", "sptun-*", "app.example.test", "wg_1", "a:b/c", "app.test * tcp/443"])
def test_quote_accepts_safe_names(name: str) -> None:
    assert _q(name) == f'"{name}"'


@pytest.mark.parametrize("make", [
    lambda: server('sptun0" ; flush ruleset ; "', []),
    lambda: server("sptun0", [(Forward('app" accept ; "', None, TCP443), B3)]),
    lambda: server("sptun0", [(Forward(APP, "198.51.100.10 accept; flush ruleset;", TCP443), B3)]),
    lambda: server("sptun0", [(Forward(APP, None, TCP443), ("10.99.0.2 }; flush ruleset; {",))]),
    lambda: server("sptun0", [(Forward(APP, None, TCP443), ("10.99.0.2", "10.99.0.3, 3 : 1.2.3.4"))]),
    lambda: server("sptun0", [(Forward(APP, "2001:db8::1 } ; flush ruleset", TCP443, 6), B3)]),
    lambda: rotation_update(0, [], ["10.99.0.2 } ; flush ruleset"]),
    lambda: render_client({"sptun-a; flush ruleset": 1}, (TCP443,)),
], ids=["interface", "domain", "listen", "backend", "backend-in-map", "listen-ipv6", "update", "client-interface"])
def test_render_refuses_injection(make: Callable[[], str]) -> None:
    with pytest.raises(ValueError):
        make()


@settings(FUZZ, max_examples=FUZZ.max_examples // 4)  # a small regex: fewer will do
@given(st.text(max_size=20))
def test_fuzz_quote(name: str) -> None:
    try:
        quoted = _q(name)
    except ValueError:
        return
    inner = quoted[1:-1]
    assert quoted == f'"{inner}"' and inner == name and name
    assert not any(c in inner for c in "\"';\t\n\r{}#\\$@")


def test_overlay_sources_come_only_through_the_tunnel() -> None:
    ruleset = server(*SERVER_CASES["server_dual_stack"])
    assert chain(ruleset, "antispoof") == [
        'iifname != { "sptun0", "lo" } ip saddr 10.99.0.0/16 counter drop comment "overlay sources come only through the tunnel"',
        'iifname != { "sptun0", "lo" } ip6 saddr fd99::/64 counter drop comment "overlay sources come only through the tunnel"',
    ]
    assert "type filter hook prerouting priority raw;" in ruleset  # before conntrack and DNAT see it
    fwd = [Forward(APP, "198.51.100.10", TCP443)]
    assert server_comment("sptun0", fwd, overlays=("10.99.0.0/16",)) != server_comment("sptun0", fwd, overlays=("10.98.0.0/16",))


def test_module_constants() -> None:
    assert (nft.FAMILY, nft.TABLE, nft.CLIENT_PREFIX) == ("inet", "sptun", "sptun-")


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft for a scratch namespace")
def test_goldens_load_in_a_real_kernel() -> None:
    """`nft -c` (check, no commit) of every golden, in a namespace of our own."""
    ns = f"sptg{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for path in sorted(GOLDEN.glob("*.nft")):
            proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-c", "-f", str(path)], capture_output=True, text=True)
            assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
