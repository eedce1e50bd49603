"""The `inet sptun` nftables table: rendered as text by pure functions, loaded in one `nft -f -`.

sptun touches no other table. A rendered table carries a hash of itself in its comment, so
a reload that would change nothing is skipped, even by a fresh process.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from sptun.config import Port
from sptun.errors import CommandError, SptunError
from sptun.run import run

TABLE = "sptun"
FAMILY = "inet"
# Client-side connection marks: MARK_BASE | ifindex; the same number is the routing table.
MARK_BASE = 0x53700000
MARK_MASK = 0xFFF00000
CLIENT_PREFIX = "sptun-"


@dataclass(frozen=True)
class Forward:
    """One public address (None = any local address) and port, spread over backends."""

    domain: str
    listen: str | None
    port: Port
    backends: tuple[str, ...]  # overlay addresses, in rotation order


def _q(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:/*-]+", name):
        raise ValueError(f"refusing to put {name!r} in an nft ruleset")
    return f'"{name}"'


def _ip(address: str) -> str:
    """An IPv4 address, checked: nothing else goes into a rule unquoted."""
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        raise ValueError(f"refusing to put {address!r} in an nft ruleset as an IPv4 address") from None


def _dnat_rule(f: Forward, dev: str) -> str:
    # Not from the overlay: a client sending to the server's overlay address (a local address)
    # or to a public address through its tunnel would otherwise be forwarded on to other clients.
    match = f"iifname != {dev} " + (f"ip daddr {_ip(f.listen)}" if f.listen else "meta nfproto ipv4 fib daddr type local")
    backends = [_ip(ip) for ip in f.backends]
    if len(backends) == 1:
        target = backends[0]
    else:
        target = "numgen inc mod {} map {{ {} }}".format(
            len(backends), ", ".join(f"{i} : {ip}" for i, ip in enumerate(backends)))
    return f"{match} {f.port.proto} dport {f.port.number} counter dnat ip to {target} comment {_q(f.domain)}"


def _wrap(kind: str, chains: list[tuple[str, str, list[str]]]) -> str:
    """The whole load transaction: (re)create the table with a hash of its body as comment."""
    body = []
    for name, hook, rules in chains:
        body.append(f"\tchain {name} {{")
        body.append(f"\t\t{hook}")
        body += [f"\t\t{rule}" for rule in rules]
        body.append("\t}")
    text = "\n".join(body)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return (f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"
            f"table {FAMILY} {TABLE} {{\n\tcomment \"sptun {kind} {digest}\"\n{text}\n}}\n")


def render_server(interface: str, forwards: list[Forward]) -> str:
    """DNAT round-robin into the overlay, and isolation: through the overlay a client reaches
    nothing but the connections forwarded to it."""
    dev = _q(interface)
    dnat = [_dnat_rule(f, dev) for f in forwards if f.backends]
    return _wrap("server", [
        ("prerouting", "type nat hook prerouting priority dstnat; policy accept;", dnat),
        ("forward", "type filter hook forward priority filter; policy accept;", [
            f"iifname {dev} ct status dnat accept",
            f'iifname {dev} counter drop comment "clients reach only their forwarded connections"',
            f"oifname {dev} ct status dnat accept",
            f'oifname {dev} counter drop comment "nothing else enters the overlay"',
        ]),
        ("input", "type filter hook input priority filter; policy accept;", [
            f"iifname {dev} ct state established,related accept",
            f'iifname {dev} counter drop comment "clients cannot reach the server itself"',
        ]),
    ])


def client_mark(ifindex: int) -> int:
    if ifindex & MARK_MASK:
        raise SptunError(f"interface index {ifindex} is too large for sptun's marks", hint="recreate the interface")
    return MARK_BASE | ifindex


def render_client(marks: dict[str, int], ports: tuple[Port, ...]) -> str:
    """Replies leave by the tunnel their connection came in on: the incoming interface is
    kept in the conntrack mark and restored as the fwmark that picks the routing table. Two
    servers may lease the same overlay address, so the source address alone cannot tell."""
    prerouting = []
    if marks:
        elements = ", ".join(f"{_q(name)} : {mark:#x}" for name, mark in sorted(marks.items()))
        prerouting.append(f"ct state new ct mark set iifname map {{ {elements} }}")
    services = ", ".join(f"{p.proto} . {p.number}" for p in sorted(ports))
    any_tunnel = _q(CLIENT_PREFIX + "*")
    return _wrap("agent", [
        ("prerouting", "type filter hook prerouting priority mangle; policy accept;", prerouting),
        ("output", "type route hook output priority mangle; policy accept;", [
            f"ct mark & {MARK_MASK:#x} == {MARK_BASE:#x} meta mark set ct mark",
        ]),
        ("input", "type filter hook input priority filter; policy accept;", [
            f"iifname {any_tunnel} ct state established,related accept",
            f"iifname {any_tunnel} meta l4proto . th dport {{ {services} }} accept",
            f'iifname {any_tunnel} counter drop comment "the server reaches only the published ports"',
        ]),
    ])


def _comment(ruleset: str) -> str | None:
    m = re.search(r'^\s*comment "(sptun [^"]*)"', ruleset, re.M)
    return m.group(1) if m else None


def loaded_comment() -> str | None:
    """The comment of the loaded table, or None if there is none."""
    try:
        return _comment(run(["nft", "list", "table", FAMILY, TABLE]))
    except CommandError:
        return None


def apply(ruleset: str) -> bool:
    """Load the table atomically unless it is already exactly this. True if it was loaded."""
    if loaded_comment() == _comment(ruleset):
        return False
    run(["nft", "-f", "-"], input=ruleset)
    return True


def delete() -> bool:
    """Remove the table; True if there was one. Touches nothing else."""
    if not table_exists():
        return False
    run(["nft", "delete", "table", FAMILY, TABLE])
    return True


def table_exists() -> bool:
    try:
        run(["nft", "list", "table", FAMILY, TABLE])
        return True
    except CommandError:
        return False
