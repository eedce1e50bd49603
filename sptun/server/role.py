"""The tunnel server: one WireGuard interface, a peer per registered client, and the
`inet sptun` table that spreads each domain's public ports over its healthy clients.

A pass observes the kernel (the interface and its device; the table as sptun last knew it
loaded, re-read every resync), plans (server/plan.py, pure) and applies (changes.Applier).
Registrations (api.py) and health checks (health.py) run beside it on the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

from sptun import attest, nft, proto
from sptun.changes import (Applier, Change, CreateLink, DeleteLink, Edges, LoadTable, SetKey, UpdatePeer, UpdateRotation,
                           observe_link)
from sptun.config import ServerConfig, check_token_files, load_server
from sptun.daemon import Role, config_changes
from sptun.errors import ConfigError, SptunError, printable
from sptun.leases import SEEN_STEP, Lease, Leases, LeaseStore
from sptun.proto import canonical_key
from sptun.server.api import RegistrationApi
from sptun.conntrack import active_connections
from sptun.server.health import NO_HANDSHAKE, HealthChecks
from sptun.server.publish import DomainRecords, Publisher, TsigKey, read_tsig_key, wanted_records
from sptun import sni
from sptun.server.plan import (
    IP6_FORWARD,
    IP_FORWARD,
    ServerKernel,
    ServerWanted,
    by_lease,
    by_lease_counts,
    by_lease_family,
    forwards,
    peer_of,
    plan,
    plan_proxy_rotation,
    plan_table,
    plan_teardown,
    rotations_by_family,
    sni_wanted,
)
from sptun.tokens import valid_tokens
from sptun.snapshot import (AttestationRefusal, AttestationStatus, BackendStatus, DomainStatus, ForwardStatus,
                            PublicationStatus, RegistrationCounts, ServerStatus)
from sptun.wg import Device, handshake_fresh

log = logging.getLogger("sptun")

MAX_ROUNDS = 3  # observe-plan-apply rounds in one pass: the interface, then the rest
EXPIRY_EVERY = 5.0  # s between checks of silent leases and rotated tokens
DEVICE_CHANGES = (CreateLink, DeleteLink, SetKey, UpdatePeer)  # the changes a read of the device sees
SUSPECT_POLL = 0.1  # s between reads of the kernel's SUSPECTS sets (health rounds: cfg.health.interval)


class Server(Role):
    def __init__(self, cfg: ServerConfig, edges: Edges | None = None, read_only: bool = False,
                 conntrack: Callable[[], Counter[str] | None] = active_connections) -> None:
        """conntrack: the edge that counts each backend's open connections, for status."""
        super().__init__(cfg.state_dir, cfg.wireguard, edges, read_only)
        self.cfg = cfg
        self.conntrack = conntrack
        if self.edges.proxy is None:
            self.edges.proxy = sni.HAProxy(cfg.state_dir)
        self.proxy = sni.ProxyState()  # the SNI proxy as the last pass read it
        self.store = LeaseStore(cfg.state_dir)
        self.leases = Leases(cfg.overlay, self.store.load(), seen_step=min(SEEN_STEP, cfg.lease_ttl / 4))
        self.leases.evicted = self.store.evicted
        self.last_expiry = 0.0
        self.health = HealthChecks()
        self.draining: dict[str, float] = {}  # deregistered keys -> when their peer may go
        self.device = Device()  # the interface as the last pass read it
        self.kernel_writes = 0  # device changes sptun applied so far: a read from before one is stale
        self.prefetched: tuple[int, Device] | None = None  # prepare()'s read, and kernel_writes then
        self.nft_table: nft.TableState | None = None  # the table as sptun last loaded or read it
        self.view: ServerView | None = None  # for status: made by each pass, commit and teardown
        self.last_resync = 0.0
        self.api = RegistrationApi(self)
        self.health_task: asyncio.Task[None] | None = None
        self.summary_task: asyncio.Task[None] | None = None
        self.probes: asyncio.Task[None] | None = None  # the running round of active probes
        self.publisher = Publisher(cfg.dns) if cfg.dns else None
        self.publish_task: asyncio.Task[None] | None = None

    def check_config(self) -> None:
        check_token_files(self.cfg)
        if self.cfg.dns:
            self.tsig_key()

    def tsig_key(self) -> TsigKey:
        """[dns]'s key, read afresh (an operator may replace the file); ConfigError if unusable."""
        assert self.cfg.dns is not None
        try:
            return read_tsig_key(self.cfg.dns.tsig_key_file)
        except SptunError as e:
            raise ConfigError(f"{self.cfg.path}: dns.tsig_key_file: {e.message}", hint=e.hint) from None

    def check_overlay(self) -> None:
        """The overlays must not cover a network this host already routes elsewhere, and each
        listen address must be this host's: a DNAT for another address never matches."""
        for key, network in (("overlay", self.cfg.overlay), ("overlay6", self.cfg.overlay6)):
            clash = self.edges.links.overlapping_routes(network, self.cfg.interface) if network else []
            if clash:
                raise ConfigError(f"{self.cfg.path}: {key}: {network} overlaps {clash[0]} on this host",
                                  hint="choose an overlay that no local network uses")
        local = self.edges.links.local_addresses()
        for i, domain in enumerate(self.cfg.domains):
            for address in domain.listen:
                if str(address) not in local:
                    raise ConfigError(f"{self.cfg.path}: domains[{i}].listen: {address} is not an address of this host",
                                      hint="list this host's own public addresses (ip addr), or leave listen out "
                                           "for any of them")

    # --- observe, plan, apply ----------------------------------------------------------

    def in_rotation(self, lease: Lease, family: int = 4) -> bool:
        if lease.public_key in self.draining:
            return False
        if not self.daemon:  # a one-shot `sptun up` has no health checks to bring anyone back later
            return True
        return self.health.is_up(lease.public_key, family)

    def wanted(self) -> ServerWanted:
        assert self.public_key is not None
        fwds = forwards(self.cfg)
        by_family = rotations_by_family(self.cfg, self.leases.all(), self.in_rotation)
        cfg = self.cfg
        addresses = [f"{cfg.server_ip}/{cfg.overlay.prefixlen}"]
        addresses += [f"{cfg.server_ip6}/{cfg.overlay6.prefixlen}"] if cfg.overlay6 else []
        return ServerWanted(
            cfg.interface, self.public_key, cfg.listen_port, tuple(sorted(addresses)),
            tuple(peer_of(lease, cfg) for lease in self.leases.all()), tuple(fwds),
            tuple(by_family[f.family][f.domain] for f in fwds),
            sni_wanted(sni.groups(self.cfg), by_family, sni.socket_path(self.cfg.state_dir)))

    def read_nft_table(self) -> nft.TableState:
        """The table as sptun believes it is: read from the kernel on the first pass and at
        each resync, and otherwise kept in step by the applier."""
        if self.nft_table is None:
            self.nft_table = self.edges.firewall.read()
            serving = self.carried()
            self.health.adopt(self.leases.all(), serving[4])
            self.health.adopt(self.leases.all(), serving[6], 6)
        return self.nft_table

    def carried(self) -> dict[int, set[str]]:
        """The leases (by family) that the kernel's rotations and the SNI proxy send connections
        to now, as sptun believes them: the kernel's word, a pass behind the health checks'."""
        assert self.nft_table is not None
        proxied = [s.address for servers in self.proxy.backends.values() for s in servers.values() if s.ready]
        return by_lease_family(self.cfg, [*(ip for r in self.nft_table.rotations(forwards(self.cfg)) for ip in r), *proxied])

    async def prepare(self, wait: bool = False) -> None:
        """Outside the lock: the read of the device, the pass's longest step (half a second
        with 10k peers on wireguard-go), so that a flip or a registration's commit does not
        wait for it. Only a device the last pass found; observe() reads again if it fails."""
        self.prefetched = None
        if self.device.public_key is None:
            return
        writes = self.kernel_writes
        try:
            self.prefetched = writes, await asyncio.to_thread(self.edges.wg.device, self.cfg.interface)
        except Exception as e:  # the pass's own read, under the lock, reports it
            log.debug("reading %s ahead of the pass: %s", self.cfg.interface, e)

    def prefetched_device(self) -> Device | None:
        """prepare()'s read, once, if nothing was applied since it began."""
        prefetched, self.prefetched = self.prefetched, None
        return prefetched[1] if prefetched is not None and prefetched[0] == self.kernel_writes else None

    def observe(self) -> ServerKernel:
        link = observe_link(self.edges, self.cfg.interface, device=self.prefetched_device())
        self.device = link.device if link is not None else Device()
        assert self.edges.proxy is not None
        self.proxy = self.edges.proxy.read()  # first: read_nft_table adopts its rotations' health too
        table = self.read_nft_table()
        return ServerKernel(link, self.edges.sysctls.get(IP_FORWARD), table, self.proxy, self.proxy_routing(),
                            self.edges.sysctls.get(IP6_FORWARD) if self.cfg.overlay6 else "")

    def proxy_routing(self) -> frozenset[int]:
        """The families whose rule and local route bring replies to the SNI proxy."""
        links = self.edges.links
        ruled = {rule["family"] for rule in links.rules(sni.PROXY_RULE_PRIORITY)}
        return frozenset(f for f in ruled if links.local_route(sni.PROXY_TABLE, f))

    def apply(self, applier: Applier, changes: list[Change]) -> list[str]:
        """Apply, then believe the table's new state, only once the kernel has it: status
        must never say a backend serves before the kernel sends it connections."""
        try:
            done = applier.apply(changes)
        except SptunError:
            self.nft_table = None  # our picture of the kernel may be wrong: read it again next pass
            raise
        finally:
            if any(isinstance(change, DEVICE_CHANGES) for change in changes):
                self.kernel_writes += 1
        for change in changes:
            if isinstance(change, LoadTable):
                self.nft_table = None
            elif isinstance(change, UpdateRotation) and self.nft_table is not None:  # a new value: views keep the old
                maps = {**self.nft_table.maps, f"rr{change.index}": list(change.new)}
                self.nft_table = dataclasses.replace(self.nft_table, maps=maps)
        return done

    def reconcile(self, undo: list[str] | None = None) -> list[str]:
        now = time.monotonic()
        if now - self.last_resync > self.resync_every:
            self.nft_table = None  # re-read the kernel now and then: someone may have changed it
            self.last_resync = now
        done = self.expire_drains()
        if self.passes <= 1:
            done += self.adopt_orphans()
        elif now - self.last_expiry >= EXPIRY_EVERY:  # once a pass has read the handshakes
            self.last_expiry = now
            done += self.expire_leases() + self.api.expire_attestations()
        if self.store.damaged:  # loaded from the backup: write a good file now
            self.store.save(self.leases)
            done.append(f"rewrote the damaged {self.store.path} ({len(self.leases.by_key)} leases)")
        applier = Applier(self.edges, self.private_key)
        try:
            for _ in range(MAX_ROUNDS):
                kernel = self.observe()  # first: it adopts a running rotation's health, which wanted() uses
                changes = plan(self.wanted(), kernel)
                if not changes:
                    self.make_view()
                    return done
                done += self.apply(applier, changes)
            kernel = self.observe()
            raise SptunError(f"the kernel did not converge in {MAX_ROUNDS} rounds; still to do: "
                             f"{'; '.join(map(str, plan(self.wanted(), kernel)))}")
        except SptunError:
            if undo is not None:
                undo += applier.rollback()
            raise

    def apply_rotation(self) -> list[str]:
        """Only the rotations, now: the kernel's and the SNI proxy's (a deregistration takes a
        client out at once, before its agent closes the tunnel). Under the lock."""
        if self.nft_table is None or self.device.public_key is None:
            return []  # no pass has run yet: the next one plans it all
        wanted = self.wanted()
        assert self.edges.proxy is not None
        proxy = self.edges.proxy.read() if wanted.sni else sni.ProxyState()  # as it is now, not as the last pass saw it
        return self.apply(Applier(self.edges, self.private_key),
                          plan_table(wanted, self.nft_table) + plan_proxy_rotation(wanted.sni, proxy))

    def adopt_orphans(self) -> list[str]:
        """Peers on the interface with no lease (the leases file was lost or is behind): keep
        their addresses for them, so they come back where they were when they register."""
        link = observe_link(self.edges, self.cfg.interface)
        changes = []
        for key, state in (link.device.peers.items() if link is not None else []):
            ips = [ip for ip in state.peer.allowed_ips if ip.endswith("/32")]  # its IPv4 lease (an IPv6 one mirrors it)
            if key in self.leases.by_key or key in self.leases.evicted or len(ips) != 1:
                continue
            address = ips[0].removesuffix("/32")
            if ipaddress.IPv4Address(address) in self.cfg.overlay and self.leases.adopt(Lease(key, "", address, time.time())):
                changes.append(f"keep {address} for {key}: a peer with no lease, until it registers again")
        if changes:
            self.store.save(self.leases)
        return changes

    def expire_leases(self) -> list[str]:
        """Release the leases of clients silent for lease_ttl, and of clients whose token
        was rotated and whose grace has ended. Their peers and backends go in this pass."""
        now = time.time()
        dirty = False
        for key, state in self.device.peers.items():
            dirty |= self.leases.saw(key, state.last_handshake)
        generations: dict[str, set[str]] = {}
        for domain in self.cfg.domains:
            try:
                tokens = valid_tokens(domain.token_file, now)
            except SptunError:
                continue  # no readable token: the API says so; evict nobody for it
            generations[domain.name] = {t.generation for t in tokens}
            current = tokens[0].generation
            for lease in self.leases.for_domain(domain.name):
                if not lease.generation:  # from an older sptun: it joined with the token of then
                    dirty |= self.leases.adopt_generation(lease.public_key, current)
        done = []
        for lease in self.leases.all():
            valid = generations.get(lease.domain)
            if now - lease.seen > self.cfg.lease_ttl:
                why = f"silent for {now - lease.seen:.0f} s (lease_ttl {self.cfg.lease_ttl:g} s)"
            elif valid is not None and lease.generation not in valid:
                why = "it joined with a token that was rotated"
            else:
                continue
            self.forget_client(lease.public_key)
            done.append(f"release {lease.overlay_ip} of {lease.public_key} ({lease.domain}): {why}")
        if done or dirty:
            self.store.save(self.leases)
        return done

    def forget_client(self, key: str) -> None:
        self.leases.release(key)
        self.draining.pop(key, None)
        self.health.forget(key)
        self.api.verdicts.pop(key, None)
        self.api.verified_at.pop(key, None)

    def remove_client(self, key: str) -> list[str]:
        """Out of the leases, the peers and the rotation now. Under the lock."""
        self.forget_client(key)
        self.store.save(self.leases)
        return self.reconcile() if not self.is_down() else []

    def evict(self, key: str) -> list[str]:
        """`sptun evict`: out of the leases, the peers and the rotation now, and kept out
        until the domain's token changes. Under the lock."""
        canonical = canonical_key(key)
        lease = self.leases.by_key.get(canonical) if canonical else None
        if lease is None:
            raise SptunError(f"no client with key {printable(key, 60)} holds a lease here",
                             hint="`sptun status` lists the clients and their keys")
        self.leases.evict(lease.public_key, lease.generation)
        done = [f"evict {lease.public_key} ({lease.domain}, {lease.overlay_ip}): out until the token is rotated"]
        return done + self.remove_client(lease.public_key)

    async def command(self, cmd: str, arg: str | None) -> dict[str, Any] | None:
        if cmd != "evict" or arg is None:
            return None
        async with self.lock:
            return {"ok": True, "changes": await asyncio.to_thread(self.evict, arg)}

    def expire_drains(self) -> list[str]:
        changes = []
        now = time.monotonic()
        for key, until in list(self.draining.items()):
            if now >= until:
                lease = self.leases.by_key.get(key)
                self.forget_client(key)
                if lease is not None:
                    self.store.save(self.leases)
                    changes.append(f"release {lease.overlay_ip} of {key} ({lease.domain}): drained")
        return changes

    def teardown(self) -> list[str]:
        name = self.cfg.interface
        assert self.edges.proxy is not None
        removal = plan_teardown(name, self.edges.links.info(name) is not None, self.edges.firewall.read().exists,
                                self.edges.proxy.read().pid is not None, bool(self.proxy_routing()))
        changes = self.apply(Applier(self.edges, self.private_key), removal)
        self.nft_table, self.device = None, Device()
        self.health.clear()
        self.make_view()
        return changes

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self.cfg.metrics

    def reload_config(self) -> str:
        new = load_server(self.cfg.path)
        changed = config_changes(self.cfg, new, needs_restart=("interface", "overlay", "state_dir", "api_port",
                                                               "wireguard", "metrics"))
        self.cfg = new
        if "attestation" in changed:
            self.api.configure_attestation()
        self.leases.seen_step = min(SEEN_STEP, new.lease_ttl / 4)
        return ", ".join(changed) or "nothing changed"

    # --- health ------------------------------------------------------------------------

    async def check_health(self) -> None:
        """One round of checks of every backend, after one read of the kernel's passive
        health (who left connections unanswered, who answered); a flip wakes the loop, and
        the kernel's word goes into the rotations at once."""
        by_family = self.checked_leases()
        suspects, answered = (by_lease_family(self.cfg, ips) for ips in await asyncio.to_thread(self.edges.firewall.passive))
        await self.take_out(by_family, suspects)
        # The probes run beside the next rounds' passive reads: a probe of a dead backend
        # waits out its timeout, and the kernel's word must not wait for it.
        if self.probes is None or self.probes.done():
            self.probes = asyncio.create_task(self.probe(by_family, answered, suspects))

    def checked_leases(self, among: list[Lease] | None = None) -> dict[int, list[Lease]]:
        """The leases whose health is checked (of all, or `among` some), by family."""
        leases = [lease for lease in (self.leases.all() if among is None else among)
                  if lease.public_key not in self.draining]
        return {4: leases, 6: [lease for lease in leases if lease.ipv6] if self.cfg.overlay6 else []}

    async def take_out(self, by_family: dict[int, list[Lease]], suspects: dict[int, set[str]]) -> None:
        if any([self.health.suspect(by_family[f], suspects[f], f) for f in (4, 6) if suspects[f]]):
            await self.apply_flips()

    async def check_suspects(self) -> None:
        """Between rounds, the kernel's SUSPECTS sets alone: a dead backend's first SYN
        retransmission (a second after the SYN) takes it out within SUSPECT_POLL, not within
        a whole interval."""
        suspects = by_lease_family(self.cfg, await asyncio.to_thread(self.edges.firewall.suspects))
        # A suspect stays in the set (a backend already down, mostly) until its element times
        # out: only its own lease is looked at, not all 10k of them ten times a second.
        if suspects[4] or suspects[6]:
            await self.take_out(self.checked_leases(self.leases.at(suspects[4] | suspects[6])), suspects)

    async def apply_flips(self) -> None:
        """Backends the kernel saw fail, out of the rotations now: only the nft change (and the
        SNI proxy's), not a whole pass, whose first step reads every peer of the interface
        (half a second with 10k). The pass it wakes sees to the rest."""
        try:
            async with self.lock:
                changes = [] if self.is_down() else await asyncio.to_thread(self.apply_rotation)
        except SptunError as e:  # the pass tries again, from a fresh read of the kernel
            log.warning("taking failed backends out: %s", e)
            changes = []
        for change in changes:
            log.info("%s", change)
        self.wake.set()

    async def probe(self, leases: dict[int, list[Lease]], answered: dict[int, set[str]],
                    suspects: dict[int, set[str]]) -> None:
        """One round of active checks, each family's beside the other's."""
        try:
            if any(await asyncio.gather(*(self.health.check(self.cfg, leases[f], self.device, answered[f], suspects[f], f)
                                          for f in (4, 6) if leases[f]))):
                self.wake.set()
            self.health.forget_all_but(set(self.leases.by_key))
        except Exception:  # a bug here must not stop the checks for good
            log.exception("health probe round failed")

    async def health_loop(self) -> None:
        next_round = 0.0
        while True:
            started = time.monotonic()
            # Not before the first pass has read the device and adopted the running rotation.
            if not self.is_down() and self.nft_table is not None:
                try:
                    if started >= next_round:
                        next_round = started + self.cfg.health.interval
                        await self.check_health()
                    else:
                        await self.check_suspects()
                except Exception:  # a bug here must not stop the checks for good
                    log.exception("health check round failed")
            await asyncio.sleep(max(0.0, min(started + SUSPECT_POLL, next_round) - time.monotonic()))

    async def start_services(self) -> list[asyncio.AbstractServer]:
        try:
            api = await asyncio.start_server(self.api.handle_api, port=self.cfg.api_port, reuse_address=True,
                                             limit=proto.MAX_MESSAGE)
        except OSError as e:
            raise SptunError(f"cannot listen on the api port {self.cfg.api_port}: {e.strerror}",
                             hint="is another sptun server running, or the port in use?") from None
        log.info("registration api on port %d, WireGuard on %d (%s), key %s", self.cfg.api_port,
                 self.cfg.listen_port, self.edges.wg.kind, self.public_key)
        await attest.provision(self.api.prover)
        self.health_task = asyncio.create_task(self.health_loop())
        self.summary_task = asyncio.create_task(self.api.summarise_rejections())
        if self.publisher is not None:
            self.publish_task = asyncio.create_task(self.publish_loop())
        return [api]

    # --- DNS (`[dns]`) -------------------------------------------------------------------

    def dns_wanted(self) -> list[DomainRecords]:
        """This server's records as they should be now: a domain with no healthy client in
        rotation for the hold-down, counted from the last check one of its clients passed,
        has its addresses withdrawn (publish.Publisher)."""
        assert self.publisher is not None and self.public_key is not None
        served = {d.name: False for d in self.cfg.domains}
        passed: dict[str, float] = {}  # domain -> the last check one of its clients passed (time.time())
        # In the kernel's rotation, not only passed: a flip reaches the kernel with the pass it
        # wakes, and an address published before would refuse the browsers it draws.
        carried = self.carried()
        for lease in self.leases.all():
            if lease.domain in served:
                for family in self.cfg.families:
                    served[lease.domain] |= self.in_rotation(lease, family) and lease.overlay_ip in carried[family]
                    if (health := self.health.of(family).get(lease.public_key)) is not None:
                        passed[lease.domain] = max(passed.get(lease.domain, 0.0), health.passed)
        now, wall = time.monotonic(), time.time()
        last_served = {d: now - max(0.0, wall - t) for d, t in passed.items()}
        return wanted_records(self.cfg, self.public_key, self.publisher.withdrawn(served, now, last_served))

    async def publish_loop(self) -> None:
        """Keep this server's records in the zone: at start, when they change (a domain
        withdrawn or back), every RECHECK s, and after a failure with backoff. A failure is
        one line in the log; serving goes on."""
        pub = self.publisher
        assert pub is not None
        while True:
            await asyncio.sleep(1.0)
            if self.is_down() or self.public_key is None or self.nft_table is None:
                continue
            try:
                wants = self.dns_wanted()
                if not pub.needs_sync(wants, time.monotonic()):
                    continue
                changes = await asyncio.to_thread(pub.sync, wants, self.public_key, self.tsig_key())
                pub.succeeded(wants, time.monotonic())
                for change in changes:
                    log.info("DNS %s: %s", pub.conf.zone, change)
            except SptunError as e:
                if pub.failed(e.message, time.monotonic()):
                    log.warning("DNS %s: %s (%s); serving goes on, retrying with backoff", pub.conf.zone, e.message, e.hint)
            except Exception:  # a bug here must not stop the publication for good
                log.exception("DNS publication failed")

    async def up_once(self) -> list[str]:
        """A one-shot `sptun up` publishes this server's records too (with [dns]), addresses
        included: no loop runs to add them once a client serves. A DNS failure is a warning:
        the server serves all the same."""
        changes = await super().up_once()
        pub = self.publisher
        if pub is not None and self.public_key is not None:
            try:
                wants = wanted_records(self.cfg, self.public_key)
                done = await asyncio.to_thread(pub.sync, wants, self.public_key, self.tsig_key())
                changes += [f"DNS {pub.conf.zone}: {c}" for c in done]
            except SptunError as e:
                log.warning("DNS %s: %s (%s)", pub.conf.zone, e.message, e.hint)
        return changes

    async def go_down(self) -> list[str]:
        """With [dns]: the addresses leave the zone first, and browsers one TTL later; then
        the TXT record, so no agent joins; then everything goes. A failure is logged, and
        down goes on."""
        pub = self.publisher
        if pub is not None and self.public_key is not None:
            try:
                key, wants = self.tsig_key(), wanted_records(self.cfg, self.public_key)
                for change in await asyncio.to_thread(pub.removal, wants, self.public_key, key, True):
                    log.info("DNS %s: %s", pub.conf.zone, change)
                log.info("DNS %s: waiting one TTL (%d s) for browsers to leave", pub.conf.zone, pub.conf.ttl)
                await asyncio.sleep(pub.conf.ttl)
                for change in await asyncio.to_thread(pub.removal, wants, self.public_key, key, False):
                    log.info("DNS %s: %s", pub.conf.zone, change)
            except SptunError as e:
                log.warning("DNS %s: cannot withdraw this server's records: %s (%s)", pub.conf.zone, e.message, e.hint)
        return await super().go_down()

    # --- status ------------------------------------------------------------------------

    def make_view(self, read_kernel: bool = False) -> ServerView:
        """What this role now holds, as plain values, for status; under the lock. A pass has
        just read the device and believes the table; read_kernel: read both afresh (no pass
        has run: `status` with no daemon)."""
        assert self.edges.proxy is not None
        if read_kernel:
            link = observe_link(self.edges, self.cfg.interface)
            device = link.device if link is not None and link.ours else Device()
            table: nft.TableState | None = self.edges.firewall.read()
            proxy = self.edges.proxy.read()
        else:
            device, table, proxy = self.device, self.nft_table, self.proxy
        fwds = forwards(self.cfg)
        health = {key: (h.up, h.reason) for key, h in list(self.health.by_key.items())}
        health6 = {key: (h.up, h.reason) for key, h in list(self.health.by_key6.items())}
        rotations = [(f.domain, f.family, frozenset(by_lease(self.cfg, r)))
                     for f, r in zip(fwds, table.rotations(fwds))] if table else []
        rotations += [(d, g.family, frozenset(by_lease(self.cfg, (s.address for s in proxy.backends.get(sni.backend_name(gi, d), {})
                                                                .values() if s.ready))))
                      for gi, g in enumerate(sni.groups(self.cfg)) for d in g.domains]
        self.view = ServerView(tuple(self.leases.all()), health, frozenset(self.draining), device, tuple(rotations),
                               bool(table and table.exists), health6)
        return self.view

    async def status(self) -> ServerStatus:
        """From the last pass's view, with no lock: a pass over 10k peers must not delay it.
        Only the counters (nft's, the SNI proxy's) and the connection counts are read now."""
        view = self.view
        if view is None:
            async with self.lock:
                view = await asyncio.to_thread(self.make_view, True)
        registrations = RegistrationCounts(self.api.accepted, dict(self.api.rejected))
        counters = (await asyncio.to_thread(self.edges.firewall.read, "prerouting")).counters
        active = await asyncio.to_thread(self.conntrack)  # a big conntrack table takes up to its 2 s
        assert self.edges.proxy is not None
        proxy = await asyncio.to_thread(self.edges.proxy.read) if sni.groups(self.cfg) else sni.ProxyState()
        return self.status_of(view, counters, active, registrations, proxy)

    def status_of(self, view: ServerView, counters: dict[str, tuple[int, int]], active: Counter[str] | None,
                  registrations: RegistrationCounts, proxy: sni.ProxyState = sni.ProxyState()) -> ServerStatus:
        """proxy: the SNI proxy's counters and open connections (its connections to a client
        are its own, not DNAT's: conntrack's count leaves them out)."""
        now = time.time()
        fwds = forwards(self.cfg)
        groups = sni.groups(self.cfg)
        if active is not None and proxy.backends:
            active = active + proxy.sessions()
        if active is not None and self.cfg.overlay6:  # a client's IPv6 connections count as its lease's
            active = by_lease_counts(self.cfg, active)
        rotating = view.rotations
        domains = []
        for domain in self.cfg.domains:
            backends = []
            for lease in (lease for lease in view.leases if lease.domain == domain.name):
                state = view.device.peers.get(lease.public_key)
                handshake = state.last_handshake if state else 0.0
                health = view.health.get(lease.public_key)
                if self.daemon:  # the active checks speak
                    is_healthy, reason = health if health is not None else (False, "not checked yet")
                else:  # no daemon: the handshake is all there is to go by
                    is_healthy = handshake_fresh(handshake, now)
                    reason = ("handshake fresh" if is_healthy else "no peer on the interface" if state is None
                              else "no handshake yet" if not handshake else NO_HANDSHAKE)
                healthy6, reason6 = None, None
                if lease.ipv6 and self.cfg.overlay6 and self.daemon:
                    healthy6, reason6 = view.health6.get(lease.public_key, (False, "not checked yet"))
                if lease.public_key in view.draining:
                    verdict = self.api.verdicts.get(lease.public_key)
                    reason = f"draining ({'attestation failed' if verdict and not verdict.ok else 'deregistered'})"
                    reason6 = reason if reason6 is not None else None
                backends.append(BackendStatus(
                    overlay_ip=lease.overlay_ip, public_key=lease.public_key, healthy=is_healthy, reason=reason,
                    in_rotation=bool(rotating) and all(lease.overlay_ip in ips for name, family, ips in rotating
                                                       if name == lease.domain and (family == 4 or lease.ipv6)),
                    handshake_age=round(now - handshake, 1) if handshake else None,
                    endpoint=state.peer.endpoint if state else None,
                    rx_bytes=state.rx_bytes if state else 0, tx_bytes=state.tx_bytes if state else 0,
                    active_connections=active[lease.overlay_ip] if active is not None else None, since=lease.since,
                    overlay_ip6=self.cfg.ip6_of(lease.overlay_ip) if lease.ipv6 else None,
                    healthy6=healthy6, reason6=reason6, **self.attestation_of(lease.public_key)))
            forwarded = [ForwardStatus(f.listen or "*", str(f.port), *counters.get(f.key, (0, 0)))
                         for f in fwds if f.domain == domain.name]
            forwarded += [ForwardStatus(g.listen or "*", str(g.port), proxy.totals.get(sni.backend_name(gi, domain.name), 0), 0)
                          for gi, g in enumerate(groups) if domain.name in g.domains]
            domains.append(DomainStatus(domain.name, [str(a) for a in domain.listen] or ["*"],
                                        [str(p) for p in domain.ports], backends, forwarded))
        return ServerStatus(
            interface=self.cfg.interface, public_key=self.public_key, listen_port=self.cfg.listen_port,
            api_port=self.cfg.api_port, overlay=str(self.cfg.overlay), overlay_ip=str(self.cfg.server_ip),
            wireguard=self.edges.wg.kind, down=self.is_down(), up=view.device.public_key is not None,
            table_loaded=view.table_loaded, registrations=registrations, domains=domains,
            overlay6=str(self.cfg.overlay6) if self.cfg.overlay6 else None,
            overlay_ip6=str(self.cfg.server_ip6) if self.cfg.server_ip6 else None,
            publication=self.publication(), attestation=self.attestation())

    def attestation_of(self, key: str) -> dict[str, Any]:
        verdict = self.api.verdicts.get(key)
        if verdict is None:
            return {}
        return {"attested": verdict.ok, "attestation": verdict.detail, "measurements": verdict.measurements or None}

    def attestation(self) -> AttestationStatus | None:
        conf, api = self.cfg.attestation, self.api
        if conf is None:
            return None
        return AttestationStatus(conf.require, conf.verify, api.attestations["verified"], api.attestations["refused"],
                                 api.attestations["admitted"],
                                 [AttestationRefusal(*r) for r in api.attestation_refusals])

    def publication(self) -> PublicationStatus | None:
        pub = self.publisher
        if pub is None:
            return None
        withdrawn = sorted(w.name for w in pub.published or [] if not w.publish_addresses and w.name not in pub.kept_as_last)
        return PublicationStatus(pub.conf.zone, pub.published is not None and not pub.error, pub.error or None, withdrawn)


@dataclass(frozen=True)
class ServerView:
    """What a pass (or a registration's commit) saw and decided: status is made from this."""

    leases: tuple[Lease, ...]
    health: dict[str, tuple[bool, str]]  # public key -> up, and why
    draining: frozenset[str]
    device: Device
    # Per forward, then per SNI backend: its domain, family, and who is in rotation (as IPv4 leases).
    rotations: tuple[tuple[str, int, frozenset[str]], ...]
    table_loaded: bool
    health6: dict[str, tuple[bool, str]] = field(default_factory=dict)  # of the IPv6 twins
