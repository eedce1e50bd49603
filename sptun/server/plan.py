"""The server's planner: the interface, a peer per lease, and the `inet sptun` table whose
maps hold each domain's backends in rotation. Pure: plain values in, changes out, [] once
the kernel has it all."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sptun import nft
from sptun.changes import (
    Change,
    CreateLink,
    DeleteLink,
    DeleteProxyRouting,
    DeleteTable,
    LinkState,
    LinkUp,
    LoadTable,
    ProxyCommands,
    ReleaseUnreplied,
    SetAddresses,
    SetKey,
    SetProxyRouting,
    SetSysctl,
    StartProxy,
    StopProxy,
    UpdatePeer,
    UpdateRotation,
)
from sptun.config import MTU, ServerConfig
from sptun.leases import Lease
from sptun import sni
from sptun.wg import Peer, plan_peers

IP_FORWARD = "net/ipv4/ip_forward"
IP6_FORWARD = "net/ipv6/conf/all/forwarding"  # a dual-stack server's; README: what it does to router advertisements


def forwards(cfg: ServerConfig) -> list[nft.Forward]:
    """Each domain's public addresses and ports that the kernel DNATs, in config order: all
    but those shared with other domains (routed by SNI: sni.groups)."""
    shared = {(g.listen, g.port) for g in sni.groups(cfg)}
    result = []
    for domain in cfg.domains:
        # None: any local address, once per family the server forwards
        addresses: list[tuple[str | None, int]] = [(str(a), a.version) for a in domain.listen]
        addresses = addresses or [(None, family) for family in cfg.families]
        for address, family in addresses:
            for port in domain.ports:
                if (address, port) not in shared:
                    result.append(nft.Forward(domain.name, address, port, family))
    return result


def rotations_by_family(cfg: ServerConfig, leases: Iterable[Lease],
                        up: Callable[[Lease, int], bool] = lambda lease, family: True) -> dict[int, dict[str, frozenset[str]]]:
    """By family, each domain's backends at the addresses a forward of that family reaches:
    the leases' own, or their IPv6 twins (only of clients whose service listens on IPv6),
    of the leases `up` in that family."""
    out: dict[int, dict[str, frozenset[str]]] = {f: {d.name: frozenset() for d in cfg.domains} for f in cfg.families}
    for lease in leases:
        ip6 = cfg.ip6_of(lease.overlay_ip) if lease.ipv6 else None
        for family, ip in ((4, lease.overlay_ip), (6, ip6)):
            if ip and family in out and lease.domain in out[family] and up(lease, family):
                out[family][lease.domain] |= {ip}
    return out


def lease_of(cfg: ServerConfig, ip: str) -> str:
    """An overlay address of either family (IPv6 in any spelling: conntrack writes it in
    full) as its IPv4 lease: the converse of rotations_by_family's twins."""
    return (cfg.ip4_of(ip) or ip) if ":" in ip else ip


def by_lease(cfg: ServerConfig, ips: Iterable[str]) -> set[str]:
    return {lease_of(cfg, ip) for ip in ips}


def by_lease_family(cfg: ServerConfig, ips: Iterable[str]) -> dict[int, set[str]]:
    """Overlay addresses as IPv4 leases, by the family the address was of."""
    out: dict[int, set[str]] = {4: set(), 6: set()}
    for ip in ips:
        out[6 if ":" in ip else 4].add(lease_of(cfg, ip))
    return out


def by_lease_counts(cfg: ServerConfig, counts: Counter[str]) -> Counter[str]:
    """Counts by overlay address of either family, summed by IPv4 lease."""
    out: Counter[str] = Counter()
    for ip, n in counts.items():
        out[lease_of(cfg, ip)] += n
    return out


@dataclass(frozen=True)
class SniWanted:
    """The SNI proxy as it should be: its config (with the servers to have in rotation) and,
    per backend, its port and who should be in its rotation."""

    config: str
    backends: tuple[tuple[str, int, frozenset[str]], ...]
    summary: str

    @property
    def digest(self) -> str | None:
        return sni.digest_of(self.config)


def sni_wanted(groups: list[sni.SniGroup], rotations: dict[int, dict[str, frozenset[str]]],
               socket_path: Path) -> SniWanted | None:
    """rotations: by family, each domain's backends in rotation (a group's family is its
    address's). None when no address is shared."""
    if not groups:
        return None
    backends = tuple((sni.backend_name(gi, d), g.port.number, rotations.get(g.family, {}).get(d, frozenset()))
                     for gi, g in enumerate(groups) for d in g.domains)
    config = sni.render(groups, {name: sorted(ips, key=nft.ip_key) for name, _, ips in backends}, socket_path)
    summary = ", ".join(f"{g.key}: {len(g.domains)} domains" for g in groups)
    return SniWanted(config, backends, summary)


def peer_of(lease: Lease, cfg: ServerConfig) -> Peer:
    """A client as a peer of the server: only its overlay addresses may come from it."""
    ip6 = cfg.ip6_of(lease.overlay_ip) if lease.ipv6 else None
    return Peer(lease.public_key, (f"{lease.overlay_ip}/32", f"{ip6}/128") if ip6 else (f"{lease.overlay_ip}/32",))


@dataclass(frozen=True)
class ServerWanted:
    interface: str
    public_key: str
    listen_port: int
    addresses: tuple[str, ...]  # the server's overlay addresses, as CIDRs, sorted (as links reads them)
    peers: tuple[Peer, ...]
    forwards: tuple[nft.Forward, ...]
    rotations: tuple[frozenset[str], ...]  # per forward: the backends that should get connections
    sni: SniWanted | None = None

    @property
    def ipv6(self) -> bool:
        """A dual-stack server: it has an IPv6 overlay address."""
        return any(":" in a for a in self.addresses)

    @property
    def proxy_mark(self) -> int | None:
        return sni.PROXY_MARK if self.sni else None

    @property
    def overlays(self) -> tuple[str, ...]:
        """The overlay prefixes, from the server's own addresses in them."""
        return tuple(str(ipaddress.ip_interface(a).network) for a in self.addresses)


@dataclass(frozen=True)
class ServerKernel:
    link: LinkState | None
    ip_forward: str
    nft_table: nft.TableState
    proxy: sni.ProxyState = sni.ProxyState()
    proxy_routing: frozenset[int] = frozenset()  # families with the rule and local route that bring replies to the proxy
    ip6_forward: str = ""


def plan(wanted: ServerWanted, kernel: ServerKernel) -> list[Change]:
    name = wanted.interface
    link = kernel.link
    if link is None or not link.ours:
        stale: list[Change] = [DeleteLink(name, "stale, not a WireGuard device of ours")] if link is not None else []
        return stale + [CreateLink(name, "")]
    changes: list[Change] = []
    if link.device.public_key != wanted.public_key or link.device.listen_port != wanted.listen_port:
        changes.append(SetKey(name, wanted.public_key, wanted.listen_port))
    if link.addresses != wanted.addresses:
        changes.append(SetAddresses(name, wanted.addresses))
    if not link.up or link.mtu != MTU:
        changes.append(LinkUp(name, MTU))
    if kernel.ip_forward != "1":
        changes.append(SetSysctl(IP_FORWARD, "1"))
    if wanted.ipv6 and kernel.ip6_forward != "1":
        changes.append(SetSysctl(IP6_FORWARD, "1"))
    changes += [UpdatePeer(name, c) for c in plan_peers(list(wanted.peers), link.device)]
    changes += plan_table(wanted, kernel.nft_table)
    changes += plan_proxy(wanted.sni, kernel, (4, 6) if wanted.ipv6 else (4,))
    return changes


def plan_proxy(wanted: SniWanted | None, kernel: ServerKernel, families: tuple[int, ...] = (4,)) -> list[Change]:
    """The SNI proxy: started (or reloaded) when its structure changes; otherwise who is in
    its rotations changes through its runtime API. After the table, whose mark it needs."""
    proxy = kernel.proxy
    changes: list[Change] = []
    if wanted is None:
        changes += [StopProxy()] if proxy.pid is not None else []
        return changes + ([DeleteProxyRouting()] if kernel.proxy_routing else [])
    changes += [] if kernel.proxy_routing >= set(families) else [SetProxyRouting(families)]
    if proxy.pid is None or proxy.digest != wanted.digest:
        return changes + [StartProxy(wanted.config, proxy.pid, wanted.summary)]
    return changes + plan_proxy_rotation(wanted, proxy)


def plan_proxy_rotation(wanted: SniWanted | None, proxy: sni.ProxyState) -> list[Change]:
    """Who is in the running proxy's rotations, through its runtime API; nothing if it does
    not run this structure (a pass starts or reloads it)."""
    if wanted is None or proxy.pid is None or proxy.digest != wanted.digest:
        return []
    commands = [c for name, port, ips in wanted.backends
                for c in sni.rotation_commands(name, port, proxy.backends.get(name, {}), ips)]
    if not commands:
        return []
    ready = {name: {s.address for s in servers.values() if s.ready} for name, servers in proxy.backends.items()}
    came = {ip for name, _, ips in wanted.backends for ip in ips - ready.get(name, set())}
    gone = {ip for name, _, ips in wanted.backends for ip in ready.get(name, set()) - ips}
    # The proxy's source ports come round again within seconds (one browser address, one
    # backend): a new connection that reuses the ports of one a backend left unanswered
    # would look like a retransmission to the passive check. So a backend that comes back
    # loses those entries first, and one that leaves loses them once no connection starts.
    return [*releases(came), ProxyCommands(tuple(commands)), *releases(gone)]


def releases(backends: set[str]) -> list[Change]:
    return [ReleaseUnreplied(tuple(sorted(backends, key=nft.ip_key)))] if backends else []


def plan_teardown(interface: str, has_link: bool, has_table: bool, proxy: bool = False,
                  proxy_routing: bool = False) -> list[Change]:
    """What `down` removes: the SNI proxy and the table first (no more connections into the
    overlay), then the interface."""
    changes: list[Change] = [StopProxy()] if proxy else []
    changes += [DeleteTable()] if has_table else []
    changes += [DeleteProxyRouting()] if proxy_routing else []
    return changes + ([DeleteLink(interface, "down")] if has_link else [])


def plan_table(wanted: ServerWanted, table: nft.TableState) -> list[Change]:
    """A new structure (domains, addresses, ports) reloads the table; a change of who is in
    rotation is made in place: map elements and one rule, atomically, no reload."""
    fwds = list(wanted.forwards)
    mark = wanted.proxy_mark
    if (table.comment != nft.server_comment(wanted.interface, fwds, mark, wanted.overlays)
            or set(table.handles) != {f.key for f in fwds}):
        rotations = [sorted(w, key=nft.ip_key) for w in wanted.rotations]
        summary = ", ".join(f"{f.domain} {f.port}: {len(r)}" for f, r in zip(fwds, rotations, strict=True))
        return [LoadTable(nft.render_server(wanted.interface, fwds, rotations, mark, wanted.overlays), summary or "no domains",
                          fresh=not table.exists)]
    changes: list[Change] = []
    gone: set[str] = set()
    for i, (f, current) in enumerate(zip(fwds, table.rotations(fwds), strict=True)):
        new = nft.next_rotation(current, set(wanted.rotations[i]))
        if new != current:
            changes.append(UpdateRotation(i, f.key, tuple(current), tuple(new), f.family))
            gone |= set(current) - set(new)
    # Then, with no new connection going there any more, those it never answered: a browser's
    # retransmitted SYN finds no entry pinning it to the backend that left.
    return changes + releases(gone)
