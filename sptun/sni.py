"""Addresses that several domains share: each new connection goes to the domain its TLS
ClientHello names (SNI), through HAProxy in TCP mode, and still carries the browser's address.

Why HAProxy (2.6, Debian's): it reads the server name from a ClientHello split over any
number of segments, closes one naming no domain, connects to a client's overlay address
*from the browser's address* (`usesrc clientip`: IP_TRANSPARENT), and changes who is in a
rotation through its runtime API (`add server`, `set server ... state`, `del server`)
with no reload, so established connections are never reset. nginx's stream module routes as
well, but every change of an upstream is a reload. Hand-written byte pumping in Python would
be slower and is a parser of untrusted input that sptun need not own.

The proxy runs in a session of its own (`-D`: it daemonizes), outlives the daemon, and a
restarted daemon adopts it by its pid file. Its config holds the servers in rotation when
it was written, so a reload (`-sf`, listeners handed over through the stats socket) starts
from the right state; between reloads, the rotation changes through the runtime API.

The kernel side: the proxy's upstream packets leave from the browser's address into the
tunnel; the client's replies come back through the tunnel to an address that is not local.
A mark set on them (nft `socket transparent`, in the `inet sptun` table) and one rule with a
local route in a table of its own deliver them to the proxy's socket.

Pure here: the groups, the config, the parsing of `show stat`, and the runtime commands
that turn one rotation into another. The process and its socket are `HAProxy`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sptun.config import Port, ServerConfig
from sptun.errors import SptunError

log = logging.getLogger("sptun")

PROXY_MARK = 0x04000000  # replies from a client to the proxy's transparent sockets
PROXY_TABLE = 51830  # the routing table that delivers them locally (wg-quick uses 51820)
PROXY_RULE_PRIORITY = 5160  # the rule `fwmark PROXY_MARK lookup PROXY_TABLE`, ahead of main
HELLO_WAIT = 5  # s a connection may take to send its whole ClientHello
CONNECT_TIMEOUT = 1  # s for a connect to a client; then the proxy retries another one
STATS_FIELDS = ("pxname", "svname", "scur", "stot", "status", "addr")


@dataclass(frozen=True)
class SniGroup:
    """One shared address (None: any local address) and TCP port, and the domains on it."""

    listen: str | None
    port: Port
    domains: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.listen or '*'}:{self.port.number}"

    @property
    def family(self) -> int:
        """Of its address, and so of its upstreams (usesrc clientip keeps the family)."""
        return 6 if self.listen and ":" in self.listen else 4


def groups(cfg: ServerConfig) -> list[SniGroup]:
    """The address:ports more than one domain takes (TCP only: config refuses shared UDP),
    in config order. The rest is plain DNAT."""
    takers: dict[tuple[str | None, Port], list[str]] = {}
    for domain in cfg.domains:
        addresses: list[str | None] = [str(a) for a in domain.listen] or [None]
        for address in addresses:
            for port in domain.ports:
                takers.setdefault((address, port), []).append(domain.name)
    return [SniGroup(address, port, tuple(names)) for (address, port), names in takers.items() if len(names) > 1]


def backend_name(group: int, domain: str) -> str:
    return f"g{group}_{domain}"


def server_name(ip: str) -> str:
    return "c6_" + ip.replace(":", "_") if ":" in ip else "c" + ip.replace(".", "_")


def render(groups: list[SniGroup], rotations: dict[str, list[str]], socket_path: Path) -> str:
    """haproxy.cfg: a frontend per group that routes by SNI, and a backend per group and
    domain with the servers now in its rotation. The first line is a digest of the structure
    (everything but the servers), so the daemon knows when only a runtime change is needed."""
    lines = [
        "global",
        f"    stats socket {socket_path} mode 600 level admin expose-fd listeners",
        "    stats timeout 10s",
        "    hard-stop-after 1h",  # a replaced process's long connections, after a reload
        "defaults",
        "    mode tcp",
        f"    timeout connect {CONNECT_TIMEOUT}s",
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout client-fin 30s",
        "    timeout server-fin 30s",
        "    retries 2",
        "    option redispatch 1",  # a client that does not answer: the retry goes to another
    ]
    servers = set()  # the lines that name a server: not part of the structure
    for gi, group in enumerate(groups):
        bind = f"[{group.listen}]:{group.port.number}" if group.family == 6 else f"{group.listen or ''}:{group.port.number}"
        lines += [
            f"frontend g{gi}  # {group.key}",
            f"    bind {bind}",
            f"    tcp-request inspect-delay {HELLO_WAIT}s",
            "    tcp-request content accept if { req.ssl_hello_type 1 }",
            "    tcp-request content reject",
            *(f"    use_backend {backend_name(gi, d)} if {{ req.ssl_sni -i {d} }}" for d in group.domains),
        ]  # no default_backend: a name that is no served domain, or none, is closed
        for domain in group.domains:
            be = backend_name(gi, domain)
            source = "[::]" if group.family == 6 else "0.0.0.0"
            lines += [f"backend {be}", "    balance roundrobin", f"    source {source} usesrc clientip"]
            for ip in rotations.get(be, []):
                lines.append(f"    server {server_name(ip)} {ip}:{group.port.number}")
                servers.add(len(lines) - 1)
    structure = "\n".join(line for i, line in enumerate(lines) if i not in servers)
    digest = hashlib.sha256(structure.encode()).hexdigest()[:16]
    return f"# sptun {digest}\n" + "\n".join(lines) + "\n"


def digest_of(config: str) -> str | None:
    m = re.match(r"# sptun ([0-9a-f]{16})\n", config)
    return m.group(1) if m else None


@dataclass(frozen=True)
class ProxyServer:
    address: str  # the client's overlay address
    ready: bool  # in rotation (not MAINT, not DRAIN)
    sessions: int  # connections open through it now


@dataclass(frozen=True)
class ProxyState:
    """The proxy as one read found it."""

    pid: int | None = None
    digest: str | None = None  # of the running config's structure
    backends: dict[str, dict[str, ProxyServer]] = field(default_factory=dict)  # backend -> server name -> server
    totals: dict[str, int] = field(default_factory=dict)  # backend -> connections it has forwarded

    def sessions(self) -> Counter[str]:
        """Connections open through the proxy now, by client overlay address."""
        out: Counter[str] = Counter()
        for servers in self.backends.values():
            for server in servers.values():
                out[server.address] += server.sessions
        return out


def parse_stat(text: str) -> tuple[dict[str, dict[str, ProxyServer]], dict[str, int]]:
    """`show stat -1 6 -1` (backends and servers, as CSV): the servers by backend and name,
    and each backend's total of forwarded connections. Pure."""
    rows = list(csv.reader(io.StringIO(text.lstrip("# "))))
    if not rows:
        return {}, {}
    header = rows[0]
    try:
        col = {name: header.index(name) for name in STATS_FIELDS}
    except ValueError:
        raise SptunError(f"unexpected HAProxy stats header: {','.join(header)[:200]}") from None
    out: dict[str, dict[str, ProxyServer]] = {}
    totals: dict[str, int] = {}
    for row in rows[1:]:
        if len(row) < len(header) or row[col["svname"]] == "FRONTEND":
            continue
        if row[col["svname"]] == "BACKEND":
            totals[row[col["pxname"]]] = int(row[col["stot"]] or 0)
            continue
        address = row[col["addr"]].rsplit(":", 1)[0].strip("[]")  # IPv6: [fd99::2]:443
        status = row[col["status"]]
        out.setdefault(row[col["pxname"]], {})[row[col["svname"]]] = ProxyServer(
            address, not status.startswith(("MAINT", "DRAIN")), int(row[col["scur"]] or 0))
    return out, totals


def rotation_commands(backend: str, port: int, current: dict[str, ProxyServer], wanted: Iterable[str]) -> list[str]:
    """Runtime commands that make a backend's rotation `wanted` (overlay addresses). One that
    leaves is put in maintenance (no new connection; its open ones go on), and deleted once it
    has none left. Pure."""
    want = {server_name(ip): ip for ip in wanted}
    commands = []
    for name, ip in sorted(want.items()):
        server = current.get(name)
        if server is None:
            commands += [f"add server {backend}/{name} {ip}:{port}", f"enable server {backend}/{name}"]
        elif not server.ready:
            commands.append(f"set server {backend}/{name} state ready")
    for name, server in sorted(current.items()):
        if name in want:
            continue
        if server.ready:
            commands.append(f"set server {backend}/{name} state maint")
        elif server.sessions == 0:
            commands.append(f"del server {backend}/{name}")
    return commands


# --- the process and its socket --------------------------------------------------------------


def proxy_dir(state_dir: Path) -> Path:
    return state_dir / "sni"


def socket_path(state_dir: Path) -> Path:
    """The proxy's runtime API, a unix socket of mode 0600 in state_dir."""
    return proxy_dir(state_dir) / "haproxy.sock"


class HAProxy:
    """The proxy of one server: its files in STATE_DIR/sni (haproxy.cfg, haproxy.pid, haproxy.sock)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = proxy_dir(state_dir)
        self.config = self.dir / "haproxy.cfg"
        self.pidfile = self.dir / "haproxy.pid"
        self.socket = socket_path(state_dir)

    def pid(self) -> int | None:
        """The running proxy of this config, by its pid file, if that process is still it."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.config).encode() in cmdline and cmdline[0].endswith(b"haproxy") else None

    def read(self) -> ProxyState:
        pid = self.pid()
        if pid is None:
            return ProxyState()
        try:
            digest = digest_of(self.config.read_text())
            backends, totals = parse_stat(self.command("show stat -1 6 -1"))  # 2: backends, 4: servers
        except (OSError, SptunError) as e:
            log.warning("cannot read the SNI proxy's state: %s", e)
            return ProxyState(pid)
        return ProxyState(pid, digest, backends, totals)

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One runtime API command; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def run(self, commands: list[str]) -> None:
        for line in commands:
            answer = self.command(line).strip()
            # Successes answer nothing, or "New server registered." / "Server deleted."
            if answer and not answer.startswith(("New server registered", "Server deleted")):
                raise SptunError(f"SNI proxy refused `{line}`: {answer.splitlines()[0][:200]}")

    def start(self, config: str, replacing: int | None) -> None:
        """Write the config, check it, and start the proxy in its own session; replacing: the
        pid of a running one, which hands over its listeners and finishes its connections."""
        binary = shutil.which("haproxy")
        if binary is None:
            raise SptunError("domains share an address, and routing them by SNI needs HAProxy",
                             hint="apt-get install haproxy (scripts/install does)")
        self.dir.mkdir(mode=0o700, exist_ok=True)
        tmp = self.config.with_suffix(".new")
        tmp.write_text(config)
        os.chmod(tmp, 0o600)
        check = subprocess.run([binary, "-c", "-q", "-f", str(tmp)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            detail = (check.stderr or check.stdout).strip().splitlines()
            raise SptunError(f"the SNI proxy's config is refused: {detail[-1][:200] if detail else check.returncode}")
        os.replace(tmp, self.config)
        argv = [binary, "-D", "-q", "-f", str(self.config), "-p", str(self.pidfile)]
        if replacing is not None:
            argv += ["-x", str(self.socket), "-sf", str(replacing)]
        # -D: the process we start forks the proxy and exits; the proxy is no child of ours
        # and, in a session of its own, no kill of the daemon's process group reaches it.
        started = subprocess.run(argv, capture_output=True, text=True, timeout=30, start_new_session=True,
                                 stdin=subprocess.DEVNULL)
        if started.returncode != 0:
            detail = (started.stderr or started.stdout).strip().splitlines()
            raise SptunError(f"the SNI proxy did not start: {detail[-1][:200] if detail else started.returncode}",
                             hint="is another process listening on a shared address?")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = self.pid()
            if pid is not None and pid != replacing and self.socket.exists():
                try:
                    self.command("show info", timeout=1)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise SptunError("the SNI proxy started but does not answer on its socket")

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for path in (self.config, self.pidfile, self.socket):
            path.unlink(missing_ok=True)
