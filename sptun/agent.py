"""The tunnel client: one WireGuard interface per server listed in DNS, registered with
each, and policy routing so that replies leave by the tunnel their connection came in on."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any

from sptun import nft, proto
from sptun.config import MTU, AgentConfig, Port, load_agent
from sptun.daemon import Role, config_changes
from sptun.discovery import Discovery, DnsTxtSource, ServerRecord, TxtSource
from sptun.errors import SptunError
from sptun.keys import load_or_create_private_key, public_key, read_token, write_file_atomic
from sptun.links import Links, sysctl
from sptun.server import healthy
from sptun.wg import Device, Peer, PeerChange, WireGuard, plan_peers

log = logging.getLogger("sptun")

RULE_PRIORITY = 5170  # our `ip rule`s sit at this priority, and only ours
REGISTER_EVERY = 10.0  # s; re-registering is idempotent and repairs a server that lost its state
RETRY_AFTER = 3.0
KICK_GRACE = 5.0  # s a new peer gets to complete its first handshake
KERNEL_CHECK_EVERY = 10.0  # s between full reads of the kernel when nothing changed
PREFIX = nft.CLIENT_PREFIX


def interface_name(server_ip: str) -> str:
    """sptun-<hex of the IPv4 address>: stable across restarts, 14 characters."""
    address = ipaddress.ip_address(server_ip)
    if address.version == 4:
        return f"{PREFIX}{int(address):08x}"
    import hashlib

    return f"{PREFIX}{hashlib.sha256(address.packed).hexdigest()[:8]}"


def endpoint(server: ServerRecord) -> str:
    return f"[{server.ip}]:{server.port}" if ":" in server.ip else f"{server.ip}:{server.port}"


# sock_diag (linux/inet_diag.h): the kernel lists only the sockets in the states asked for.
# /proc/net/tcp instead walks the whole connection hash table on every read: ~2 ms each
# second for an idle agent, and more the busier its web server is.
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10  # an unconnected UDP socket is in TCP_CLOSE
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def local_sockets(protocol: str, state: int, family: int = socket.AF_INET) -> list[tuple[str, int]]:
    """(local address, local port) of this network namespace's sockets of a protocol in a state."""
    # inet_diag_req_v2: family, protocol, extensions, pad, states; then an empty socket id
    request = struct.pack("=BBBxI", family, PROTOCOLS[protocol], 0, 1 << state) + bytes(48)
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    found: list[tuple[str, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.sendto(header + request, (0, 0))
        while data := s.recv(65536):
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + 16)
                    if errno:
                        raise SptunError(f"sock_diag: {os.strerror(-errno)}")
                    return found
                # inet_diag_msg: family, state, timer, retrans; then sport, dport (big-endian), src
                body = offset + 16
                port = struct.unpack_from("!H", data, body + 4)[0]
                packed = data[body + 8:body + 8 + (4 if family == socket.AF_INET else 16)]
                found.append((socket.inet_ntop(family, packed), port))
                offset += (length + 3) & ~3
    return found


def listening(ports: tuple[Port, ...]) -> bool:
    """Whether a local service listens on every port (this network namespace, IPv4 or IPv6)."""
    for port in ports:
        state = TCP_LISTEN if port.proto == "tcp" else TCP_CLOSE
        if not any(p == port.number for family in (socket.AF_INET, socket.AF_INET6)
                   for _, p in local_sockets(port.proto, state, family)):
            return False
    return True


def in_flight(addresses: set[str], ports: tuple[Port, ...]) -> int:
    """Established TCP connections to the service on these (overlay, IPv4) addresses."""
    tcp = {p.number for p in ports if p.proto == "tcp"}
    return sum(1 for address, port in local_sockets("tcp", TCP_ESTABLISHED) if address in addresses and port in tcp)


@dataclass
class Tunnel:
    server: ServerRecord
    ifname: str
    assignment: proto.Assignment | None = None
    next_register: float = 0.0
    error: str = ""
    configured_at: float = 0.0  # when its peer was last (re)configured; 0 = not yet
    kick: bool = False  # the server lost our session: re-add the peer for a fresh handshake


class Agent(Role):
    def __init__(self, cfg: AgentConfig, links: Links | None = None, wg: WireGuard | None = None,
                 source: TxtSource | None = None) -> None:
        super().__init__(cfg.state_dir, cfg.wireguard, links, wg)
        self.cfg = cfg
        self.private_key = load_or_create_private_key(cfg.state_dir)
        self.public_key = public_key(self.private_key)
        self.discovery = Discovery(cfg.domain, source or DnsTxtSource(cfg.nameservers), cfg.realm)
        self.state_file = cfg.state_dir / "agent.json"
        self.tunnels: dict[str, Tunnel] = self.load_state()
        self.listening = False
        self.loaded_table: str | None = None  # the client table we loaded last
        self.table_checked = 0.0
        self.last_seen: tuple[tuple[str, ...], bool] | None = None  # servers and listening, last pass
        self.kernel_checked = 0.0

    # --- state across restarts ---------------------------------------------------------

    def load_state(self) -> dict[str, Tunnel]:
        try:
            data = json.loads(self.state_file.read_text())
            tunnels = {}
            for item in data["tunnels"]:
                server = ServerRecord(**item["server"])
                a = item.get("assignment")
                tunnels[server.ip] = Tunnel(server, interface_name(server.ip), proto.Assignment(**a) if a else None)
            return tunnels
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring damaged %s (%s); registering afresh", self.state_file, e)
            return {}

    def save_state(self) -> None:
        data = {"tunnels": [{"server": asdict(t.server), "assignment": asdict(t.assignment) if t.assignment else None}
                            for t in self.tunnels.values()]}
        text = json.dumps(data, indent=1) + "\n"
        if not self.state_file.exists() or self.state_file.read_text() != text:
            write_file_atomic(self.state_file, text)

    # --- registration ------------------------------------------------------------------

    def exchange(self, server: ServerRecord, op: str) -> proto.Assignment | None:
        request = proto.Request(op, self.cfg.domain, read_token(self.cfg.token_file), self.public_key)
        _, assignment = proto.exchange(server.ip, server.api, request, self.private_key, pinned_key=server.pk)
        return assignment

    def register(self, tunnel: Tunnel) -> list[str]:
        now = time.monotonic()
        if now < tunnel.next_register:
            return []
        try:
            assignment = self.exchange(tunnel.server, "register")
        except SptunError as e:
            if str(e) != tunnel.error:
                log.warning("registration with %s failed: %s", tunnel.server.ip, e)
            tunnel.error = str(e)
            tunnel.next_register = now + RETRY_AFTER
            return []
        tunnel.error = ""
        tunnel.next_register = now + REGISTER_EVERY
        if assignment is not None and not assignment.seen and tunnel.configured_at and now - tunnel.configured_at > KICK_GRACE:
            tunnel.kick = True
        if assignment == tunnel.assignment:
            return []
        tunnel.assignment = assignment
        return [f"registered with {tunnel.server.ip}: overlay {assignment.overlay_ip if assignment else '-'}"]

    def deregister(self, tunnel: Tunnel) -> None:
        if tunnel.assignment is None:
            return
        try:
            self.exchange(tunnel.server, "deregister")
        except SptunError as e:  # the server forgets us anyway once the handshakes stop
            log.warning("deregistration from %s failed: %s", tunnel.server.ip, e)

    # --- kernel state ------------------------------------------------------------------

    def ensure_link(self, tunnel: Tunnel) -> list[str]:
        """The interface, its key, address and routing table; not yet the peer."""
        assert tunnel.assignment is not None
        name = tunnel.ifname
        changes = []
        if not self.wg.is_ours(name):
            if self.links.delete(name):
                changes.append(f"remove stale interface {name}")
            self.wg.create(name)
            changes.append(f"create interface {name} to {tunnel.server.ip} ({self.wg.kind} WireGuard)")
        if self.wg.device(name).public_key != self.public_key:
            self.wg.configure(name, self.private_key, None)
            changes.append(f"set {name} key {self.public_key}")
        changes += self.links.set_addresses(name, [f"{tunnel.assignment.overlay_ip}/32"])
        self.links.up(name, MTU)
        # Loose: a browser's address routes out by the default route, not by this tunnel.
        if sysctl(f"net/ipv4/conf/{name}/rp_filter", "2"):
            changes.append(f"set loose rp_filter on {name}")
        table = self.table_of(name)
        if table is not None and self.links.set_default_route(table, name):
            changes.append(f"route default dev {name} table {table:#x}")
        return changes

    def ensure_peer(self, tunnel: Tunnel) -> list[str]:
        """The server as the peer. This starts the handshake, after which the server puts us in
        its rotation: so it comes last, once replies can find their way back."""
        assert tunnel.assignment is not None
        name = tunnel.ifname
        peer = Peer(tunnel.assignment.server_key, ("0.0.0.0/0",), endpoint(tunnel.server), self.cfg.keepalive)
        changes = plan_peers([peer], self.wg.device(name))
        if tunnel.kick and not changes:
            # WireGuard would wait for its 2-minute rekey; a re-added peer handshakes at once.
            changes = [PeerChange("remove", peer), PeerChange("add", peer)]
            log.warning("%s: %s has no session with us (restarted?); handshaking again", name, tunnel.server.ip)
        tunnel.kick = False
        if changes or not tunnel.configured_at:  # (re)configured now, or adopted from an earlier run
            tunnel.configured_at = time.monotonic()
        self.wg.apply(name, changes)
        return [f"{name}: {c}" for c in changes]

    def table_of(self, name: str) -> int | None:
        index = self.links.index(name)
        return nft.client_mark(index) if index is not None else None

    def marks(self) -> dict[str, int]:
        """Each registered tunnel's interface: its mark, which is also its routing table."""
        tables = {t.ifname: self.table_of(t.ifname) for t in self.tunnels.values() if t.assignment}
        return {name: table for name, table in tables.items() if table is not None}

    def sync_rules(self, marks: dict[str, int]) -> list[str]:
        """Exactly one rule per tunnel: from its overlay address with its mark, to its table."""
        wanted = {(marks[t.ifname], f"{t.assignment.overlay_ip}/32"): t.ifname
                  for t in self.tunnels.values() if t.assignment and t.ifname in marks}
        changes = []
        have = self.links.rules(RULE_PRIORITY)
        for rule in have:
            if (rule["table"], rule["src"]) not in wanted or rule["fwmark"] != rule["table"]:
                self.links.delete_rule(RULE_PRIORITY, rule["fwmark"], rule["src"], rule["table"])
                self.links.flush_table(rule["table"])
                changes.append(f"delete rule from {rule['src']} lookup {rule['table']:#x}")
        present = {(r["table"], r["src"]) for r in have if r["fwmark"] == r["table"]}
        for (table, src), name in sorted(wanted.items()):
            if (table, src) not in present:
                self.links.add_rule(RULE_PRIORITY, table, src, table)
                changes.append(f"add rule from {src} fwmark {table:#x} lookup {table:#x} ({name})")
        return changes

    def sync_table(self, marks: dict[str, int]) -> list[str]:
        ruleset = nft.render_client(marks, self.cfg.ports)
        now = time.monotonic()
        if ruleset == self.loaded_table and now - self.table_checked < self.resync_every:
            return []  # unchanged since we loaded it: no nft process at all (idle CPU)
        self.table_checked = now
        loaded = nft.apply(ruleset)  # still a no-op if the kernel holds it already
        self.loaded_table = ruleset
        return [f"load table inet sptun ({len(marks)} tunnels)"] if loaded else []

    def drain(self, tunnels: list[Tunnel]) -> None:
        """Deregister first, so the servers take us out of their rotation at once; then wait,
        at most drain_timeout, for the connections in flight through these tunnels."""
        for tunnel in tunnels:
            self.deregister(tunnel)
        addresses = {t.assignment.overlay_ip for t in tunnels if t.assignment}
        deadline = time.monotonic() + self.cfg.drain_timeout
        while addresses and in_flight(addresses, self.cfg.ports) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = in_flight(addresses, self.cfg.ports) if addresses else 0
        if left:
            log.warning("drain: %d connections still open after %g s; closing them", left, self.cfg.drain_timeout)

    def remove_tunnels(self, tunnels: list[Tunnel], why: str) -> list[str]:
        self.drain(tunnels)
        changes = []
        for tunnel in tunnels:
            self.tunnels.pop(tunnel.server.ip, None)
            if self.links.delete(tunnel.ifname):
                changes.append(f"delete interface {tunnel.ifname} ({why})")
        return changes

    def reconcile(self) -> list[str]:
        servers = {s.ip: s for s in self.discovery.current()}
        changes = []
        for tunnel in list(self.tunnels.values()):
            if tunnel.server.ip not in servers:
                changes += self.remove_tunnels([tunnel], f"{tunnel.server.ip} left DNS")
        self.listening = listening(self.cfg.ports)
        for server in servers.values():
            tunnel = self.tunnels.setdefault(server.ip, Tunnel(server, interface_name(server.ip)))
            if tunnel.server != server:
                tunnel.server, tunnel.next_register = server, 0.0
            if not self.listening:
                if tunnel.assignment is not None:
                    changes += self.remove_tunnels([tunnel], f"nothing listens on {', '.join(map(str, self.cfg.ports))}")
                continue
            changes += self.register(tunnel)
        # The kernel is read and repaired every KERNEL_CHECK_EVERY, or at once when anything
        # changed: reading it each second (netlink dumps, UAPI, nft) costs an idle agent ~5% CPU.
        now = time.monotonic()
        seen = (tuple(sorted(servers)), self.listening)
        if (not changes and seen == self.last_seen and not any(t.kick for t in self.tunnels.values())
                and now - self.kernel_checked < KERNEL_CHECK_EVERY):
            return []
        self.last_seen, self.kernel_checked = seen, now
        for tunnel in self.tunnels.values():
            if tunnel.assignment is not None and self.listening:
                changes += self.ensure_link(tunnel)
        marks = self.marks()
        changes += self.sync_rules(marks)
        changes += self.sync_table(marks)
        for tunnel in self.tunnels.values():
            if tunnel.assignment is not None and self.listening:
                changes += self.ensure_peer(tunnel)
        self.save_state()
        return changes

    def serving(self) -> bool:
        return any(t.assignment is not None and self.wg.is_ours(t.ifname) for t in self.tunnels.values())

    def teardown(self) -> list[str]:
        changes = self.remove_tunnels(list(self.tunnels.values()), "down")
        for name in self.links.names(PREFIX):  # anything left by an earlier run
            if self.links.delete(name):
                changes.append(f"delete interface {name}")
        for rule in self.links.rules(RULE_PRIORITY):
            self.links.delete_rule(RULE_PRIORITY, rule["fwmark"], rule["src"], rule["table"])
            self.links.flush_table(rule["table"])
            changes.append(f"delete rule lookup {rule['table']:#x}")
        if nft.delete():
            changes.append("delete table inet sptun")
        self.loaded_table = None
        self.kernel_checked = 0.0
        self.save_state()
        return changes

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self.cfg.metrics

    def reload_config(self) -> str:
        new = load_agent(self.cfg.path)
        changed = config_changes(self.cfg, new, needs_restart=("state_dir", "wireguard", "metrics"))
        if (new.domain, new.nameservers, new.realm) != (self.cfg.domain, self.cfg.nameservers, self.cfg.realm):
            self.discovery = Discovery(new.domain, DnsTxtSource(new.nameservers), new.realm)
        self.cfg = new
        for tunnel in self.tunnels.values():  # register again now, with the new token or domain
            tunnel.next_register = 0.0
        return ", ".join(changed) or "nothing changed"

    async def on_stop(self) -> None:
        """Stopping the agent drains: the servers take it out of rotation before its tunnels go."""
        import asyncio

        async with self.lock:
            for change in await asyncio.to_thread(self.teardown):
                log.info("%s", change)

    # --- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.time()
        tunnels = []
        for t in sorted(self.tunnels.values(), key=lambda t: t.server.ip):
            device = self.wg.device(t.ifname) if self.wg.is_ours(t.ifname) else Device()
            state = next(iter(device.peers.values()), None)
            handshake = state.last_handshake if state else 0.0
            tunnels.append({
                "server": t.server.ip, "interface": t.ifname, "port": t.server.port,
                "overlay_ip": t.assignment.overlay_ip if t.assignment else None,
                "server_overlay_ip": t.assignment.server_ip if t.assignment else None,
                "server_key": t.assignment.server_key if t.assignment else None,
                "registered": t.assignment is not None, "up": device.public_key is not None,
                "healthy": t.assignment is not None and healthy(handshake, now),
                "handshake_age": round(now - handshake, 1) if handshake else None,
                "rx_bytes": state.rx_bytes if state else 0, "tx_bytes": state.tx_bytes if state else 0,
                "error": t.error or None,
            })
        return {
            "role": "agent", "domain": self.cfg.domain, "public_key": self.public_key, "wireguard": self.wg.kind,
            "down": self.is_down(), "listening": self.listening, "ports": [str(p) for p in self.cfg.ports],
            "dns": {"servers": [s.ip for s in self.discovery.servers or []], "error": self.discovery.last_error or None},
            "tunnels": tunnels,
        }
