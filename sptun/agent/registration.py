"""The agent's registrations with its servers: one task per server, each with a deadline
for the whole round trip, running beside the passes and never under the role's lock. A
black-holed server delays nobody but itself."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sptun import proto
from sptun.discovery import ServerRecord
from sptun.errors import SptunError
from sptun.keys import read_token, write_file_atomic

log = logging.getLogger("sptun")

REGISTER_EVERY = 10.0  # s; re-registering is idempotent and repairs a server that lost its state
RETRY_AFTER = 3.0
REGISTER_DEADLINE = 5.0  # s for one whole registration round trip
DEREGISTER_DEADLINE = 2.0  # s; `down` must not wait long on a server that does not answer
KICK_GRACE = 5.0  # s a new peer gets to complete its first handshake


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


class Registrar:
    """Registers with each server on its own schedule, concurrently."""

    def __init__(self, domain: str, token_file: Path, private_key: str, public_key: str,
                 on_change: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.domain, self.token_file = domain, token_file
        self.private_key, self.public_key = private_key, public_key
        self.on_change = on_change  # wakes the pass loop
        self.clock = clock
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def exchange(self, server: ServerRecord, op: str, deadline: float) -> proto.Assignment | None:
        request = proto.Request(op, self.domain, read_token(self.token_file), self.public_key)
        _, assignment = await proto.exchange_async(server.ip, server.api, request, self.private_key,
                                                   pinned_key=server.pk, timeout=deadline)
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
            assignment = await self.exchange(server, "register", REGISTER_DEADLINE)
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
