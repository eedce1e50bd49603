"""What both roles change in the kernel, as typed values, and the one thin applier.

A planner returns a list of these; each renders as one `[#] ...` line. `Applier` is the
only code that turns them into netlink, UAPI and nft calls (through the edges), and it
can undo what it created when a one-shot `sptun up` fails halfway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from sptun import nft
from sptun.errors import SptunError
from sptun.links import LinkInfo, Links, family_of, read_sysctl, sysctl
from sptun.conntrack import ConntrackTable
from sptun.sni import PROXY_MARK, PROXY_RULE_PRIORITY, PROXY_TABLE, ProxyState
from sptun.wg import Device, PeerChange, WireGuard

log = logging.getLogger("sptun")


# --- the kernel as one read found it ------------------------------------------------------


@dataclass(frozen=True)
class LinkState:
    """One of our interfaces: the link, and its WireGuard device if it is ours."""

    name: str
    index: int
    ours: bool  # a WireGuard device of this host's backend; else a stale link in our name
    up: bool
    mtu: int
    addresses: tuple[str, ...] = ()  # CIDRs of both families, sorted
    device: Device = field(default_factory=Device)
    rp_filter: str = ""
    default_route: int | None = None  # output ifindex of the default route in the link's table, if asked
    default_route6: int | None = None  # the same, IPv6's


class Sysctls(Protocol):
    def get(self, path: str) -> str: ...

    def set(self, path: str, value: str) -> bool: ...


class ProcSysctls:
    """/proc/sys of this network namespace."""

    def get(self, path: str) -> str:
        return read_sysctl(path)

    def set(self, path: str, value: str) -> bool:
        return sysctl(path, value)


class Proxy(Protocol):
    """The server's SNI proxy (sptun.sni.HAProxy)."""

    def read(self) -> ProxyState: ...

    def start(self, config: str, replacing: int | None) -> None: ...

    def run(self, commands: list[str]) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Edges:
    """Everything a role reads from or writes to the kernel, each behind a small protocol."""

    links: Links
    wg: WireGuard
    firewall: nft.Firewall
    sysctls: Sysctls
    conntrack: ConntrackTable
    proxy: Proxy | None = None  # a server's, set by the role


def observe_link(edges: Edges, name: str, tunnel: bool = False, device: Device | None = None) -> LinkState | None:
    """One interface in full (link, addresses, device), or None if there is no such link.
    tunnel (an agent's): also its rp_filter, and the default route of the routing table
    that its mark names. device: the device as read already, and still true."""
    info: LinkInfo | None = edges.links.info(name)
    if info is None:
        return None
    ours = edges.wg.is_ours(name)
    device = (device if device is not None else edges.wg.device(name)) if ours else Device()
    route = edges.links.default_route(nft.client_mark(info.index)) if tunnel else None
    route6 = edges.links.default_route(nft.client_mark(info.index), 6) if tunnel else None
    rp_filter = edges.sysctls.get(f"net/ipv4/conf/{name}/rp_filter") if tunnel else ""
    return LinkState(name, info.index, ours, info.up, info.mtu, tuple(edges.links.addresses(info.index)),
                     device, rp_filter, route, route6)


# --- changes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateLink:
    name: str
    why: str

    def __str__(self) -> str:
        return f"create interface {self.name} {self.why}"


@dataclass(frozen=True)
class DeleteLink:
    name: str
    why: str

    def __str__(self) -> str:
        return f"delete interface {self.name} ({self.why})"


@dataclass(frozen=True)
class SetKey:
    name: str
    public_key: str
    listen_port: int | None = None

    def __str__(self) -> str:
        port = f" listen-port {self.listen_port}" if self.listen_port is not None else ""
        return f"set {self.name} key {self.public_key}{port}"


@dataclass(frozen=True)
class SetAddresses:
    name: str
    addresses: tuple[str, ...]

    def __str__(self) -> str:
        return f"set {self.name} address {', '.join(self.addresses)}"


@dataclass(frozen=True)
class LinkUp:
    name: str
    mtu: int

    def __str__(self) -> str:
        return f"set {self.name} mtu {self.mtu} up"


@dataclass(frozen=True)
class SetSysctl:
    path: str
    value: str

    def __str__(self) -> str:
        return f"sysctl {self.path}={self.value}"


@dataclass(frozen=True)
class SetDefaultRoute:
    route_table: int
    name: str
    family: int = 4

    def __str__(self) -> str:
        return f"route{'' if self.family == 4 else ' -6'} default dev {self.name} table {self.route_table:#x}"


@dataclass(frozen=True)
class AddRule:
    priority: int
    mark: int  # 0: any mark
    src: str
    name: str
    table: int | None = None  # default: the mark's number

    @property
    def route_table(self) -> int:
        return self.table if self.table is not None else self.mark

    def __str__(self) -> str:
        mark = f" fwmark {self.mark:#x}" if self.mark else ""
        return f"add rule from {self.src}{mark} lookup {self.route_table:#x} ({self.name})"


@dataclass(frozen=True)
class DeleteRule:
    """A rule of ours, and the routing table it points to."""

    priority: int
    mark: int
    src: str | None
    route_table: int

    def __str__(self) -> str:
        return f"delete rule from {self.src or 'all'} lookup {self.route_table:#x}"


@dataclass(frozen=True)
class UpdatePeer:
    name: str
    change: PeerChange

    def __str__(self) -> str:
        return f"{self.name}: {self.change}"


@dataclass(frozen=True)
class LoadTable:
    ruleset: str
    summary: str
    fresh: bool = False  # there was no table before: undoing it deletes the table

    def __str__(self) -> str:
        return f"load table inet sptun ({self.summary})"


@dataclass(frozen=True)
class DeleteTable:
    def __str__(self) -> str:
        return "delete table inet sptun"


@dataclass(frozen=True)
class UpdateRotation:
    """Who is in one forward's rotation, changed in place (map elements and one rule)."""

    index: int
    key: str
    current: tuple[str, ...]
    new: tuple[str, ...]
    family: int = 4  # of the forward's addresses

    def __str__(self) -> str:
        came = sorted(set(self.new) - set(self.current))
        gone = sorted(set(self.current) - set(self.new))
        return (f"rotation {self.key}: {len(self.new)} backends" + "".join(f" +{ip}" for ip in came)
                + "".join(f" -{ip}" for ip in gone))


@dataclass(frozen=True)
class ReleaseUnreplied:
    """Forget the connections the backends that left the rotation never answered: one
    change (one dump of the kernel's table) however many left at once."""

    backends: tuple[str, ...]

    def __str__(self) -> str:
        shown = ", ".join(self.backends[:5]) + (f" and {len(self.backends) - 5} more" if len(self.backends) > 5 else "")
        return f"release the unanswered connections to {shown}"


@dataclass(frozen=True)
class StartProxy:
    """Start the SNI proxy with this config; replacing: the pid of the running one, which
    hands over its listeners and finishes its own connections."""

    config: str
    replacing: int | None
    summary: str

    def __str__(self) -> str:
        return f"{'reload' if self.replacing else 'start'} the SNI proxy ({self.summary})"


@dataclass(frozen=True)
class ProxyCommands:
    """Runtime changes of the SNI proxy's rotations: no reload, no connection reset."""

    commands: tuple[str, ...]

    def __str__(self) -> str:
        return "SNI proxy: " + "; ".join(self.commands[:6]) + (f"; ... ({len(self.commands)})" if len(self.commands) > 6 else "")


@dataclass(frozen=True)
class StopProxy:
    def __str__(self) -> str:
        return "stop the SNI proxy"


@dataclass(frozen=True)
class SetProxyRouting:
    families: tuple[int, ...] = (4,)  # of the server: each gets its rule and local route

    def __str__(self) -> str:
        shown = "" if self.families == (4,) else f" (IPv{' and IPv'.join(map(str, self.families))})"
        return (f"add rule fwmark {PROXY_MARK:#x} lookup {PROXY_TABLE}, and a local route there (replies to the "
                f"SNI proxy){shown}")


@dataclass(frozen=True)
class DeleteProxyRouting:
    def __str__(self) -> str:
        return f"delete rule fwmark {PROXY_MARK:#x} lookup {PROXY_TABLE}, and its table"


Change = (CreateLink | DeleteLink | SetKey | SetAddresses | LinkUp | SetSysctl | SetDefaultRoute | AddRule
          | DeleteRule | UpdatePeer | LoadTable | DeleteTable | UpdateRotation | ReleaseUnreplied | StartProxy
          | ProxyCommands | StopProxy | SetProxyRouting | DeleteProxyRouting)


# --- the applier -------------------------------------------------------------------------


class Applier:
    """Turns changes into kernel calls, in order. Consecutive peer changes of one interface
    go in one call (10k registrations must not be 10k netlink round trips)."""

    def __init__(self, edges: Edges, private_key: str | None) -> None:
        self.edges = edges
        self.private_key = private_key
        self.undo: list[Change] = []  # what undoes the creations so far, newest last

    def apply(self, changes: list[Change]) -> list[str]:
        done: list[str] = []
        i = 0
        while i < len(changes):
            change = changes[i]
            if isinstance(change, UpdatePeer):
                batch = [change]
                while i + 1 < len(changes) and isinstance(nxt := changes[i + 1], UpdatePeer) and nxt.name == change.name:
                    batch.append(nxt)
                    i += 1
                self.edges.wg.apply(change.name, [c.change for c in batch])
                done += [str(c) for c in batch]
            else:
                self.apply_one(change)
                done.append(str(change))
            i += 1
        return done

    def apply_one(self, change: Change) -> None:
        e = self.edges
        match change:
            case CreateLink(name=name):
                e.wg.create(name)
                self.undo.append(DeleteLink(name, "undoing a failed up"))
            case DeleteLink(name=name):
                e.links.delete(name)
            case SetKey(name=name, listen_port=port):
                if self.private_key is None:
                    raise SptunError(f"no private key to configure {name} with")
                e.wg.configure(name, self.private_key, port)
            case SetAddresses(name=name, addresses=addresses):
                e.links.set_addresses(name, list(addresses))
            case LinkUp(name=name, mtu=mtu):
                e.links.up(name, mtu)
            case SetSysctl(path=path, value=value):
                e.sysctls.set(path, value)
            case SetDefaultRoute(route_table=route_table, name=name, family=family):
                e.links.set_default_route(route_table, name, family)
            case AddRule(priority=priority, mark=mark, src=src, route_table=table):
                e.links.add_rule(priority, mark, src, table)
                self.undo.append(DeleteRule(priority, mark, src, table))
            case DeleteRule(priority=priority, mark=mark, src=src, route_table=route_table):
                e.links.delete_rule(priority, mark, src, route_table)
                e.links.flush_table(route_table, family_of(src) if src else 4)
            case UpdatePeer(name=name, change=peer):
                e.wg.apply(name, [peer])
            case LoadTable(ruleset=ruleset, fresh=fresh):
                e.firewall.write(ruleset)
                if fresh:
                    self.undo.append(DeleteTable())
            case DeleteTable():
                e.firewall.write(nft.delete_table())
            case UpdateRotation(index=index, current=current, new=new, family=family):
                e.firewall.write("\n".join(nft.rotation_update(index, list(current), list(new), family)))
            case ReleaseUnreplied(backends=backends):
                for backend, released in e.conntrack.release_unreplied(backends).items():
                    log.info("released %d unanswered connections to %s: their next SYN goes to another backend",
                             released, backend)
            case StartProxy(config=config, replacing=replacing):
                self._proxy().start(config, replacing)
                if replacing is None:
                    self.undo.append(StopProxy())
            case ProxyCommands(commands=commands):
                self._proxy().run(list(commands))
            case StopProxy():
                self._proxy().stop()
            case SetProxyRouting(families=families):
                have = {rule["family"] for rule in e.links.rules(PROXY_RULE_PRIORITY)}
                for family in families:
                    e.links.set_local_route(PROXY_TABLE, family)
                    if family not in have:
                        e.links.add_rule(PROXY_RULE_PRIORITY, PROXY_MARK, "::/0" if family == 6 else "0.0.0.0/0",
                                         PROXY_TABLE)
                self.undo.append(DeleteProxyRouting())
            case DeleteProxyRouting():
                for rule in e.links.rules(PROXY_RULE_PRIORITY):
                    e.links.delete_rule(PROXY_RULE_PRIORITY, rule["fwmark"], rule["src"], rule["table"], rule["family"])
                for family in (4, 6):
                    e.links.delete_local_route(PROXY_TABLE, family)

    def _proxy(self) -> Proxy:
        if self.edges.proxy is None:
            raise SptunError("no SNI proxy on this host")
        return self.edges.proxy

    def rollback(self) -> list[str]:
        """Undo what this applier created, newest first; each step on its own, so one
        failure does not skip the rest."""
        done = []
        for change in reversed(self.undo):
            try:
                self.apply_one(change)
                done.append(str(change))
            except SptunError as e:
                log.error("rollback: %s failed: %s", change, e)
        self.undo.clear()
        return done
