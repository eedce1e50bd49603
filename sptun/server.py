"""The tunnel server: one WireGuard interface, a peer per registered client, and the
`inet sptun` table that spreads each domain's public ports over its live clients."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sptun import nft, proto
from sptun.config import MTU, ServerConfig, load_server
from sptun.daemon import Role, config_changes
from sptun.errors import ConfigError, ProtocolError, SptunError
from sptun.keys import load_or_create_private_key, public_key, read_token
from sptun.leases import Lease, Leases, LeaseStore
from sptun.links import Links, sysctl
from sptun.wg import Device, Peer, PeerChange, WireGuard, plan_peers

log = logging.getLogger("sptun")

FRESH_HANDSHAKE = 180.0  # s; with the agents' keepalive, WireGuard re-handshakes every 2 min
API_READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 256
MAX_PER_SOURCE = 16
FAILURES_ALLOWED = 10  # bad attempts per source per window, then it is refused for the window
FAILURE_WINDOW = 60.0
DRAIN_KEEP = 120.0  # s a deregistered client's peer stays, so its in-flight connections finish


class FailureLimiter:
    """Counts bad registration attempts per source address over a sliding window."""

    def __init__(self, allowed: int = FAILURES_ALLOWED, window: float = FAILURE_WINDOW) -> None:
        self.allowed, self.window = allowed, window
        self.failures: dict[str, deque[float]] = defaultdict(deque)

    def _trim(self, source: str, now: float) -> deque[float]:
        times = self.failures[source]
        while times and now - times[0] > self.window:
            times.popleft()
        if not times:
            del self.failures[source]
        return times

    def blocked(self, source: str, now: float | None = None) -> bool:
        return len(self._trim(source, now if now is not None else time.monotonic())) >= self.allowed

    def fail(self, source: str, now: float | None = None) -> None:
        self.failures[source].append(now if now is not None else time.monotonic())


def healthy(state_handshake: float, now: float) -> bool:
    return state_handshake > 0 and now - state_handshake < FRESH_HANDSHAKE


@dataclass
class Health:
    """One backend's health, with fall/rise hysteresis. A new backend starts out of rotation."""

    up: bool = False
    streak: int = 0  # checks in a row that disagree with `up`
    reason: str = "not checked yet"
    checked: float = 0.0

    def record(self, ok: bool, reason: str, fall: int, rise: int) -> bool:
        """Take one check's result; True if the backend changed state."""
        self.reason, self.checked = reason, time.time()
        self.streak = self.streak + 1 if ok != self.up else 0
        if self.streak >= (rise if ok else fall):
            self.up, self.streak = ok, 0
            return True
        return False


def peer_of(lease: Lease) -> Peer:
    """A client as a peer of the server: only its overlay address may come from it."""
    return Peer(lease.public_key, (f"{lease.overlay_ip}/32",))


def forwards(cfg: ServerConfig) -> list[nft.Forward]:
    """Each domain's public addresses and ports, in config order. Pure."""
    result = []
    for domain in cfg.domains:
        addresses: list[str | None] = [str(a) for a in domain.listen] or [None]  # None: any local address
        for address in addresses:
            for port in domain.ports:
                result.append(nft.Forward(domain.name, address, port))
    return result


CONNTRACK = Path("/proc/net/nf_conntrack")  # this network namespace's table, as text
CONNTRACK_BUDGET = 2.0  # s: status must not wait long on a huge table


def active_connections(table: Path = CONNTRACK) -> Counter[str] | None:
    """Established TCP connections DNATed to each backend, by backend address, from the kernel's
    conntrack table (status time only). Read as text: the kernel writes ~1M entries/s, where
    pyroute2 decodes ~1k/s. UDP has no connections to count. None when the table can't be read,
    or not within CONNTRACK_BUDGET."""
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + CONNTRACK_BUDGET
    try:
        with table.open() as lines:
            for n, line in enumerate(lines):
                if n % 4096 == 0 and time.monotonic() > deadline:
                    return None
                if " tcp " not in line or " ESTABLISHED " not in line:
                    continue
                # ... src= dst= sport= dport= (original) src= dst= sport= dport= (reply) ...
                addresses = [field[4:] for field in line.split() if field.startswith(("src=", "dst="))]
                if len(addresses) == 4 and addresses[2] != addresses[1]:  # replies come from elsewhere: DNAT
                    counts[addresses[2]] += 1
    except OSError as e:  # no conntrack here is not a reason to fail `status`
        log.debug("cannot read %s: %s", table, e)
        return None
    return counts


def check_port(cfg: ServerConfig, domain: str) -> int | None:
    """The port a health check connects to: the domain's first TCP port (None: UDP only)."""
    d = cfg.domain(domain)
    return next((p.number for p in d.ports if p.proto == "tcp"), None) if d else None


class Server(Role):
    def __init__(self, cfg: ServerConfig, links: Links | None = None, wg: WireGuard | None = None) -> None:
        super().__init__(cfg.state_dir, cfg.wireguard, links, wg)
        self.cfg = cfg
        self.private_key = load_or_create_private_key(cfg.state_dir)
        self.public_key = public_key(self.private_key)
        self.store = LeaseStore(cfg.state_dir)
        self.leases = Leases(cfg.overlay, self.store.load())
        self.health: dict[str, Health] = {}
        self.draining: dict[str, float] = {}  # deregistered keys -> when their peer may go
        self.device = Device()  # the interface as the last pass read it
        self.limiter = FailureLimiter()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()
        self.last_resync = 0.0
        self.table: nft.ServerTable | None = None  # what we loaded, to change it in place
        self.health_task: asyncio.Task[None] | None = None
        # Registrations change leases and peers in memory; commit() puts them into the kernel
        # and the leases file, many registrations at a time.
        self.pending_peers: dict[str, PeerChange] = {}
        self.change_version = 0  # bumped by each registration that changes a lease or a peer ...
        self.committed_version = 0  # ... and how far the kernel and the leases file have it
        self.commit_lock = asyncio.Lock()

    # --- kernel state ------------------------------------------------------------------

    def desired_peers(self) -> list[Peer]:
        return [peer_of(lease) for lease in self.leases.all()]

    def check_overlay(self) -> None:
        """The overlay must not cover a network this host already routes elsewhere."""
        clash = self.links.overlapping_routes(self.cfg.overlay, self.cfg.interface)
        if clash:
            raise ConfigError(f"{self.cfg.path}: overlay: {self.cfg.overlay} overlaps {clash[0]} on this host",
                              hint="choose an overlay that no local network uses")

    def ensure_interface(self) -> list[str]:
        changes = []
        name = self.cfg.interface
        if not self.wg.is_ours(name):
            if self.links.delete(name):
                changes.append(f"remove stale interface {name}")
            self.wg.create(name)
            changes.append(f"create interface {name} ({self.wg.kind} WireGuard)")
        device = self.wg.device(name)  # reconcile uses this read too: a device of 10k peers is costly to read
        if device.public_key != self.public_key or device.listen_port != self.cfg.listen_port:
            self.wg.configure(name, self.private_key, self.cfg.listen_port)
            changes.append(f"set {name} key {self.public_key} listen-port {self.cfg.listen_port}")
            device = self.wg.device(name)
        self.device = device
        changes += self.links.set_addresses(name, [f"{self.cfg.server_ip}/{self.cfg.overlay.prefixlen}"])
        self.links.up(name, MTU)
        if sysctl("net/ipv4/ip_forward", "1"):
            changes.append("enable IPv4 forwarding")
        return changes

    def sync_peers(self, device: Device) -> list[str]:
        changes = plan_peers(self.desired_peers(), device)
        self.wg.apply(self.cfg.interface, changes)
        return [str(c) for c in changes]

    def in_rotation(self, lease: Lease) -> bool:
        if lease.public_key in self.draining:
            return False
        if not self.daemon:  # a one-shot `sptun up` has no health checks to bring anyone back later
            return True
        health = self.health.get(lease.public_key)
        return health is not None and health.up

    def sync_table(self) -> list[str]:
        """Each forward's map holds the domain's backends in rotation. A change of who is in
        rotation is made in place: map elements and one rule, atomically, no reload."""
        fwds = forwards(self.cfg)
        if self.table is None:  # first pass, or a resync: adopt what the kernel holds
            self.table = nft.read_server_table(fwds)
            self.adopt_health(self.table)
        wanted = [{lease.overlay_ip for lease in self.leases.for_domain(f.domain) if self.in_rotation(lease)} for f in fwds]
        if self.table.comment != nft.server_comment(self.cfg.interface, fwds) or set(self.table.handles) != {f.key for f in fwds}:
            rotations = [sorted(w, key=ipaddress.IPv4Address) for w in wanted]
            nft.transaction([nft.render_server(self.cfg.interface, fwds, rotations)])
            self.table = nft.read_server_table(fwds)
            summary = ", ".join(f"{f.domain} {f.port}: {len(r)}" for f, r in zip(fwds, rotations, strict=True))
            return [f"load table inet sptun ({summary or 'no domains'})"]
        lines, changes, updated = [], [], {}
        for i, f in enumerate(fwds):
            current = self.table.rotations[i]
            new = nft.next_rotation(current, wanted[i])
            if new == current:
                continue
            lines += nft.rotation_update(i, current, new)
            came, gone = sorted(set(new) - set(current)), sorted(set(current) - set(new))
            changes.append(f"rotation {f.key}: {len(new)} backends" + "".join(f" +{ip}" for ip in came)
                           + "".join(f" -{ip}" for ip in gone))
            updated[i] = new
        if lines:
            try:
                nft.transaction(lines)
            except SptunError:
                self.table = None  # our picture of the kernel was wrong: read it again next pass
                raise
        # Only now: status (another thread) reports in_rotation from this picture, and must
        # never say a backend serves before the kernel sends it connections.
        for i, new in updated.items():
            self.table.rotations[i] = new
        return changes

    def adopt_orphans(self, device: Device) -> list[str]:
        """Peers on the interface with no lease (the leases file was lost or is behind): keep
        their addresses for them, so they come back where they were when they register."""
        changes = []
        for key, state in device.peers.items():
            ips = state.peer.allowed_ips
            if key in self.leases.by_key or len(ips) != 1 or not ips[0].endswith("/32"):
                continue
            address = ips[0].removesuffix("/32")
            if ipaddress.IPv4Address(address) in self.cfg.overlay and self.leases.adopt(Lease(key, "", address, time.time())):
                changes.append(f"keep {address} for {key}: a peer with no lease, until it registers again")
        if changes:
            self.store.save(self.leases)
        return changes

    def adopt_health(self, table: nft.ServerTable) -> None:
        """A restarted daemon trusts the rotation it finds until its own checks say otherwise:
        emptying it while the first checks run would refuse every request."""
        serving = {ip for rotation in table.rotations for ip in rotation}
        for lease in self.leases.all():
            if lease.overlay_ip in serving and lease.public_key not in self.health:
                self.health[lease.public_key] = Health(up=True, reason="in rotation when this daemon started")

    def expire_drains(self) -> list[str]:
        changes = []
        now = time.monotonic()
        for key, until in list(self.draining.items()):
            if now >= until:
                del self.draining[key]
                lease = self.leases.release(key)
                if lease is not None:
                    self.store.save(self.leases)
                    changes.append(f"release {lease.overlay_ip} of {key} ({lease.domain}): drained")
        return changes

    def reconcile(self) -> list[str]:
        now = time.monotonic()
        if now - self.last_resync > self.resync_every:
            self.table = None  # re-read the kernel now and then: someone may have changed it
            self.last_resync = now
        changes = self.ensure_interface()  # and reads the device into self.device
        changes += self.expire_drains()
        if self.passes <= 1:
            changes += self.adopt_orphans(self.device)
        if self.store.damaged:  # loaded from the backup: write a good file now
            self.store.save(self.leases)
            changes.append(f"rewrote the damaged {self.store.path} ({len(self.leases.by_key)} leases)")
        changes += self.sync_peers(self.device)
        changes += self.sync_table()
        return changes

    def teardown(self) -> list[str]:
        changes = []
        if nft.delete():
            changes.append("delete table inet sptun")
        if self.links.delete(self.cfg.interface):
            changes.append(f"delete interface {self.cfg.interface}")
        self.table = None
        self.health.clear()
        return changes

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self.cfg.metrics

    def reload_config(self) -> str:
        new = load_server(self.cfg.path)
        changed = config_changes(self.cfg, new, needs_restart=("interface", "overlay", "state_dir", "api_port",
                                                               "wireguard", "metrics"))
        self.cfg = new
        return ", ".join(changed) or "nothing changed"

    # --- health ------------------------------------------------------------------------

    async def probe(self, lease: Lease) -> tuple[bool, str]:
        state = self.device.peers.get(lease.public_key)
        if state is None or not healthy(state.last_handshake, time.time()):
            return False, "no recent WireGuard handshake"
        port = check_port(self.cfg, lease.domain)
        if port is None:
            return True, "handshake fresh (UDP only: no connect check)"
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(lease.overlay_ip, port), self.cfg.health.timeout)
        except TimeoutError:
            return False, f"tcp/{port} timed out"
        except OSError as e:
            return False, f"tcp/{port}: {e.strerror or e}"
        writer.close()
        return True, f"tcp/{port} answers"

    async def check_health(self) -> None:
        """One round of checks of every backend, concurrently; a flip wakes the loop."""
        h = self.cfg.health
        leases = [lease for lease in self.leases.all() if lease.public_key not in self.draining]
        now = time.time()
        # A backend with no fresh handshake fails without a connect: no task for it (10k a second add up).
        fresh = [lease for lease in leases
                 if (state := self.device.peers.get(lease.public_key)) is not None and healthy(state.last_handshake, now)]
        probed = dict(zip((lease.public_key for lease in fresh),
                          await asyncio.gather(*(self.probe(lease) for lease in fresh)), strict=True))
        results = [probed.get(lease.public_key, (False, "no recent WireGuard handshake")) for lease in leases]
        flipped = False
        for lease, (ok, reason) in zip(leases, results, strict=True):
            health = self.health.setdefault(lease.public_key, Health())
            if health.record(ok, reason, h.fall, h.rise):
                flipped = True
                log.info("backend %s of %s is %s: %s", lease.overlay_ip, lease.domain,
                         "up" if health.up else "down", reason)
        for key in set(self.health) - set(self.leases.by_key):
            del self.health[key]
        if flipped:
            self.wake.set()

    async def health_loop(self) -> None:
        while True:
            started = time.monotonic()
            # Not before the first pass has read the device and adopted the running rotation.
            if not self.is_down() and self.table is not None:
                try:
                    await self.check_health()
                except Exception:  # a bug here must not stop the checks for good
                    log.exception("health check round failed")
            await asyncio.sleep(max(0.0, self.cfg.health.interval - (time.monotonic() - started)))

    # --- registration ------------------------------------------------------------------

    def authorize(self, request: proto.Request) -> None:
        domain = self.cfg.domain(request.domain)
        if domain is None:
            raise ProtocolError(f"this server does not serve {request.domain}", reason="unknown-domain")
        try:
            token = read_token(domain.token_file)
        except SptunError as e:
            log.error("%s: %s", domain.name, e)
            raise ProtocolError(f"{domain.name} has no token on this server", reason="no-token") from None
        if not hmac.compare_digest(request.token.encode(), token.encode()):
            raise ProtocolError(f"wrong token for {domain.name}", reason="bad-token")

    def register(self, request: proto.Request) -> proto.Assignment:
        """Runs under the lock, in memory only: the lease, and the peer queued for commit().
        The table follows once the client's handshake proves it is live."""
        self.draining.pop(request.client_key, None)
        lease, changed = self.leases.acquire(request.client_key, request.domain)
        if changed:
            self.change_version += 1
            log.info("registered %s for %s at %s", lease.public_key, lease.domain, lease.overlay_ip)
        # A refresh of a known client changes nothing: the last pass saw its peer.
        state = self.device.peers.get(lease.public_key)
        peer = peer_of(lease)
        # The last pass found the interface (is_ours costs a netlink dump of every link).
        if (state is None or state.peer.allowed_ips != peer.allowed_ips) and self.device.public_key is not None:
            self.pending_peers[lease.public_key] = PeerChange("add" if state is None else "update", peer)
            self.change_version += 1
        seen = state is not None and healthy(state.last_handshake, time.time())
        return proto.Assignment(lease.overlay_ip, str(self.cfg.server_ip), self.public_key,
                                self.cfg.overlay.prefixlen, seen)

    def deregister(self, request: proto.Request) -> None:
        """Runs under the lock: out of the rotation now; the peer stays while its connections finish."""
        lease = self.leases.by_key.get(request.client_key)
        if lease is not None:
            self.draining[lease.public_key] = time.monotonic() + DRAIN_KEEP
            if self.wg.is_ours(self.cfg.interface):
                self.sync_table()
            log.info("deregistered %s (%s) from %s; draining", lease.public_key, lease.overlay_ip, lease.domain)

    async def commit(self) -> None:
        """Put what registrations changed so far into the kernel (the queued peers, in one
        call) and into the leases file (one write, one fsync), unless a commit since has.
        Registrations that arrive while a commit runs share the next one (group commit). It
        holds the daemon's lock, as the passes do: one writer at a time, and never an older
        picture over a newer one. A peer lost to a failed commit is added by the next pass."""
        wanted = self.change_version
        async with self.commit_lock:
            if self.committed_version >= wanted:
                return
            async with self.lock:
                version, peers = self.change_version, list(self.pending_peers.values())
                self.pending_peers.clear()
                await asyncio.to_thread(self._commit, peers)
            self.committed_version = version

    def _commit(self, peers: list[PeerChange]) -> None:
        if peers:
            self.wg.apply(self.cfg.interface, peers)
        self.store.save(self.leases)

    async def handle_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str((writer.get_extra_info("peername") or ("?",))[0])
        self.connections[source] += 1
        try:
            if sum(self.connections.values()) > MAX_CONNECTIONS or self.connections[source] > MAX_PER_SOURCE:
                raise ProtocolError("too many connections", reason="busy")
            if self.limiter.blocked(source):
                raise ProtocolError("too many bad attempts; try again later", reason="rate-limited")
            if self.is_down():
                raise ProtocolError("this server is down (sptun down)", reason="down")
            challenge = os.urandom(proto.CHALLENGE_LEN)
            writer.write(proto.hello(self.public_key, challenge))
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), API_READ_TIMEOUT)
            except ValueError:  # longer than the stream limit
                raise ProtocolError(f"message larger than {proto.MAX_MESSAGE} bytes", reason="oversized") from None
            except TimeoutError:
                raise ProtocolError("no request in time", reason="timeout") from None
            if not line.endswith(b"\n"):
                raise ProtocolError("truncated message", reason="truncated")
            request = proto.open_request(line, self.private_key, challenge)
            self.authorize(request)
            assignment = None
            async with self.lock:
                if request.op == "deregister":
                    await asyncio.to_thread(self.deregister, request)  # an nft change
                else:
                    assignment = self.register(request)
            await self.commit()  # the peer is in the kernel and the lease on disk before the client hears of it
            self.accepted += 1
            writer.write(proto.accept(assignment, self.private_key, request.client_key))
        except ProtocolError as e:
            self.rejected[e.reason] += 1
            if e.reason not in ("busy", "rate-limited", "down"):
                self.limiter.fail(source)
            log.warning("rejected registration from %s: %s", source, e.message)
            writer.write(proto.reject(e.reason, e.message))
        except SptunError as e:
            self.rejected["error"] += 1
            log.error("registration from %s failed: %s", source, e)
            writer.write(proto.reject("error", "the server failed; try again"))
        except (ConnectionError, OSError):
            pass
        finally:
            self.connections[source] -= 1
            if self.connections[source] <= 0:
                del self.connections[source]
            try:
                await writer.drain()
                writer.close()
            except (ConnectionError, OSError):
                pass

    async def start_services(self) -> list[asyncio.AbstractServer]:
        try:
            api = await asyncio.start_server(self.handle_api, port=self.cfg.api_port, reuse_address=True,
                                             limit=proto.MAX_MESSAGE)
        except OSError as e:
            raise SptunError(f"cannot listen on the api port {self.cfg.api_port}: {e.strerror}",
                             hint="is another sptun server running, or the port in use?") from None
        log.info("registration api on port %d, WireGuard on %d (%s), key %s", self.cfg.api_port,
                 self.cfg.listen_port, self.wg.kind, self.public_key)
        self.health_task = asyncio.create_task(self.health_loop())
        return [api]

    # --- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        device = self.wg.device(self.cfg.interface) if self.wg.is_ours(self.cfg.interface) else Device()
        now = time.time()
        counters = nft.forward_counters()
        active = active_connections()
        # In rotation: in the kernel's maps now, as loaded (not as the health checks would have it).
        fwds = forwards(self.cfg)
        table = self.table
        if table is None or len(table.rotations) != len(fwds):  # no pass yet, or one since a reload
            table = nft.read_server_table(fwds)
        rotating = [(f.domain, set(rotation)) for f, rotation in zip(fwds, table.rotations, strict=True)]
        domains = []
        for domain in self.cfg.domains:
            backends = []
            for lease in self.leases.for_domain(domain.name):
                state = device.peers.get(lease.public_key)
                handshake = state.last_handshake if state else 0.0
                health = self.health.get(lease.public_key)
                if self.daemon:  # the active checks speak
                    is_healthy = health is not None and health.up
                    reason = health.reason if health else "not checked yet"
                else:  # no daemon: the handshake is all there is to go by
                    is_healthy = healthy(handshake, now)
                    reason = ("handshake fresh" if is_healthy else "no peer on the interface" if state is None
                              else "no handshake yet" if not handshake else "handshake too old")
                if lease.public_key in self.draining:
                    reason = "draining (deregistered)"
                backends.append({
                    "overlay_ip": lease.overlay_ip, "public_key": lease.public_key, "healthy": is_healthy,
                    "reason": reason, "in_rotation": all(lease.overlay_ip in ips for name, ips in rotating if name == lease.domain),
                    "handshake_age": round(now - handshake, 1) if handshake else None,
                    "endpoint": state.peer.endpoint if state else None,
                    "rx_bytes": state.rx_bytes if state else 0, "tx_bytes": state.tx_bytes if state else 0,
                    "active_connections": active[lease.overlay_ip] if active is not None else None,
                    "since": lease.since,
                })
            forwarded = [{"listen": f.listen or "*", "port": str(f.port), "connections": counters.get(f.key, (0, 0))[0],
                          "bytes": counters.get(f.key, (0, 0))[1]} for f in forwards(self.cfg) if f.domain == domain.name]
            domains.append({"name": domain.name, "listen": [str(a) for a in domain.listen] or ["*"],
                            "ports": [str(p) for p in domain.ports], "backends": backends, "forwards": forwarded})
        return {
            "role": "server", "interface": self.cfg.interface, "public_key": self.public_key,
            "listen_port": self.cfg.listen_port, "api_port": self.cfg.api_port, "overlay": str(self.cfg.overlay),
            "overlay_ip": str(self.cfg.server_ip), "wireguard": self.wg.kind, "down": self.is_down(),
            "up": device.public_key is not None, "table_loaded": nft.table_exists(),
            "registrations": {"accepted": self.accepted, "rejected": dict(self.rejected)},
            "domains": domains,
        }

