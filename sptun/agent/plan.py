"""The agent's planner: what turns the kernel as observed into the tunnels wanted. Pure: it
takes plain values and returns changes, and [] once the kernel has everything."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from sptun import nft
from sptun.changes import (
    AddRule,
    Change,
    CreateLink,
    DeleteLink,
    DeleteRule,
    DeleteTable,
    LinkState,
    LinkUp,
    LoadTable,
    SetAddresses,
    SetDefaultRoute,
    SetKey,
    SetSysctl,
    UpdatePeer,
)
from sptun.config import MTU, Port
from sptun.discovery import ServerRecord
from sptun.wg import Peer, PeerChange, plan_peers

RULE_PRIORITY = 5170  # our `ip rule`s sit at this priority, and only ours
# And, after them, one rule per tunnel and family with no mark: a reply's first route lookup
# happens before nft restores its mark (then the output chain routes it again, by the mark).
# Without it, that first lookup needs a default route in the main table, which a host with
# no IPv6 (or no IPv4) uplink lacks: the reply to a browser of that family would never leave.
FALLBACK_PRIORITY = 5171
PREFIX = nft.CLIENT_PREFIX
LOOSE_RP_FILTER = "2"  # a browser's address routes out by the default route, not by the tunnel


def interface_name(server_ip: str) -> str:
    """sptun-<hex of the IPv4 address>: stable across restarts, 14 characters."""
    address = ipaddress.ip_address(server_ip)
    if address.version == 4:
        return f"{PREFIX}{int(address):08x}"
    return f"{PREFIX}{hashlib.sha256(address.packed).hexdigest()[:8]}"


def endpoint(server: ServerRecord) -> str:
    return f"[{server.ip}]:{server.port}" if ":" in server.ip else f"{server.ip}:{server.port}"


@dataclass(frozen=True)
class TunnelWanted:
    """A registered tunnel: the server, and what it assigned us."""

    server: ServerRecord
    overlay_ip: str
    server_key: str
    kick: bool = False  # the server lost our session: re-add the peer for a fresh handshake
    overlay_ip6: str | None = None  # with a dual-stack server: our /128 in its IPv6 overlay

    @property
    def ifname(self) -> str:
        return interface_name(self.server.ip)

    @property
    def sources(self) -> tuple[str, ...]:
        """Our addresses in its overlay, as CIDRs: the sources of each family's rule."""
        return (f"{self.overlay_ip}/32",) + ((f"{self.overlay_ip6}/128",) if self.overlay_ip6 else ())


@dataclass(frozen=True)
class AgentWanted:
    public_key: str
    ports: tuple[Port, ...]
    keepalive: int
    tunnels: tuple[TunnelWanted, ...] = ()


@dataclass(frozen=True)
class Rule:
    mark: int  # also the number of the routing table; 0: any mark (a fallback rule)
    src: str | None
    route_table: int
    priority: int = RULE_PRIORITY


@dataclass(frozen=True)
class AgentKernel:
    """What the kernel holds of ours: every `sptun-*` link, our rules, our table's digest."""

    links: dict[str, LinkState] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    nft_digest: str | None = None  # the loaded nft table's digest comment; None: none of ours
    nft_loaded: bool = False


def peer_of(tunnel: TunnelWanted, keepalive: int) -> Peer:
    """The server as our peer: browsers' connections come through it from any address."""
    return Peer(tunnel.server_key, ("0.0.0.0/0", "::/0") if tunnel.overlay_ip6 else ("0.0.0.0/0",),
                endpoint(tunnel.server), keepalive)


def rules_of(tunnel: TunnelWanted, mark: int) -> list[Rule]:
    return [rule for src in tunnel.sources for rule in (Rule(mark, src, mark), Rule(0, src, mark, FALLBACK_PRIORITY))]


def plan(wanted: AgentWanted, kernel: AgentKernel) -> list[Change]:
    """Links first, then each tunnel's rule and table entry, and its peer last: the peer
    starts the handshake, after which the server sends connections, so replies must already
    find their way back. What depends on a link that does not exist yet waits for the next
    round (the interface index names the mark and the routing table)."""
    changes: list[Change] = []
    by_name = {t.ifname: t for t in wanted.tunnels}
    for name in sorted(kernel.links):
        if name not in by_name:
            changes.append(DeleteLink(name, "no tunnel wants it"))
    marks: dict[str, int] = {}
    for name, tunnel in sorted(by_name.items()):
        found = kernel.links.get(name)
        if found is None or not found.ours:
            if found is not None:
                changes.append(DeleteLink(name, "stale, not a WireGuard device of ours"))
            changes.append(CreateLink(name, f"to {tunnel.server.ip}"))
            continue
        link = found
        mark = nft.client_mark(link.index)
        marks[name] = mark
        if link.device.public_key != wanted.public_key:
            changes.append(SetKey(name, wanted.public_key))
        if link.addresses != tuple(sorted(tunnel.sources)):
            changes.append(SetAddresses(name, tuple(sorted(tunnel.sources))))
        if not link.up or link.mtu != MTU:
            changes.append(LinkUp(name, MTU))
        if link.rp_filter != LOOSE_RP_FILTER:
            changes.append(SetSysctl(f"net/ipv4/conf/{name}/rp_filter", LOOSE_RP_FILTER))
        if link.default_route != link.index:
            changes.append(SetDefaultRoute(mark, name))
        if tunnel.overlay_ip6 and link.default_route6 != link.index:
            changes.append(SetDefaultRoute(mark, name, 6))

    # Exactly two rules per tunnel and family: from its overlay address with its mark, to its
    # table; and the fallback, with no mark.
    wanted_rules = {rule: t.ifname for t in wanted.tunnels if t.ifname in marks for rule in rules_of(t, marks[t.ifname])}
    for rule in kernel.rules:
        if rule not in wanted_rules:
            changes.append(DeleteRule(rule.priority, rule.mark, rule.src, rule.route_table))
    for rule, name in sorted(wanted_rules.items(), key=lambda item: (item[1], item[0].priority)):
        if rule not in kernel.rules:
            changes.append(AddRule(rule.priority, rule.mark, rule.src or "", name, rule.route_table))

    ruleset = nft.render_client(marks, wanted.ports)
    table_ready = kernel.nft_digest == nft.comment_of(ruleset)
    if not table_ready:
        changes.append(LoadTable(ruleset, f"{len(marks)} tunnels", fresh=not kernel.nft_loaded))

    for name, tunnel in sorted(by_name.items()):
        ready = kernel.links.get(name)
        if ready is None or not ready.ours or not table_ready:
            continue
        if any(rule not in kernel.rules for rule in rules_of(tunnel, marks[name])):
            continue  # its replies would not find their way back yet
        peer = peer_of(tunnel, wanted.keepalive)
        peer_changes = plan_peers([peer], ready.device)
        if tunnel.kick and not peer_changes:
            # WireGuard would wait for its 2-minute rekey; a re-added peer handshakes at once.
            peer_changes = [PeerChange("remove", peer), PeerChange("add", peer)]
        changes += [UpdatePeer(name, c) for c in peer_changes]
    return changes


def plan_teardown(kernel: AgentKernel) -> list[Change]:
    """Everything of ours goes: links, rules (and their tables), the nft table."""
    changes: list[Change] = [DeleteLink(name, "down") for name in sorted(kernel.links)]
    changes += [DeleteRule(r.priority, r.mark, r.src, r.route_table) for r in kernel.rules]
    if kernel.nft_loaded:
        changes.append(DeleteTable())
    return changes
