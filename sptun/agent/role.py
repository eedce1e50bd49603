"""The tunnel client: one WireGuard interface per server listed in DNS, registered with
each, and policy routing so that replies leave by the tunnel their connection came in on.

A pass: outside the lock, DNS and the registrations (each server on its own task); under
it, observe the kernel, plan (agent/plan.py, pure), apply (changes.Applier)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

from sptun import attest, proto
from sptun.agent.plan import (
    PREFIX,
    FALLBACK_PRIORITY,
    RULE_PRIORITY,
    AgentKernel,
    AgentWanted,
    Rule,
    TunnelWanted,
    interface_name,
    plan,
    plan_teardown,
)
from sptun.agent.registration import KnownServers, Registrar, Registration, StateFile, server_ip
from sptun.agent.sockets import SockDiag, Sockets
from sptun.changes import Applier, Edges, UpdatePeer, observe_link
from sptun.config import AgentConfig, check_token_files, load_agent
from sptun.daemon import Role, config_changes
from sptun.discovery import RETRY_AFTER_FAILURE, Discovery, DnsTxtSource, TxtSource
from sptun.errors import SptunError
from sptun.snapshot import AgentStatus, DnsStatus, TunnelStatus
from sptun.wg import handshake_fresh

log = logging.getLogger("sptun")

KERNEL_CHECK_EVERY = 10.0  # s between full reads of the kernel when nothing changed
MAX_ROUNDS = 4  # observe-plan-apply rounds in one pass: link, then rules and table, then peer


def attestation_of(cfg: AgentConfig) -> proto.Attestation:
    """The evidence this agent presents, and what it requires of its servers."""
    check = cfg.server_attestation
    return proto.Attestation(attest.make_prover(cfg.attestation, cfg.state_dir) if cfg.attestation else None,
                             check.verifier() if check else None, check is not None and check.require)


class Agent(Role):
    nft_in_process = False  # the agent loads its table rarely: `nft -f -`, not libnftables in its memory

    def __init__(self, cfg: AgentConfig, edges: Edges | None = None, source: TxtSource | None = None,
                 sockets: Sockets | None = None, discovery: Discovery | None = None,
                 clock: Callable[[], float] = time.monotonic, read_only: bool = False) -> None:
        super().__init__(cfg.state_dir, cfg.wireguard, edges, read_only)
        self.cfg = cfg
        self.clock = clock
        self.discovery = discovery or Discovery(cfg.domain, source or DnsTxtSource(cfg.nameservers), cfg.realm)
        self.sockets = sockets or SockDiag()
        self.state = StateFile(cfg.state_dir / "agent.json")
        self.registrations: dict[str, Registration] = self.state.load()
        self.known = KnownServers.of(cfg.state_dir)
        self.attestation = attestation_of(cfg)
        self.registrar = Registrar(cfg.domain, cfg.token_file, self.private_key, self.public_key, self.wake.set,
                                   self.known, clock, cfg.nameservers, self.attestation) \
            if self.private_key and self.public_key else None
        self.draining: dict[str, asyncio.Task[None]] = {}  # server ip -> its drain, while it runs
        self.listening = False
        self.last_wanted: AgentWanted | None = None
        self.configured: set[str] = set()  # interfaces whose peer a pass (re)configured, for note_configured
        self.kernel_checked = -KERNEL_CHECK_EVERY

    def check_config(self) -> None:
        check_token_files(self.cfg)

    async def start_services(self) -> list[asyncio.AbstractServer]:
        await attest.provision(self.attestation.prover)
        return []

    # --- outside the lock: DNS, registrations, drains ----------------------------------

    async def prepare(self, wait: bool = False) -> None:
        assert self.registrar is not None
        # A DNS query may wait seconds: in a thread. The cached answer, and sock_diag (the kernel
        # answers at once), cost less than a thread hop, which an idle agent makes every second.
        d = self.discovery
        # A server endpoint inside a tunnel's overlay would route WireGuard into itself.
        d.set_excluded({ipaddress.ip_interface(f"{r.assignment.overlay_ip}/{r.assignment.prefixlen}").network
                        for r in self.registrations.values() if r.assignment is not None})
        known = d.last_error
        try:
            found = await asyncio.to_thread(d.current) if d.due() else d.current()
        except SptunError as e:  # DNS never answered yet (down at boot, say): not a failed pass
            if wait and not self.registrations:
                raise  # `sptun up`: say why nothing comes up
            # The daemon is ready all the same: it keeps the tunnels it had (its last good
            # answer, from before a restart), `status` says why, and DNS is asked again.
            log.log(logging.DEBUG if str(e) == known else logging.ERROR, "no servers from DNS yet: %s", e)
            found = [reg.server for reg in self.registrations.values()]
        servers = {s.ip: s for s in found}
        self.listening = self.sockets.listening(self.cfg.ports)
        ipv6 = self.listening and self.sockets.listening6(self.cfg.ports)
        if ipv6 != self.registrar.ipv6:  # the servers learn it at once: they send IPv6 browsers, or stop
            if any(r.assignment for r in self.registrations.values()):
                log.info("the service %s on IPv6: registering again", "listens" if ipv6 else "does not listen")
            self.registrar.ipv6 = ipv6
            for reg in self.registrations.values():
                reg.next_at = 0.0
        for ip, reg in list(self.registrations.items()):
            if self.leaving(ip):
                continue
            if ip not in servers:
                self.start_drain(reg, f"{ip} left DNS")
            elif not self.listening and reg.assignment is not None:
                self.start_drain(reg, f"nothing listens on {', '.join(map(str, self.cfg.ports))}")
        for ip, server in servers.items():
            if self.leaving(ip):
                continue
            reg = self.registrations.setdefault(ip, Registration(server))
            if reg.server != server:
                reg.server, reg.next_at = server, 0.0
        if self.listening:
            self.registrar.start_due({ip: r for ip, r in self.registrations.items() if not self.leaving(ip)})
        if wait:
            await asyncio.gather(*self.registrar.tasks.values(), *self.draining.values(), return_exceptions=True)

    def leaving(self, ip: str) -> bool:
        reg = self.registrations.get(ip)
        return ip in self.draining or (reg is not None and reg.drained)

    def start_drain(self, reg: Registration, why: str) -> None:
        log.info("tunnel to %s goes: %s", reg.server.ip, why)
        self.draining[reg.server.ip] = asyncio.create_task(self.drain_one(reg))

    async def drain_one(self, reg: Registration) -> None:
        try:
            await self.drain([reg])
        finally:
            # It stays (in status too) until a pass has removed its interface.
            reg.drained = True
            self.draining.pop(reg.server.ip, None)
            self.wake.set()

    async def drain(self, regs: list[Registration]) -> None:
        """Deregister first, so the servers take us out of their rotation at once; then wait,
        at most drain_timeout, for the connections in flight through these tunnels."""
        assert self.registrar is not None
        await self.registrar.deregister(regs)
        addresses = {ip for r in regs if r.assignment for ip in (r.assignment.overlay_ip, r.assignment.overlay_ip6) if ip}
        deadline = self.clock() + self.cfg.drain_timeout
        left = 0
        while addresses:
            left = self.sockets.in_flight(addresses, self.cfg.ports)  # sock_diag: no thread needed
            if not left or self.clock() >= deadline:
                break
            await asyncio.sleep(0.2)
        if left:
            log.warning("drain: %d connections still open after %g s; closing them", left, self.cfg.drain_timeout)

    # --- under the lock: observe, plan, apply ------------------------------------------

    def wanted(self) -> AgentWanted:
        """The tunnels to have now: registered ones while the service listens, and the ones
        draining (their connections finish through them)."""
        assert self.public_key is not None
        tunnels = tuple(TunnelWanted(r.server, r.assignment.overlay_ip, r.assignment.server_key, r.kick,
                                     r.assignment.overlay_ip6)
                        for ip, r in sorted(self.registrations.items())
                        if r.assignment is not None and not r.drained and (self.listening or ip in self.draining))
        return AgentWanted(self.public_key, self.cfg.ports, self.cfg.keepalive, tunnels)

    def observe(self) -> AgentKernel:
        e = self.edges
        links = {}
        for name in e.links.names(PREFIX):
            link = observe_link(e, name, tunnel=True)
            if link is not None:
                links[name] = link
        rules = tuple(Rule(r["fwmark"], r["src"], r["table"], priority) for priority in (RULE_PRIORITY, FALLBACK_PRIORITY)
                      for r in e.links.rules(priority))
        nft_table = e.firewall.read()
        return AgentKernel(links, rules, nft_table.comment, nft_table.exists)

    async def run_pass(self, wait: bool = False) -> list[str]:
        drained = [ip for ip, r in self.registrations.items() if r.drained]  # before the pass: it removes their links
        changes = await super().run_pass(wait)
        for ip in drained:
            del self.registrations[ip]
        self.note_configured()
        self.state.save(self.registrations)  # assignments as the registrations left them
        return changes

    def reconcile(self, undo: list[str] | None = None) -> list[str]:
        wanted = self.wanted()
        now = self.clock()
        # An idle agent reads the kernel every KERNEL_CHECK_EVERY, or at once when anything
        # changed: reading it each second (netlink dumps, UAPI, nft) costs ~5% CPU.
        if wanted == self.last_wanted and now - self.kernel_checked < KERNEL_CHECK_EVERY:
            return []
        applier = Applier(self.edges, self.private_key)
        done: list[str] = []
        try:
            for _ in range(MAX_ROUNDS):
                changes = plan(wanted, self.observe())
                if not changes:
                    break
                done += applier.apply(changes)
                peers_set = {c.name for c in changes if isinstance(c, UpdatePeer)}
                self.configured |= peers_set
                wanted = dataclasses.replace(wanted, tunnels=tuple(
                    dataclasses.replace(t, kick=False) if t.ifname in peers_set else t for t in wanted.tunnels))
            else:
                raise SptunError(f"the kernel did not converge in {MAX_ROUNDS} rounds; still to do: "
                                 f"{'; '.join(map(str, plan(wanted, self.observe())))}")
        except SptunError:
            self.last_wanted = None
            if undo is not None:
                undo += applier.rollback()
            raise
        # What was converged, not wanted() again: a registration that finished meanwhile (on
        # the event loop) must still count as a change for the next pass.
        self.last_wanted, self.kernel_checked = wanted, now
        return done

    def note_configured(self) -> None:
        """On the event loop, after a pass: the peers it (re)configured start their kick
        grace now and are kicked no more; one found configured (by an earlier run) too."""
        now = self.clock()
        for reg in self.registrations.values():
            if interface_name(reg.server.ip) in self.configured:
                reg.configured_at, reg.kick = now, False
            elif reg.assignment is not None and not reg.configured_at:
                reg.configured_at = now
        self.configured.clear()

    def teardown(self) -> list[str]:
        changes = Applier(self.edges, self.private_key).apply(plan_teardown(self.observe()))
        self.last_wanted = None
        return changes

    async def go_down(self) -> list[str]:
        """Drain every tunnel (outside the lock: the servers may be slow), then remove all."""
        if self.registrar is not None:
            self.registrar.cancel_all()
            for task in list(self.draining.values()):
                task.cancel()
            await self.drain(list(self.registrations.values()))
        self.registrations.clear()
        async with self.lock:
            changes = await asyncio.to_thread(self.teardown)
        self.state.save(self.registrations)
        return changes

    async def on_stop(self) -> None:
        """Stopping the agent drains: the servers take it out of rotation before its tunnels go."""
        for change in await self.go_down():
            log.info("%s", change)

    async def command(self, cmd: str, arg: str | None) -> dict[str, Any] | None:
        if cmd != "forget" or arg is None:
            return None
        return {"ok": True, "changes": self.forget(arg)}

    def forget(self, ip: str) -> list[str]:
        """`sptun forget IP`: accept the next key that server presents (it was re-keyed)."""
        done = self.known.forget(ip)
        reg = self.registrations.get(server_ip(ip))
        if reg is not None:
            reg.next_at = 0.0  # register again now, with whatever key it has
            self.wake.set()
        return done

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self.cfg.metrics

    def reload_config(self) -> str:
        new = load_agent(self.cfg.path)
        changed = config_changes(self.cfg, new, needs_restart=("state_dir", "wireguard", "metrics"))
        if (new.domain, new.nameservers, new.realm) != (self.cfg.domain, self.cfg.nameservers, self.cfg.realm):
            self.discovery = Discovery(new.domain, DnsTxtSource(new.nameservers), new.realm)
        if (new.attestation, new.server_attestation) != (self.cfg.attestation, self.cfg.server_attestation):
            self.attestation = attestation_of(new)
        self.cfg = new
        if self.registrar is not None:
            self.registrar.domain, self.registrar.token_file = new.domain, new.token_file
            self.registrar.nameservers = new.nameservers
            self.registrar.attestation = self.attestation
        for reg in self.registrations.values():  # register again now, with the new token or domain
            reg.next_at = 0.0
        return ", ".join(changed) or "nothing changed"

    # --- status ------------------------------------------------------------------------

    def read_status(self) -> AgentStatus:
        now = time.time()
        tunnels = []
        for ip, reg in sorted(self.registrations.items()):
            name = interface_name(ip)
            link = observe_link(self.edges, name)
            device = link.device if link is not None else None
            state = next(iter(device.peers.values()), None) if device else None
            handshake = state.last_handshake if state else 0.0
            verdict = self.attestation.verdicts.get(ip)
            a = reg.assignment
            tunnels.append(TunnelStatus(
                server=ip, interface=name, port=reg.server.port,
                overlay_ip=a.overlay_ip if a else None, server_overlay_ip=a.server_ip if a else None,
                server_key=a.server_key if a else None, registered=a is not None,
                up=device is not None and device.public_key is not None,
                healthy=a is not None and handshake_fresh(handshake, now),
                handshake_age=round(now - handshake, 1) if handshake else None,
                rx_bytes=state.rx_bytes if state else 0, tx_bytes=state.tx_bytes if state else 0,
                error=reg.error or None, overlay_ip6=a.overlay_ip6 if a else None,
                server_overlay_ip6=a.server_ip6 if a else None,
                server_attested=verdict.ok if verdict else None, server_attestation=verdict.detail if verdict else None))
        d = self.discovery
        return AgentStatus(
            domain=self.cfg.domain, public_key=self.public_key, wireguard=self.edges.wg.kind, down=self.is_down(),
            listening=self.listening, ports=[str(p) for p in self.cfg.ports],
            dns=DnsStatus([s.ip for s in d.servers or []],
                          f"{d.last_error}; retrying every {RETRY_AFTER_FAILURE:g} s" if d.last_error else None,
                          d.refreshes, d.failures),
            tunnels=tunnels, attestation_key=getattr(self.attestation.prover, "fingerprint", None) or None)
