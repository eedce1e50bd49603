"""In-memory fakes of sptun's edges (links, WireGuard, the nft table, sysctls, sockets,
DNS), with just enough kernel behaviour for the roles to run against them without root.

They model what the roles rely on (a link has an index; a WireGuard device has a key, a
listen port and peers; the table's digest is what was loaded last), and they refuse what
the kernel would refuse, so that a role test fails where the real thing would."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sptun import nft
from sptun.changes import Edges
from sptun.config import Port
from sptun.discovery import Discovery, ServerRecord
from sptun.errors import SptunError
from sptun.keys import public_key
from sptun.links import LinkInfo
from sptun import sni
from sptun.wg import Device, Peer, PeerChange, PeerState


@dataclass
class FakeLink:
    index: int
    kind: str
    up: bool = False
    mtu: int = 1500
    addresses: list[str] = field(default_factory=list)


class FakeKernel:
    """One network namespace: links, routes, rules, sysctls, WireGuard devices, nft table."""

    def __init__(self) -> None:
        self.links: dict[str, FakeLink] = {}
        self.next_index = 10
        self.routes: dict[int, int] = {}  # table -> default route's output ifindex
        self.routes6: dict[int, int] = {}  # the same, IPv6's
        self.public: set[str] = {"198.51.100.10", "2001:db8::10"}  # the host's own addresses beyond its links
        self.rules: list[dict[str, Any]] = []  # {priority, fwmark, src, table}
        self.sysctls: dict[str, str] = {"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"}
        self.devices: dict[str, Device] = {}
        self.private_keys: dict[str, str] = {}
        self.table: str | None = None  # the loaded ruleset's digest comment
        self.maps: dict[str, list[str]] = {}
        self.handles: dict[str, int] = {}
        self.writes: list[str] = []  # every nft transaction, in order
        self.fail_nft: str | None = None  # the next nft write fails with this error
        self.unreplied: dict[str, int] = {}  # backend -> connections it never answered
        self.released: list[str] = []  # backends whose unanswered connections were released
        self.suspects: set[str] = set()  # the server table's SUSPECTS set
        self.answered: set[str] = set()  # ... and its ANSWERED set
        self.handshakes: dict[str, float] = {}  # peer key -> last handshake, as the kernel would report it
        self.connections: Counter[str] = Counter()  # conntrack: open connections by backend address
        self.counters: dict[str, tuple[int, int]] = {}  # nft rule counters, by the rule's comment
        self.local_routes: set[int] = set()  # tables with `local default dev lo`
        self.local_routes6: set[int] = set()  # the same, IPv6's
        self.proxy_pid: int | None = None  # the SNI proxy, when it runs
        self.proxy_config = ""
        self.proxy_servers: dict[str, dict[str, sni.ProxyServer]] = {}  # backend -> server name -> server
        self.proxy_starts: list[str] = []  # every config it was started (or reloaded) with
        self.proxy_commands: list[str] = []  # every runtime command it got

    def edges(self, kind: str = "kernel") -> Edges:
        links = FakeLinks(self)
        return Edges(links, FakeWireGuard(self, kind), FakeFirewall(self), FakeSysctls(self), FakeConntrack(self),  # type: ignore[arg-type]
                     FakeProxy(self))


class FakeLinks:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def info(self, name: str) -> LinkInfo | None:
        link = self.k.links.get(name)
        return LinkInfo(link.index, link.kind, link.up, link.mtu) if link else None

    def index(self, name: str) -> int | None:
        link = self.k.links.get(name)
        return link.index if link else None

    def kind(self, name: str) -> str | None:
        link = self.k.links.get(name)
        return link.kind if link else None

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.k.links if n.startswith(prefix))

    def addresses(self, index: int) -> list[str]:
        return sorted(next(link.addresses for link in self.k.links.values() if link.index == index))

    def add(self, name: str, kind: str) -> None:
        if name in self.k.links:
            raise SptunError(f"ip link add {name}: File exists")
        self.k.links[name] = FakeLink(self.k.next_index, kind)
        self.k.sysctls[f"net/ipv4/conf/{name}/rp_filter"] = "1"
        self.k.next_index += 1

    def delete(self, name: str) -> bool:
        link = self.k.links.pop(name, None)
        if link is None:
            return False
        self.k.devices.pop(name, None)
        self.k.sysctls.pop(f"net/ipv4/conf/{name}/rp_filter", None)
        self.k.routes = {t: oif for t, oif in self.k.routes.items() if oif != link.index}  # routes die with the link
        self.k.routes6 = {t: oif for t, oif in self.k.routes6.items() if oif != link.index}
        return True

    def _link(self, name: str) -> FakeLink:
        if name not in self.k.links:
            raise SptunError(f"interface {name} disappeared")
        return self.k.links[name]

    def up(self, name: str, mtu: int) -> None:
        link = self._link(name)
        link.up, link.mtu = True, mtu

    def set_addresses(self, name: str, wanted: list[str]) -> list[str]:
        self._link(name).addresses = list(wanted)
        return []

    def _routes(self, family: int) -> dict[int, int]:
        return self.k.routes if family == 4 else self.k.routes6

    def default_route(self, table: int, family: int = 4) -> int | None:
        return self._routes(family).get(table)

    def set_default_route(self, table: int, name: str, family: int = 4) -> bool:
        self._routes(family)[table] = self._link(name).index
        return True

    def flush_table(self, table: int, family: int = 4) -> None:
        self._routes(family).pop(table, None)

    def rules(self, priority: int) -> list[dict[str, Any]]:
        return [{**{k: r[k] for k in ("fwmark", "src", "table")}, "family": 6 if ":" in (r["src"] or "") else 4}
                for r in self.k.rules if r["priority"] == priority]

    def add_rule(self, priority: int, fwmark: int, src: str, table: int) -> None:
        rule = {"priority": priority, "fwmark": fwmark, "src": src, "table": table}
        if rule in self.k.rules:
            raise SptunError("ip rule add: File exists")
        self.k.rules.append(rule)

    def delete_rule(self, priority: int, fwmark: int, src: str | None, table: int, family: int | None = None) -> None:
        family = family or (6 if ":" in (src or "") else 4)  # as the real one: one family's rule
        self.k.rules = [r for r in self.k.rules if (r["priority"], r["fwmark"], r["table"]) != (priority, fwmark, table)
                        or (6 if ":" in (r["src"] or "") else 4) != family]

    def overlapping_routes(self, network: Any, except_dev: str) -> list[str]:
        return []

    def local_addresses(self) -> set[str]:
        return {a.split("/")[0] for link in self.k.links.values() for a in link.addresses} | self.k.public

    def _local(self, family: int) -> set[int]:
        return self.k.local_routes if family == 4 else self.k.local_routes6

    def local_route(self, table: int, family: int = 4) -> bool:
        return table in self._local(family)

    def set_local_route(self, table: int, family: int = 4) -> None:
        self._local(family).add(table)

    def delete_local_route(self, table: int, family: int = 4) -> None:
        self._local(family).discard(table)


class FakeProxy:
    """The SNI proxy: its config's digest, and each backend's servers, changed by the
    runtime commands sptun sends (as HAProxy 2.6 answers them)."""

    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def read(self) -> sni.ProxyState:
        if self.k.proxy_pid is None:
            return sni.ProxyState()
        return sni.ProxyState(self.k.proxy_pid, sni.digest_of(self.k.proxy_config),
                              {b: dict(servers) for b, servers in self.k.proxy_servers.items()})

    def start(self, config: str, replacing: int | None) -> None:
        self.k.proxy_config = config
        self.k.proxy_pid = (self.k.proxy_pid or 1000) + 1
        self.k.proxy_starts.append(config)
        self.k.proxy_servers = {}
        backend = ""
        for line in config.splitlines():
            words = line.split()
            if words and words[0] == "backend":
                backend = words[1]
                self.k.proxy_servers[backend] = {}
            elif words[:1] == ["server"]:
                self.k.proxy_servers[backend][words[1]] = sni.ProxyServer(words[2].rsplit(":", 1)[0], True, 0)

    def run(self, commands: list[str]) -> None:
        for line in commands:
            self.k.proxy_commands.append(line)
            words = line.split()
            backend, name = words[2].split("/") if words[0] in ("add", "del", "enable", "set") else ("", "")
            servers = self.k.proxy_servers[backend]
            if words[0] == "add":
                assert name not in servers, line
                servers[name] = sni.ProxyServer(words[3].rsplit(":", 1)[0], False, 0)  # added in maintenance
            elif words[0] == "del":
                server = servers[name]
                if server.ready or server.sessions:
                    raise SptunError(f"SNI proxy refused `{line}`")
                del servers[name]
            else:  # enable server B/S, set server B/S state ready|maint
                servers[name] = dataclasses.replace(servers[name], ready=words[0] == "enable" or words[-1] == "ready")

    def stop(self) -> None:
        self.k.proxy_pid = None
        self.k.proxy_servers = {}


class FakeWireGuard:
    def __init__(self, k: FakeKernel, kind: str = "kernel") -> None:
        self.k, self.kind = k, kind
        self.calls = 0  # apply() calls: batching is part of the contract with the kernel

    def create(self, ifname: str) -> None:
        FakeLinks(self.k).add(ifname, "wireguard")
        self.k.devices[ifname] = Device()

    def is_ours(self, ifname: str) -> bool:
        return ifname in self.k.devices and ifname in self.k.links

    def configure(self, ifname: str, private_key: str, listen_port: int | None) -> None:
        device = self._device(ifname)
        self.k.private_keys[ifname] = private_key
        self.k.devices[ifname] = Device(public_key(private_key), listen_port or device.listen_port or 40000, device.peers)

    def _device(self, ifname: str) -> Device:
        if ifname not in self.k.devices:
            raise SptunError(f"no WireGuard device {ifname}")
        return self.k.devices[ifname]

    def device(self, ifname: str) -> Device:
        device = self._device(ifname)
        peers = {key: PeerState(s.peer, self.k.handshakes.get(key, 0.0), s.rx_bytes, s.tx_bytes)
                 for key, s in device.peers.items()}
        return Device(device.public_key, device.listen_port, peers)

    def apply(self, ifname: str, changes: list[PeerChange]) -> None:
        self.calls += 1
        device = self._device(ifname)
        peers = dict(device.peers)
        for change in changes:
            if change.action == "remove":
                peers.pop(change.peer.public_key, None)
            else:
                old = peers.get(change.peer.public_key)
                endpoint = change.peer.endpoint or (old.peer.endpoint if old else None)
                peers[change.peer.public_key] = PeerState(Peer(change.peer.public_key, change.peer.allowed_ips, endpoint,
                                                               change.peer.keepalive))
        self.k.devices[ifname] = Device(device.public_key, device.listen_port, peers)


class FakeFirewall:
    """Keeps the digest of the loaded ruleset, and the rotation maps as nft would."""

    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def read(self, chain: str | None = None) -> nft.TableState:
        if self.k.table is None and not self.k.maps:
            return nft.TableState()
        if chain is not None:
            return nft.TableState(True, None, dict(self.k.handles), {}, dict(self.k.counters))
        return nft.TableState(True, self.k.table, dict(self.k.handles), {n: list(m) for n, m in self.k.maps.items()},
                              dict(self.k.counters))

    def passive(self) -> tuple[set[str], set[str]]:
        """(SUSPECTS, ANSWERED): a test puts backends in k.suspects and k.answered (none if unset)."""
        return set(self.k.suspects), set(self.k.answered)

    def suspects(self) -> set[str]:  # tests/test_roles.py reads the suspects alone
        return self.passive()[0]

    def write(self, text: str) -> None:
        self.k.writes.append(text)
        if self.k.fail_nft is not None:
            error, self.k.fail_nft = self.k.fail_nft, None
            raise SptunError(f"nft: {error}")
        if text.startswith(nft.delete_table().splitlines()[0]) and "delete table" in text:
            self.k.table, self.k.maps, self.k.handles = None, {}, {}
            if "comment" not in text:
                return
        if "comment \"sptun" in text:  # a whole ruleset
            self.k.table = nft.comment_of(text)
            self.k.maps, self.k.handles = {}, {}
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("map rr"):
                    name = line.split()[1]
                    elements = line.partition("elements = {")[2].partition("}")[0]
                    slots = [e.split(":") for e in elements.split(",") if e.strip()]
                    self.k.maps[name] = [ip.strip() for _, ip in sorted((int(n), ip) for n, ip in slots)]
                if " jump fwd" in line and " comment " in line:
                    self.k.handles[json.loads(line.rpartition(" comment ")[2])] = len(self.k.handles) + 1
            return
        for line in text.splitlines():  # in-place rotation changes
            words = line.split()
            if line.startswith(("delete element", "add element")):
                name = words[4]
                body = line.partition("{")[2].rpartition("}")[0]
                current = self.k.maps.setdefault(name, [])
                slots = dict(enumerate(current))
                for item in body.split(","):
                    if words[0] == "delete":
                        slots.pop(int(item), None)
                    else:
                        n, ip = item.split(":", 1)  # an IPv6 address has colons of its own
                        slots[int(n)] = ip.strip()
                self.k.maps[name] = [slots[i] for i in sorted(slots)]


class FakeConntrack:
    """Unanswered connections per backend, as a test sets them up; released ones are noted."""

    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def release_unreplied(self, backends: Collection[str]) -> dict[str, int]:
        self.k.released.extend(backends)
        released = {b: self.k.unreplied.pop(b, 0) for b in backends}
        return {b: n for b, n in released.items() if n}


class FakeSysctls:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k

    def get(self, path: str) -> str:
        return self.k.sysctls.get(path, "")

    def set(self, path: str, value: str) -> bool:
        if path not in self.k.sysctls:
            raise SptunError(f"no sysctl {path}")
        changed = self.k.sysctls[path] != value
        self.k.sysctls[path] = value
        return changed


class FakeSockets:
    def __init__(self, listening: bool = True) -> None:
        self.is_listening = listening
        self.connections = 0

    def listening(self, ports: tuple[Port, ...]) -> bool:
        return self.is_listening

    def listening6(self, ports: tuple[Port, ...]) -> bool:
        return self.is_listening and self.ipv6

    ipv6 = True  # the service listens on IPv6 too

    def in_flight(self, addresses: set[str], ports: tuple[Port, ...]) -> int:
        return self.connections


class FakeDiscovery(Discovery):
    """The servers as records, past TXT parsing (which refuses loopback addresses)."""

    def __init__(self, servers: list[ServerRecord]) -> None:
        super().__init__("app.example.test", source=None)  # type: ignore[arg-type]
        self.servers = list(servers)

    def current(self) -> list[ServerRecord]:
        self.refreshes += 1
        assert self.servers is not None
        return self.servers
