"""The CPU cost of the server's health rounds for 100, 1,000 and 10,000 backends.

    python bench/healthscale.py [--sizes 100,1000,10000] [--seconds 6] [--modes idle,answering]

As root. It makes one scratch network namespace (removed at the end, even on failure) in
which every address of 10.99.0.0/16 is local (one `local` route on lo), and one listener
process on 0.0.0.0:PORT there accepts for all of them: N distinct overlay addresses that
answer a TCP connect, with no WireGuard and no per-address setup. The server's `inet sptun`
table is loaded there too (render_server, the N backends in its rotation), then the bench runs
itself inside the namespace (`ip netns exec`) and times health rounds as Server.check_health
makes them, at the configured interval: one read of the table's passive-health sets, then
HealthChecks.check over N leases whose peers all have a fresh handshake.

Modes: `idle` (the `answered` set is empty: every backend gets a TCP connect, as before
passive health), `answering` (every backend is in `answered`, as the kernel would put it
when the backend answers forwarded connections: no connect at all), and `crash`: as
`answering`, but TRIALS times one backend becomes a suspect (the element the kernel adds
when a SYN to it is retransmitted), at a random moment of the rounds' pacing; timed from
then until the rotation's map no longer holds it, through what the server does for it: the
round's passive read, the flip, a read of the table (the pass's observation), the pure
next rotation, and the map update. Not included: the kernel's own second before the
retransmission, and the pass's read of the WireGuard device (no real peers here).

CPU is this process's (all threads) plus its reaped children's (the `nft` reads), from
getrusage, over the whole run of rounds, sleeps included: CPU seconds per wall second is
the load the checks put on a server. The listener's CPU is not counted (it stands for the
clients). The connects here go over loopback, not a tunnel: what is measured is the
checker's own cost, not WireGuard's.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

PORT = 4443
OVERLAY = "10.99.0.0/16"
DOMAIN = "app.example.test"
MIN_ROUNDS = 3
TRIALS = 5  # crash mode: suspects, one at a time
HARD_CAP = 60.0  # s of rounds per size and mode, whatever --seconds says
LISTENER_LIFETIME = 900  # s: the listener exits by itself after this, whatever happens to the bench

LISTENER = f"""
import select, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen(65535)
s.setblocking(False)
print("ready", flush=True)
deadline = time.monotonic() + {LISTENER_LIFETIME}
while time.monotonic() < deadline:
    if select.select([s], [], [], 0.5)[0]:
        for _ in range(8192):
            try:
                c, _ = s.accept()
            except BlockingIOError:
                break
            c.close()
"""


def addresses(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("10.99.0.0"))
    return [str(ipaddress.IPv4Address(base + 2 + i)) for i in range(n)]


def retransmits() -> int:
    """TCP segments retransmitted in this namespace so far (a dropped SYN costs its connect 1 s)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
    return int(dict(zip(lines[0][1:], lines[1][1:], strict=True))["RetransSegs"])


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# --- inside the namespace ------------------------------------------------------------------


def read_passive(firewall: object) -> tuple[set[str], set[str]]:
    """(suspects, answered) in one read; before passive answers existed (a tree without
    Firewall.passive, to measure the code as it was) the suspects alone."""
    passive = getattr(firewall, "passive", None)
    if passive is not None:
        return passive()  # type: ignore[no-any-return]
    return firewall.suspects(), set()  # type: ignore[attr-defined]


async def rounds(size: int, mode: str, seconds: float, max_rounds: int) -> dict[str, object]:
    from sptun import nft
    from sptun.config import Domain, Port, ServerConfig
    from sptun.leases import Lease
    from sptun.server import health as health_module
    from sptun.server.health import HealthChecks
    from sptun.wg import Device, Peer, PeerState

    backends = addresses(size)
    firewall = nft.Nft()
    forward = nft.Forward(DOMAIN, None, Port("tcp", PORT))
    firewall.write(nft.render_server("sptun0", [forward], [backends]))
    if mode == "answering":  # as the forward chain's rule would, with a timeout that outlives the run
        for i in range(0, size, 5000):
            chunk = ", ".join(f"{ip} timeout 1h" for ip in backends[i:i + 5000])
            firewall.write(f"add element inet sptun answered {{ {chunk} }}")
    cfg = ServerConfig(path=Path("/dev/null"), overlay=ipaddress.IPv4Network(OVERLAY),
                       domains=(Domain(DOMAIN, (), (Port("tcp", PORT),), Path("/nonexistent")),))
    now = time.time()
    keys = [f"key{i:05d}" for i in range(size)]
    leases = [Lease(key, DOMAIN, ip, now, seen=now) for key, ip in zip(keys, backends, strict=True)]
    device = Device("server-key", 51820, {key: PeerState(Peer(key, (f"{ip}/32",)), now)
                                          for key, ip in zip(keys, backends, strict=True)})
    checks = HealthChecks()
    probes = 0
    real_probe = health_module.probe

    async def counted_probe(*args: object) -> tuple[bool, str]:
        nonlocal probes
        probes += 1
        return await real_probe(*args)  # type: ignore[arg-type]

    health_module.probe = counted_probe  # type: ignore[assignment]

    async def one_round() -> None:  # Server.check_health, without the daemon around it
        suspects, answered = await asyncio.to_thread(read_passive, firewall)
        checks.suspect(leases, suspects)
        if hasattr(firewall, "passive"):
            await checks.check(cfg, leases, device, suspects=suspects, answered=answered)
        else:
            await checks.check(cfg, leases, device)

    await one_round()  # warm-up: the Health objects, the first listing
    probes = 0
    durations: list[float] = []
    retrans0, cpu0, wall0 = retransmits(), cpu_seconds(), time.monotonic()
    # At least MIN_ROUNDS (a 10k-backend round of connects can take seconds), at most HARD_CAP s.
    while ((time.monotonic() - wall0 < seconds or len(durations) < MIN_ROUNDS) and len(durations) < max_rounds
           and time.monotonic() - wall0 < HARD_CAP):
        started = time.monotonic()  # the pacing of Server.health_loop
        await one_round()
        durations.append(time.monotonic() - started)
        await asyncio.sleep(max(0.0, cfg.health.interval - (time.monotonic() - started)))
    cpu, wall = cpu_seconds() - cpu0, time.monotonic() - wall0
    retrans = retransmits() - retrans0
    health_module.probe = real_probe
    passing = sum(1 for key in keys if checks.by_key[key].reason.startswith(("tcp/", "answering")))
    firewall.write(nft.delete_table())
    n = len(durations)
    return {"mode": mode, "backends": size, "rounds": n, "wall_s": round(wall, 2),
            "cpu_per_wall_s": round(cpu / wall, 3), "cpu_ms_per_round": round(cpu / n * 1e3, 1),
            "round_ms_median": round(statistics.median(durations) * 1e3, 1),
            "round_ms_max": round(max(durations) * 1e3, 1),
            "probes_per_round": round(probes / n), "passing_last_round": passing,
            "retransmits": retrans}


async def crash(size: int) -> dict[str, object]:
    """Mode crash: TRIALS backends become suspects one at a time; how long until each leaves the map."""
    import random

    from sptun import nft
    from sptun.config import Port
    from sptun.leases import Lease
    from sptun.server.health import HealthChecks

    backends = addresses(size)
    firewall = nft.Nft()
    forward = nft.Forward(DOMAIN, None, Port("tcp", PORT))
    firewall.write(nft.render_server("sptun0", [forward], [backends]))
    now = time.time()
    leases = [Lease(f"key{i:05d}", DOMAIN, ip, now, seen=now) for i, ip in enumerate(backends)]
    checks = HealthChecks()
    checks.adopt(leases, set(backends))  # all up, as a running rotation is
    interval = 0.5  # the default [health] interval
    totals: list[float] = []
    work: list[float] = []
    for victim in random.sample(backends, min(TRIALS, size - 1)):
        await asyncio.sleep(0.2)
        became = time.monotonic()
        firewall.write(f"add element inet sptun {nft.SUSPECTS} {{ {victim} timeout {nft.SUSPECT_FOR}s }}")
        await asyncio.sleep(random.uniform(0, interval))  # it came at a random moment of the rounds' pacing
        while True:
            started = time.monotonic()  # one round, as Server.check_health makes it
            suspects, _answered = await asyncio.to_thread(firewall.passive)
            if checks.suspect(leases, suspects):  # the flip wakes a pass: observe, plan, apply
                current = firewall.read().rotations([forward])[0]
                healthy = {lease.overlay_ip for lease in leases if checks.is_up(lease.public_key)}
                firewall.write("\n".join(nft.rotation_update(0, current, nft.next_rotation(current, healthy))))
                break
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        done = time.monotonic()
        assert victim not in firewall.read().rotations([forward])[0]
        totals.append(done - became)
        work.append(done - started)
    firewall.write(nft.delete_table())
    return {"mode": "crash", "backends": size, "trials": len(totals),
            "out_ms_median": round(statistics.median(totals) * 1e3, 1), "out_ms_max": round(max(totals) * 1e3, 1),
            "work_ms_median": round(statistics.median(work) * 1e3, 1), "work_ms_max": round(max(work) * 1e3, 1)}


def inner(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10k connects at once
    results = [asyncio.run(crash(size) if mode == "crash" else rounds(size, mode, args.seconds, args.max_rounds))
               for mode in args.modes.split(",") for size in map(int, args.sizes.split(","))]
    print(json.dumps(results))


# --- outside: the namespace and the listener ---------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def outer(args: argparse.Namespace) -> None:
    netns = f"sptun-hs-{os.getpid()}-{secrets.token_hex(3)}"
    listener: subprocess.Popen[str] | None = None
    sh("ip", "netns", "add", netns)
    try:
        sh("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", netns, "ip", "route", "add", "local", OVERLAY, "dev", "lo")
        for key, value in (("net.core.somaxconn", "65535"), ("net.ipv4.tcp_max_syn_backlog", "65535"),
                           ("net.ipv4.tcp_tw_reuse", "1")):
            sh("ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}")
        listener = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", LISTENER],
                                    stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        argv = ["ip", "netns", "exec", netns, sys.executable, __file__, "--inner", "--sizes", args.sizes,
                "--seconds", str(args.seconds), "--modes", args.modes, "--max-rounds", str(args.max_rounds)]
        budget = (max(args.seconds, HARD_CAP) + 60) * len(args.sizes.split(",")) * len(args.modes.split(","))
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=budget,
                             env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).parents[1]))})
        results = json.loads(out.stdout)
    finally:
        if listener is not None:
            listener.terminate()  # the `ip netns exec` process we started, by its PID
            try:
                listener.wait(5)
            except subprocess.TimeoutExpired:
                listener.kill()
                listener.wait(5)
        sh("ip", "netns", "del", netns)
    crashes = [r for r in results if r["mode"] == "crash"]
    results = [r for r in results if r["mode"] != "crash"]
    if crashes:
        print(f"{'crash':<10} {'backends':>8} {'trials':>6} {'out ms (median)':>15} {'out ms (max)':>12} "
              f"{'work ms (median)':>16} {'work ms (max)':>13}")
        for r in crashes:
            print(f"{'':<10} {r['backends']:>8} {r['trials']:>6} {r['out_ms_median']:>15.1f} {r['out_ms_max']:>12.1f} "
                  f"{r['work_ms_median']:>16.1f} {r['work_ms_max']:>13.1f}")
    if results:
        print(f"{'mode':<10} {'backends':>8} {'rounds':>6} {'CPU s/wall s':>12} {'CPU ms/round':>12} "
              f"{'ms/round (median)':>17} {'ms/round (max)':>14} {'probes/round':>12} {'passing':>8} {'retrans':>7}")
        for r in results:
            print(f"{r['mode']:<10} {r['backends']:>8} {r['rounds']:>6} {r['cpu_per_wall_s']:>12.3f} "
                  f"{r['cpu_ms_per_round']:>12.1f} {r['round_ms_median']:>17.1f} {r['round_ms_max']:>14.1f} "
                  f"{r['probes_per_round']:>12} {r['passing_last_round']:>8} {r['retransmits']:>7}")
    if args.json:
        print(json.dumps(results + crashes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--modes", default="idle,answering,crash")
    parser.add_argument("--seconds", type=float, default=6.0, help="of rounds per size and mode")
    parser.add_argument("--max-rounds", type=int, default=40)
    parser.add_argument("--json", action="store_true", help="the results as JSON too")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    main()
