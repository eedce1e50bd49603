"""Overlay address leases of a server: which client key holds which address, for which domain."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sptun.errors import SptunError
from sptun.keys import write_file_atomic
from sptun.proto import canonical_key

log = logging.getLogger("sptun")

FORMAT = 2  # 1: without generation and seen (read as seen now, generation unknown)
SEEN_STEP = 60.0  # s: `seen` is kept (and written) no finer than this, or lease_ttl / 4 if less
MAX_EVICTED = 4096  # evicted keys remembered; the oldest is forgotten first


class OverlayFull(SptunError):
    """No address of the overlay is free: the server's capacity, not the client's fault."""


@dataclass(frozen=True)
class Lease:
    public_key: str
    domain: str
    overlay_ip: str
    since: float
    generation: str = ""  # of the token it joined with ("": not known, from an older sptun)
    seen: float = 0.0  # wall clock of its last registration or handshake, to SEEN_STEP
    ipv6: bool = True  # its service listens on IPv6, as it said when it registered


class Leases:
    """All leases of one overlay. A key keeps its address for as long as it holds a lease."""

    def __init__(self, overlay: ipaddress.IPv4Network, leases: list[Lease] | None = None,
                 seen_step: float = SEEN_STEP) -> None:
        self.overlay = overlay
        self.seen_step = seen_step  # well under lease_ttl, or a live client could look silent
        self.by_key: dict[str, Lease] = {}
        self._used: set[ipaddress.IPv4Address] = set()
        self._next = int(overlay.network_address) + 2  # the first address is the server's
        self._sorted: list[Lease] | None = None  # all(), kept until the next change: the daemon asks every second
        self._by_ip: dict[str, Lease] | None = None  # at()'s index, kept likewise
        self.count: Counter[str] = Counter()  # leases per domain
        # Evicted keys, and the token generation they were evicted under: they stay out until
        # the domain's token changes.
        self.evicted: dict[str, str] = {}
        for lease in leases or []:
            address = ipaddress.IPv4Address(lease.overlay_ip)
            if lease.public_key in self.by_key or address in self._used or not self._usable(address):
                log.warning("dropping lease of %s: %s is taken or outside %s, or the key has a lease already",
                            lease.public_key, address, overlay)
                continue
            self.by_key[lease.public_key] = lease
            self._used.add(address)
            self.count[lease.domain] += 1

    def _usable(self, address: ipaddress.IPv4Address) -> bool:
        first, last = int(self.overlay.network_address) + 2, int(self.overlay.broadcast_address) - 1
        return first <= int(address) <= last

    def acquire(self, public_key: str, domain: str, generation: str = "", now: float | None = None,
                ipv6: bool = True) -> tuple[Lease, bool]:
        """The key's lease for domain, new or existing; and whether anything changed that
        the leases file should record."""
        now = time.time() if now is None else now
        old = self.by_key.get(public_key)
        if old is not None and old.domain == domain:
            if old.generation == generation and old.ipv6 == ipv6 and now - old.seen < self.seen_step:
                return old, False
            lease = dataclasses.replace(old, generation=generation, seen=now, ipv6=ipv6)
        elif old is not None:  # the same key moved to another domain: keep its address
            lease = Lease(public_key, domain, old.overlay_ip, now, generation, now, ipv6)
        else:
            lease = Lease(public_key, domain, str(self._free_address()), now, generation, now, ipv6)
            self._used.add(ipaddress.IPv4Address(lease.overlay_ip))
        self._put(old, lease)
        return lease, True

    def _put(self, old: Lease | None, lease: Lease) -> None:
        if old is not None:
            self.count[old.domain] -= 1
        self.count[lease.domain] += 1
        self.by_key[lease.public_key] = lease
        self._sorted = self._by_ip = None

    def saw(self, public_key: str, when: float) -> bool:
        """A handshake (or registration) at `when`: True if the lease's `seen` moved, which
        happens at most once per seen_step, so that writing it stays cheap."""
        lease = self.by_key.get(public_key)
        if lease is None or when - lease.seen < self.seen_step:
            return False
        self._put(lease, dataclasses.replace(lease, seen=when))
        return True

    def adopt_generation(self, public_key: str, generation: str) -> bool:
        lease = self.by_key.get(public_key)
        if lease is None or lease.generation:
            return False
        self._put(lease, dataclasses.replace(lease, generation=generation))
        return True

    def evict(self, public_key: str, generation: str) -> Lease | None:
        """Release a key's lease, and keep it out until the token's generation changes."""
        self.evicted.pop(public_key, None)
        self.evicted[public_key] = generation
        while len(self.evicted) > MAX_EVICTED:
            del self.evicted[next(iter(self.evicted))]
        return self.release(public_key)

    def is_evicted(self, public_key: str, generation: str) -> bool:
        return self.evicted.get(public_key) == generation

    def adopt(self, lease: Lease) -> bool:
        """Take a lease found elsewhere (a peer on the interface) if its address is free."""
        address = ipaddress.IPv4Address(lease.overlay_ip)
        if lease.public_key in self.by_key or address in self._used or not self._usable(address):
            return False
        self._put(None, lease)
        self._used.add(address)
        return True

    def release(self, public_key: str) -> Lease | None:
        lease = self.by_key.pop(public_key, None)
        if lease is not None:
            self._used.discard(ipaddress.IPv4Address(lease.overlay_ip))
            self.count[lease.domain] -= 1
            self._sorted = self._by_ip = None
        return lease

    def _free_address(self) -> ipaddress.IPv4Address:
        first, last = int(self.overlay.network_address) + 2, int(self.overlay.broadcast_address) - 1
        size = last - first + 1
        for i in range(size):  # next-fit from where the last lease went: O(1) while addresses last
            candidate = ipaddress.IPv4Address(first + (self._next - first + i) % size)
            if candidate not in self._used:
                self._next = int(candidate) + 1
                return candidate
        raise OverlayFull(f"the overlay {self.overlay} is full", hint="use a larger overlay")

    def for_domain(self, domain: str) -> list[Lease]:
        return [lease for lease in self.all() if lease.domain == domain]

    def all(self) -> list[Lease]:
        if self._sorted is None:
            self._sorted = sorted(self.by_key.values(), key=_address_key)
        return list(self._sorted)

    def at(self, addresses: Iterable[str]) -> list[Lease]:
        """The leases of some IPv4 overlay addresses (none for an address nobody holds), in
        address order: a few of them without a walk over all."""
        if self._by_ip is None:
            self._by_ip = {lease.overlay_ip: lease for lease in self.by_key.values()}
        return sorted((lease for a in addresses if (lease := self._by_ip.get(a)) is not None), key=_address_key)


def _address_key(lease: Lease) -> tuple[int, ...]:
    """Sort key of a lease's (valid, dotted) IPv4 address: ipaddress.IPv4Address costs 10x more."""
    return tuple(map(int, lease.overlay_ip.split(".")))


def dumps(leases: Leases) -> str:
    """One lease to a line. Each registration's commit writes the whole file: json's C encoder
    (not used with indent=) and vars() (not dataclasses.asdict) make that 5x cheaper."""
    encode = json.JSONEncoder().encode
    rows = ",\n".join(map(encode, map(vars, leases.all())))
    return f'{{"format": {FORMAT}, "leases": [\n{rows}\n], "evicted": {encode(leases.evicted)}}}\n'


def loads(text: str) -> list[Lease]:
    return parse(text)[0]


def parse(text: str, now: float | None = None) -> tuple[list[Lease], dict[str, str]]:
    """Parse a leases file into its leases and evicted keys; ValueError if it is not one."""
    now = time.time() if now is None else now
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") not in (1, FORMAT) or not isinstance(data.get("leases"), list):
        raise ValueError("not an sptun leases file")
    leases = []
    for item in data["leases"]:
        if not isinstance(item, dict):
            raise ValueError("a lease is not an object")
        lease = Lease(str(item["public_key"]), str(item["domain"]), str(item["overlay_ip"]), float(item["since"]),
                      str(item.get("generation", "")), float(item.get("seen", now)), item.get("ipv6") is not False)
        if canonical_key(lease.public_key) != lease.public_key:
            raise ValueError(f"lease key {lease.public_key!r} is not a WireGuard key in canonical base64")
        ipaddress.IPv4Address(lease.overlay_ip)
        leases.append(lease)
    evicted = data.get("evicted", {})
    if not isinstance(evicted, dict):
        raise ValueError("evicted is not an object")
    return leases, {str(k): str(v) for k, v in evicted.items()}


class LeaseStore:
    """leases.json in the state dir, written atomically, with the previous version kept as
    leases.json.bak so that a damaged file never loses every lease."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "leases.json"
        self.backup = state_dir / "leases.json.bak"
        self.damaged: Path | None = None
        self.evicted: dict[str, str] = {}  # as the last load() found them

    def load(self) -> list[Lease]:
        """The leases, from the backup if the file is damaged. Reading changes nothing on disk
        (`sptun status` reads too); the damaged file is set aside by the next save."""
        self.damaged = None
        for path in (self.path, self.backup):
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                leases, self.evicted = parse(text)
            except (ValueError, KeyError, TypeError) as e:
                log.error("%s is damaged (%s); trying the backup", path, e)
                if path == self.path:
                    self.damaged = path
                continue
            if path == self.backup:
                log.warning("restored %d leases from %s", len(leases), path)
            return leases
        return []

    def save(self, leases: Leases) -> None:
        text = dumps(leases)
        if self.damaged is not None and self.path.exists():  # keep the evidence, and the good backup
            aside = self.path.with_name(f"{self.path.name}.damaged-{time.time_ns()}")
            self.path.rename(aside)
            log.warning("kept the damaged %s as %s", self.path, aside)
            self.damaged = None
        elif self.path.exists():
            self.path.replace(self.backup)
        write_file_atomic(self.path, text)
