"""The `inet sptun` nftables table: rendered as text by pure functions, loaded in one `nft -f -`.

sptun touches no other table. A rendered table carries a hash of its structure in its
comment, so a reload that would change nothing is skipped, even by a fresh process. On a
server, who is in each domain's rotation changes in place (map elements and one rule), not
by a reload.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Protocol

from sptun.config import MTU, Port
from sptun.errors import CommandError, SptunError
from sptun.run import run

log = logging.getLogger("sptun")

TABLE = "sptun"
FAMILY = "inet"
# Client-side connection marks: MARK_BASE | ifindex; the same number is the routing table.
MARK_BASE = 0x53700000
MARK_MASK = 0xFFF00000
# Server-side connection mark: the one bit sptun's own DNAT sets on the connection it
# forwards, with an OR that keeps every other bit of the ct mark (other software's). The
# forward chain lets overlay traffic through only with this bit, so a DNAT that other
# software makes in its own table (Docker, kube-proxy) never opens a path through the
# overlay. It lies in MARK_MASK but not in MARK_BASE, so no client mark carries it.
DNAT_MARK = 0x08000000
# And the bit the SNI proxy's own connections into the overlay get (its output chain), so
# that their unanswered ones can be released too when a backend leaves or comes back.
PROXIED_MARK = 0x02000000
OUR_CONNECTIONS = DNAT_MARK | PROXIED_MARK
SUSPECTS = "suspects"  # server: backends whose connections go unanswered, as the kernel saw it
SUSPECT_FOR = 2  # s an unanswered SYN keeps a backend in SUSPECTS
ANSWERED = "answered"  # server: backends that answered a forwarded connection (a SYN-ACK), as the kernel saw it
ANSWERED_FOR = 2  # s a SYN-ACK keeps a backend in ANSWERED
SUSPECTS6, ANSWERED6 = "suspects6", "answered6"  # the same, of IPv6 forwards (by their IPv6 overlay addresses)
CLIENT_PREFIX = "sptun-"
TUNNEL_MSS = {4: MTU - 40, 6: MTU - 60}  # the tunnel's MTU less the IP (by family) and TCP headers


@dataclass(frozen=True)
class Forward:
    """One public address (None = any local address of the family) and port of a domain."""

    domain: str
    listen: str | None
    port: Port
    family: int = 4  # of the address, and of the overlay addresses in its rotation

    @property
    def key(self) -> str:
        """Names its rule (as the rule's comment), so an update finds it again."""
        return f"{self.domain} {self.listen or ('*' if self.family == 4 else '*6')} {self.port}"

    @property
    def ip(self) -> str:
        """nft's word for the family's header: ip or ip6."""
        return "ip" if self.family == 4 else "ip6"


def _q(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:/* -]+", name):
        raise ValueError(f"refusing to put {name!r} in an nft ruleset")
    return f'"{name}"'


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def _ip(address: str) -> str:
    """An IP address in canonical form, checked: nothing else goes into a rule unquoted.
    (IPv4 by a regular expression: ipaddress.IPv4Address costs most of a 10k-backend render.)"""
    if isinstance(address, str) and _IPV4.fullmatch(address):
        return address
    try:
        if isinstance(address, str) and ":" in address and str(ipaddress.IPv6Address(address)) == address:
            return address
    except ValueError:
        pass
    raise ValueError(f"refusing to put {address!r} in an nft ruleset as an IP address")


def server_rule(interface: str, index: int, f: Forward, size: int) -> str:
    """The prerouting rule of forward `index`: it counts the forward's connections and jumps to
    the forward's own chain fwdINDEX, which holds the DNAT rule (dnat_rule). With no backend
    that chain is empty: the packet goes on to the host, where nothing listens. `size` is
    not part of this rule: a change of the rotation's size remakes only the small chain."""
    # Not from the overlay: a client sending to the server's overlay address (a local address)
    # or to a public address through its tunnel would otherwise be forwarded on to other clients.
    match = f"iifname != {_q(interface)} " + (
        f"{f.ip} daddr {_ip(f.listen)}" if f.listen else f"meta nfproto ipv{f.family} fib daddr type local")
    return f"{match} {f.port.proto} dport {f.port.number} counter jump fwd{index} comment {_q(f.key)}"


def dnat_rule(index: int, size: int, family: int = 4) -> list[str]:
    """The rules of chain fwdINDEX: mark the connection as sptun's (DNAT_MARK), then DNAT over
    the first `size` elements of map @rrINDEX. The mark is set on the connection, so its
    replies carry it too."""
    ip = "ip" if family == 4 else "ip6"
    return [f"ct mark set ct mark or {DNAT_MARK:#010x} dnat {ip} to numgen inc mod {size} map @rr{index}"] if size else []


def _wrap(kind: str, body: str, digest_of: str) -> str:
    """The whole load transaction: (re)create the table, with a hash of `digest_of` as comment."""
    digest = hashlib.sha256(digest_of.encode()).hexdigest()[:16]
    # Also as the comment of a rule that never runs: nft's JSON output (the one way sptun
    # reads the table) omits a table's comment, but not a rule's.
    marker = f'\tchain digest {{\n\t\treturn comment "sptun {kind} {digest}"\n\t}}'
    return (f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"
            f"table {FAMILY} {TABLE} {{\n\tcomment \"sptun {kind} {digest}\"\n{marker}\n{body}\n}}\n")


def _chains(chains: list[tuple[str, str, list[str]]]) -> str:
    lines = []
    for name, hook, rules in chains:
        lines += [f"\tchain {name} {{", f"\t\t{hook}", *[f"\t\t{rule}" for rule in rules], "\t}"]
    return "\n".join(lines)


def _server_body(interface: str, forwards: list[Forward], rotations: list[list[str]], proxy_mark: int | None,
                 overlays: tuple[str, ...] = ()) -> str:
    dev = _q(interface)
    v6 = any(f.family == 6 for f in forwards)  # IPv4-only servers keep the ruleset (and digest) they had
    ours = f"ct mark & {DNAT_MARK:#010x} == {DNAT_MARK:#010x}"
    maps = []
    for i, (f, backends) in enumerate(zip(forwards, rotations, strict=True)):
        elements = f" elements = {{ {', '.join(f'{n} : {_ip(ip)}' for n, ip in enumerate(backends))} }}" if backends else ""
        maps.append(f"\tmap rr{i} {{ typeof numgen inc mod 2 : {f.ip} daddr;{elements} }}")
    # Passive health, in the kernel: a SYN retransmitted on a connection DNATed to a backend
    # that never answered it (confirmed: not the first SYN; no reply seen), or a reset from a
    # backend on a connection it never established, puts the backend in this set for a
    # moment. The daemon reads it each health round: no probe, no conntrack dump needed.
    maps.append(f"\tset {SUSPECTS} {{ type ipv4_addr; flags dynamic, timeout; timeout {SUSPECT_FOR}s; size 65536; }}")
    # And its converse: a SYN-ACK from a backend on one of sptun's connections puts it in this
    # set for a moment. A backend in it (and not in SUSPECTS) passes its health check without
    # a probe: a backend under load is never probed, however many there are.
    maps.append(f"\tset {ANSWERED} {{ type ipv4_addr; flags dynamic, timeout; timeout {ANSWERED_FOR}s; size 65536; }}")
    if v6:
        maps.append(f"\tset {SUSPECTS6} {{ type ipv6_addr; flags dynamic, timeout; timeout {SUSPECT_FOR}s; size 65536; }}")
        maps.append(f"\tset {ANSWERED6} {{ type ipv6_addr; flags dynamic, timeout; timeout {ANSWERED_FOR}s; size 65536; }}")

    def passive(rule: str) -> list[str]:
        """A passive-health rule (written for IPv4), and its IPv6 twin if the server has IPv6."""
        twin = (rule.replace(f"@{SUSPECTS} ", f"@{SUSPECTS6} ").replace(f"@{ANSWERED} ", f"@{ANSWERED6} ")
                .replace("{ ip daddr }", "{ ip6 daddr }").replace("{ ip saddr }", "{ ip6 saddr }"))
        return [rule, twin] if v6 else [rule]
    proxied_in: list[str] = []
    proxy_chains: list[tuple[str, str, list[str]]] = []
    if proxy_mark is not None:
        # The SNI proxy (sptun.sni) connects to clients from the browser's address:
        # a client's reply to it comes back through the tunnel to an address that is not
        # local. This mark (and sni's rule and local route) deliver it to the proxy's socket.
        proxy_chains.append(("proxy", "type filter hook prerouting priority mangle; policy accept;", [
            f"iifname {dev} meta l4proto tcp socket transparent 1 meta mark set {proxy_mark:#010x} accept"]))
        # Passive health for the proxy's connections, as the forward chain has it for DNAT's.
        proxy_chains.append(("output", "type filter hook output priority filter; policy accept;", [
            f"oifname {dev} ct state new ct mark set ct mark or {PROXIED_MARK:#010x}",
            *passive(f"oifname {dev} tcp flags syn / syn,ack ct status confirmed / confirmed,seen-reply "
                     f"update @{SUSPECTS} {{ ip daddr }}")]))
        proxied_in = [*passive(f"iifname {dev} tcp flags & rst == rst ct status & assured == 0 update @{SUSPECTS} {{ ip saddr }}"),
                      *passive(f"iifname {dev} tcp flags syn,ack / syn,ack update @{ANSWERED} {{ ip saddr }}")]
    # An overlay source address comes only through the tunnel (or from the server itself):
    # a browser that spoofs one would have a client answer another client. IPv6 has no
    # rp_filter, and IPv4's may be off; this needs neither.
    antispoof = [f"iifname != {{ {dev}, \"lo\" }} {'ip6' if ':' in net else 'ip'} saddr {net} counter drop "
                 f'comment "overlay sources come only through the tunnel"' for net in overlays]
    chains = _chains([
        *([("antispoof", "type filter hook prerouting priority raw; policy accept;", antispoof)] if antispoof else []),
        *[(f"fwd{i}", f"comment {_q(f.key)}", dnat_rule(i, len(rotations[i]), f.family)) for i, f in enumerate(forwards)],
        ("prerouting", "type nat hook prerouting priority dstnat; policy accept;",
         [server_rule(interface, i, f, len(rotations[i])) for i, f in enumerate(forwards)]),
        ("forward", "type filter hook forward priority filter; policy accept;", [
            # The tunnel's MTU is lower than the browsers' and the clients' own links: clamp the MSS of
            # forwarded connections both ways, so no end relies on ICMP "fragmentation needed".
            f"oifname {dev} tcp flags syn / syn,rst tcp option maxseg size set rt mtu",
            *[f"iifname {dev} {'' if not v6 else f'meta nfproto ipv{family} '}tcp flags syn / syn,rst "
              f"tcp option maxseg size > {TUNNEL_MSS[family]} tcp option maxseg size set {TUNNEL_MSS[family]}"
              for family in ((4, 6) if v6 else (4,))],
            *passive(f"oifname {dev} {ours} tcp flags syn / syn,ack ct status confirmed / confirmed,seen-reply "
                     f"update @{SUSPECTS} {{ ip daddr }}"),
            *passive(f"iifname {dev} {ours} tcp flags & rst == rst ct status & assured == 0 update @{SUSPECTS} {{ ip saddr }}"),
            *passive(f"iifname {dev} {ours} tcp flags syn,ack / syn,ack update @{ANSWERED} {{ ip saddr }}"),
            # Only sptun's own forwards, by its mark: not `ct status dnat`, which any DNAT sets.
            f"iifname {dev} {ours} accept",
            f'iifname {dev} counter drop comment "clients reach only their forwarded connections"',
            f"oifname {dev} {ours} accept",
            f'oifname {dev} counter drop comment "nothing else enters the overlay"',
        ]),
        ("input", "type filter hook input priority filter; policy accept;", [
            *proxied_in,
            f"iifname {dev} ct state established,related accept",
            f'iifname {dev} counter drop comment "clients cannot reach the server itself"',
        ]),
        *proxy_chains,
    ])
    return "\n".join(maps + [chains])


def render_server(interface: str, forwards: list[Forward], rotations: list[list[str]],
                  proxy_mark: int | None = None, overlays: tuple[str, ...] = ()) -> str:
    """DNAT round-robin into the overlay, and isolation: through the overlay a client reaches
    nothing but the connections forwarded to it. Each forward's backends live in a named map
    that changes in place; the comment hashes the structure only, not who is in rotation.
    proxy_mark: an SNI proxy runs (sptun.sni); the mark that brings replies to it.
    overlays: the overlay prefixes (CIDRs), whose sources only the tunnel may bring."""
    structure = _server_body(interface, forwards, [[] for _ in forwards], proxy_mark, overlays)
    return _wrap("server", _server_body(interface, forwards, rotations, proxy_mark, overlays), structure)


def server_comment(interface: str, forwards: list[Forward], proxy_mark: int | None = None,
                   overlays: tuple[str, ...] = ()) -> str | None:
    return comment_of(render_server(interface, forwards, [[] for _ in forwards], proxy_mark, overlays))


def ip_key(ip: str) -> tuple[int, int]:
    """Sorts addresses of both families: IPv4 first, then by number."""
    address = ipaddress.ip_address(ip)
    return address.version, int(address)


def next_rotation(current: list[str], wanted: set[str]) -> list[str]:
    """The rotation after a change, moving as few map elements as possible: a leaving backend's
    slot takes the last backend; newcomers are appended. Pure."""
    order = list(current)
    for ip in current:
        if ip not in wanted:
            i = order.index(ip)
            order[i] = order[-1]
            order.pop()
    return order + sorted(wanted - set(order), key=ip_key)


def rotation_update(index: int, current: list[str], new: list[str], family: int = 4) -> list[str]:
    """nft commands that turn map @rrINDEX from current into new, in place. Pure.

    A change of size remakes chain fwdINDEX (`flush chain` + `add rule`): unlike `replace rule
    ... handle`, that needs no cache of the map's elements in nft, so its cost does not grow
    with the number of backends."""
    gone = [i for i in range(len(current)) if i >= len(new) or current[i] != new[i]]
    came = [i for i in range(len(new)) if i >= len(current) or current[i] != new[i]]
    lines = []
    if gone:
        lines.append(f"delete element {FAMILY} {TABLE} rr{index} {{ {', '.join(map(str, gone))} }}")
    if came:
        lines.append(f"add element {FAMILY} {TABLE} rr{index} {{ {', '.join(f'{i} : {_ip(new[i])}' for i in came)} }}")
    if len(new) != len(current):  # numgen's modulus lives in the rule
        lines.append(f"flush chain {FAMILY} {TABLE} fwd{index}")
        lines += [f"add rule {FAMILY} {TABLE} fwd{index} {rule}" for rule in dnat_rule(index, len(new), family)]
    return lines


class _Library:
    """libnftables (the library behind `nft`, package libnftables1) in this process: a change
    costs no fork and exec of `nft`, which at one change per health flip is most of its cost."""

    def __init__(self) -> None:
        import ctypes

        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)
        self.lock = threading.Lock()  # one context: one command at a time

    def run(self, text: str) -> None:
        with self.lock:
            if self.lib.nft_run_cmd_from_buffer(self.ctx, text.encode()) != 0:
                raise CommandError(["nft", "-f", "-"], 1, self.lib.nft_ctx_get_error_buffer(self.ctx).decode(errors="replace"))


@dataclass(frozen=True)
class TableState:
    """The `inet sptun` table as one read found it. Pure data."""

    exists: bool = False
    comment: str | None = None  # "sptun server DIGEST", from the digest chain
    handles: dict[str, int] = field(default_factory=dict)  # prerouting rules by comment
    maps: dict[str, list[str]] = field(default_factory=dict)  # map name -> backend of each slot
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # prerouting rules: packets, bytes

    def rotations(self, forwards: list[Forward]) -> list[list[str]]:
        return [list(self.maps.get(f"rr{i}", [])) for i in range(len(forwards))]


def parse_table(listing: dict[str, object]) -> TableState:
    """`nft -a -j list table inet sptun`, parsed. Pure."""
    handles: dict[str, int] = {}
    maps: dict[str, list[str]] = {}
    counters: dict[str, tuple[int, int]] = {}
    comment = None
    items = listing.get("nftables", [])
    for item in items if isinstance(items, list) else []:
        rule = item.get("rule")
        if rule and rule.get("chain") == "digest":
            comment = rule.get("comment")
        elif rule and rule.get("chain") == "prerouting" and "comment" in rule:
            handles[rule["comment"]] = int(rule["handle"])
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    counters[rule["comment"]] = (int(expr["counter"]["packets"]), int(expr["counter"]["bytes"]))
        nftmap = item.get("map")
        if nftmap:
            slots = {int(k): str(v) for k, v in nftmap.get("elem", [])}
            maps[nftmap["name"]] = [slots[i] for i in sorted(slots)]
    return TableState(True, comment, handles, maps, counters)


# Reading the passive-health sets: one netlink socket, one dump of each set's elements. Not
# `nft -j`: with 10k backends in ANSWERED, `nft -j list sets table inet sptun` costs ~160 ms of
# CPU per read (it fetches the rotation maps' elements too) and its JSON ~35 ms more, twice a
# second; this dump ~20 ms. (And `list set A; list set B` in one nft 1.0.6 command fails.) A
# dump that packets change under it (NLM_F_DUMP_INTR) is taken as it is: the next round reads again.
_NFT_GETSETELEM = (10 << 8) | 13  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM
_NFPROTO_INET = 1
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_LIST_TABLE, _LIST_SET, _LIST_ELEMENTS = 1, 2, 3  # NFTA_SET_ELEM_LIST_*
_LIST_ELEM = _ELEM_KEY = _DATA_VALUE = 1  # NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE
_IPV4_KEY = struct.pack("=HHHH", 12, _ELEM_KEY, 8, _DATA_VALUE)  # a key nest holding a 4-byte value, as it starts


def _nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def set_dump_request(table: str, name: str, seq: int) -> bytes:
    """The netlink request that dumps the elements of set `name` of table inet `table`. Pure."""
    body = struct.pack("=BBH", _NFPROTO_INET, 0, 0) + _nla(_LIST_TABLE, table.encode() + b"\0") + \
        _nla(_LIST_SET, name.encode() + b"\0")
    return struct.pack("=IHHII", 16 + len(body), _NFT_GETSETELEM, 0x1 | 0x300, seq, 0) + body  # REQUEST | DUMP


def _attrs(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The netlink attributes in data[start:end]: (type, value start, value end)."""
    found = []
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4 or start + length > end:
            break
        found.append((kind & 0x3FFF, start + 4, start + length))
        start += (length + 3) & ~3
    return found


_FAMILY_OF_SIZE = {4: socket.AF_INET, 16: socket.AF_INET6}  # an address key's length: its family


def parse_set_dump(data: bytes, seq: int, into: set[str]) -> bool:
    """One read of a set-element dump's replies: adds the address keys to `into`; True once the
    dump is done. An error reply raises OSError (ENOENT: no such table or set). Pure."""
    unpack_u16, inet_ntoa = struct.Struct("=H").unpack_from, socket.inet_ntoa
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, msg_seq, _ = struct.unpack_from("=IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            break
        if msg_seq == seq:
            if kind == _NLMSG_DONE:
                return True
            if kind == _NLMSG_ERROR:
                error = -struct.unpack_from("=i", data, offset + 16)[0]
                if error:
                    raise OSError(error, os.strerror(error))
                return True
            for a_kind, a_start, a_end in _attrs(data, offset + 20, offset + length):  # after nfgenmsg
                if a_kind != _LIST_ELEMENTS:
                    continue
                e_start = a_start
                while e_start + 4 <= a_end:  # each NFTA_LIST_ELEM: a loop, not _attrs (10k of them)
                    e_length = unpack_u16(data, e_start)[0]
                    if e_length < 4 or e_start + e_length > a_end:
                        break
                    if data.startswith(_IPV4_KEY, e_start + 4):  # the kernel's layout: the key first
                        into.add(inet_ntoa(data[e_start + 12:e_start + 16]))
                    else:
                        for k_kind, k_start, k_end in _attrs(data, e_start + 4, e_start + e_length):
                            if k_kind == _ELEM_KEY:
                                into.update(socket.inet_ntop(_FAMILY_OF_SIZE[v_end - v_start], data[v_start:v_end])
                                            for v_kind, v_start, v_end in _attrs(data, k_start, k_end)
                                            if v_kind == _DATA_VALUE and v_end - v_start in _FAMILY_OF_SIZE)
                                break
                    e_start += (e_length + 3) & ~3
        offset += (length + 3) & ~3
    return False


def read_sets(table: str, names: tuple[str, ...], timeout: float = 5.0) -> list[set[str]]:
    """The address elements of some sets of table inet `table`, through one netlink socket. A set
    (or table) that does not exist is empty; any other failure raises OSError."""
    found: list[set[str]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12) as sock:  # NETLINK_NETFILTER
        sock.settimeout(timeout)
        sock.bind((0, 0))
        for seq, name in enumerate(names, start=1):
            elements: set[str] = set()
            sock.send(set_dump_request(table, name, seq))
            try:
                while not parse_set_dump(sock.recv(1 << 20), seq, elements):
                    pass
            except FileNotFoundError:
                elements = set()
            found.append(elements)
    return found


class Firewall(Protocol):
    """sptun's own nftables table: one way to read it, one way to write it."""

    def read(self, chain: str | None = None) -> TableState:
        """The whole table in one listing, or one chain of it (its rules' handles and
        counters); TableState() if there is none."""
        ...

    def write(self, text: str) -> None:
        """One nft transaction (a ruleset or commands): all of it, or nothing."""
        ...

    def passive(self) -> tuple[set[str], set[str]]:
        """The backends in the server table's SUSPECTS and ANSWERED sets now (and their IPv6
        twins: addresses of both families), in one read (none if there is no table)."""
        ...

    def suspects(self) -> set[str]:
        """The SUSPECTS sets alone (both families): small, so cheap to read often."""
        ...


class Nft:
    """The real table: reads with `nft -j` (one process per read), but the passive-health
    sets, which the health loop reads ten times a second, by netlink (read_sets); writes through
    libnftables in this process (no fork per change, which at one change per health flip is
    most of a server's cost), or with `nft -f -`: where the library is missing, and for the
    agent, which changes its table rarely and would carry the library's ~4 MiB for it."""

    def __init__(self, in_process: bool = True) -> None:
        self._library: _Library | None = None
        self._library_failed = not in_process

    def read(self, chain: str | None = None) -> TableState:
        what = ["chain", FAMILY, TABLE, chain] if chain else ["table", FAMILY, TABLE]
        try:
            return parse_table(json.loads(run(["nft", "-a", "-j", "list", *what])))
        except CommandError:
            return TableState()

    def passive(self) -> tuple[set[str], set[str]]:
        # A server with no IPv6 forward has no SUSPECTS6 and ANSWERED6: they read as empty.
        suspects, answered, suspects6, answered6 = self._passive_sets((SUSPECTS, ANSWERED, SUSPECTS6, ANSWERED6))
        return suspects | suspects6, answered | answered6

    def suspects(self) -> set[str]:
        suspects, suspects6 = self._passive_sets((SUSPECTS, SUSPECTS6))
        return suspects | suspects6

    @staticmethod
    def _passive_sets(names: tuple[str, ...]) -> list[set[str]]:
        try:
            return read_sets(TABLE, names)
        except OSError as e:  # as if nobody were suspect or answering: every backend is probed
            log.debug("cannot read the passive-health sets: %s", e)
            return [set() for _ in names]

    def write(self, text: str) -> None:
        if not text.endswith("\n"):
            text += "\n"
        if self._library is None and not self._library_failed:
            try:
                self._library = _Library()
            except (OSError, AttributeError):  # no libnftables.so.1: use the nft command
                self._library_failed = True
        if self._library is None:
            run(["nft", "-f", "-"], input=text)
            return
        log.debug("[#] nft -f - (libnftables): %s", text.strip().splitlines()[0][:200] if text.strip() else "")
        self._library.run(text)


def delete_table() -> str:
    """The transaction that removes the table, whether or not it exists."""
    return f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"


def client_mark(ifindex: int) -> int:
    if ifindex & MARK_MASK:
        raise SptunError(f"interface index {ifindex} is too large for sptun's marks", hint="recreate the interface")
    return MARK_BASE | ifindex


def render_client(marks: dict[str, int], ports: tuple[Port, ...]) -> str:
    """Replies leave by the tunnel their connection came in on: the incoming interface is
    kept in the conntrack mark and restored as the fwmark that picks the routing table. Two
    servers may lease the same overlay address, so the source address alone cannot tell.
    Through a tunnel, a server reaches the published ports of the client itself, nothing else."""
    prerouting = []
    if marks:
        elements = ", ".join(f"{_q(name)} : {mark:#x}" for name, mark in sorted(marks.items()))
        prerouting.append(f"ct state new ct mark set iifname map {{ {elements} }}")
    services = ", ".join(f"{p.proto} . {p.number}" for p in sorted(ports))
    any_tunnel = _q(CLIENT_PREFIX + "*")
    tcp_ports = ", ".join(str(p.number) for p in sorted(ports) if p.proto == "tcp")
    # A published TCP port with nothing listening (the web server crashed) answers a tunnel's
    # SYN with silence, not a reset: the browser then retransmits, and the server, which sees
    # the SYN go unanswered, sends the retry to another client.
    silent = [f"iifname {any_tunnel} tcp flags syn / syn,ack tcp dport {{ {tcp_ports} }} socket transparent 0 accept",
              f'iifname {any_tunnel} tcp flags syn / syn,ack tcp dport {{ {tcp_ports} }} counter drop '
              f'comment "nothing listens: silence, not a reset"'] if tcp_ports else []
    any_tunnel = _q(CLIENT_PREFIX + "*")
    body = _chains([
        ("prerouting", "type filter hook prerouting priority mangle; policy accept;", prerouting),
        ("output", "type route hook output priority mangle; policy accept;", [
            f"ct mark & {MARK_MASK:#x} == {MARK_BASE:#x} meta mark set ct mark",
        ]),
        ("input", "type filter hook input priority filter; policy accept;", [
            f"iifname {any_tunnel} ct state established,related accept",
            *silent,
            f"iifname {any_tunnel} meta l4proto . th dport {{ {services} }} accept",
            f'iifname {any_tunnel} counter drop comment "the server reaches only the published ports"',
        ]),
        # Nothing behind the client either (its LAN, its containers): whatever the host
        # forwards otherwise is left alone.
        ("forward", "type filter hook forward priority filter; policy accept;", [
            f'iifname {any_tunnel} counter drop comment "the server reaches nothing behind the client"',
        ]),
    ])
    return _wrap("agent", body, body)


def comment_of(ruleset: str) -> str | None:
    """The digest comment a rendered ruleset carries. Pure."""
    m = re.search(r'^\s*comment "(sptun [^"]*)"', ruleset, re.M)
    return m.group(1) if m else None
