"""WireGuard devices behind one small interface, with two backends:

- kernel: the wireguard module, through pyroute2's generic netlink;
- userspace: wireguard-go, through its UAPI socket (/var/run/wireguard/IFNAME.sock).

Links, addresses and routes around the device are the same for both (see links.py).
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sptun.errors import SptunError, WireGuardUnavailable
from sptun.keys import public_key
from sptun.links import Links
from sptun.run import run

log = logging.getLogger("sptun")

UAPI_DIR = Path("/var/run/wireguard")


@dataclass(frozen=True)
class Peer:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None  # "ip:port"; None lets the peer roam (server side)
    keepalive: int = 0


@dataclass(frozen=True)
class PeerState:
    peer: Peer
    last_handshake: float = 0.0  # unix time; 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class Device:
    public_key: str | None = None
    listen_port: int = 0
    peers: dict[str, PeerState] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerChange:
    action: str  # "add" | "update" | "remove"
    peer: Peer

    def __str__(self) -> str:
        if self.action == "remove":
            return f"remove peer {self.peer.public_key}"
        where = f" at {self.peer.endpoint}" if self.peer.endpoint else ""
        return f"{self.action} peer {self.peer.public_key} allowed-ips {','.join(self.peer.allowed_ips)}{where}"


def plan_peers(desired: list[Peer], actual: Device) -> list[PeerChange]:
    """What turns actual into desired; [] once converged. Pure.

    A roaming peer's endpoint is whatever the kernel learnt, so it counts as a difference
    only where desired names one."""
    changes = []
    wanted = {p.public_key: p for p in desired}
    for key, state in sorted(actual.peers.items()):
        if key not in wanted:
            changes.append(PeerChange("remove", state.peer))
    for key, peer in sorted(wanted.items()):
        have = actual.peers.get(key)
        if have is None:
            changes.append(PeerChange("add", peer))
            continue
        current = have.peer
        if (sorted(current.allowed_ips) != sorted(peer.allowed_ips) or current.keepalive != peer.keepalive
                or (peer.endpoint is not None and current.endpoint != peer.endpoint)):
            changes.append(PeerChange("update", peer))
    return changes


class WireGuard(Protocol):
    kind: str

    def create(self, ifname: str) -> None: ...

    def is_ours(self, ifname: str) -> bool:
        """The link exists and is a working device of this backend."""
        ...

    def configure(self, ifname: str, private_key: str, listen_port: int | None) -> None: ...

    def device(self, ifname: str) -> Device: ...

    def apply(self, ifname: str, changes: list[PeerChange]) -> None: ...


def _hex(key: str) -> str:
    return base64.b64decode(key).hex()


def _b64(hexkey: str) -> str:
    return base64.b64encode(bytes.fromhex(hexkey)).decode()


class Userspace:
    """wireguard-go, configured through the cross-platform UAPI (key=value lines)."""

    kind = "userspace"

    def __init__(self, links: Links) -> None:
        self.links = links

    def sock(self, ifname: str) -> Path:
        return UAPI_DIR / f"{ifname}.sock"

    def create(self, ifname: str) -> None:
        # wireguard-go daemonizes itself, so the tunnel outlives a restart of sptun. Its
        # daemon child keeps stdout/stderr open: a file, not a pipe, or we would wait forever.
        # In a session of its own: Ctrl-C of a foreground daemon, or a supervisor's kill of
        # the daemon's process group, must not take the data plane with it.
        env = dict(os.environ, LOG_LEVEL="error")
        env.pop("WG_PROCESS_FOREGROUND", None)
        log.debug("[#] wireguard-go %s", ifname)
        with tempfile.TemporaryFile(mode="w+") as out:
            code = subprocess.call(["wireguard-go", ifname], env=env, stdout=out, stderr=out, timeout=15,
                                   start_new_session=True, stdin=subprocess.DEVNULL)
            out.seek(0)
            lines = [line for line in out.read().splitlines() if line.strip() and not line.startswith(("│", "┌", "└"))]
        if code != 0:
            raise SptunError(f"wireguard-go {ifname} failed: {lines[-1] if lines else code}")
        deadline = time.monotonic() + 5
        while not self.sock(ifname).exists():
            if time.monotonic() > deadline:
                raise SptunError(f"wireguard-go {ifname} did not open {self.sock(ifname)}")
            time.sleep(0.02)

    def is_ours(self, ifname: str) -> bool:
        return self.links.kind(ifname) == "tun" and self.sock(ifname).exists()

    def _uapi(self, ifname: str, request: str) -> list[str]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(self.sock(ifname)))
                s.sendall(request.encode() + b"\n")
                chunks: list[bytes] = []  # joined once: a device of 10k peers is megabytes
                while not (chunks and chunks[-1].endswith(b"\n\n")):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError as e:
            raise SptunError(f"wireguard-go UAPI of {ifname}: {e}") from None
        lines = b"".join(chunks).decode().splitlines()
        errno_ = next((line for line in lines if line.startswith("errno=")), "errno=?")
        if errno_ != "errno=0":
            raise SptunError(f"wireguard-go refused the configuration of {ifname} ({errno_})")
        return [line for line in lines if line and not line.startswith("errno=")]

    def configure(self, ifname: str, private_key: str, listen_port: int | None) -> None:
        lines = ["set=1", f"private_key={_hex(private_key)}"]
        if listen_port is not None:
            lines.append(f"listen_port={listen_port}")
        self._uapi(ifname, "\n".join(lines) + "\n")

    def device(self, ifname: str) -> Device:
        top: dict[str, str] = {}
        rows: list[tuple[dict[str, str], list[str]]] = []  # each peer's keys, and its allowed-ips
        for line in self._uapi(ifname, "get=1\n"):
            key, _, value = line.partition("=")
            if key == "public_key":
                rows.append(({}, []))
            if not rows:
                top[key] = value
            elif key == "allowed_ip":
                rows[-1][1].append(value)
            else:
                rows[-1][0][key] = value
        peers = {}
        for row, ips in rows:
            key = _b64(row["public_key"])
            peer = Peer(key, tuple(ips), row.get("endpoint"), int(row.get("persistent_keepalive_interval", 0)))
            peers[key] = PeerState(peer, float(row.get("last_handshake_time_sec", 0)),
                                   int(row.get("rx_bytes", 0)), int(row.get("tx_bytes", 0)))
        own = public_key(_b64(top["private_key"])) if "private_key" in top else None
        return Device(own, int(top.get("listen_port", 0)), peers)

    def apply(self, ifname: str, changes: list[PeerChange]) -> None:
        if not changes:
            return
        lines = ["set=1"]
        for change in changes:  # all changes in one UAPI transaction
            peer = change.peer
            lines.append(f"public_key={_hex(peer.public_key)}")
            if change.action == "remove":
                lines.append("remove=true")
                continue
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={ip}" for ip in peer.allowed_ips]
            if peer.endpoint:
                lines.append(f"endpoint={peer.endpoint}")
            lines.append(f"persistent_keepalive_interval={peer.keepalive}")
        self._uapi(ifname, "\n".join(lines) + "\n")


class Kernel:
    """The wireguard kernel module through pyroute2 (generic netlink)."""

    kind = "kernel"

    def __init__(self, links: Links) -> None:
        self.links = links

    def create(self, ifname: str) -> None:
        self.links.add(ifname, "wireguard")

    def is_ours(self, ifname: str) -> bool:
        return self.links.kind(ifname) == "wireguard"

    def _wg(self) -> Any:
        from pyroute2 import WireGuard as GenlWireGuard

        return GenlWireGuard()

    def configure(self, ifname: str, private_key: str, listen_port: int | None) -> None:
        with self._wg() as wg:
            wg.set(ifname, private_key=private_key, listen_port=listen_port)

    def device(self, ifname: str) -> Device:
        public_key, listen_port = None, 0
        peers: dict[str, PeerState] = {}
        with self._wg() as wg:
            # A large device comes in several messages; a peer can even continue in the
            # next one. Reading only the first message loses peers.
            for msg in wg.info(ifname):
                pub = msg.get_attr("WGDEVICE_A_PUBLIC_KEY")
                if pub is not None:
                    public_key = pub.decode() if isinstance(pub, bytes) else str(pub)
                listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
                for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
                    key_raw = p.get_attr("WGPEER_A_PUBLIC_KEY")
                    key = key_raw.decode() if isinstance(key_raw, bytes) else str(key_raw)
                    ips = tuple(a["addr"] for a in (p.get_attr("WGPEER_A_ALLOWEDIPS") or []) if "addr" in a)
                    endpoint = p.get_attr("WGPEER_A_ENDPOINT")
                    where = None
                    if endpoint is not None and endpoint.get("addr") not in (None, "0.0.0.0", "::"):
                        addr = endpoint["addr"]
                        where = f"[{addr}]:{endpoint['port']}" if ":" in addr else f"{addr}:{endpoint['port']}"
                    handshake = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
                    seen = float(handshake["tv_sec"]) if handshake is not None else 0.0
                    old = peers.get(key)
                    if old is not None:  # continuation of the same peer
                        merged = Peer(key, old.peer.allowed_ips + ips, old.peer.endpoint or where, old.peer.keepalive)
                        peers[key] = PeerState(merged, old.last_handshake or seen, old.rx_bytes, old.tx_bytes)
                        continue
                    keepalive = p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0
                    peers[key] = PeerState(Peer(key, ips, where, keepalive), seen,
                                           p.get_attr("WGPEER_A_RX_BYTES") or 0, p.get_attr("WGPEER_A_TX_BYTES") or 0)
        return Device(public_key, listen_port, peers)

    def apply(self, ifname: str, changes: list[PeerChange]) -> None:
        with self._wg() as wg:
            for change in changes:
                peer = change.peer
                if change.action == "remove":
                    wg.set(ifname, peer={"public_key": peer.public_key, "remove": True})
                    continue
                # replace_allowed_ips: without it the kernel adds to the old ones.
                spec: dict[str, object] = {"public_key": peer.public_key, "allowed_ips": list(peer.allowed_ips),
                                           "replace_allowed_ips": True, "persistent_keepalive": peer.keepalive}
                if peer.endpoint:
                    host, _, port = peer.endpoint.rpartition(":")
                    spec.update(endpoint_addr=host.strip("[]"), endpoint_port=int(port))
                wg.set(ifname, peer=spec)


def kernel_module_present() -> bool:
    if Path("/sys/module/wireguard").exists():
        return True
    if shutil.which("modprobe"):
        run(["modprobe", "-q", "wireguard"], check=False)
    return Path("/sys/module/wireguard").exists()


def userspace_present() -> bool:
    return shutil.which("wireguard-go") is not None and Path("/dev/net/tun").exists()


def backend(mode: str, links: Links) -> WireGuard:
    """The backend for `wireguard = mode`: the kernel module where it is, else wireguard-go
    (the daemons and `up` say so loudly: Role.warn_fallback)."""
    if mode in ("auto", "kernel") and kernel_module_present():
        return Kernel(links)
    if mode == "kernel":
        raise WireGuardUnavailable("wireguard = \"kernel\", but this kernel has no wireguard module",
                                   hint="install linux-image-amd64 (the module ships with it), or set wireguard = \"userspace\"")
    if userspace_present():
        return Userspace(links)
    raise WireGuardUnavailable("no WireGuard: neither the kernel module nor wireguard-go is available",
                               hint="apt-get install wireguard-go, or load the wireguard module")


FRESH_HANDSHAKE = 180.0  # s; with keepalives, WireGuard re-handshakes every 2 minutes


def handshake_fresh(last_handshake: float, now: float) -> bool:
    """Whether a peer's last handshake (unix time, 0 = never) is recent enough to count."""
    return last_handshake > 0 and now - last_handshake < FRESH_HANDSHAKE
