"""`scripts/bench`: every benchmark in one run, then RESULTS.md and the plots.

    python -m bench.run [--smoke] [--out DIR]

Builds its own lab (unique prefix, always removed), measures, and writes DIR/RESULTS.md,
DIR/results.json and DIR/*.png. A missed target is reported, never an error: the exit
code is 0 unless a benchmark could not run at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import attestation, common, control, dataplane, faults, fleet, publication, ratios, report
from bench.benchlab import bench_lab
from bench.common import log


# The ratios step, named by the WireGuard backend it runs on: the host's (wireguard-go here)
# in a normal run, the kernel module's in the VM (--vm).
RATIOS = f"ratios_{common.wireguard_backend()}"
THROUGHPUT = f"throughput_{common.wireguard_backend()}"
LATENCY = f"latency_{common.wireguard_backend()}"
UDP = f"udp_{common.wireguard_backend()}"
FLOWTABLE = f"flowtable_{common.wireguard_backend()}"
FLEET = f"fleet_{common.wireguard_backend()}"
STEPS = ("nft", "domains", "scale", "agent_idle", "dataplane", "ratios", "throughput", "latency", "udp", "flowtable", "status_after_load", "split", "one_backend", "buffers",
         "mtu", "health_scale", "crash", "restarts", "join", "dns", "registration", "crash_leases", "publication", "fleet",
         "fleet_1000", "attestation")
OWN_LABS = {"publication", "fleet", "fleet_1000", "attestation"}  # the steps that build a lab of their own


@dataclass(frozen=True)
class Profile:
    """How much of everything to run."""

    smoke: bool
    wrk_seconds: float
    wrk_repeats: int
    split_connections: int
    buffer_repeats: int
    buffer_seconds: float
    nft_sizes: tuple[int, ...]
    nft_repeats: int
    scale_leases: int
    scale_repeats: int
    scale_idle_seconds: float
    registrations: tuple[int, ...]
    registration_inflight: int
    idle_seconds: float
    crash_seconds: float
    restart_seconds: float
    health_sizes: tuple[int, ...]
    health_seconds: float
    ratio_rounds: int
    ratio_seconds: float
    domains: int
    fleet: int
    fleet_death: int  # clients in the rotation for the death at scale (kernel WireGuard only; 0: skipped)
    attest_per_round: int  # sequential registrations per round and kind (ratio_rounds rounds)
    attest_rate: int  # registrations at once, 16 in flight, for the rate


FULL = Profile(smoke=False, wrk_seconds=3, wrk_repeats=4, split_connections=300, buffer_repeats=2, buffer_seconds=4,
               nft_sizes=(10, 100, 1000, 10000), nft_repeats=7, scale_leases=10000, scale_repeats=5,
               scale_idle_seconds=10, registrations=(1, 100, 1000), registration_inflight=128, idle_seconds=30,
               crash_seconds=12, restart_seconds=9, health_sizes=(100, 1000, 10000), health_seconds=6,
               ratio_rounds=8, ratio_seconds=3, domains=1000, fleet=200, fleet_death=1000, attest_per_round=50,
               attest_rate=400)
SMOKE = Profile(smoke=True, wrk_seconds=1, wrk_repeats=1, split_connections=30, buffer_repeats=1, buffer_seconds=1,
                nft_sizes=(10, 10000), nft_repeats=2, scale_leases=500, scale_repeats=1, scale_idle_seconds=2,
                registrations=(1, 100), registration_inflight=128, idle_seconds=8, crash_seconds=5, restart_seconds=3,
                health_sizes=(100, 1000), health_seconds=1, ratio_rounds=2, ratio_seconds=1, domains=1000, fleet=20,
                fleet_death=0, attest_per_round=10, attest_rate=40)


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    wg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "wireguard-go"], capture_output=True, text=True).stdout
    from sptun import __version__

    return {
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "memory": _first_line(["sh", "-c", "free -h | awk '/Mem:/ {print $2}'"]),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "os": _first_line(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "versions": {
            "sptun": __version__,
            "wireguard-go": f"{wg} (Debian package; the binary has no --version)" if wg else "?",
            "nft": _first_line(["nft", "--version"]),
            "haproxy": re.sub(r" - https://.*", "", _first_line(["haproxy", "-v"])),
            "nginx": _first_line(["nginx", "-v"]),
            "wrk": re.sub(r" \[.*", "", _first_line(["wrk", "--version"])),
            "python": platform.python_version(),
        },
        "wireguard_kernel_module": Path("/sys/module/wireguard").exists(),
    }


def step(results: dict[str, Any], name: str, fn: Any, *args: Any, key: str | None = None) -> Any:
    """Run one benchmark; a failure is recorded (and shown in RESULTS.md), the others still run.
    With --only, a benchmark not named there is skipped."""
    if results.get("only") and name not in results["only"]:
        return None
    started = time.monotonic()
    try:
        value = fn(*args)
        results[key or name] = value
        return value
    except Exception as e:  # one broken benchmark must not hide the others' results
        log(f"{name} FAILED: {type(e).__name__}: {e}")
        results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        return None
    finally:
        results.setdefault("step_seconds", {})[name] = round(time.monotonic() - started, 1)


def run(profile: Profile, out: Path, only: list[str] | None = None) -> dict[str, Any]:
    tag = f"{os.getpid() % 100000}"
    results: dict[str, Any] = {"only": only, "smoke": profile.smoke, "profile": profile.__dict__, "machine": machine(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "lab_prefixes": [f"bnl{tag}", f"bnn{tag}", f"bnd{tag}", f"bns{tag}", f"bnp{tag}", f"bnf{tag}", f"bna{tag}"]}
    started = time.monotonic()
    if not only or set(only) - OWN_LABS:  # bringing up the main lab takes a minute, and under load can fail
        with bench_lab(f"bnl{tag}") as lab:
            s1, s2 = lab.servers[0], lab.servers[1]
            # The agents sit idle while the scratch-namespace benchmarks run.
            idle = control.IdleAgents(lab)
            step(results, "nft", control.nft_bench, f"bnn{tag}", list(profile.nft_sizes), profile.nft_repeats)
            step(results, "domains", control.domains_bench, f"bnd{tag}", profile.domains, profile.nft_repeats)
            step(results, "scale", control.scale_bench, f"bns{tag}", profile.scale_leases, profile.scale_repeats,
                 profile.scale_idle_seconds)
            if not only or "agent_idle" in only:
                time.sleep(max(0.0, profile.idle_seconds - (time.monotonic() - idle.started)))
            step(results, "agent_idle", idle.finish)
            step(results, "dataplane", dataplane.dataplane, lab, s1, profile.wrk_repeats, profile.wrk_seconds, not profile.smoke)
            step(results, "ratios", ratios.ratios, lab, s1, profile.ratio_rounds, profile.ratio_seconds, key=RATIOS)
            step(results, "throughput", ratios.throughput, lab, s1, profile.ratio_rounds, key=THROUGHPUT)
            step(results, "latency", ratios.latency, lab, s1, results.get(RATIOS), 1 if profile.smoke else 3,
                 profile.ratio_seconds, key=LATENCY)
            step(results, "udp", ratios.udp, lab, s1, profile.ratio_rounds, 2.0 if not profile.smoke else 1.0, key=UDP)
            step(results, "flowtable", ratios.flowtable, lab, s1, max(2, profile.ratio_rounds // 2), profile.ratio_seconds,
                 key=FLOWTABLE)
            step(results, "status_after_load", control.status_with_conntrack, s1)
            step(results, "split", dataplane.split_check, lab, s1, profile.split_connections)
            step(results, "one_backend", dataplane.one_backend, lab, s1, min(3, profile.wrk_repeats), profile.wrk_seconds)
            step(results, "buffers", dataplane.buffer_experiment, lab, s1, profile.buffer_repeats, profile.buffer_seconds)
            step(results, "mtu", dataplane.mtu_probe, lab, s1)
            step(results, "health_scale", control.health_scale, profile.health_sizes, profile.health_seconds)
            step(results, "crash", faults.crash, lab, profile.crash_seconds)
            step(results, "restarts", faults.restarts, lab, profile.restart_seconds)
            step(results, "join", faults.join, lab, 1 if profile.smoke else 3)
            step(results, "dns", faults.dns_change, lab)
            step(results, "registration", control.registration_bench, lab, s2, list(profile.registrations),
                 profile.registration_inflight)
            step(results, "crash_leases", faults.crash_with_leases, lab, profile.crash_seconds, profile.scale_leases)
    # A lab of its own, whose servers publish themselves: after the first is gone.
    step(results, "publication", publication.publication, f"bnp{tag}", 30.0)
    step(results, "fleet", fleet.fleet, f"bnf{tag}", profile.fleet, 10, key=FLEET)
    if profile.fleet_death and common.wireguard_backend() == "kernel":  # userspace: at most fleet.USERSPACE_MAX
        step(results, "fleet_1000", fleet.fleet, f"bnf{tag}", profile.fleet_death, 0, fleet.SLOW_MACHINE_HEALTH)
    elif only and "fleet_1000" in only:
        log("fleet_1000 skipped: it needs kernel WireGuard and the full profile (scripts/bench --vm)")
    step(results, "attestation", attestation.attestation_bench, f"bna{tag}", profile.ratio_rounds, profile.attest_per_round,
         profile.attest_rate)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    results["commands"] = common.COMMANDS
    return results


BOOKKEEPING = {"only", "smoke", "profile", "machine", "started", "lab_prefixes", "wall_seconds", "commands",
               "step_seconds", "errors"}


def merge(base: dict[str, Any], new: dict[str, Any], machine_key: str = "machine") -> dict[str, Any]:
    """base, with new's benchmarks (a run with --only, or the VM's) in place of its own."""
    merged = dict(base)
    ran = set(new.get("step_seconds", {}))
    for key, value in new.items():
        if key not in BOOKKEEPING:
            merged[key] = value
    merged[machine_key] = new["machine"]
    if machine_key == "vm_machine":
        merged["vm_smoke"] = new.get("smoke", False)
    merged["step_seconds"] = {**base.get("step_seconds", {}), **new.get("step_seconds", {})}
    errors = {k: v for k, v in base.get("errors", {}).items() if k not in ran} | new.get("errors", {})
    merged.pop("errors", None)
    if errors:
        merged["errors"] = errors
    merged["commands"] = {**base.get("commands", {}), **new.get("commands", {})}
    where = "in the VM" if machine_key == "vm_machine" else "on this machine"
    merged["reruns"] = [*base.get("reruns", []), f"{', '.join(sorted(ran))} ({new.get('started', '?')}, {where})"]
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a reduced run of about a minute or two: every row, small sizes")
    p.add_argument("--out", default=str(common.BENCH_DIR), help="where RESULTS.md, results.json and the plots go")
    p.add_argument("--report-only", metavar="JSON", help="rewrite RESULTS.md and the plots from a results.json")
    p.add_argument("--only", metavar="STEP,...", help=f"run only these benchmarks (of {', '.join(STEPS)}), and put "
                   "their results in place of the old ones in OUT/results.json")
    p.add_argument("--merge-vm", metavar="JSON", help="put the results.json of a run in the VM (scripts/bench --vm) "
                      "into OUT/results.json, and rewrite RESULTS.md")
    p.add_argument("--ratio-seconds", type=float, metavar="S", help="each run of the ratios benchmark (the VM's "
                   "emulated TLS needs longer ones)")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(STEPS):
        print(f"scripts/bench: --only: no such benchmark: {', '.join(sorted(set(only) - set(STEPS)))} "
              f"(there are: {', '.join(STEPS)})", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("scripts/bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    if args.report_only:
        results = json.loads(Path(args.report_only).read_text())
    elif args.merge_vm:
        results = merge(json.loads(saved.read_text()), json.loads(Path(args.merge_vm).read_text()), "vm_machine")
    else:
        profile = SMOKE if args.smoke else FULL
        if args.ratio_seconds:
            profile = dataclasses.replace(profile, ratio_seconds=args.ratio_seconds)
        results = run(profile, out, only)
        if only and saved.exists():
            results = merge(json.loads(saved.read_text()), results)
    if not args.report_only:
        saved.write_text(json.dumps(results, indent=1, default=str) + "\n")
    rows = report.write(results, out)
    log(f"wrote {out / 'RESULTS.md'}: {sum(r.result == 'PASS' for r in rows)} PASS, "
        f"{sum(r.result == 'MISS' for r in rows)} MISS, {sum(r.result == 'n/a' for r in rows)} not measured; "
        f"wall time {results.get('wall_seconds', 0):.0f} s")
    return 1 if results.get("errors") and all(r.result == "n/a" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
