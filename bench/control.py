"""Control-plane benchmarks: nft changes and reloads by size, a server with 10k leases
(bring-up, RSS, `status --json`), registrations at once, and an idle agent's footprint."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from bench.common import (
    BENCH_DIR,
    PY,
    daemon_pid,
    log,
    median,
    note_command,
    ns_pids,
    percentile,
    proc_cpu_with_children,
    proc_stat,
    rss_bytes,
    scratch,
    wait_for,
)
from sptun.errors import SptunError
from sptun.keys import ensure_private_dir, write_file_atomic
from sptun.lab import DOMAIN, Arg, Host, Lab, config_path, sptun
from sptun.leases import Lease, Leases, dumps

# --- nft: one change against a full reload, by number of backends ---------------------------------


def nft_bench(prefix: str, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    with scratch(prefix) as host:
        argv: list[Arg] = [PY, BENCH_DIR / "nftbench.py", ",".join(map(str, sizes)), str(repeats)]
        note_command("nft changes (in a scratch namespace)", argv)
        result: list[dict[str, Any]] = json.loads(host.run(argv, timeout=600))
    return result


def domains_bench(prefix: str, domains: int, repeats: int) -> dict[str, Any]:
    with scratch(prefix) as host:
        argv: list[Arg] = [PY, BENCH_DIR / "nftbench.py", "domains", str(domains), str(repeats)]
        note_command("nft changes (in a scratch namespace)", argv)
        result: dict[str, Any] = json.loads(host.run(argv, timeout=600))
    return result


# --- a server with many leases --------------------------------------------------------------------

SCALE_TOML = """\
interface = "sptun0"
listen_port = 51820
api_port = 51821
overlay = "10.99.0.0/16"
state_dir = "{home}/state"
wireguard = "auto"

[[domains]]
name = "{domain}"
listen = ["198.51.100.10"]
ports = ["tcp/443"]
token_file = "{home}/tokens/{domain}"
"""


def fake_leases(n: int) -> Leases:
    """n leases of real (throw-away) WireGuard keys, as n registrations would leave them."""
    overlay = ipaddress.IPv4Network("10.99.0.0/16")
    first = int(overlay.network_address) + 2
    now = time.time()
    leases = []
    for i in range(n):
        key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
        leases.append(Lease(key, DOMAIN, str(ipaddress.IPv4Address(first + i)), now))
    return Leases(overlay, leases)


def _timed_run(host: Host, argv: list[str], timeout: float = 300) -> tuple[float, str]:
    started = time.monotonic()
    out = host.run(argv, timeout=timeout)
    return time.monotonic() - started, out


def scale_bench(prefix: str, n: int, repeats: int, idle_seconds: float) -> dict[str, Any]:
    """A server brought up from a state dir with n leases: `sptun up` time, then a daemon on
    that state: `status --json` time, RSS, and its CPU while idle (health checks and passes)."""
    result: dict[str, Any] = {"leases": n}
    with scratch(prefix) as host:
        home = host.dir
        conf = home / "server.toml"
        conf.write_text(SCALE_TOML.format(home=home, domain=DOMAIN))
        host.run(["ip", "addr", "add", "198.51.100.10/32", "dev", "lo"])  # listen must be one of the host's addresses
        ensure_private_dir(home / "state")
        ensure_private_dir(home / "tokens")
        write_file_atomic(home / "tokens" / DOMAIN, "bench-token-" + "x" * 32 + "\n")
        write_file_atomic(home / "state" / "leases.json", dumps(fake_leases(n)))
        up = sptun("up", "-c", str(conf))
        note_command("server with many leases (in a scratch namespace)", up)
        result["up_s"], _ = _timed_run(host, up, timeout=600)
        log(f"sptun up with {n} leases: {result['up_s']:.2f} s")
        rotation = host.run(["nft", "-j", "list", "map", "inet", "sptun", "rr0"])
        result["up_in_rotation"] = sum(len(m["map"].get("elem", [])) for m in json.loads(rotation)["nftables"] if "map" in m)
        st_argv = sptun("status", "--json", "-c", str(conf))
        note_command("server with many leases (in a scratch namespace)", st_argv)
        took, out = _timed_run(host, st_argv)
        result["status_no_daemon_s"] = took
        result["peers"] = sum(len(d["backends"]) for d in json.loads(out)["domains"])
        run_argv = sptun("server", "run", "-c", str(conf))
        note_command("server with many leases (in a scratch namespace)", run_argv)
        started = time.monotonic()
        host.spawn(run_argv, log=home / "sptun.log")

        def answers() -> bool:
            try:
                return bool(json.loads(host.run(st_argv, timeout=60)).get("daemon"))
            except Exception:
                return False

        wait_for("the daemon answering status", answers, 120, interval=0.5)
        result["daemon_ready_s"] = time.monotonic() - started
        time.sleep(3)  # its first health checks have run: the fake clients never handshake
        pid = daemon_pid(host)
        times, statuses = [], []
        for _ in range(repeats):
            took, out = _timed_run(host, st_argv)
            times.append(took)
            statuses.append(json.loads(out))
        result["status_s"] = times
        last = statuses[-1]
        result["status_peers"] = sum(len(d["backends"]) for d in last["domains"])
        result["rss_status_bytes"] = last["process"]["rss_bytes"]
        result["rss_bytes"] = rss_bytes(pid)
        wg = [p for p in _pids(host) if (proc_stat(p) or ("", 0))[0].startswith("wireguard")]
        result["wireguard_go_rss_bytes"] = sum(rss_bytes(p) for p in wg)
        before, t0 = proc_stat(pid), time.monotonic()
        time.sleep(idle_seconds)
        after, t1 = proc_stat(pid), time.monotonic()
        assert before and after
        result["daemon_idle_cpu_fraction"] = (after[1] - before[1]) / (t1 - t0)
        result["rss_after_idle_bytes"] = rss_bytes(pid)
    log(f"{n} leases: status {median(result['status_s']):.2f} s, daemon RSS {result['rss_bytes'] / 2**20:.0f} MiB, "
        f"idle CPU {100 * result['daemon_idle_cpu_fraction']:.0f}% of a core")
    return result


def _pids(host: Host) -> list[int]:
    return ns_pids(host.netns)


def status_with_conntrack(server: Host, repeats: int = 1) -> dict[str, Any]:
    """`sptun status --json` on the data-plane server right after the load, while its conntrack
    table still holds the load's connections (status counts open connections per backend)."""
    count = int(server.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).strip())
    argv = sptun("status", "--json", "-c", config_path(server))
    note_command("status after the load", [f"[{server.name}]", *argv])
    times: list[float | str] = []
    for _ in range(repeats):
        started = time.monotonic()
        try:
            server.run(argv, timeout=120)
            times.append(time.monotonic() - started)
        except SptunError as e:  # a result: the daemon did not answer in time
            times.append(f"failed after {time.monotonic() - started:.0f} s: {str(e).split(': ', 1)[-1][:120]}")
    # What the status does per call: a conntrack dump through pyroute2, timed alone (for at most 10 s).
    dump = server.run([PY, "-c", CONNTRACK_DUMP], timeout=120)
    return {"conntrack_entries": count, "status_s": times, "pyroute2_dump": json.loads(dump)}


CONNTRACK_DUMP = """
import json, time
from pyroute2 import Conntrack
started = time.monotonic()
n = 0
with Conntrack() as ct:
    for _ in ct.dump_entries():
        n += 1
        if time.monotonic() - started > 10:
            break
took = time.monotonic() - started
print(json.dumps({"entries": n, "seconds": round(took, 2), "per_second": round(n / took, 1) if took else None}))
"""


# --- registrations at once ---------------------------------------------------------------------------

EXTRA_SOURCES = [f"203.0.113.{20 + i}" for i in range(8)]  # the browser's extra addresses


def add_sources(lab: Lab) -> list[str]:
    for address in EXTRA_SOURCES:
        lab.browser.run(["ip", "addr", "replace", f"{address}/24", "dev", "eth0"])
    return EXTRA_SOURCES


def registration_bench(lab: Lab, server: Host, sizes: list[int], inflight_max: int) -> list[dict[str, Any]]:
    """Fresh keys registering with server from the browser, all started at once (at most
    inflight_max in flight: 16 per source address, under the server's per-source cap)."""
    sources = add_sources(lab)
    token_file = server.dir / "tokens" / DOMAIN
    rows: list[dict[str, Any]] = []
    for n in sizes:
        inflight = min(n, inflight_max)
        argv: list[Arg] = [PY, BENCH_DIR / "regclient.py", server.address, "51821", DOMAIN, token_file, str(n), str(inflight),
                ",".join(sources)]
        note_command("registrations (in the browser namespace)", argv)
        before = proc_stat(daemon_pid(server))
        out = json.loads(lab.browser.run(argv, timeout=900))
        after = proc_stat(daemon_pid(server))
        lat = out.pop("latencies_ms")
        out.update(p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99), max_ms=max(lat) if lat else float("nan"),
                   server_cpu_s=round(after[1] - before[1], 2) if before and after else None)
        out["leases_before"] = sum(r["n"] for r in rows)
        rows.append(out)
        log(f"{n} registrations at once ({inflight} in flight): p50 {out['p50_ms']:.0f} ms, p99 {out['p99_ms']:.0f} ms, "
            f"{out['per_second']:.0f}/s, failures {out['failures']}")
    return rows


# --- an idle agent -------------------------------------------------------------------------------------


class IdleAgents:
    """CPU and RSS of every agent daemon over a window in which nothing happens to them. CPU
    includes the commands the agent runs and waits for (its `nft` calls)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.pids = {c.name: daemon_pid(c) for c in lab.clients}
        self.before = {name: (proc_stat(pid), proc_cpu_with_children(pid)) for name, pid in self.pids.items()}
        self.started = time.monotonic()

    def finish(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        rows = {}
        for name, pid in self.pids.items():
            after, after_all = proc_stat(pid), proc_cpu_with_children(pid)
            before, before_all = self.before[name]
            if after is None or before is None or after_all is None or before_all is None:
                continue
            rows[name] = {"cpu_fraction": (after_all - before_all) / seconds,
                          "own_cpu_fraction": (after[1] - before[1]) / seconds, "rss_bytes": rss_bytes(pid)}
        return {"seconds": round(seconds, 1), "agents": rows,
                "cpu_fraction_max": max(r["cpu_fraction"] for r in rows.values()),
                "rss_bytes_max": max(r["rss_bytes"] for r in rows.values())}


def agent_config(lab: Lab) -> Path:
    return Path(config_path(lab.clients[0]))


def health_scale(sizes: list[int], seconds: float) -> list[dict[str, Any]]:
    """bench/healthscale.py (its own scratch namespace): the health rounds' CPU at each size,
    idle and answering; then a suspect's way out of the map at 3 backends and the larger sizes."""
    results: list[dict[str, Any]] = []
    crash_sizes = sorted({3, *(n for n in sizes if n >= 1000)})
    for modes, at in (("idle,answering", sizes), ("crash", crash_sizes)):
        argv = [PY, BENCH_DIR / "healthscale.py", "--modes", modes, "--sizes", ",".join(map(str, at)),
                "--seconds", str(seconds), "--json"]
        note_command("health", argv)
        out = subprocess.run(list(map(str, argv)), check=True, capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "PYTHONPATH": str(BENCH_DIR.parent)})
        results += json.loads(out.stdout.strip().splitlines()[-1])
    log("health at scale: " + ", ".join(f"{r['mode']} {r['backends']}" for r in results))
    return results
