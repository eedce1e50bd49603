"""Health checks of the backends: a fresh WireGuard handshake, then a TCP connect to the
domain's first TCP port through the tunnel, unless the kernel saw the backend answer one of
its forwarded connections a moment ago (then that is the check: a busy backend is never
probed). `healthy` on the server means exactly this. Each family is checked on its own: a
lease's IPv6 twin (a dual-stack server, a client whose service listens on IPv6) has a
health of its own, and leaves or joins the IPv6 rotations alone."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Set
from dataclasses import dataclass

from sptun.config import ServerConfig
from sptun.leases import Lease
from sptun.wg import Device, handshake_fresh

log = logging.getLogger("sptun")


@dataclass
class Health:
    """One backend's health, with fall/rise hysteresis. A new backend starts out of rotation."""

    up: bool = False
    streak: int = 0  # checks in a row that disagree with `up`
    reason: str = "not checked yet"
    checked: float = 0.0
    passed: float = 0.0  # time.time() of the last check it passed (or of its adoption)
    # Registered again after a deregistration: its tunnel may be new (its agent made the
    # interface again), so the kernel's record of its old connections' SYN-ACKs proves
    # nothing: only its own probes, through the tunnel, bring it back.
    rejoined: bool = False

    def record(self, ok: bool, reason: str, fall: int, rise: int) -> bool:
        """Take one check's result; True if the backend changed state."""
        self.reason, self.checked = reason, time.time()
        if ok:
            self.passed = self.checked
        self.streak = self.streak + 1 if ok != self.up else 0
        if self.streak >= (rise if ok else fall):
            self.up, self.streak = ok, 0
            self.rejoined = self.rejoined and not ok
            return True
        return False


def check_port(cfg: ServerConfig, domain: str) -> int | None:
    """The port a health check connects to: the domain's first TCP port (None: UDP only)."""
    d = cfg.domain(domain)
    return next((p.number for p in d.ports if p.proto == "tcp"), None) if d else None


NO_HANDSHAKE = "no recent WireGuard handshake"
REJOINED = "registered again: not checked since"
UNANSWERED = "connections to it go unanswered (seen by the kernel)"
ANSWERING = "answering its connections (seen by the kernel)"
# Connects in flight at once, per family. A round of a thousand at once, on a busy server,
# misses its timeouts together: under emulation (the VM tier) not one of 1,000 freshly
# handshaken clients passed in 100 s, with every connect in flight at once.
PROBES_IN_FLIGHT = 128


async def probe(cfg: ServerConfig, lease: Lease, address: str) -> tuple[bool, str]:
    port = check_port(cfg, lease.domain)
    if port is None:
        return True, "handshake fresh (UDP only: no connect check)"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), cfg.health.timeout)
    except TimeoutError:
        return False, f"tcp/{port} timed out"
    except OSError as e:
        return False, f"tcp/{port}: {e.strerror or e}"
    writer.close()
    return True, f"tcp/{port} answers"


class HealthChecks:
    """The health of every backend, by public key and family; changed only by check rounds
    (on the event loop) and by the passes' adoption of a running rotation."""

    def __init__(self) -> None:
        self.by_key: dict[str, Health] = {}  # at the lease's own (IPv4) address
        self.by_key6: dict[str, Health] = {}  # at its IPv6 twin

    def of(self, family: int) -> dict[str, Health]:
        return self.by_key6 if family == 6 else self.by_key

    def is_up(self, key: str, family: int = 4) -> bool:
        health = self.of(family).get(key)
        return health is not None and health.up

    def adopt(self, leases: list[Lease], serving: set[str], family: int = 4) -> None:
        """A restarted daemon trusts the rotation it finds until its own checks say otherwise:
        emptying it while the first checks run would refuse every request. serving: the
        leases (IPv4 addresses) in that family's rotations."""
        table = self.of(family)
        for lease in leases:
            if lease.overlay_ip in serving and lease.public_key not in table:
                table[lease.public_key] = Health(up=True, reason="in rotation when this daemon started",
                                                 passed=time.time())

    async def check(self, cfg: ServerConfig, leases: list[Lease], device: Device,
                    answered: Set[str] = frozenset(), suspects: Set[str] = frozenset(), family: int = 4) -> bool:
        """One round of checks of the given backends in one family, concurrently; True if any
        flipped. answered, suspects: the leases (IPv4 addresses) in that family's passive-health
        sets. A backend in `answered` passes without a probe, unless it is also a suspect (then
        it is probed)."""
        h = cfg.health
        table = self.of(family)

        def address(lease: Lease) -> str:
            return (cfg.ip6_of(lease.overlay_ip) or lease.overlay_ip) if family == 6 else lease.overlay_ip

        now = time.time()
        # A backend with no fresh handshake fails without a connect, and one the kernel saw
        # answer passes without one: no task for either (10k a second add up).
        results: dict[str, tuple[bool, str]] = {}
        to_probe = []
        for lease in leases:
            state = device.peers.get(lease.public_key)
            health = table.get(lease.public_key)
            if state is None or not handshake_fresh(state.last_handshake, now):
                results[lease.public_key] = (False, NO_HANDSHAKE)
            elif lease.overlay_ip in answered and lease.overlay_ip not in suspects and not (health and health.rejoined):
                results[lease.public_key] = (True, ANSWERING)
            else:
                to_probe.append(lease)
        gate = asyncio.Semaphore(PROBES_IN_FLIGHT)

        async def gated(lease: Lease) -> tuple[bool, str]:
            async with gate:  # the timeout runs from the connect, not from the wait for a turn
                return await probe(cfg, lease, address(lease))

        results.update(zip((lease.public_key for lease in to_probe),
                           await asyncio.gather(*(gated(lease) for lease in to_probe)), strict=True))
        flipped = False
        for lease in leases:
            ok, reason = results[lease.public_key]
            health = table.setdefault(lease.public_key, Health())
            if health.record(ok, reason, h.fall, h.rise):
                flipped = True
                log.info("backend %s of %s is %s: %s", address(lease), lease.domain, "up" if health.up else "down", reason)
        return flipped

    def suspect(self, leases: list[Lease], unanswered: set[str], family: int = 4) -> bool:
        """Take out at once, from that family's rotations, the backends the kernel saw leave
        connections unanswered (a SYN retransmitted to them, or a reset from them before any
        reply): faster than any probe. The active checks bring one back if it answers again.
        unanswered: leases (IPv4 addresses). True if any flipped."""
        flipped = False
        for lease in leases:
            health = self.of(family).get(lease.public_key)
            if lease.overlay_ip in unanswered and health is not None and health.up:
                health.up, health.streak, health.reason = False, 0, UNANSWERED
                health.checked = time.time()
                flipped = True
                log.info("backend %s of %s is down over IPv%d: %s", lease.overlay_ip, lease.domain, family, UNANSWERED)
        return flipped

    def rejoin(self, key: str) -> None:
        """A client back from a deregistration (`sptun down` and up, say): out of rotation
        until `rise` probes through its tunnel pass. Its old health would put it back at
        once, before its agent has even made its new tunnel: the connections sent to it then
        wait a SYN retransmission (a second) for it."""
        for table in (self.by_key, self.by_key6):
            table[key] = Health(reason=REJOINED, rejoined=True)

    def forget(self, key: str) -> None:
        self.by_key.pop(key, None)
        self.by_key6.pop(key, None)

    def forget_all_but(self, keys: set[str]) -> None:
        for table in (self.by_key, self.by_key6):
            for key in set(table) - keys:
                del table[key]

    def clear(self) -> None:
        self.by_key.clear()
        self.by_key6.clear()
