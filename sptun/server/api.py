"""The registration API (TCP, `api_port`): proof of key and token, rate limits, and group
commit of the leases and peers that registrations change."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections import Counter, defaultdict, deque
from typing import TYPE_CHECKING

from sptun import proto
from sptun.changes import Applier, UpdatePeer
from sptun.errors import ProtocolError, SptunError
from sptun.keys import read_token
from sptun.server.plan import peer_of
from sptun.wg import PeerChange, handshake_fresh

if TYPE_CHECKING:
    from sptun.server.role import Server

log = logging.getLogger("sptun")

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


class RegistrationApi:
    """Serves registrations for one server role. Leases and the draining set are the role's;
    the counts, limits and queued peers are this API's own."""

    def __init__(self, role: Server) -> None:
        self.role = role
        self.limiter = FailureLimiter()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()
        # Registrations change leases and peers in memory; commit() puts them into the kernel
        # and the leases file, many registrations at a time.
        self.pending_peers: dict[str, PeerChange] = {}
        self.change_version = 0  # bumped by each registration that changes a lease or a peer ...
        self.committed_version = 0  # ... and how far the kernel and the leases file have it
        self.commit_lock = asyncio.Lock()

    @property
    def private_key(self) -> str:
        assert self.role.private_key is not None  # a read-only role serves no registrations
        return self.role.private_key

    @property
    def public_key(self) -> str:
        assert self.role.public_key is not None
        return self.role.public_key

    def authorize(self, request: proto.Request) -> None:
        domain = self.role.cfg.domain(request.domain)
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
        self.role.draining.pop(request.client_key, None)
        lease, changed = self.role.leases.acquire(request.client_key, request.domain)
        if changed:
            self.change_version += 1
            log.info("registered %s for %s at %s", lease.public_key, lease.domain, lease.overlay_ip)
        # A refresh of a known client changes nothing: the last pass saw its peer.
        state = self.role.device.peers.get(lease.public_key)
        peer = peer_of(lease)
        # The last pass found the interface (is_ours costs a netlink dump of every link).
        if (state is None or state.peer.allowed_ips != peer.allowed_ips) and self.role.device.public_key is not None:
            self.pending_peers[lease.public_key] = PeerChange("add" if state is None else "update", peer)
            self.change_version += 1
        seen = state is not None and handshake_fresh(state.last_handshake, time.time())
        return proto.Assignment(lease.overlay_ip, str(self.role.cfg.server_ip), self.public_key,
                                self.role.cfg.overlay.prefixlen, seen)

    def deregister(self, request: proto.Request) -> None:
        """Runs under the lock: out of the rotation now; the peer stays while its connections finish."""
        lease = self.role.leases.by_key.get(request.client_key)
        if lease is not None:
            self.role.draining[lease.public_key] = time.monotonic() + DRAIN_KEEP
            self.role.apply_rotation()
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
            async with self.role.lock:
                version, peers = self.change_version, list(self.pending_peers.values())
                self.pending_peers.clear()
                await asyncio.to_thread(self._commit, peers)
            self.committed_version = version

    def _commit(self, peers: list[PeerChange]) -> None:
        Applier(self.role.edges, self.role.private_key).apply([UpdatePeer(self.role.cfg.interface, p) for p in peers])
        self.role.store.save(self.role.leases)
        self.role.make_view()  # status shows the new leases now, not after the next pass

    async def handle_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str((writer.get_extra_info("peername") or ("?",))[0])
        self.connections[source] += 1
        try:
            if sum(self.connections.values()) > MAX_CONNECTIONS or self.connections[source] > MAX_PER_SOURCE:
                raise ProtocolError("too many connections", reason="busy")
            if self.limiter.blocked(source):
                raise ProtocolError("too many bad attempts; try again later", reason="rate-limited")
            if self.role.is_down():
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
            async with self.role.lock:
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
