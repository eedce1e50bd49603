"""What the benchmarks share: timing, statistics, /proc accounting, scratch namespaces, wrk."""

from __future__ import annotations

import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sptun.lab import LAB_ROOT, Host, HostSpec, destroy
from sptun.run import run

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()

# Every command a benchmark runs is recorded here, for RESULTS.md ("the exact commands").
COMMANDS: dict[str, list[str]] = {}


def note_command(section: str, argv: Sequence[object]) -> None:
    text = shlex.join(map(str, argv))
    cmds = COMMANDS.setdefault(section, [])
    if text not in cmds:
        cmds.append(text)


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def wireguard_backend() -> str:
    """What a lab's `wireguard = "auto"` picks on this machine."""
    return "kernel" if Path("/sys/module/wireguard").exists() else "wireguard-go"


# --- statistics ------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return float(ordered[int(min(rank, len(ordered))) - 1])


# --- /proc accounting -------------------------------------------------------------------------


def ns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def proc_stat(pid: int) -> tuple[str, float] | None:
    """(comm, utime+stime in seconds) of a process, all its threads included."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_with_children(pid: int) -> float | None:
    """utime+stime+cutime+cstime in seconds: a process and the children it has waited for
    (the commands a daemon runs, `nft` say, count as its own work)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def kind_of(pid: int, comm: str) -> str:
    """A process's part in the server namespace, for the CPU breakdown."""
    if comm.startswith("wireguard"):
        return "wireguard-go"
    if comm.startswith("haproxy"):
        return "haproxy"
    line = cmdline(pid)
    if "sptun server run" in line or "sptun agent run" in line:
        return "sptun"
    return comm


def ns_cpu(netns: str, exclude: set[int] = frozenset()) -> dict[str, float]:  # type: ignore[assignment]
    """CPU seconds so far of every process in a namespace, summed by kind (wireguard-go, haproxy, sptun, ...)."""
    total: dict[str, float] = {}
    for pid in ns_pids(netns):
        if pid in exclude:
            continue
        stat = proc_stat(pid)
        if stat is not None:
            kind = kind_of(pid, stat[0])
            total[kind] = total.get(kind, 0.0) + stat[1]
    return total


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    # A process that exited between the readings is left out (its seconds are lost either way).
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in after}


def machine_cpu() -> tuple[float, float]:
    """(busy seconds, total seconds) of the whole machine so far, all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def snmp(host: Host, section: str = "Udp") -> dict[str, int]:
    """One section's counters (Udp, Tcp, Ip, Icmp) of a namespace's /proc/net/snmp, as seen from inside it."""
    lines = [line.split() for line in host.run(["cat", "/proc/net/snmp"]).splitlines() if line.startswith(f"{section}:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


# --- waiting ---------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    """Poll check() until true; the seconds it took. Raises TimeoutError after timeout."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - started


def daemon_pid(host: Host) -> int:
    role = "server run" if host.spec.role == "server" else "agent run"
    for pid in ns_pids(host.netns):
        line = cmdline(pid)
        if f"sptun {role}" in line and not line.startswith("nsenter"):
            return pid
    raise RuntimeError(f"no sptun daemon on {host.name}")


# --- a scratch namespace --------------------------------------------------------------------


@contextmanager
def scratch(prefix: str) -> Iterator[Host]:
    """One empty host (network and mount namespace, private /run/wireguard) named like a lab
    host, so that sptun.lab.destroy(prefix) removes it: on exit, and after a crash."""
    lab_dir = LAB_ROOT / prefix
    host = Host(HostSpec("x", "server", "127.0.0.1"), prefix, lab_dir)
    try:
        LAB_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        lab_dir.mkdir(mode=0o755)
        run(["mount", "--bind", str(lab_dir), str(lab_dir)])
        run(["mount", "--make-private", str(lab_dir)])
        host.dir.mkdir(mode=0o755)
        run(["ip", "netns", "add", host.netns])
        host.mnt.touch()
        script = f"""set -e
mkdir -p /run/wireguard
mount -t tmpfs -o mode=0700 tmpfs /run/wireguard
if mountpoint -q /run/netns; then umount -l /run/netns; fi
mount -t tmpfs -o mode=0755 tmpfs /run/netns
umount -l {shlex.quote(str(lab_dir))}
"""
        run(["unshare", f"--mount={host.mnt}", "--propagation", "private", "sh", "-c", script])
        host.run(["ip", "link", "set", "lo", "up"])
        yield host
    finally:
        destroy(prefix)
        for proc in host.procs:
            proc.poll()


# --- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors (connect, read, write, timeout) and non-2xx answers
    error_detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def parse_wrk(out: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", out, re.M)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    if not (rps and total and "50" in lat and "99" in lat):
        raise ValueError(f"cannot read wrk's output:\n{out}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = (sum(map(int, sock.groups())) if sock else 0) + (int(non2xx.group(1)) if non2xx else 0)
    detail = "; ".join(x.group(0) for x in (sock, non2xx) if x)
    return WrkResult(float(rps.group(1)), int(total.group(1)), _ms(total.group(2) + total.group(3)) / 1e3,
                     _ms(lat["50"]), _ms(lat["99"]), errors, detail)


def wrk_argv(url: str, seconds: float, connections: int, close: bool, threads: int = 2) -> list[str]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "3s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]
