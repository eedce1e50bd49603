"""sptun against HAProxy and against plain routing: paired ratios over interleaved rounds,
each with a 95% bootstrap interval, on whichever WireGuard backend the lab runs.

Every path reaches the same three clients' nginx through the same server s1 and its tunnels:

    sptun    the browser to s1's public address; nft DNAT, round-robin (numgen inc)
    haproxy  the browser to s1's :8443/:8080; HAProxy 2.6 in TCP mode, balance roundrobin
    routed   the browser to the three clients' overlay addresses themselves, by plain routing:
             a bench-only route on the lab's internet router sends them to s1, and a bench-only
             table on s1 marks them as sptun's own (so its forward chain, passive health and
             all, treats them as it treats a DNATed connection). No DNAT, no round-robin:
             sptun ÷ routed is what those two cost.
    sni      (HTTPS only) the browser to s1's SNI address: the HAProxy that sptun runs.

The load is the same for every path: three wrk processes at once, one thread and a third of
the connections each (for routed, one per client address, so the three share it as
round-robin would). A round runs every (mode, path) once, in an order rotated every round;
a ratio is taken within a round (paired), and its median and 95% interval (percentile
bootstrap over rounds) are reported. Machine CPU: every CPU's busy time from /proc/stat
(user, system, irq, softirq, steal) over the run, per request; the load generator's own
CPU (from getrusage of its processes) is also given, so that it can be taken out.
"""

from __future__ import annotations

import json
import random
import re
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.benchlab import client_overlay
from bench.common import BENCH_DIR, PY, log, machine_cpu, median, note_command, parse_wrk, percentile, wireguard_backend, wrk_argv
from bench.dataplane import HAPROXY_PORTS, Target, start_haproxy, targets
from sptun.lab import Arg, Host, Lab
from sptun.errors import CommandError
from sptun.nft import DNAT_MARK

MODES = [("keep-alive", "http"), ("keep-alive", "https"), ("close", "http"), ("close", "https")]
PATHS = ("sptun", "haproxy", "routed", "sni")
LOADERS = 3
PER_LOADER = {"keep-alive": 21, "close": 11}  # connections of each of the three wrk processes
# name: (numerator path, denominator path, what): the ratios reported, per mode
RATIOS = {
    "rps_haproxy": ("sptun", "haproxy", "rps"),
    "rps_routed": ("sptun", "routed", "rps"),
    "rps_sni_haproxy": ("sni", "haproxy", "rps"),
    "cpu_haproxy": ("sptun", "haproxy", "machine CPU per request"),
    "cpu_routed": ("sptun", "routed", "machine CPU per request"),
    "cpu_net_haproxy": ("sptun", "haproxy", "machine CPU per request, load generator taken out"),
}
ROUTE_TABLE = "benchroute"


def bootstrap_interval(values: list[float], level: float = 0.95, resamples: int = 4000,
                       seed: int = 1) -> tuple[float, float]:
    """The percentile-bootstrap interval of the median of values (seeded: a rerun of the same
    figures gives the same interval)."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v
    rng = random.Random(seed)
    stats = sorted(median([rng.choice(values) for _ in values]) for _ in range(resamples))
    tail = (1 - level) / 2
    return stats[int(resamples * tail)], stats[min(resamples - 1, int(resamples * (1 - tail)))]


def summarize_ratio(values: list[float]) -> dict[str, Any]:
    lo, hi = bootstrap_interval(values)
    return {"median": median(values), "lo": lo, "hi": hi, "rounds": values}


class Routed:
    """The routed path, set up for the run and removed after: the internet router's routes to
    the clients' overlay addresses through s1, and s1's table that marks those connections."""

    def __init__(self, lab: Lab, server: Host, overlay: dict[str, str]) -> None:
        self.router, self.server, self.addresses = lab.hosts["inet"], server, sorted(overlay.values())

    def __enter__(self) -> Routed:
        for ip in self.addresses:
            argv: list[Arg] = ["ip", "route", "replace", f"{ip}/32", "via", self.server.address]
            note_command("ratios", [f"[{self.router.name}]", *argv])
            self.router.run(argv)
        table = (f"table inet {ROUTE_TABLE} {{\n\tchain prerouting {{\n"
                 "\t\ttype filter hook prerouting priority mangle; policy accept;\n"
                 f"\t\tiifname \"eth0\" ip daddr {{ {', '.join(self.addresses)} }} ct state new "
                 f"ct mark set ct mark or {DNAT_MARK:#010x}\n\t}}\n}}\n")
        note_command("ratios", [f"[{self.server.name}]", "nft", "-f", "-", "# " + " ".join(table.split())])
        self.server.run(["nft", "-f", "-"], input=table)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.run(["nft", "delete", "table", "inet", ROUTE_TABLE], check=False)
        for ip in self.addresses:
            self.router.run(["ip", "route", "del", f"{ip}/32"], check=False)


def ensure_haproxy(lab: Lab, server: Host, overlay: dict[str, str]) -> None:
    """The HAProxy to compare with, unless an earlier benchmark (dataplane) started it."""
    if f"{server.address}:{HAPROXY_PORTS['https']}" not in server.run(["ss", "-Hltn"]):
        start_haproxy(lab, server, overlay)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load(target: Target, urls: list[str], keep: str, seconds: float) -> dict[str, Any]:
    """LOADERS wrk processes at once, one per URL; their sum (latency: the median of their
    p50s, the worst of their p99s), and the machine's and the load generator's CPU."""
    argvs = [target.argv(wrk_argv(url, seconds, PER_LOADER[keep], close=keep == "close", threads=1)) for url in urls]
    for argv in argvs:
        note_command("ratios", [f"[{target.host.name}]", *argv])
    busy0, children0 = machine_cpu()[0], _children_cpu()
    procs = [subprocess.Popen(target.host.cmd(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv in argvs]
    try:
        outs = [p.communicate(timeout=seconds + 60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    busy, loadgen = machine_cpu()[0] - busy0, _children_cpu() - children0
    results = [parse_wrk(out) for out in outs]
    requests = sum(r.requests for r in results)
    return {"rps": sum(r.rps for r in results), "requests": requests, "errors": sum(r.errors for r in results),
            "p50_ms": median([r.p50_ms for r in results]), "p99_ms": max(r.p99_ms for r in results),
            "machine_busy_s": round(busy, 3), "loadgen_s": round(loadgen, 3)}


def ratios(lab: Lab, server: Host, rounds: int, seconds: float) -> dict[str, Any]:
    backend = wireguard_backend()
    overlay = client_overlay(lab, server)
    ensure_haproxy(lab, server, overlay)
    by_name = {t.name: t for t in targets(lab, server, overlay)}
    paths = {name: by_name[name] for name in ("sptun", "haproxy", "sni")}
    paths["routed"] = Target("routed", lab.browser, {s: f"{s}://{{}}/" for s in ("http", "https")})
    addresses = [overlay[c.name] for c in lab.clients]
    rows: list[dict[str, Any]] = []
    with Routed(lab, server, overlay):
        for rnd in range(rounds):
            for keep, scheme in MODES:
                order = [p for p in PATHS if scheme in paths[p].urls]
                shift = rnd % len(order)
                for name in order[shift:] + order[:shift]:
                    target = paths[name]
                    url = target.urls[scheme]
                    urls = [url.format(ip) for ip in addresses] if name == "routed" else [url] * LOADERS
                    row = load(target, urls, keep, seconds)
                    rows.append({"round": rnd, "path": name, "keep": keep, "scheme": scheme, **row})
                    time.sleep(0.3)
            log(f"ratios ({backend}): round {rnd + 1}/{rounds} done")
    return {"backend": backend, "rounds": rounds, "seconds": seconds, "loaders": LOADERS, "per_loader": PER_LOADER,
            "overlay": overlay, "haproxy_ports": HAPROXY_PORTS, "runs": rows, **summarize(rows, rounds)}


def summarize(rows: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Per mode: each path's medians, and each ratio's per-round values, median and interval."""
    paths: dict[str, dict[str, Any]] = {}
    ratio: dict[str, dict[str, Any]] = {}
    for keep, scheme in MODES:
        mode = f"{keep} {scheme}"
        cell = {(r["round"], r["path"]): r for r in rows if r["keep"] == keep and r["scheme"] == scheme}

        def per_request(r: dict[str, Any], net: bool = False) -> float:
            busy: float = r["machine_busy_s"] - (r["loadgen_s"] if net else 0.0)
            return busy / r["requests"] if r["requests"] else float("nan")  # none served (emulated TLS, say)

        paths[mode] = {}
        for name in PATHS:
            runs = [r for (_, p), r in cell.items() if p == name]
            if runs:
                paths[mode][name] = {
                    "rps": median([r["rps"] for r in runs]), "p50_ms": median([r["p50_ms"] for r in runs]),
                    "p99_ms": median([r["p99_ms"] for r in runs]), "errors": sum(r["errors"] for r in runs),
                    "machine_cpu_per_10k": median([per_request(r) * 1e4 for r in runs if r["requests"]]),
                    "loadgen_cpu_per_10k": median([r["loadgen_s"] / r["requests"] * 1e4 for r in runs if r["requests"]]),
                }
        ratio[mode] = {}
        for key, (num, den, what) in RATIOS.items():
            values = []
            for rnd in range(rounds):
                a, b = cell.get((rnd, num)), cell.get((rnd, den))
                if not (a and b and a["requests"] and b["requests"]):
                    continue
                if what == "rps":
                    values.append(a["rps"] / b["rps"])
                else:
                    net = "taken out" in what
                    values.append(per_request(a, net) / per_request(b, net))
            if values:
                ratio[mode][key] = summarize_ratio(values)
    return {"paths": paths, "ratios": ratio}


# --- throughput: one body at a time, in Gbit/s ---------------------------------------------------------------

BODIES = {"1MiB": 1 << 20, "100MiB": 100 << 20}
BODY_REPEATS = {"1MiB": 5, "100MiB": 1}  # transfers per curl (one connection): a 1 MiB body alone is mostly slow start
THROUGHPUT_PATHS = ("sptun", "haproxy", "routed")


def make_bodies(lab: Lab) -> None:
    """BODIES on every client, where its nginx serves /bytes/ (sparse files: nginx sends them
    with sendfile). Each step that fetches them makes them: `--only` may run it alone."""
    for c in lab.clients:
        (c.dir / "bytes").mkdir(exist_ok=True)
        for name, size in BODIES.items():
            with open(c.dir / "bytes" / name, "wb") as f:
                f.truncate(size)


def throughput(lab: Lab, server: Host, rounds: int) -> dict[str, Any]:
    """Plain HTTP bodies (sparse files: nginx sends them with sendfile) through sptun, HAProxy and
    plain routing, a path at a time, interleaved over rounds; curl's own average speed."""
    overlay = client_overlay(lab, server)
    ensure_haproxy(lab, server, overlay)
    make_bodies(lab)
    bases = {"sptun": f"http://{server.address}", "haproxy": f"http://{server.address}:{HAPROXY_PORTS['http']}",
             "routed": f"http://{overlay[lab.clients[0].name]}"}
    rows: list[dict[str, Any]] = []
    with Routed(lab, server, overlay):
        for rnd in range(rounds):
            for body in BODIES:
                shift = rnd % len(THROUGHPUT_PATHS)
                for name in THROUGHPUT_PATHS[shift:] + THROUGHPUT_PATHS[:shift]:
                    argv: list[Arg] = ["curl", "-sS", "--fail", "--max-time", "300", "-w", r"%{speed_download}\n",
                                       *[x for _ in range(BODY_REPEATS[body])
                                         for x in ("-o", "/dev/null", f"{bases[name]}/bytes/{body}")]]
                    note_command("throughput", [f"[{lab.browser.name}]", *argv])
                    speeds = [float(x) for x in lab.browser.run(argv, timeout=600).split()]
                    rows.append({"round": rnd, "path": name, "body": body, "gbit_s": median(speeds) * 8 / 1e9})
            log(f"throughput ({wireguard_backend()}): round {rnd + 1}/{rounds} done")
    summary: dict[str, Any] = {}
    for body in BODIES:
        cell = {(r["round"], r["path"]): r["gbit_s"] for r in rows if r["body"] == body}
        summary[body] = {
            "gbit_s": {p: median([v for (_, q), v in cell.items() if q == p]) for p in THROUGHPUT_PATHS},
            "ratios": {f"sptun_{other}": summarize_ratio([cell[(rnd, "sptun")] / cell[(rnd, other)] for rnd in range(rounds)
                                                          if cell.get((rnd, other))])
                       for other in ("haproxy", "routed")},
        }
    return {"backend": wireguard_backend(), "rounds": rounds, "runs": rows, "summary": summary}


# --- latency at a fixed rate: half a path's maximum, with a constant-rate load (h2load --rps) ---------------

LATENCY_PATHS = ("sptun", "haproxy", "routed")
LATENCY_CLIENTS = 4  # h2load clients (connections, keep-alive) in each of the three processes


def _h2load(target_host: Host, urls: list[str], rate: float, seconds: float, logs: list[Path]) -> dict[str, Any]:
    """Three h2load processes at once (one per URL), each LATENCY_CLIENTS connections sending
    at a constant rate that sums to `rate`; the latencies of every request, from their logs."""
    per_client = max(1, round(rate / len(urls) / LATENCY_CLIENTS))
    for log_file in logs:  # h2load appends
        log_file.unlink(missing_ok=True)
    argvs: list[list[Arg]] = [["h2load", "--h1", "-c", str(LATENCY_CLIENTS), "-t", "1", "--rps", str(per_client),
                               "-D", f"{seconds:g}", "--log-file", log, url] for url, log in zip(urls, logs, strict=True)]
    for argv in argvs:
        note_command("latency at a fixed rate", [f"[{target_host.name}]", *argv])
    procs = [subprocess.Popen(target_host.cmd(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv in argvs]
    outs = [p.communicate(timeout=seconds + 60)[0] for p in procs]
    failed = 0
    for out in outs:
        m = re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, (\d+) errored, "
                      r"(\d+) timeout", out)
        if not m:
            raise RuntimeError(f"cannot read h2load's output:\n{out[-2000:]}")
        failed += sum(map(int, m.groups()))
    ms = [int(line.split("\t")[2]) / 1e3 for log in logs for line in log.read_text().splitlines() if line.strip()]
    return {"rate": per_client * len(urls) * LATENCY_CLIENTS, "requests": len(ms), "achieved": len(ms) / seconds,
            "failed": failed,
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}


def latency(lab: Lab, server: Host, measured: dict[str, Any] | None, rounds: int, seconds: float) -> dict[str, Any]:
    """p50/p99 over plain HTTP keep-alive at half of each path's maximum (the ratios step's
    median rps), and all paths at one common rate (half the slowest path's maximum)."""
    if not measured:
        raise RuntimeError("needs the ratios step's maxima (run it first)")
    maxima = {p: measured["paths"]["keep-alive http"][p]["rps"] for p in LATENCY_PATHS}
    overlay = client_overlay(lab, server)
    ensure_haproxy(lab, server, overlay)
    addresses = [overlay[c.name] for c in lab.clients]
    urls = {"sptun": [f"http://{server.address}/"] * LOADERS,
            "haproxy": [f"http://{server.address}:{HAPROXY_PORTS['http']}/"] * LOADERS,
            "routed": [f"http://{ip}/" for ip in addresses]}
    logs = [lab.browser.dir / f"h2load-{i}.log" for i in range(LOADERS)]
    common = min(maxima.values()) / 2
    rows = []
    with Routed(lab, server, overlay):
        for rnd in range(rounds):
            shift = rnd % len(LATENCY_PATHS)
            for name in LATENCY_PATHS[shift:] + LATENCY_PATHS[:shift]:
                for load_kind, rate in (("half its maximum", maxima[name] / 2), ("common rate", common)):
                    row = _h2load(lab.browser, urls[name], rate, seconds, logs)
                    rows.append({"round": rnd, "path": name, "load": load_kind, **row})
                    time.sleep(0.3)
            log(f"latency ({wireguard_backend()}): round {rnd + 1}/{rounds} done")
    summary: dict[str, dict[str, Any]] = {}
    for load_kind in ("half its maximum", "common rate"):
        summary[load_kind] = {}
        for p in LATENCY_PATHS:
            runs = [r for r in rows if r["path"] == p and r["load"] == load_kind]
            summary[load_kind][p] = {key: median([r[key] for r in runs]) for key in ("rate", "achieved", "p50_ms", "p99_ms")}
            summary[load_kind][p]["failed"] = sum(r["failed"] for r in runs)
    return {"backend": wireguard_backend(), "maxima": maxima, "rounds": rounds, "seconds": seconds, "runs": rows,
            "summary": summary}


# --- UDP forwarding rate --------------------------------------------------------------------------------------

UDP_PORT = 9000
UDP_SIZE = 512  # bytes of payload
UDP_FLOWS = 24
UDP_COUNTER = """table inet benchudp {
\tchain input {
\t\ttype filter hook input priority -5; policy accept;
\t\tudp dport %d counter drop
\t}
}
""" % UDP_PORT


def _udp_counted(host: Host) -> int:
    out = host.run(["nft", "list", "chain", "inet", "benchudp", "input"])
    m = re.search(r"counter packets (\d+)", out)
    return int(m.group(1)) if m else 0


def udp(lab: Lab, server: Host, rounds: int, seconds: float) -> dict[str, Any]:
    """UDP datagrams from the browser through sptun's DNAT (udp/UDP_PORT, round-robin per flow)
    and by plain routing to the same three clients, in turn: how many the clients received
    per second (an nft counter in each, which drops them: no application's speed in it)."""
    overlay = client_overlay(lab, server)
    for c in lab.clients:
        c.run(["nft", "-f", "-"], input=UDP_COUNTER)
    dests = {"sptun": server.address, "routed": ",".join(overlay[c.name] for c in lab.clients)}
    rows: list[dict[str, Any]] = []
    try:
        with Routed(lab, server, overlay):
            for rnd in range(rounds):
                for name in (("sptun", "routed") if rnd % 2 == 0 else ("routed", "sptun")):
                    argv: list[Arg] = [PY, BENCH_DIR / "udpblast.py", dests[name], str(UDP_PORT), f"{seconds:g}",
                                       str(UDP_FLOWS), str(UDP_SIZE)]
                    note_command("udp", [f"[{lab.browser.name}]", *argv])
                    before = {c.name: _udp_counted(c) for c in lab.clients}
                    sent = json.loads(lab.browser.run(argv, timeout=seconds + 60))
                    time.sleep(0.5)  # the last datagrams arrive
                    got = {c.name: _udp_counted(c) - before[c.name] for c in lab.clients}
                    rows.append({"round": rnd, "path": name, "sent": sent["sent"], "received": got,
                                 "pps": sum(got.values()) / seconds})
            log(f"udp ({wireguard_backend()}): round {rnd + 1}/{rounds} done")
    finally:
        for c in lab.clients:
            c.run(["nft", "delete", "table", "inet", "benchudp"], check=False)
    cell = {(r["round"], r["path"]): r for r in rows}
    paths = {p: {"pps": median([r["pps"] for r in rows if r["path"] == p]),
                 "delivered": median([sum(r["received"].values()) / max(1, r["sent"]) for r in rows if r["path"] == p])}
             for p in ("sptun", "routed")}
    ratio = summarize_ratio([cell[(rnd, "sptun")]["pps"] / cell[(rnd, "routed")]["pps"] for rnd in range(rounds)
                             if cell[(rnd, "routed")]["pps"]])
    return {"backend": wireguard_backend(), "rounds": rounds, "seconds": seconds, "flows": UDP_FLOWS, "size": UDP_SIZE,
            "runs": rows, "paths": paths, "sptun_routed": ratio}


# --- the flowtable fast path: established forwarded flows past the forward hook ------------------------------

FLOWTABLE = """table inet benchflow {
\tflowtable ft { hook ingress priority 0; devices = { eth0, %s }; }
\tchain forward {
\t\ttype filter hook forward priority 10; policy accept;
\t\tmeta l4proto tcp flow add @ft;
\t}
}
"""


def flowtable(lab: Lab, server: Host, rounds: int, seconds: float, interface: str = "sptun0") -> dict[str, Any]:
    """sptun's path with and without an nft flowtable on s1 (a table of the bench's own, after
    sptun's forward chain: only flows it accepted are offloaded), in turn: rps keep-alive and
    per request, and a 100 MiB body. Where the kernel has no flowtables (CONFIG_NF_FLOW_TABLE),
    says so."""
    table = FLOWTABLE % interface
    try:
        server.run(["nft", "-f", "-"], input=table)
    except CommandError as e:  # this kernel cannot: a result, not a failure
        why = next((line.split(": ", 1)[1] for line in e.stderr.splitlines() if "Error:" in line), str(e))
        return {"backend": wireguard_backend(), "available": False, "error": why.strip()[:200]}
    server.run(["nft", "delete", "table", "inet", "benchflow"])
    note_command("flowtable", [f"[{server.name}]", "nft", "-f", "-", "# " + " ".join(table.split())])
    overlay = client_overlay(lab, server)
    make_bodies(lab)
    target = Target("sptun", lab.browser, {"http": f"http://{server.address}/"})
    rows: list[dict[str, Any]] = []
    for rnd in range(rounds):
        for on in ((False, True) if rnd % 2 == 0 else (True, False)):
            if on:
                server.run(["nft", "-f", "-"], input=table)
            try:
                row: dict[str, Any] = {"round": rnd, "flowtable": on}
                for keep in ("keep-alive", "close"):
                    row[keep] = load(target, [target.urls["http"]] * LOADERS, keep, seconds)["rps"]
                curl = subprocess.Popen(lab.browser.cmd(["curl", "-sS", "--fail", "-o", "/dev/null", "-w",
                                                         "%{speed_download}", f"http://{server.address}/bytes/100MiB"]),
                                        stdout=subprocess.PIPE, text=True)
                try:
                    time.sleep(0.5)  # mid-transfer: is its flow offloaded?
                    conntrack = server.run(["cat", "/proc/net/nf_conntrack"], check=False)
                    row["offloaded"] = conntrack.count("[OFFLOAD]") + conntrack.count("[HW_OFFLOAD]")
                    speed = curl.communicate(timeout=600)[0]
                finally:
                    if curl.poll() is None:
                        curl.kill()
                        curl.wait()
                row["gbit_s"] = float(speed) * 8 / 1e9
            finally:
                if on:
                    server.run(["nft", "delete", "table", "inet", "benchflow"], check=False)
            rows.append(row)
        log(f"flowtable ({wireguard_backend()}): round {rnd + 1}/{rounds} done")
    cell = {(r["round"], r["flowtable"]): r for r in rows}
    ratios_of = {what: summarize_ratio([cell[(rnd, True)][what] / cell[(rnd, False)][what] for rnd in range(rounds)
                                        if cell[(rnd, False)][what]])
                 for what in ("keep-alive", "close", "gbit_s")}
    return {"backend": wireguard_backend(), "available": True, "rounds": rounds, "overlay": overlay, "runs": rows,
            "on_off": ratios_of}
