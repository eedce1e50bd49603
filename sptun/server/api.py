"""The registration API (TCP, `api_port`): proof of key and token, rate limits, and group
commit of the leases and peers that registrations change."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

from sptun import attest, proto
from sptun.changes import Applier, UpdatePeer
from sptun.errors import ProtocolError, SptunError, printable
from sptun.leases import OverlayFull
from sptun.server.limits import FailureLimiter, RejectionLog, source_key
from sptun.server.plan import peer_of
from sptun.tokens import valid_tokens
from sptun.wg import PeerChange, handshake_fresh

if TYPE_CHECKING:
    from sptun.server.role import Server

log = logging.getLogger("sptun")

API_READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 256
MAX_PER_SOURCE = 16
DRAIN_KEEP = 120.0  # s a deregistered client's peer stays, so its in-flight connections finish
SUMMARY_EVERY = 10.0  # s between lines that total the rejections
# Refusals that are no sign of a bad client. A failed attestation comes with a valid token:
# the machine changed, and the limiter must not shut out its neighbours behind one NAT.
NO_PENALTY = ("busy", "rate-limited", "down", "full", "attestation")
MAX_ATTESTATION_REFUSALS = 32  # the last refusals kept for `status`


class RegistrationApi:
    """Serves registrations for one server role. Leases and the draining set are the role's;
    the counts, limits and queued peers are this API's own."""

    def __init__(self, role: Server) -> None:
        self.role = role
        self.limiter = FailureLimiter()
        self.rejections = RejectionLog(log)  # a line per source per interval, then a summary
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()
        # Registrations change leases and peers in memory; commit() puts them into the kernel
        # and the leases file, many registrations at a time.
        self.pending_peers: dict[str, PeerChange] = {}
        self.change_version = 0  # bumped by each registration that changes a lease or a peer ...
        self.committed_version = 0  # ... and how far the kernel and the leases file have it
        self.commit_lock = asyncio.Lock()
        self.verifier: attest.Verifier | None = None
        self.prover: attest.Prover | None = None
        self.configure_attestation()
        self.verdicts: dict[str, attest.Verdict] = {}  # lease holder's key -> its last check (role.forget_client drops it)
        self.verified_at: dict[str, float] = {}  # lease holder's key -> when its evidence last verified (monotonic)
        self.started = time.monotonic()  # a restarted server gives the clients it adopts max_age to prove themselves
        self.attestations: Counter[str] = Counter()  # verified | refused | admitted (require = false)
        self.attestation_refusals: deque[tuple[float, str, str, str]] = deque(maxlen=MAX_ATTESTATION_REFUSALS)

    def configure_attestation(self) -> None:
        """The verifier of clients' evidence and the prover of this server's own, from the
        config (again after a reload: a new reference applies from the next registration)."""
        conf = self.role.cfg.attestation
        self.verifier = conf.verifier() if conf else None
        self.prover = attest.make_prover(conf.evidence, self.role.cfg.state_dir) if conf and conf.evidence else None

    @property
    def private_key(self) -> str:
        assert self.role.private_key is not None  # a read-only role serves no registrations
        return self.role.private_key

    @property
    def public_key(self) -> str:
        assert self.role.public_key is not None
        return self.role.public_key

    def authorize(self, claim: proto.Claim, challenge: bytes) -> str:
        """The generation of the token the claim proves knowledge of; ProtocolError if none."""
        domain = self.role.cfg.domain(claim.domain)
        if domain is None:
            raise ProtocolError(f"this server does not serve {printable(claim.domain)}", reason="unknown-domain")
        try:
            tokens = valid_tokens(domain.token_file)
        except SptunError as e:
            log.error("%s: %s", domain.name, e)
            raise ProtocolError(f"{domain.name} has no token on this server", reason="no-token") from None
        for token in tokens:
            if claim.proves(token.secret, self.public_key, challenge):
                return token.generation
        raise ProtocolError(f"wrong token for {domain.name}", reason="bad-token")

    async def check_evidence(self, claim: proto.Claim, challenge: bytes) -> attest.Verdict:
        """The claim's evidence, checked against this exchange's nonce. With `require`, a
        refusal also takes a client that holds a lease out of its rotation now, as a
        deregistration does (its measurements changed since it was admitted): no new
        connection goes to it, and those it serves finish (or its peer goes after DRAIN_KEEP)."""
        assert self.verifier is not None and self.role.cfg.attestation is not None
        nonce = attest.nonce(challenge, claim.client_key, self.public_key, claim.domain)
        verdict = await self.verifier.verify(claim.evidence, nonce, claim.client_key, claim.domain)
        if verdict.ok:
            self.attestations["verified"] += 1
            return verdict
        if not self.role.cfg.attestation.require:
            self.attestations["admitted"] += 1
            log.warning("attestation of %s (%s) failed, admitted as require = false: %s",
                        claim.client_key, claim.domain, verdict.detail)
            return verdict
        self.attestations["refused"] += 1
        self.attestation_refusals.append((time.time(), claim.client_key, claim.domain, verdict.detail))
        async with self.role.lock:
            if claim.client_key in self.role.leases.by_key:
                self.verdicts[claim.client_key] = verdict
                if claim.client_key not in self.role.draining:
                    log.warning("attestation of %s (%s) failed: out of its rotation: %s", claim.client_key,
                                claim.domain, verdict.detail)
                    await asyncio.to_thread(self.drain, claim.client_key, "attestation failed")
        raise ProtocolError(f"attestation failed: {verdict.detail}", reason="attestation")

    def expire_attestations(self) -> list[str]:
        """Runs under the lock, in a pass. With `require`: a client whose last good evidence
        is older than max_age leaves its rotation, as on a refusal: it stopped registering,
        and so stopped proving what it runs."""
        conf = self.role.cfg.attestation
        if conf is None or not conf.require:
            return []
        now, done = time.monotonic(), []
        for lease in self.role.leases.all():
            key = lease.public_key
            age = now - self.verified_at.get(key, self.started)
            if key in self.role.draining or age <= conf.max_age:
                continue
            self.verdicts[key] = attest.Verdict(False, f"no fresh evidence for {age:.0f} s (max_age {conf.max_age:g} s)")
            log.warning("attestation of %s (%s): no fresh evidence for %.0f s: out of its rotation", key, lease.domain, age)
            self.drain(key, "no fresh evidence")
            done.append(f"drain {lease.overlay_ip} of {key} ({lease.domain}): no fresh evidence for {age:.0f} s")
        return done

    async def present_evidence(self, asked: proto.EvidenceRequest, reader: asyncio.StreamReader) -> bytes:
        """This server's own evidence, for an agent that checks its servers, unless it hangs up
        before the quote's turn (ConnectionAbortedError: nothing to answer, no penalty)."""
        if self.prover is None:
            raise ProtocolError("this server presents no attestation evidence ([attestation] evidence)",
                                reason="no-evidence")
        nonce = attest.nonce(asked.challenge, self.public_key, asked.client_key, asked.domain)
        return proto.evidence_reply(await self.prover.evidence(nonce, asked.ask, wanted=lambda: not reader.at_eof()))

    def register(self, claim: proto.Claim, generation: str) -> proto.Assignment:
        """Runs under the lock, in memory only: the lease, and the peer queued for commit().
        The table follows once the client's handshake proves it is live."""
        leases, domain = self.role.leases, self.role.cfg.domain(claim.domain)
        assert domain is not None  # authorize() checked
        if leases.is_evicted(claim.client_key, generation):
            raise ProtocolError("this key was evicted (sptun evict); it may join again once the token is rotated",
                                reason="evicted")
        held = leases.by_key.get(claim.client_key)
        if (held is None or held.domain != domain.name) and leases.count[domain.name] >= domain.max_clients:
            raise ProtocolError(f"{domain.name} has its {domain.max_clients} clients (max_clients)", reason="full")
        if self.role.draining.pop(claim.client_key, None) is not None:
            self.role.health.rejoin(claim.client_key)
        try:
            lease, changed = leases.acquire(claim.client_key, claim.domain, generation, ipv6=claim.ipv6)
        except OverlayFull as e:  # a refusal like max_clients: no penalty for the client's address
            raise ProtocolError(f"{e} (no overlay address free for {domain.name})", reason="full") from None
        if changed:
            self.change_version += 1
            if held is None or held.domain != lease.domain:
                log.info("registered %s for %s at %s", lease.public_key, lease.domain, lease.overlay_ip)
            elif not held.ipv6 and lease.ipv6 and self.role.cfg.overlay6:
                # Its service listens on IPv6 now, but its tunnel has no IPv6 address until its
                # agent hears this answer: it joins the IPv6 rotations as a new client does,
                # after `rise` good IPv6 checks; its IPv4 rotations keep it.
                self.role.health.by_key6.pop(lease.public_key, None)
                log.info("client %s serves IPv6 now: in its IPv6 rotations once it passes its checks", lease.overlay_ip)
        # A refresh of a known client changes nothing: the last pass saw its peer.
        state = self.role.device.peers.get(lease.public_key)
        peer = peer_of(lease, self.role.cfg)
        # The last pass found the interface (is_ours costs a netlink dump of every link).
        if (state is None or state.peer.allowed_ips != peer.allowed_ips) and self.role.device.public_key is not None:
            self.pending_peers[lease.public_key] = PeerChange("add" if state is None else "update", peer)
            self.change_version += 1
        seen = state is not None and handshake_fresh(state.last_handshake, time.time())
        cfg = self.role.cfg
        ip6 = cfg.ip6_of(lease.overlay_ip) if lease.ipv6 else None  # none for a client that serves IPv4 only
        return proto.Assignment(lease.overlay_ip, str(cfg.server_ip), self.public_key, cfg.overlay.prefixlen, seen,
                                ip6, str(cfg.server_ip6) if ip6 else None, cfg.overlay6.prefixlen if ip6 and cfg.overlay6 else None)

    def drain(self, key: str, why: str) -> None:
        """Runs under the lock: out of the rotation now; the peer stays while its connections finish."""
        lease = self.role.leases.by_key.get(key)
        if lease is not None:
            self.role.draining[lease.public_key] = time.monotonic() + DRAIN_KEEP
            self.role.apply_rotation()
            log.info("%s (%s) out of the rotation of %s, draining: %s", lease.public_key, lease.overlay_ip,
                     lease.domain, why)

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
        self.role.apply(Applier(self.role.edges, self.role.private_key), [UpdatePeer(self.role.cfg.interface, p) for p in peers])
        self.role.store.save(self.role.leases)
        self.role.make_view()  # status shows the new leases now, not after the next pass

    async def summarise_rejections(self) -> None:
        """Every SUMMARY_EVERY: one line with the rejections since the last, if any."""
        while True:
            await asyncio.sleep(SUMMARY_EVERY)
            self.rejections.flush()

    @staticmethod
    async def read_line(reader: asyncio.StreamReader, timeout: float) -> bytes:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except ValueError:  # longer than the stream limit
            raise ProtocolError(f"message larger than {proto.MAX_MESSAGE} bytes", reason="oversized") from None
        except TimeoutError:
            raise ProtocolError("no request in time", reason="timeout") from None
        if not line.endswith(b"\n"):
            raise ProtocolError("truncated message", reason="truncated")
        return line

    async def handle_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = str((writer.get_extra_info("peername") or ("?",))[0])
        source = source_key(address)  # an IPv6 /64 counts as one source
        self.connections[source] += 1
        try:
            if sum(self.connections.values()) > MAX_CONNECTIONS or self.connections[source] > MAX_PER_SOURCE:
                raise ProtocolError("too many connections", reason="busy")
            if self.limiter.blocked(address):
                raise ProtocolError("too many bad attempts; try again later", reason="rate-limited")
            if self.role.is_down():
                raise ProtocolError("this server is down (sptun down)", reason="down")
            challenge = os.urandom(proto.CHALLENGE_LEN)
            writer.write(proto.hello(self.public_key, challenge, self.verifier.ask() if self.verifier else None))
            await writer.drain()
            wait = API_READ_TIMEOUT + (attest.EXCHANGE_GRACE if self.verifier or self.prover else 0)
            line = await self.read_line(reader, wait)
            if (asked := proto.parse_evidence_request(line)) is not None:  # the agent checks us first
                writer.write(await self.present_evidence(asked, reader))
                await writer.drain()
                line = await self.read_line(reader, wait)
            claim = proto.open_request(line, self.private_key, challenge)
            generation = self.authorize(claim, challenge)
            verdict = await self.check_evidence(claim, challenge) if self.verifier and claim.op == "register" else None
            assignment = None
            async with self.role.lock:
                if claim.op == "deregister":
                    await asyncio.to_thread(self.drain, claim.client_key, "deregistered")  # an nft change
                else:
                    assignment = self.register(claim, generation)
                    if verdict is not None:  # kept for lease holders only: forget_client drops them
                        self.verdicts[claim.client_key] = verdict
                        if verdict.ok:
                            self.verified_at[claim.client_key] = time.monotonic()
            await self.commit()  # the peer is in the kernel and the lease on disk before the client hears of it
            self.accepted += 1
            writer.write(proto.accept(assignment, self.private_key, claim.client_key, challenge, claim.op))
        except ProtocolError as e:
            self.rejected[e.reason] += 1
            if e.reason in ("busy", "rate-limited"):  # counted; a flood of them writes no lines
                self.rejections.count(e.reason)
            else:
                self.rejections.record(address, e.reason, e.message)
            if e.reason not in NO_PENALTY:
                self.limiter.fail(address)
            writer.write(proto.reject(e.reason, e.message))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Shutdown: the exchange is abandoned, and the task ends as if done. Cancelled, Python
            # 3.11's stream protocol asks it for its exception, and the loop logs a traceback.
            pass
        except Exception as e:  # SptunError, or a bug: counted, answered, and the next one is served
            self.rejected["error"] += 1
            self.limiter.fail(address)
            if isinstance(e, SptunError):
                self.rejections.record(address, "error", str(e))
            else:
                log.exception("registration from %s failed", printable(address))
            writer.write(proto.reject("error", "the server failed; try again"))
        finally:
            self.connections[source] -= 1
            if self.connections[source] <= 0:
                del self.connections[source]
            try:
                await writer.drain()
                writer.close()
            except (ConnectionError, OSError):
                pass
