"""The server's planner: the interface, a peer per lease, and the `inet sptun` table whose
maps hold each domain's backends in rotation. Pure: plain values in, changes out, [] once
the kernel has it all."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sptun import nft
from sptun.changes import (
    Change,
    CreateLink,
    DeleteLink,
    DeleteTable,
    LinkState,
    LinkUp,
    LoadTable,
    ReleaseUnreplied,
    SetAddresses,
    SetKey,
    SetSysctl,
    UpdatePeer,
    UpdateRotation,
)
from sptun.config import MTU, ServerConfig
from sptun.leases import Lease
from sptun.wg import Peer, plan_peers

IP_FORWARD = "net/ipv4/ip_forward"


def forwards(cfg: ServerConfig) -> list[nft.Forward]:
    """Each domain's public addresses and ports, in config order."""
    result = []
    for domain in cfg.domains:
        addresses: list[str | None] = [str(a) for a in domain.listen] or [None]  # None: any local address
        for address in addresses:
            for port in domain.ports:
                result.append(nft.Forward(domain.name, address, port))
    return result


def peer_of(lease: Lease) -> Peer:
    """A client as a peer of the server: only its overlay address may come from it."""
    return Peer(lease.public_key, (f"{lease.overlay_ip}/32",))


@dataclass(frozen=True)
class ServerWanted:
    interface: str
    public_key: str
    listen_port: int
    address: str  # the server's overlay address, as a CIDR
    peers: tuple[Peer, ...]
    forwards: tuple[nft.Forward, ...]
    rotations: tuple[frozenset[str], ...]  # per forward: the backends that should get connections


@dataclass(frozen=True)
class ServerKernel:
    link: LinkState | None
    ip_forward: str
    nft_table: nft.TableState


def plan(wanted: ServerWanted, kernel: ServerKernel) -> list[Change]:
    name = wanted.interface
    link = kernel.link
    if link is None or not link.ours:
        stale: list[Change] = [DeleteLink(name, "stale, not a WireGuard device of ours")] if link is not None else []
        return stale + [CreateLink(name, "")]
    changes: list[Change] = []
    if link.device.public_key != wanted.public_key or link.device.listen_port != wanted.listen_port:
        changes.append(SetKey(name, wanted.public_key, wanted.listen_port))
    if link.addresses != (wanted.address,):
        changes.append(SetAddresses(name, (wanted.address,)))
    if not link.up or link.mtu != MTU:
        changes.append(LinkUp(name, MTU))
    if kernel.ip_forward != "1":
        changes.append(SetSysctl(IP_FORWARD, "1"))
    changes += [UpdatePeer(name, c) for c in plan_peers(list(wanted.peers), link.device)]
    changes += plan_table(wanted, kernel.nft_table)
    return changes


def plan_teardown(interface: str, has_link: bool, has_table: bool) -> list[Change]:
    """What `down` removes: the table first (no more DNAT into the overlay), then the interface."""
    changes: list[Change] = [DeleteTable()] if has_table else []
    return changes + ([DeleteLink(interface, "down")] if has_link else [])


def plan_table(wanted: ServerWanted, table: nft.TableState) -> list[Change]:
    """A new structure (domains, addresses, ports) reloads the table; a change of who is in
    rotation is made in place: map elements and one rule, atomically, no reload."""
    fwds = list(wanted.forwards)
    if table.comment != nft.server_comment(wanted.interface, fwds) or set(table.handles) != {f.key for f in fwds}:
        rotations = [sorted(w, key=ipaddress.IPv4Address) for w in wanted.rotations]
        summary = ", ".join(f"{f.domain} {f.port}: {len(r)}" for f, r in zip(fwds, rotations, strict=True))
        return [LoadTable(nft.render_server(wanted.interface, fwds, rotations), summary or "no domains",
                          fresh=not table.exists)]
    changes: list[Change] = []
    gone: set[str] = set()
    for i, (f, current) in enumerate(zip(fwds, table.rotations(fwds), strict=True)):
        new = nft.next_rotation(current, set(wanted.rotations[i]))
        if new != current:
            changes.append(UpdateRotation(i, f.key, tuple(current), tuple(new)))
            gone |= set(current) - set(new)
    # Then, with no new connection going there any more, those it never answered: a browser's
    # retransmitted SYN finds no entry pinning it to the backend that left.
    return changes + [ReleaseUnreplied(ip) for ip in sorted(gone, key=ipaddress.IPv4Address)]
