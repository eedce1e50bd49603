"""Data-plane benchmarks: wrk through four paths to the same three nginx clients, side by side.

(a) sptun: the browser to tunnel server s1 :443/:80, nft DNAT round-robin over WireGuard;
(b) HAProxy 2.6 in TCP mode, balance roundrobin, in s1's namespace on :8443/:8080, to the
    clients' overlay addresses over the same tunnels;
(c) wrk inside s1's namespace straight to one client's overlay address (the tunnel's ceiling);
(d) wrk from the NAT router's namespace to one client's LAN address over a plain veth;
(e) sptun's SNI path (HTTPS only): s1's second address, where DOMAIN shares :443 with two other
    domains, so the connection goes through the HAProxy that sptun runs, routed by the
    ClientHello's server name, to the same three clients, from the browser's own address.

Runs interleave (every path once per mode, then again), so that the machine's noise hits
all paths alike; figures are medians of the runs, and ratios of those medians.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import rcvbuf
from bench.benchlab import client_overlay, rotation
from bench.common import (
    BENCH_DIR,
    PY,
    WrkResult,
    cpu_delta,
    log,
    machine_cpu,
    median,
    note_command,
    ns_cpu,
    parse_wrk,
    snmp,
    wait_for,
    wrk_argv,
)
from sptun.lab import DOMAIN, Arg, Host, Lab, sni_address

MODES = [("keep-alive", "http"), ("keep-alive", "https"), ("close", "http"), ("close", "https")]
PATHS = {
    "sptun": "(a) sptun: nft DNAT over WireGuard",
    "haproxy": "(b) HAProxy 2.6, TCP mode, same tunnels",
    "overlay": "(c) direct to a client's overlay address over WireGuard",
    "veth": "(d) direct to a client over a plain veth",
    "sni": "(e) sptun's SNI path: HAProxy run by sptun, routed by server name, browser address kept (HTTPS only)",
}
CONNECTIONS = {"keep-alive": 64, "close": 32}
HAPROXY_PORTS = {"https": 8443, "http": 8080}
SERVER_KINDS = ("wireguard-go", "haproxy", "sptun")

HAPROXY_CFG = """\
# HAProxy as a user would put it in sptun's place: TCP mode (no TLS termination),
# round-robin over the clients' overlay addresses, through the same WireGuard tunnels.
global
    maxconn 4096

defaults
    mode tcp
    balance roundrobin
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{sections}"""

HAPROXY_SECTION = """
frontend {scheme}_in
    bind {address}:{port}
    default_backend {scheme}_out

backend {scheme}_out
{servers}
"""


@dataclass
class Target:
    name: str
    host: Host  # where wrk runs
    urls: dict[str, str]  # scheme -> URL; a path without a scheme skips its modes
    hosts: Path | None = None  # an /etc/hosts for wrk: a URL's name (and so its SNI) to an address

    def argv(self, wrk: list[str]) -> list[Arg]:
        if self.hosts is None:
            return [*wrk]
        # wrk takes the SNI from the URL's name and resolves it itself: give it a private /etc/hosts.
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"', self.hosts, *wrk]


def start_haproxy(lab: Lab, server: Host, overlay: dict[str, str]) -> None:
    sections = "".join(HAPROXY_SECTION.format(
        scheme=scheme, address=server.address, port=port,
        servers="\n".join(f"    server {name} {ip}:{443 if scheme == 'https' else 80}" for name, ip in sorted(overlay.items())))
        for scheme, port in HAPROXY_PORTS.items())
    cfg = server.dir / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(sections=sections))
    argv: list[Arg] = ["haproxy", "-f", cfg, "-db"]
    note_command("data plane", argv)
    server.spawn(argv, log=server.dir / "haproxy.log")

    def listening() -> bool:
        out = server.run(["ss", "-Hltn"], check=False)
        return all(f"{server.address}:{port}" in out for port in HAPROXY_PORTS.values())

    try:
        wait_for("haproxy listening", listening, 15)
    except TimeoutError:
        raise RuntimeError(f"haproxy did not start: {(server.dir / 'haproxy.log').read_text()[-2000:]}") from None


def targets(lab: Lab, server: Host, overlay: dict[str, str]) -> list[Target]:
    first = lab.clients[0]
    nat = lab.hosts["nat"]
    hosts = lab.browser.dir / "hosts.sni"
    hosts.write_text(f"127.0.0.1 localhost\n{sni_address(server)} {DOMAIN}\n")
    return [
        Target("sptun", lab.browser, {s: f"{s}://{server.address}/" for s in ("http", "https")}),
        Target("haproxy", lab.browser, {s: f"{s}://{server.address}:{p}/" for s, p in HAPROXY_PORTS.items()}),
        Target("overlay", server, {s: f"{s}://{overlay[first.name]}/" for s in ("http", "https")}),
        Target("veth", nat, {s: f"{s}://{first.address}/" for s in ("http", "https")}),
        Target("sni", lab.browser, {"https": f"https://{DOMAIN}/"}, hosts),
    ]


class AccessLogs:
    """Requests per client since the last look, from the nginx access logs (appended only)."""

    def __init__(self, lab: Lab) -> None:
        self.files = {c.name: c.dir / "access.log" for c in lab.clients}
        self.offsets = {name: self._size(name) for name in self.files}

    def _size(self, name: str) -> int:
        path = self.files[name]
        return path.stat().st_size if path.exists() else 0

    def take(self) -> dict[str, int]:
        counts = {}
        for name, path in self.files.items():
            end = self._size(name)
            with open(path, "rb") as f:
                f.seek(self.offsets[name])
                counts[name] = f.read(end - self.offsets[name]).count(b"\n")
            self.offsets[name] = end
        return counts


def run_wrk(target: Target, server: Host, keep: str, scheme: str, seconds: float,
            logs: AccessLogs | None, settle: float) -> dict[str, Any]:
    argv = target.argv(wrk_argv(target.urls[scheme], seconds, CONNECTIONS[keep], close=keep == "close"))
    note_command("data plane", [f"[{target.host.name}]", *argv])
    if logs:
        logs.take()
    before, machine_before = ns_cpu(server.netns), machine_cpu()
    out = target.host.run(argv, timeout=seconds + 60)
    after, machine_after = ns_cpu(server.netns), machine_cpu()
    result: WrkResult = parse_wrk(out)
    cpu = cpu_delta(before, after)
    row: dict[str, Any] = {"path": target.name, "keep": keep, "scheme": scheme, **asdict(result)}
    row.pop("extra")
    row["server_cpu_s"] = {k: v for k, v in cpu.items() if k in SERVER_KINDS}
    row["machine_busy_s"] = round(machine_after[0] - machine_before[0], 2)
    row["machine_total_s"] = round(machine_after[1] - machine_before[1], 2)
    time.sleep(settle)  # nginx flushes its access log each second; and a pause between runs
    if logs:
        row["split"] = logs.take()
    return row


def dataplane(lab: Lab, server: Host, repeats: int, seconds: float, split_logs: bool) -> dict[str, Any]:
    overlay = client_overlay(lab, server)
    start_haproxy(lab, server, overlay)
    paths = targets(lab, server, overlay)
    logs = AccessLogs(lab) if split_logs else None
    rows = []
    for rep in range(repeats):
        for keep, scheme in MODES:
            order = paths[rep % len(paths):] + paths[:rep % len(paths)]  # each path first in turn
            for target in (t for t in order if scheme in t.urls):
                row = run_wrk(target, server, keep, scheme, seconds,
                              logs if target.name in ("sptun", "haproxy", "sni") else None,
                              settle=1.2 if split_logs else 0.3)
                row["repeat"] = rep
                rows.append(row)
        log(f"data plane: round {rep + 1}/{repeats} done")
    return {"overlay": overlay, "runs": rows, "summary": summarize(rows)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Medians per (mode, path)."""
    out: dict[str, dict[str, Any]] = {}
    for keep, scheme in MODES:
        mode = f"{keep} {scheme}"
        out[mode] = {}
        for name in PATHS:
            runs = [r for r in rows if r["path"] == name and r["keep"] == keep and r["scheme"] == scheme]
            if not runs:
                continue
            per10k = {kind: median([r["server_cpu_s"].get(kind, 0.0) / r["requests"] * 1e4 for r in runs if r["requests"]])
                      for kind in SERVER_KINDS}
            machine10k = median([r["machine_busy_s"] / r["requests"] * 1e4 for r in runs if r["requests"]])
            split: dict[str, int] = {}
            for r in runs:
                for c, n in r.get("split", {}).items():
                    split[c] = split.get(c, 0) + n
            out[mode][name] = {
                "rps": median([r["rps"] for r in runs]), "rps_all": [r["rps"] for r in runs],
                "p50_ms": median([r["p50_ms"] for r in runs]), "p99_ms": median([r["p99_ms"] for r in runs]),
                "errors": sum(r["errors"] for r in runs), "cpu_per_10k": per10k, "machine_cpu_per_10k": machine10k,
                "split_requests": split, "runs": len(runs),
            }
    return out


# --- why connection-per-request is slower through sptun than straight to one overlay address ------------


def one_backend(lab: Lab, server: Host, repeats: int, seconds: float) -> dict[str, Any]:
    """Connection per request through sptun with c2 and c3 drained (`sptun down`), so that sptun
    and the direct path (c) reach the same single client: what is left of the gap is sptun's own
    (DNAT, and the browser's two extra hops); the rest came from spreading over three clients."""
    from sptun.lab import config_path, sptun

    overlay = client_overlay(lab, server)
    first = lab.clients[0]
    others = lab.clients[1:]
    for c in others:
        argv = sptun("down", "-c", config_path(c))
        note_command("one backend", [f"[{c.name}]", *argv])
        c.run(argv, timeout=60)
    rows = []
    try:
        wait_for("one backend in the rotations", lambda: rotation(server, 0) == [overlay[first.name]]
                 and rotation(server, 1) == [overlay[first.name]], 30, interval=0.2)
        paths = [t for t in targets(lab, server, overlay) if t.name in ("sptun", "overlay")]
        for rep in range(repeats):
            for scheme in ("http", "https"):
                for target in paths if rep % 2 == 0 else paths[::-1]:
                    row = run_wrk(target, server, "close", scheme, seconds, None, settle=0.3)
                    rows.append(row)
    finally:
        for c in others:
            c.run(sptun("up", "-c", config_path(c)), timeout=60)
        want = set(overlay.values())
        wait_for("every client back", lambda: set(rotation(server, 0)) == want and set(rotation(server, 1)) == want,
                 60, interval=0.2)
    summary = {}
    for scheme in ("http", "https"):
        med = {p: median([r["rps"] for r in rows if r["path"] == p and r["scheme"] == scheme]) for p in ("sptun", "overlay")}
        cpu = {p: median([r["machine_busy_s"] / r["requests"] * 1e4 for r in rows if r["path"] == p and r["scheme"] == scheme
                          and r["requests"]]) for p in ("sptun", "overlay")}
        summary[f"close {scheme}"] = {"rps": med, "ratio": med["sptun"] / med["overlay"] if med["overlay"] else float("nan"),
                                      "machine_cpu_per_10k": cpu}
    return {"runs": rows, "summary": summary}


# --- the split, exactly: every connection counted ------------------------------------------------------


def split_check(lab: Lab, server: Host, n: int, concurrency: int = 8) -> dict[str, dict[str, int]]:
    """n new TLS connections through sptun (DNAT), HAProxy and sptun's SNI path; who answered each."""
    result = {}
    for name, address, port in (("sptun", server.address, 443), ("haproxy", server.address, HAPROXY_PORTS["https"]),
                                ("sni", sni_address(server), 443)):
        argv: list[Arg] = [PY, BENCH_DIR / "splitclient.py", address, str(port), lab.ca_cert, DOMAIN, str(n), str(concurrency)]
        note_command("split", argv)
        result[name] = json.loads(lab.browser.run(argv, timeout=300))
    return result


# --- wireguard-go's receive buffer ------------------------------------------------------------------------

PIPELINE_LUA = """\
-- HTTP pipelining: each write carries 100 requests, so the answers come back in bursts
init = function(args)
   local r = {}
   for i = 1, 100 do r[i] = wrk.format(nil, "/") end
   req = table.concat(r)
end
request = function() return req end
"""
RAISED = 4 * 2**20  # bytes: what `net.core.rmem_default = 4194304` would give a new socket
BUFFER_LOADS = [
    # name, extra wrk arguments, scheme, connections
    ("pipelined http, 16 conns × 100 requests", ["-s", "{lua}"], "http", 16),
    ("pipelined https, 64 conns × 100 requests", ["-s", "{lua}"], "https", 64),
    ("keep-alive http, 256 conns", [], "http", 256),
]


def buffer_experiment(lab: Lab, server: Host, repeats: int, seconds: float) -> dict[str, Any]:
    """The sptun path with wireguard-go's default receive buffer and with a raised one, in turn."""
    lua = lab.browser.dir / "pipeline.lua"
    lua.write_text(PIPELINE_LUA)
    hosts = [server, *lab.clients]
    rows: list[dict[str, Any]] = []
    for rep in range(repeats):
        for setting, size in (("default", rcvbuf.DEFAULT), ("raised", RAISED)) if rep % 2 == 0 else \
                (("raised", RAISED), ("default", rcvbuf.DEFAULT)):
            sizes = sorted({s for h in hosts for s in rcvbuf.set_receive_buffer(h, size)})
            for name, extra, scheme, conns in BUFFER_LOADS:
                argv = ["wrk", "-t2", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "3s", "--latency",
                        *[x.format(lua=lua) for x in extra], f"{scheme}://{server.address}/"]
                note_command("receive buffer", [f"[{lab.browser.name}]", *argv])
                before = {h.name: snmp(h) for h in hosts}
                out = lab.browser.run(argv, timeout=seconds + 60)
                after = {h.name: snmp(h) for h in hosts}
                r = parse_wrk(out)
                rows.append({"setting": setting, "buffer_bytes": sizes, "load": name, "rps": r.rps, "p99_ms": r.p99_ms,
                             "errors": r.errors, "repeat": rep,
                             "rcvbuf_errors": {n: after[n]["RcvbufErrors"] - before[n]["RcvbufErrors"] for n in after},
                             "in_datagrams": {n: after[n]["InDatagrams"] - before[n]["InDatagrams"] for n in after}})
                time.sleep(0.3)
        log(f"receive buffer: round {rep + 1}/{repeats} done")
    rcvbuf.set_receive_buffer(server, rcvbuf.DEFAULT)
    for c in lab.clients:
        rcvbuf.set_receive_buffer(c, rcvbuf.DEFAULT)
    summary: dict[str, dict[str, Any]] = {}
    for name, *_ in BUFFER_LOADS:
        summary[name] = {}
        for setting in ("default", "raised"):
            runs = [r for r in rows if r["load"] == name and r["setting"] == setting]
            drops = [sum(r["rcvbuf_errors"].values()) for r in runs]
            datagrams = [sum(r["in_datagrams"].values()) for r in runs]
            summary[name][setting] = {
                "rps": median([r["rps"] for r in runs]), "p99_ms": median([r["p99_ms"] for r in runs]),
                "rcvbuf_errors": sum(drops), "datagrams": sum(datagrams),
                "drop_rate": sum(drops) / max(1, sum(datagrams) + sum(drops)),
                "rcvbuf_errors_by_host": {h: sum(r["rcvbuf_errors"][h] for r in runs) for h in runs[0]["rcvbuf_errors"]},
            }
    return {"namespaced": rcvbuf.namespaced_rmem(server), "raised_bytes": RAISED, "runs": rows, "summary": summary}


# --- path MTU: the tunnel is 1420, the browser's and the client's own links 1500 -------------------------

CLAMP_TABLE = """\
table inet benchclamp {
\tchain forward {
\t\ttype filter hook forward priority mangle; policy accept;
\t\toifname "sptun0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu
\t\tiifname "sptun0" tcp flags syn / syn,rst tcp option maxseg size set 1380
\t}
}
"""


def mtu_probe(lab: Lab, server: Host, requests: int = 300) -> dict[str, Any]:
    """One connection of pipelined requests through sptun from a browser address with no path-MTU
    history, without and then with MSS clamping on the server (in a table of the bench's own,
    removed after): how often a packet was too big for the tunnel (IP FragFails: the kernel
    dropped it and sent ICMP "fragmentation needed"), and TCP retransmissions."""
    hosts = [lab.browser, server, *lab.clients]
    rows = []
    for i, clamp in enumerate((False, True)):
        source = f"203.0.113.{40 + i}"
        lab.browser.run(["ip", "addr", "replace", f"{source}/24", "dev", "eth0"])
        for h in (lab.browser, *lab.clients):
            h.run(["ip", "route", "flush", "cache"])
        if clamp:
            server.run(["nft", "-f", "-"], input=CLAMP_TABLE)
            note_command("path MTU", [f"[{server.name}]", "nft", "-f", "-", "# " + " ".join(CLAMP_TABLE.split())])
        try:
            before = {h.name: (snmp(h, "Ip"), snmp(h, "Tcp")) for h in hosts}
            argv: list[Arg] = [PY, BENCH_DIR / "pipeclient.py", server.address, "80", str(requests), source]
            note_command("path MTU", [f"[{lab.browser.name}]", *argv])
            out = json.loads(lab.browser.run(argv, timeout=60))
            after = {h.name: (snmp(h, "Ip"), snmp(h, "Tcp")) for h in hosts}
        finally:
            if clamp:
                server.run(["nft", "delete", "table", "inet", "benchclamp"], check=False)
        too_big = {n: after[n][0]["FragFails"] - before[n][0]["FragFails"] for n in after}
        retrans = {n: after[n][1]["RetransSegs"] - before[n][1]["RetransSegs"] for n in after}
        rows.append({"clamp": clamp, **out, "too_big": too_big, "retransmits": retrans})
    # What a client's socket of a tunnelled connection believes its path is: a few connections held open.
    wrk = lab.browser.spawn(["wrk", "-t1", "-c6", "-d3s", f"http://{server.address}/"], log=lab.browser.dir / "mtu-wrk.log")
    mss = {}
    try:
        time.sleep(1.5)
        for c in lab.clients:
            out = c.run(["ss", "-Htin", "state", "established", "( sport = :80 )"])
            m = re.search(r"\bmss:(\d+) pmtu:(\d+)", out)
            if m:
                mss[c.name] = {"mss": int(m.group(1)), "pmtu": int(m.group(2))}
    finally:
        wrk.wait(timeout=30)
    return {"runs": rows, "client_sockets": mss}
