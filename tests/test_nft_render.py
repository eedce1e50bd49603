"""sptun.nft rendering: golden rulesets, the self-hash in the table comment, and no injection.

Rewrite the golden files after an intended change with UPDATE_GOLDEN=1, then read the diff.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sptun import nft
from sptun.config import Port
from sptun.nft import MARK_BASE, MARK_MASK, Forward, _comment, _q, client_mark, render_client, render_server

FUZZ = settings.get_profile("sptun")

GOLDEN = Path(__file__).parent / "golden"
TCP443, UDP443, TCP80 = Port("tcp", 443), Port("udp", 443), Port("tcp", 80)
APP = "app.example.test"
B3 = ("10.99.0.2", "10.99.0.3", "10.99.0.4")

SERVER_CASES = {
    "server_listen_tcp443_3_backends": ("sptun0", [Forward(APP, "198.51.100.10", TCP443, B3)]),
    "server_any_address": ("sptun0", [Forward(APP, None, TCP443, B3)]),
    "server_udp443": ("sptun0", [Forward(APP, "198.51.100.10", UDP443, B3)]),
    "server_1_backend": ("sptun0", [Forward(APP, "198.51.100.10", TCP443, ("10.99.0.7",))]),
    "server_0_backends": ("sptun0", [Forward(APP, "198.51.100.10", TCP443, ())]),
    "server_two_domains": ("wg-pub", [
        Forward(APP, "198.51.100.10", TCP443, B3),
        Forward(APP, "198.51.100.10", TCP80, B3),
        Forward("shop.example.test", "198.51.100.11", TCP443, ("10.99.0.9", "10.99.0.5")),
        Forward("idle.example.test", None, Port("tcp", 8443), ()),
    ]),
}
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
    interface, forwards = SERVER_CASES[name]
    check_golden(name, render_server(interface, forwards))


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
    return [r for r in chain(ruleset, "prerouting") if "dnat" in r]


def test_round_robin_over_the_backends_in_order() -> None:
    (rule,) = dnat_rules(render_server("sptun0", SERVER_CASES["server_listen_tcp443_3_backends"][1]))
    assert "ip daddr 198.51.100.10 tcp dport 443" in rule
    assert "dnat ip to numgen inc mod 3 map { 0 : 10.99.0.2, 1 : 10.99.0.3, 2 : 10.99.0.4 }" in rule
    assert rule.endswith(f'comment "{APP}"')


def test_any_address_matches_local_addresses() -> None:
    (rule,) = dnat_rules(render_server("sptun0", SERVER_CASES["server_any_address"][1]))
    assert "fib daddr type local" in rule and "ip daddr" not in rule


def test_one_backend_is_a_plain_dnat() -> None:
    (rule,) = dnat_rules(render_server("sptun0", SERVER_CASES["server_1_backend"][1]))
    assert "numgen" not in rule and "dnat ip to 10.99.0.7 " in rule


def test_no_backends_no_dnat() -> None:
    ruleset = render_server("sptun0", SERVER_CASES["server_0_backends"][1])
    assert chain(ruleset, "prerouting") == [] and "dnat ip to" not in ruleset


def test_udp_forward() -> None:
    (rule,) = dnat_rules(render_server("sptun0", SERVER_CASES["server_udp443"][1]))
    assert " udp dport 443 " in rule and "tcp" not in rule


@pytest.mark.parametrize("name", SERVER_CASES)
def test_clients_cannot_use_the_forwarding_from_inside_the_overlay(name: str) -> None:
    """Isolation: a client that sends to the server's overlay address (a local address) or to the
    public address through its tunnel must not be DNATed on to another client."""
    interface, forwards = SERVER_CASES[name]
    for rule in dnat_rules(render_server(interface, forwards)):
        assert rule.startswith(f'iifname != "{interface}" '), rule


def test_server_isolation_rules() -> None:
    ruleset = render_server("sptun0", SERVER_CASES["server_listen_tcp443_3_backends"][1])
    assert chain(ruleset, "forward") == [
        'iifname "sptun0" ct status dnat accept',
        'iifname "sptun0" counter drop comment "clients reach only their forwarded connections"',
        'oifname "sptun0" ct status dnat accept',
        'oifname "sptun0" counter drop comment "nothing else enters the overlay"',
    ]
    assert chain(ruleset, "input")[-1].startswith('iifname "sptun0" counter drop')


def test_only_the_sptun_table() -> None:
    for ruleset in [render_server("sptun0", f) for _, f in SERVER_CASES.values()] + \
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


def test_client_ports_sorted() -> None:
    ruleset = render_client(*CLIENT_CASES["client_several_ports"])
    assert 'meta l4proto . th dport { tcp . 80, tcp . 443, tcp . 8080, udp . 443 } accept' in ruleset


def test_client_mark() -> None:
    assert client_mark(5) == 0x53700005
    assert client_mark(5) & MARK_MASK == MARK_BASE


# --- the hash in the comment ----------------------------------------------------------------------


def body_and_digest(ruleset: str) -> tuple[str, str]:
    m = re.search(r'\tcomment "sptun (?:server|agent) ([0-9a-f]{16})"\n(.*)\n}\n\Z', ruleset, re.S)
    assert m
    return m.group(2), m.group(1)


@pytest.mark.parametrize("ruleset", [render_server(i, f) for i, f in SERVER_CASES.values()]
                         + [render_client(m, p) for m, p in CLIENT_CASES.values()])
def test_digest_is_the_hash_of_the_body(ruleset: str) -> None:
    body, digest = body_and_digest(ruleset)
    assert hashlib.sha256(body.encode()).hexdigest()[:16] == digest
    assert _comment(ruleset) == f"sptun {'server' if 'server' in ruleset.split(chr(10))[3] else 'agent'} {digest}"


def test_digest_is_stable() -> None:
    forwards = SERVER_CASES["server_two_domains"][1]
    assert render_server("wg-pub", forwards) == render_server("wg-pub", list(forwards))
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


@pytest.mark.parametrize("change", [
    lambda: render_server("sptun0", [Forward(APP, "198.51.100.10", TCP443, B3[:2])]),
    lambda: render_server("sptun0", [Forward(APP, "198.51.100.10", TCP443, B3[::-1])]),
    lambda: render_server("sptun0", [Forward(APP, "198.51.100.11", TCP443, B3)]),
    lambda: render_server("sptun0", [Forward(APP, "198.51.100.10", TCP80, B3)]),
    lambda: render_server("sptun1", [Forward(APP, "198.51.100.10", TCP443, B3)]),
    lambda: render_server("sptun0", [Forward("b.test", "198.51.100.10", TCP443, B3)]),
    lambda: render_server("sptun0", []),
], ids=["fewer-backends", "other-order", "other-address", "other-port", "other-interface", "other-domain", "none"])
def test_digest_changes_with_the_body(change: Callable[[], str]) -> None:
    base = render_server("sptun0", [Forward(APP, "198.51.100.10", TCP443, B3)])
    assert body_and_digest(change())[1] != body_and_digest(base)[1]


def test_client_digest_changes_with_the_body() -> None:
    base = body_and_digest(render_client({"sptun-s1": 0x53700005}, (TCP443,)))[1]
    assert body_and_digest(render_client({"sptun-s1": 0x53700006}, (TCP443,)))[1] != base
    assert body_and_digest(render_client({"sptun-s2": 0x53700005}, (TCP443,)))[1] != base
    assert body_and_digest(render_client({"sptun-s1": 0x53700005}, (TCP80,)))[1] != base
    assert body_and_digest(render_client({}, (TCP443,)))[1] != base


def test_comment_read_back_from_nft_list_output() -> None:
    """`nft list table inet sptun` prints the comment indented inside the table."""
    listed = 'table inet sptun {\n\tcomment "sptun server 0123456789abcdef"\n\n\tchain prerouting {\n\t}\n}\n'
    assert _comment(listed) == "sptun server 0123456789abcdef"
    assert _comment("table inet sptun {\n}\n") is None
    assert _comment('table inet sptun {\n\tchain x {\n\t\tcounter comment "sptun server x"\n\t}\n}\n') is None


# --- injection --------------------------------------------------------------------------------------

BAD_NAMES = ['sptun0"', 'a b', "a;b", "a\nb", "a\tb", "", 'x" ; flush ruleset ; "', "a}b", "a{b", "a'b", "a$b",
             "a#b", "a\\b", "a@b", "a\x00b", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_quote_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(ValueError):
        _q(name)


@pytest.mark.parametrize("name", ["sptun0", "sptun-*", "app.example.test", "wg_1", "a:b/c"])
def test_quote_accepts_safe_names(name: str) -> None:
    assert _q(name) == f'"{name}"'


@pytest.mark.parametrize("make", [
    lambda: render_server('sptun0" ; flush ruleset ; "', []),
    lambda: render_server("sptun0", [Forward('app" accept ; "', None, TCP443, B3)]),
    lambda: render_server("sptun0", [Forward(APP, "198.51.100.10 accept; flush ruleset;", TCP443, B3)]),
    lambda: render_server("sptun0", [Forward(APP, None, TCP443, ("10.99.0.2 }; flush ruleset; {",))]),
    lambda: render_server("sptun0", [Forward(APP, None, TCP443, ("10.99.0.2", "10.99.0.3, 3 : 1.2.3.4"))]),
    lambda: render_server("sptun0", [Forward(APP, "2001:db8::1", TCP443, B3)]),
    lambda: render_client({"sptun-a; flush ruleset": 1}, (TCP443,)),
], ids=["interface", "domain", "listen", "backend", "backend-in-map", "listen-ipv6", "client-interface"])
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
    assert not any(c in inner for c in "\"'; \t\n\r{}#\\$@")


def test_module_constants() -> None:
    assert (nft.FAMILY, nft.TABLE, nft.CLIENT_PREFIX) == ("inet", "sptun", "sptun-")
