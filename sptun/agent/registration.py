"""The agent's registrations with its servers: one task per server, each with a deadline
for the whole round trip, running beside the passes and never under the role's lock. A
black-holed server delays nobody but itself."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from sptun import attest, proto
from sptun.discovery import ServerRecord
from sptun.errors import ProtocolError, SptunError, printable
from sptun.keys import read_token, write_file_atomic

log = logging.getLogger("sptun")

REGISTER_EVERY = 10.0  # s; re-registering is idempotent and repairs a server that lost its state
RETRY_AFTER = 3.0
REGISTER_DEADLINE = 5.0  # s for one whole registration round trip
DEREGISTER_DEADLINE = 2.0  # s; `down` must not wait long on a server that does not answer
KICK_GRACE = 5.0  # s a new peer gets to complete its first handshake
MAX_KNOWN_SERVERS = 1024


@dataclass
class Registration:
    """Where the agent stands with one server. Changed only on the event loop."""

    server: ServerRecord
    assignment: proto.Assignment | None = None
    error: str = ""
    next_at: float = 0.0  # monotonic time of the next (re)registration
    configured_at: float = 0.0  # when its peer was last (re)configured; 0 = not yet
    kick: bool = False  # the server lost our session (restarted?): re-add the peer
    drained: bool = False  # deregistered and drained: its tunnel goes in the next pass, then it


class StateFile:
    """agent.json: each server's assignment, so a restarted agent keeps its addresses."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: str | None = None

    def load(self) -> dict[str, Registration]:
        try:
            data = json.loads(self.path.read_text())
            found = {}
            for item in data["tunnels"]:
                server = ServerRecord(**item["server"])
                a = item.get("assignment")
                found[server.ip] = Registration(server, proto.Assignment(**a) if a else None)
            self.written = None
            return found
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring damaged %s (%s); registering afresh", self.path, e)
            return {}

    @staticmethod
    def render(registrations: dict[str, Registration]) -> str:
        data = {"tunnels": [{"server": asdict(r.server), "assignment": asdict(r.assignment) if r.assignment else None}
                            for r in registrations.values()]}
        return json.dumps(data, indent=1) + "\n"

    def save(self, registrations: dict[str, Registration]) -> None:
        text = self.render(registrations)
        if text == self.written:
            return
        if not self.path.exists() or self.path.read_text() != text:
            write_file_atomic(self.path, text)
        self.written = text


class KnownServers:
    """known_servers.json: the key each server without pk= in DNS presented first (trust on
    first use). A different key later is refused until `sptun forget IP`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, str] = {}
        try:
            data = json.loads(path.read_text())
            self.keys = {str(ip): str(key) for ip, key in data["servers"].items() if proto.canonical_key(str(key))}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring damaged %s (%s): servers without pk= are trusted on first use again", path, e)

    def pin(self, server: ServerRecord) -> proto.Pin | None:
        if server.pk is not None:
            return proto.Pin(server.pk, f"DNS pins pk={server.pk}")
        key = self.keys.get(server.ip)
        if key is None:
            return None
        return proto.Pin(key, f"it presented {key} before (trusted on first use, no pk= in DNS); "
                              f"if it was re-keyed, run `sptun forget {server.ip}`")

    def remember(self, server: ServerRecord, key: str) -> None:
        if server.pk is not None or self.keys.get(server.ip) == key:
            return
        log.warning("server %s has no pk= in its TXT record: trusting the key it presented, %s, from now on "
                    "(publish pk= to pin it)", server.ip, key)
        self.keys.pop(server.ip, None)
        self.keys[server.ip] = key
        while len(self.keys) > MAX_KNOWN_SERVERS:
            del self.keys[next(iter(self.keys))]
        self.save()

    @classmethod
    def of(cls, state_dir: Path) -> KnownServers:
        return cls(state_dir / "known_servers.json")

    def forget(self, ip: str) -> list[str]:
        """`sptun forget IP`: the next key that server presents is trusted on first use."""
        ip = server_ip(ip)
        if self.keys.pop(ip, None) is None:
            raise SptunError(f"no key is remembered for {printable(ip, 60)}",
                             hint="only servers without pk= in DNS are remembered; `sptun status` lists the servers")
        self.save()
        return [f"forget the key of {ip}: its next key is trusted on first use"]

    def save(self) -> None:
        write_file_atomic(self.path, json.dumps({"servers": self.keys}, indent=1) + "\n")


def server_ip(text: str) -> str:
    """A server's address as sptun keeps it (discovery's str(ip_address)), so that
    `sptun forget 2001:DB8::0010` finds 2001:db8::10."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise SptunError(f"{printable(text, 60)} is not an IP address",
                         hint="give the server's address as in its TXT record's ip=") from None


def host_addresses() -> set[str]:
    """The addresses on this host's interfaces other than sptun's own tunnels."""
    from sptun.agent.plan import PREFIX

    return {a.address.split("%")[0] for name, addrs in psutil.net_if_addrs().items() if not name.startswith(PREFIX)
            for a in addrs if a.family.name in ("AF_INET", "AF_INET6")}


def check_assignment(a: proto.Assignment, server: ServerRecord, presented_key: str, taken: Iterable[str]) -> None:
    """What a server assigns, checked before it touches the host: a rogue server must not
    make this host take another's address (a server's, the resolver's, 169.254.169.254)."""
    def bad(problem: str) -> ProtocolError:
        return ProtocolError(f"server {server.ip} assigns {problem}; refusing it", reason="bad-assignment")

    if a.server_key != presented_key:
        raise bad(f"the key {a.server_key}, not the one it proved ({presented_key})")
    if not 8 <= a.prefixlen <= 30:
        raise bad(f"an overlay prefix of /{a.prefixlen}")
    try:
        mine, its = ipaddress.IPv4Address(a.overlay_ip), ipaddress.IPv4Address(a.server_ip)
    except ValueError:
        raise bad("an address that is not IPv4") from None
    overlay = ipaddress.IPv4Network(f"{its}/{a.prefixlen}", strict=False)
    for address in (mine, its):
        if address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified \
                or address.is_reserved:
            raise bad(f"the special address {address}")
    if mine not in overlay or mine in (its, overlay.network_address, overlay.broadcast_address):
        raise bad(f"{mine}, which is not a client address in its overlay {overlay}")
    if ipaddress.ip_address(server.ip) in overlay:
        raise bad(f"the overlay {overlay}, which holds its own endpoint {server.ip}")
    if str(mine) in set(taken):
        raise bad(f"{mine}, an address this host already uses")
    if a.overlay_ip6 is not None:
        _check_ipv6(a, server, taken, bad)


def _check_ipv6(a: proto.Assignment, server: ServerRecord, taken: Iterable[str],
                bad: Callable[[str], ProtocolError]) -> None:
    """The IPv6 half of an assignment, checked as the IPv4 half is."""
    if a.prefixlen6 is None or not 8 <= a.prefixlen6 <= 126:
        raise bad(f"an IPv6 overlay prefix of /{a.prefixlen6}")
    try:
        mine, its = ipaddress.IPv6Address(a.overlay_ip6 or ""), ipaddress.IPv6Address(a.server_ip6 or "")
    except ValueError:
        raise bad("an IPv6 overlay address that is not IPv6") from None
    overlay = ipaddress.IPv6Network(f"{its}/{a.prefixlen6}", strict=False)
    for address in (mine, its):
        if address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified \
                or address.is_reserved or address.ipv4_mapped or address.is_site_local:
            raise bad(f"the special address {address}")
    if mine not in overlay or mine in (its, overlay.network_address):
        raise bad(f"{mine}, which is not a client address in its IPv6 overlay {overlay}")
    if ipaddress.ip_address(server.ip) in overlay:
        raise bad(f"the IPv6 overlay {overlay}, which holds its own endpoint {server.ip}")
    if str(mine) in set(taken):
        raise bad(f"{mine}, an address this host already uses")


class Registrar:
    """Registers with each server on its own schedule, concurrently."""

    def __init__(self, domain: str, token_file: Path, private_key: str, public_key: str,
                 on_change: Callable[[], None], known: KnownServers, clock: Callable[[], float] = time.monotonic,
                 nameservers: tuple[str, ...] = (), attestation: proto.Attestation | None = None) -> None:
        self.domain, self.token_file = domain, token_file
        self.private_key, self.public_key = private_key, public_key
        self.on_change = on_change  # wakes the pass loop
        self.known = known
        self.clock = clock
        self.nameservers = nameservers  # an assignment must not take a resolver's address
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.ipv6 = True  # the service listens on IPv6 too: say so, and get IPv6 browsers
        self.attestation = attestation

    async def exchange(self, server: ServerRecord, op: str, deadline: float) -> proto.Assignment | None:
        request = proto.Request(op, self.domain, read_token(self.token_file), self.public_key, self.ipv6)
        key, assignment = await proto.exchange_async(server.ip, server.api, request, self.private_key,
                                                     pin=self.known.pin(server), timeout=deadline,
                                                     attestation=self.attestation)
        if assignment is not None:
            check_assignment(assignment, server, key, host_addresses() | set(self.nameservers))
        if op == "register":
            self.known.remember(server, key)
        return assignment

    def start_due(self, registrations: dict[str, Registration]) -> None:
        """A registration task for each server that is due and has none running."""
        now = self.clock()
        for ip, reg in registrations.items():
            running = self.tasks.get(ip)
            if now >= reg.next_at and (running is None or running.done()):
                self.tasks[ip] = asyncio.create_task(self.register(reg))

    async def register(self, reg: Registration) -> None:
        server = reg.server
        try:
            attests = self.attestation is not None and (self.attestation.prover or self.attestation.verifier)
            assignment = await self.exchange(server, "register", REGISTER_DEADLINE + (attest.EXCHANGE_GRACE if attests else 0))
        except SptunError as e:
            if str(e) != reg.error:
                log.warning("registration with %s failed: %s", server.ip, e)
                reg.error = str(e)
                self.on_change()
            reg.next_at = self.clock() + RETRY_AFTER
            return
        now = self.clock()
        reg.next_at = now + REGISTER_EVERY
        changed = bool(reg.error) or assignment != reg.assignment
        reg.error = ""
        if assignment is not None and not assignment.seen and reg.configured_at and now - reg.configured_at > KICK_GRACE:
            log.warning("%s has no session with us (restarted?); handshaking again", server.ip)
            reg.kick, changed = True, True
        if assignment != reg.assignment:
            log.info("registered with %s: overlay %s", server.ip, assignment.overlay_ip if assignment else "-")
        reg.assignment = assignment
        if changed:
            self.on_change()

    async def deregister(self, regs: list[Registration]) -> None:
        """Tell these servers we leave, all at once, within DEREGISTER_DEADLINE. A server that
        does not hear it forgets us anyway once our handshakes stop."""
        for reg in regs:
            task = self.tasks.pop(reg.server.ip, None)
            if task is not None:
                task.cancel()
        leaving = [r for r in regs if r.assignment is not None]
        results = await asyncio.gather(*(self.exchange(r.server, "deregister", DEREGISTER_DEADLINE) for r in leaving),
                                       return_exceptions=True)
        for reg, result in zip(leaving, results, strict=True):
            if isinstance(result, SptunError):
                log.warning("deregistration from %s failed: %s", reg.server.ip, result)
            elif isinstance(result, BaseException):
                raise result

    def cancel_all(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
