"""wireguard-go's UDP receive buffer, changed from outside, per socket.

Debian 12's wireguard-go (0.0.20220316) never sets SO_RCVBUF, so its sockets get
net.core.rmem_default (212,992 bytes); wireguard-go from 0.0.20230223 on asks for 7 MiB
with SO_RCVBUFFORCE itself. net.core.rmem_default and rmem_max are not per network
namespace: a namespace sees the init namespace's values, read-only (checked by
`namespaced_rmem()`), so a lab cannot raise them for one namespace, and this shared
machine's global value must not change under other work. Instead this takes a duplicate
of each wireguard-go UDP socket (pidfd_getfd(2), Linux 5.6+) and sets SO_RCVBUFFORCE on
it: the same socket, so the same effect a larger rmem_default would have had when
wireguard-go opened it.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
from pathlib import Path

from bench.common import ns_pids, proc_stat
from sptun.lab import Host

SYS_PIDFD_GETFD = 438  # x86_64 and most others (asm-generic)
SO_RCVBUFFORCE = 33
DEFAULT = 212_992  # Debian's net.core.rmem_default
_libc = ctypes.CDLL(None, use_errno=True)


def _udp_inodes(pid: int) -> set[int]:
    inodes = set()
    for name in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        inodes |= {int(line.split()[9]) for line in lines if len(line.split()) > 9}
    return inodes


def wireguard_sockets(host: Host) -> list[tuple[int, int]]:
    """(pid, fd) of every UDP socket of every wireguard-go in the host's namespace."""
    found = []
    for pid in ns_pids(host.netns):
        stat = proc_stat(pid)
        if not stat or not stat[0].startswith("wireguard"):
            continue
        udp = _udp_inodes(pid)
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m and int(m.group(1)) in udp:
                found.append((pid, int(fd)))
    return found


def set_receive_buffer(host: Host, size: int) -> list[int]:
    """Give every wireguard-go UDP socket on host a receive buffer of `size` bytes, as if
    net.core.rmem_default had been `size` when it was opened. Returns the sizes now set."""
    sizes = []
    for pid, fd in wireguard_sockets(host):
        pidfd = os.pidfd_open(pid)
        try:
            dup = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
            if dup < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd of fd {fd} of pid {pid}")
        finally:
            os.close(pidfd)
        with socket.socket(fileno=dup) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size // 2)  # the kernel doubles it
            sizes.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    return sizes


def namespaced_rmem(host: Host) -> dict[str, str]:
    """What a network namespace can do with net.core.rmem_default/rmem_max on this kernel."""
    out = host.run(["sh", "-c", "for f in rmem_default rmem_max; do "
                    "printf '%s %s %s\\n' $f $(stat -c %A /proc/sys/net/core/$f) $(cat /proc/sys/net/core/$f); done"])
    result = {}
    for line in out.splitlines():
        name, mode, value = line.split()
        result[name] = f"{value} ({'read-only' if 'w' not in mode else 'writable'} in a namespace)"
    return result
