"""A single-machine lab: hosts are network namespaces, each with its own mount namespace.

The lab is a small internet (core router ``inet``), an authoritative DNS server
(knot), public tunnel servers, a browser, and a home NAT router with the tunnel
clients behind it, each client running nginx with a certificate from a lab CA.
Nothing is ever created in the root network namespace: veth pairs are created
directly inside their target namespaces.

Everything the lab makes is named after its prefix (namespaces ``PREFIX-NAME``,
the directory ``LAB_ROOT/PREFIX``), so ``destroy(prefix)`` can clean up after a
crash without any state from the Python process that built the lab.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sptun.discovery import txt_rdata
from sptun.errors import SptunError
from sptun.run import run

LAB_ROOT = Path("/run/sptun-lab")
DOMAIN = "app.example.test"
# More domains, published in DNS as DOMAIN is (the same servers) and named in every client's
# certificate: the SNI tests and the demo serve them on the servers' one address beside DOMAIN.
SNI_DOMAINS = ("blue.example.test", "green.example.test")
ZONE = "example.test"
DNS_ADDRESS = "192.0.2.53"
# The public IPv6 network: one link (the inet router's br0) for the servers, the browser and
# DNS; and the home LAN's, behind the NAT router (which routes it: IPv6 has no NAT there).
PUBLIC6 = "2001:db8::"
INET6 = f"{PUBLIC6}1"  # the inet router
DNS6 = f"{PUBLIC6}53"
NAT6 = f"{PUBLIC6}2:2"
HOME6 = "2001:db8:100::"


def slow() -> float:
    """SPTUN_LAB_SLOW: how many times slower than a plain host this machine runs the lab
    (scripts/test-vm sets it for its VM under software emulation). Every lab wait scales by it.
    Read on every call, never at import."""
    text = os.environ.get("SPTUN_LAB_SLOW", "").strip() or "1"
    try:
        factor = float(text)
    except ValueError:
        raise SptunError(f"SPTUN_LAB_SLOW={text!r} is not a number", hint="e.g. SPTUN_LAB_SLOW=4") from None
    if not 1 <= factor <= 100:
        raise SptunError(f"SPTUN_LAB_SLOW={text!r} is out of range", hint="a factor from 1 to 100")
    return factor


def ready_timeout() -> float:
    """Seconds up() waits for knot and nginx."""
    return 15.0 * slow()


def _stop_timeout() -> float:
    """Seconds a lab process gets after SIGTERM, then again after SIGKILL."""
    return 5.0 * slow()


Arg = str | os.PathLike[str]


# --- topology: pure data ---------------------------------------------------------


@dataclass(frozen=True)
class HostSpec:
    """One lab host. A Vagrantfile reads the same data, so keep it plain."""

    name: str
    role: str  # "dns" | "server" | "client" | "browser" | "router"
    address: str  # main address, without prefix length
    prefixlen: int = 24
    gateway: str | None = None  # default route
    uplink: str | None = None  # the router whose br0 this host's eth0 plugs into
    bridge: tuple[str, ...] = ()  # CIDRs on this host's own br0 (routers only)
    forward: bool = False  # net.ipv4.ip_forward=1
    masquerade: bool = False  # NAT br0 out of eth0 and refuse inbound connections
    routes: tuple[tuple[str, str], ...] = ()  # extra (destination, via)
    address6: str | None = None  # an IPv6 address (/64) on eth0
    bridge6: tuple[str, ...] = ()  # IPv6 CIDRs on this host's br0 (routers only: they forward IPv6 then)
    gateway6: str | None = None  # IPv6 default route
    routes6: tuple[tuple[str, str], ...] = ()  # extra IPv6 (destination, via)

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


def topology(servers: int = 2, clients: int = 3, ipv6_only: int = 0) -> list[HostSpec]:
    """The lab's hosts, routers before the hosts that plug into them. Servers, the browser and
    the DNS server are dual stack. With ipv6_only > 0, the home LAN gets IPv6 too (routed,
    not NATed, and still closed to inbound connections), and its last ipv6_only clients
    have no IPv4 uplink: their network is IPv6 only."""
    if not 1 <= servers <= 50 or not 1 <= clients <= 50 or not 0 <= ipv6_only <= clients:
        raise SptunError(f"lab size out of range: {servers} servers, {clients} clients ({ipv6_only} IPv6-only)",
                         hint="use 1..50 of each, and at most as many IPv6-only clients as clients")
    home6 = bool(ipv6_only)
    hosts = [
        HostSpec(
            "inet",
            "router",
            "192.0.2.1",
            bridge=("192.0.2.1/24", "198.51.100.1/24", "203.0.113.1/24"),
            bridge6=(f"{INET6}/64",),
            forward=True,
            # Like a careless ISP: route the home LAN to the NAT router, so that only
            # the NAT router's firewall keeps the browser away from the clients.
            routes=(("10.99.100.0/24", "203.0.113.2"),),
            routes6=((f"{HOME6}/64", NAT6),) if home6 else (),
        ),
        HostSpec("dns", "dns", DNS_ADDRESS, gateway="192.0.2.1", uplink="inet", address6=DNS6, gateway6=INET6),
    ]
    hosts += [
        HostSpec(f"s{i}", "server", f"198.51.100.{9 + i}", gateway="198.51.100.1", uplink="inet",
                 address6=f"{PUBLIC6}1:{9 + i}", gateway6=INET6)
        for i in range(1, servers + 1)
    ]
    hosts += [
        HostSpec("browser", "browser", "203.0.113.10", gateway="203.0.113.1", uplink="inet", address6=f"{PUBLIC6}3:10",
                 gateway6=INET6),
        HostSpec(
            "nat",
            "router",
            "203.0.113.2",
            gateway="203.0.113.1",
            uplink="inet",
            bridge=("10.99.100.1/24",),
            forward=True,
            masquerade=True,
            address6=NAT6 if home6 else None,
            bridge6=(f"{HOME6}1/64",) if home6 else (),
            gateway6=INET6 if home6 else None,
        ),
    ]
    hosts += [
        HostSpec(f"c{i}", "client", f"10.99.100.{10 + i}", uplink="nat",
                 gateway=None if i > clients - ipv6_only else "10.99.100.1",  # IPv6 only: no IPv4 beyond the LAN
                 address6=f"{HOME6}{10 + i}" if home6 else None, gateway6=f"{HOME6}1" if home6 else None)
        for i in range(1, clients + 1)
    ]
    return hosts


# --- one host ----------------------------------------------------------------------


class Host:
    """A lab host: commands run inside its network and mount namespaces."""

    def __init__(self, spec: HostSpec, prefix: str, lab_dir: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.netns = f"{prefix}-{spec.name}"
        self.address = spec.address
        self.address6 = spec.address6
        self.dir = lab_dir / spec.name  # this host's files
        self.mnt = lab_dir / f"{spec.name}.mnt"  # bind mount that keeps its mount namespace alive
        self.lab_dir = lab_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address})"

    def cmd(self, argv: Sequence[Arg]) -> list[str]:
        # Absolute paths only: entering a mount namespace moves cwd to its root.
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--mount={self.mnt}", "--", *map(str, argv)]

    def run(self, argv: Sequence[Arg], input: str | None = None, check: bool = True, timeout: float | None = None) -> str:
        """Run argv on this host; timeout defaults to 30 s (times slow())."""
        return run(self.cmd(argv), input=input, check=check, timeout=30 * slow() if timeout is None else timeout)

    def spawn(self, argv: Sequence[Arg], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start argv in the background; stdout and stderr go to log.

        env, as in Popen, replaces the whole environment. The pid is also appended
        to the lab's "pids" file, for the record; destroy() finds processes by
        namespace, not by that file.
        """
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.cmd(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        with open(self.lab_dir / "pids", "a") as pids:
            pids.write(f"{proc.pid}\n")
        return proc


# --- the lab -----------------------------------------------------------------------


@dataclass(frozen=True)
class CurlResult:
    body: str
    exit_code: int  # curl's; 0 is success
    subject: str | None  # the server certificate's subject, as curl -v prints it
    log: str  # curl -v output, for failure messages

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def error(self) -> str:
        """curl's own error line (`curl: (28) ...`), or its exit code; empty on success."""
        if self.ok:
            return ""
        lines = [line for line in self.log.splitlines() if line.startswith("curl: (")]
        return lines[-1] if lines else f"curl exited {self.exit_code}"


class Lab:
    def __init__(
        self, prefix: str = "sptlab", servers: int = 2, clients: int = 3, ttl: int = 5, root: Path = LAB_ROOT,
        ipv6_only: int = 0,
    ) -> None:
        _check_prefix(prefix)
        self.prefix = prefix
        self.ttl = ttl
        self.dir = root / prefix
        self.root = root
        self.hosts = {spec.name: Host(spec, prefix, self.dir) for spec in topology(servers, clients, ipv6_only)}
        self.servers = self._role("server")
        self.clients = self._role("client")
        self.dns = self._role("dns")[0]
        self.browser = self._role("browser")[0]
        self.ca_cert = self.dir / "ca" / "ca.pem"
        self.knot_conf = self.dns.dir / "knot.conf"
        self.zone_file = self.dns.dir / f"{ZONE}.zone"
        self._a = [s.address for s in self.servers] + [s.address6 for s in self.servers if s.address6]  # A, AAAA

    def _role(self, role: str) -> list[Host]:
        return [h for h in self.hosts.values() if h.spec.role == role]

    # up / down

    def up(self) -> None:
        """Build the whole lab; on any failure remove what was built and re-raise."""
        if lab_namespaces(self.prefix) or self.dir.exists():
            raise SptunError(f"lab {self.prefix!r} already exists", hint="run `sptun lab down` first")
        try:
            self._make_dir()
            for host in self.hosts.values():
                self._add_host(host)
            for host in self.hosts.values():
                self._wire(host)
            self._make_ca()
            self._start_dns()
            for client in self.clients:
                self._start_web(client)
            self._wait_ready()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove everything named after the prefix; idempotent, and works after a crash."""
        destroy(self.prefix, self.root)
        for host in self.hosts.values():
            for proc in host.procs:
                proc.poll()  # collect our own children (destroy may have reaped them already)
            host.procs.clear()

    def _make_dir(self) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.dir.mkdir(mode=0o755)
        # A private bind mount of the lab dir, so nsfs mounts can be made under it.
        run(["mount", "--bind", str(self.dir), str(self.dir)])
        run(["mount", "--make-private", str(self.dir)])
        (self.dir / "resolv.conf").write_text(f"nameserver {DNS_ADDRESS}\n")

    def _add_host(self, host: Host) -> None:
        host.dir.mkdir(mode=0o755)
        run(["ip", "netns", "add", host.netns])
        host.mnt.touch()
        # The host's own mount namespace, made once and kept by a bind mount on host.mnt:
        # - a private /run/wireguard, since wireguard-go's UAPI sockets live there;
        # - the lab DNS as its system resolver;
        # - no copies of the root's netns and lab mounts, which would pin those namespaces.
        script = f"""set -e
mkdir -p /run/wireguard
mount -t tmpfs -o mode=0700 tmpfs /run/wireguard
mount --bind {shlex.quote(str(self.dir / 'resolv.conf'))} /etc/resolv.conf
if mountpoint -q /run/netns; then umount -l /run/netns; fi
mount -t tmpfs -o mode=0755 tmpfs /run/netns
umount -l {shlex.quote(str(self.dir))}
"""
        run(["unshare", f"--mount={host.mnt}", "--propagation", "private", "sh", "-c", script])
        host.run(["ip", "link", "set", "lo", "up"])

    def _wire(self, host: Host) -> None:
        spec = host.spec
        if spec.bridge:
            host.run(["ip", "link", "add", "br0", "type", "bridge"])
            for cidr in spec.bridge:
                host.run(["ip", "addr", "add", cidr, "dev", "br0"])
            for cidr in spec.bridge6:  # nodad: not tentative for a second or two
                host.run(["ip", "addr", "add", cidr, "dev", "br0", "nodad"])
            host.run(["ip", "link", "set", "br0", "up"])
        if spec.uplink:
            router = self.hosts[spec.uplink]
            # Both ends are born in their namespaces; the root namespace never sees them.
            run(["ip", "link", "add", "eth0", "netns", host.netns, "type", "veth",
                 "peer", "name", host.name, "netns", router.netns])  # fmt: skip
            router.run(["ip", "link", "set", host.name, "master", "br0", "up"])
            host.run(["ip", "addr", "add", spec.cidr, "dev", "eth0"])
            if spec.address6:
                host.run(["ip", "addr", "add", f"{spec.address6}/64", "dev", "eth0", "nodad"])
            host.run(["ip", "link", "set", "eth0", "up"])
        if spec.gateway:
            host.run(["ip", "route", "add", "default", "via", spec.gateway])
        for dest, via in spec.routes:
            host.run(["ip", "route", "add", dest, "via", via])
        if spec.gateway6:
            host.run(["ip", "-6", "route", "add", "default", "via", spec.gateway6])
        for dest, via in spec.routes6:
            host.run(["ip", "-6", "route", "add", dest, "via", via])
        if spec.forward:
            host.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        if spec.bridge6:
            host.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        if spec.masquerade:
            host.run(["nft", "-f", "-"], input=NAT_RULESET)

    # CA and certificates

    def _make_ca(self) -> None:
        ca = self.dir / "ca"
        ca.mkdir(mode=0o700)
        key = ca / "ca.key"
        run(["openssl", "req", "-x509", "-new", *_EC_KEY, "-keyout", str(key), "-out", str(self.ca_cert),
             "-subj", "/O=sptun lab/CN=sptun lab CA", "-days", "30"])  # fmt: skip
        key.chmod(0o600)
        ext = ca / "leaf.ext"
        names = ",".join(f"DNS:{d}" for d in (DOMAIN, *SNI_DOMAINS))
        ext.write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
        for client in self.clients:
            self._make_cert(client.name, key, ext)
        # One session-ticket key for every client's nginx, as a pool behind any L4 balancer
        # has: a browser sent to another client resumes its TLS session instead of a full
        # handshake (without it, round-robin pays a full handshake per new connection).
        self.ticket_key.write_bytes(os.urandom(80))
        self.ticket_key.chmod(0o600)

    @property
    def ticket_key(self) -> Path:
        return self.dir / "ca" / "tickets.key"

    def _make_cert(self, name: str, ca_key: Path, ext: Path) -> None:
        """A certificate for DOMAIN whose subject names the client (OU=name)."""
        key, cert = self.cert_paths(name)
        subject = f"/O=sptun lab/OU={name}/CN={DOMAIN}"
        csr = run(["openssl", "req", "-new", *_EC_KEY, "-keyout", str(key), "-subj", subject])
        key.chmod(0o600)
        run(["openssl", "x509", "-req", "-CA", str(self.ca_cert), "-CAkey", str(ca_key), "-set_serial",
             f"0x{uuid.uuid4().hex}", "-days", "30", "-extfile", str(ext), "-out", str(cert)], input=csr)  # fmt: skip

    def cert_paths(self, name: str) -> tuple[Path, Path]:
        """(key, certificate) of a client's web server."""
        return self.dir / "ca" / f"{name}.key", self.dir / "ca" / f"{name}.pem"

    # DNS

    def _start_dns(self) -> None:
        dns = self.dns.dir
        (dns / "run").mkdir()
        (dns / "db").mkdir()
        self.knot_conf.write_text(KNOT_CONF.format(dir=dns, listen=f"[ {DNS_ADDRESS}@53, {DNS6}@53 ]", zone=ZONE))
        self.write_zone([server_txt(s.address) for s in self.servers], self._a, serial=1)
        self.dns.spawn(["knotd", "-c", self.knot_conf], log=dns / "knotd.log")

    def allow_updates(self) -> None:
        """Let each server keep its own records in the zone (sptun's `[dns]`): a TSIG key of
        its own (`tsig.key` in its directory, mode 0600), which the zone's update policy
        allows TXT, A and AAAA records at the lab's domains only; knot reloads its config.
        The zone file then no longer lists the domains' records: the servers publish them."""
        keys, acls = [], []
        for server in self.servers:
            name = f"{server.name}.{ZONE}"
            secret = base64.b64encode(secrets.token_bytes(32)).decode()
            path = server.dir / "tsig.key"
            path.touch(mode=0o600)
            path.write_text(f"key:\n  - id: {name}\n    algorithm: hmac-sha256\n    secret: {secret}\n")
            keys.append(f"  - id: {name}\n    algorithm: hmac-sha256\n    secret: {secret}\n")
            owners = ", ".join(f"{d}." for d in (DOMAIN, *SNI_DOMAINS))
            acls.append(f"  - id: {server.name}\n    key: {name}\n    action: update\n    update-type: [TXT, A, AAAA]\n"
                        f"    update-owner: name\n    update-owner-match: equal\n    update-owner-name: [{owners}]\n")
        text = self.knot_conf.read_text()
        text = text.replace("zone:\n", "key:\n" + "".join(keys) + "\nacl:\n" + "".join(acls) + "\nzone:\n", 1)
        text += f"    acl: [{', '.join(s.name for s in self.servers)}]\n"
        self.knot_conf.write_text(text)
        self.set_txt([], a=[])
        self.dns.run(["knotc", "-b", "-c", self.knot_conf, "reload"])

    def zone_records(self, name: str = DOMAIN) -> list[str]:
        """The name's TXT, A and AAAA records as the DNS server answers them now, one per line."""
        out = self.dns.run(["kdig", f"@{DNS_ADDRESS}", "+short", "+tcp", name, "TXT"]).split("\n")
        out += self.dns.run(["kdig", f"@{DNS_ADDRESS}", "+short", "+tcp", name, "A"]).split("\n")
        out += self.dns.run(["kdig", f"@{DNS_ADDRESS}", "+short", "+tcp", name, "AAAA"]).split("\n")
        return sorted(line for line in out if line.strip())

    def set_txt(self, txt: Sequence[str | Sequence[str]], a: list[str] | None = None) -> None:
        """Replace DOMAIN's TXT records (and A records, if a is given); reload knot.

        A str is one TXT record (split into 255-byte character-strings if longer);
        a list of str is one record made of those character-strings.
        """
        if a is not None:
            self._a = list(a)
        self.write_zone(txt, self._a, serial=self._serial() + 1)
        # -b: return once the new zone is served, so the caller can query right away.
        self.dns.run(["knotc", "-b", "-c", self.knot_conf, "zone-reload", ZONE])

    def _serial(self) -> int:
        match = re.search(r"\bSOA\s+\S+\s+\S+\s+(\d+)", self.zone_file.read_text())
        if not match:
            raise SptunError(f"no SOA serial in {self.zone_file}")
        return int(match.group(1))

    def write_zone(self, txt: Sequence[str | Sequence[str]], a: list[str], serial: int) -> None:
        """Write the zone file for ZONE, with DOMAIN's A and TXT records (txt as in set_txt),
        and the same for SNI_DOMAINS. Knot is not told: set_txt() reloads it."""
        lines = [
            f"$ORIGIN {ZONE}.",
            f"$TTL {self.ttl}",
            f"@ SOA ns.{ZONE}. hostmaster.{ZONE}. {serial} 60 60 3600 {self.ttl}",
            "@ NS ns",
            f"ns A {DNS_ADDRESS}",
            *(f"{name}. {'AAAA' if ':' in ip else 'A'} {ip}" for name in (DOMAIN, *SNI_DOMAINS) for ip in a),
            *(f"{name}. TXT {txt_rdata(record)}" for name in (DOMAIN, *SNI_DOMAINS) for record in txt),
        ]
        tmp = self.zone_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.zone_file)  # knot never reads a half-written file

    # web servers

    def _start_web(self, client: Host) -> None:
        home = client.dir
        (home / "tmp").mkdir()
        key, cert = self.cert_paths(client.name)
        conf = home / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=home, name=client.name, key=key, cert=cert, tickets=self.ticket_key,
                                           domain=DOMAIN))
        # -e: nginx opens its error log before reading the config; keep it out of /var/log.
        client.spawn(["nginx", "-p", home, "-e", home / "error.log", "-c", conf, "-g", "daemon off;"],
                     log=home / "nginx.log")  # fmt: skip

    # readiness

    def _wait_ready(self) -> None:
        probe = self.clients[0]

        def knot_answers() -> bool:
            query = ["kdig", f"@{DNS_ADDRESS}", "+short", "+time=1", "+retry=0", "TXT", DOMAIN]
            return "r=superprotocol" in probe.run(query, check=False)

        _wait_until("knot answering TXT through the NAT", self.dns, knot_answers)
        for client in self.clients:
            _wait_until(f"nginx listening on {client.name}", client, partial(_listening, client, [80, 443]))

    # use

    def curl(self, server_ip: str, path: str = "/", timeout: float | None = None, source: Host | None = None,
             domain: str = DOMAIN, args: Sequence[str] = ()) -> CurlResult:
        """Fetch https://DOMAIN/path (or another domain's) from the browser (or source), the
        domain resolved to server_ip; timeout defaults to 5 s (times slow()); args: curl's."""
        if timeout is None:
            timeout = 5 * slow()
        host = source or self.browser
        body = host.dir / f"curl-{uuid.uuid4().hex}.body"
        # run() returns stdout only, so curl sends its -v log and exit code there and the body to a file.
        out = host.run(
            ["curl", "-sS", "-v", "--stderr", "-", "-o", body, "-w", "\nsptun-curl-exit=%{exitcode}\n",
             "--max-time", f"{timeout:g}", "--cacert", self.ca_cert,
             "--resolve", f"{domain}:443:{f'[{server_ip}]' if ':' in server_ip else server_ip}", *args,
             f"https://{domain}{path}"],
            check=False, timeout=timeout + 10,
        )  # fmt: skip
        try:
            text = body.read_text(errors="replace") if body.exists() else ""
        finally:
            body.unlink(missing_ok=True)
        code = re.search(r"^sptun-curl-exit=(\d+)$", out, re.M)
        subject = re.search(r"^\*\s+subject:\s*(.*?)\s*$", out, re.M)
        return CurlResult(text, int(code.group(1)) if code else -1, subject.group(1) if subject else None, out)


# --- crash-proof cleanup -------------------------------------------------------------


def destroy(prefix: str, root: Path = LAB_ROOT) -> None:
    """Remove the lab named prefix: its processes, namespaces, mounts and directory.

    Relies only on the names, so it works after the builder crashed; anything
    already gone is fine. Each step runs even if an earlier one failed.
    """
    _check_prefix(prefix)
    lab_dir = root / prefix
    errors: list[str] = []
    namespaces = lab_namespaces(prefix)
    steps: list[Callable[[], None]] = [
        lambda: _stop_processes(namespaces),
        lambda: _delete_namespaces(namespaces),
        lambda: _unmount_below(lab_dir),
        lambda: _remove_dir(lab_dir),
    ]
    for step in steps:
        try:
            step()
        except SptunError as exc:
            errors.append(str(exc))
    if errors:
        raise SptunError(f"lab {prefix!r} not fully removed: {'; '.join(errors)}", hint="see ip netns list; findmnt")


def _check_prefix(prefix: str) -> None:
    # No '-': so that PREFIX-NAME matches exactly one lab's namespaces.
    if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", prefix):
        raise SptunError(f"bad lab prefix {prefix!r}", hint="use 1-32 letters, digits or _")


def _netns_names() -> list[str]:
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


def lab_namespaces(prefix: str) -> list[str]:
    """The network namespaces of the lab named prefix (PREFIX-NAME)."""
    return [n for n in _netns_names() if re.fullmatch(rf"{re.escape(prefix)}-[A-Za-z0-9]+", n)]


def _stop_processes(namespaces: list[str]) -> None:
    """SIGTERM every process in the namespaces, then SIGKILL what is left.

    The namespaces are listed again on every poll, so a process that a dying
    daemon starts at the last moment is caught too, and cannot keep a deleted
    namespace alive unseen.
    """
    pids: set[int] = set()
    # A killed process can take seconds to leave a busy machine (a wireguard-go closing its tun):
    # SIGKILL gets twice SIGTERM's time before anything is called a survivor.
    stop = _stop_timeout()
    for sig, wait in ((signal.SIGTERM, stop), (signal.SIGKILL, 2 * stop)):
        signalled: set[int] = set()
        deadline = time.monotonic() + wait
        while (pids := _pids_in(namespaces)) and time.monotonic() < deadline:
            for pid in pids - signalled:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            signalled |= pids
            time.sleep(0.05)
            _reap(signalled)
        if not pids:
            return
    raise SptunError(f"lab processes survived SIGKILL: {sorted(pids)}")


def _pids_in(namespaces: list[str]) -> set[int]:
    # Zombies have no namespaces any more, so they are not listed.
    return {int(p) for ns in namespaces for p in run(["ip", "netns", "pids", ns], check=False).split()}


def _reap(pids: set[int]) -> None:
    """Collect those of pids that are our own exited children (Lab.up's spawns)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child, or already collected


def alive(pid: int) -> bool:
    """True unless pid has exited; a zombie counts as exited."""
    _reap({pid})
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _delete_namespaces(namespaces: list[str]) -> None:
    for ns in namespaces:
        run(["ip", "netns", "del", ns], check=False)
    if left := set(namespaces) & set(_netns_names()):
        raise SptunError(f"could not delete network namespaces {sorted(left)}")


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below path, as this process's mount namespace sees them."""
    base = os.path.realpath(path)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == base or point.startswith(base + "/"):
            points.append(point)
    return points


def _unmount_below(path: Path) -> None:
    # Deepest first; loop because a mount point may be stacked more than once.
    for _ in range(5):
        points = mounts_below(path)
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            run(["umount", point], check=False)
    raise SptunError(f"could not unmount {mounts_below(path)}")


def _remove_dir(path: Path) -> None:
    if mounts_below(path):
        raise SptunError(f"not removing {path}: still mounted")  # never delete through a mount
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise SptunError(f"could not remove {path}")


# --- helpers -----------------------------------------------------------------------


def _wait_until(what: str, host: Host, ready: Callable[[], bool]) -> None:
    """Poll ready() for up to ready_timeout(); fail at once if one of host's processes died."""
    timeout = ready_timeout()
    deadline = time.monotonic() + timeout
    hint = f"see the logs in {host.dir}"
    while not ready():
        if dead := [p for p in host.procs if p.poll() is not None]:
            raise SptunError(f"lab: {what}: process exited with {dead[0].returncode}", hint=hint)
        if time.monotonic() > deadline:
            raise SptunError(f"lab: timed out after {timeout:g} s waiting for {what}", hint=hint)
        time.sleep(0.1)


def _listening(host: Host, ports: list[int]) -> bool:
    out = host.run(["ss", "-Hltn"], check=False)
    local = {line.split()[3].rsplit(":", 1)[-1] for line in out.splitlines() if len(line.split()) > 3}
    return all(str(p) in local for p in ports)


def server_txt(ip: str) -> str:
    """The TXT record that announces a tunnel server at ip."""
    return f"r=superprotocol;ip={ip}"


_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc"]

NAT_RULESET = """\
table inet lab {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "eth0" oifname "br0" drop comment "a home router: no inbound connections to the LAN"
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" meta nfproto ipv4 masquerade
    }
}
"""

KNOT_CONF = """\
server:
    rundir: "{dir}/run"
    user: root:root
    listen: {listen}

control:
    listen: "{dir}/run/knot.sock"

log:
  - target: stderr
    any: info

database:
    storage: "{dir}/db"

template:
  - id: default
    storage: "{dir}"
    file: "%s.zone"
    # The zone file is the only source of truth; set_txt rewrites it and reloads.
    zonefile-load: whole
    zonefile-sync: -1
    journal-content: none

zone:
  - domain: {zone}
"""

NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log;

events {{
    worker_connections 4096;
}}

http {{
    access_log {dir}/access.log combined buffer=64k flush=1s;  # cheap enough for benchmarks
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_timeout 65;
    keepalive_requests 100000;
    default_type text/plain;

    server {{
        listen 80;
        listen [::]:80;
        listen 443 ssl http2;
        listen [::]:443 ssl http2;
        server_name {domain};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_ticket_key {tickets};
        location / {{
            return 200 "client={name} remote=$remote_addr\\n";
        }}
        location /bytes/ {{  # bodies for throughput benchmarks, where one puts them
            alias {dir}/bytes/;
        }}
    }}
}}
"""
