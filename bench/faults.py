"""Fault timings under the load of 8 concurrent browsers (bench/browsers.py, each with a
browser's 10 s connect): a crashed client's way out of the rotation, the failed connections
and longest stall then, failed connections during a drain and each kind of restart, and a
DNS change to the first request served through a new server."""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial
from typing import Any

from bench.benchlab import client_overlay, overlay_ips, rotation
from bench.common import BENCH_DIR, PY, daemon_pid, log, note_command, wait_for
from sptun.lab import DOMAIN, Arg, Host, Lab, config_path, sptun


def _all_back(server: Host, want: set[str], timeout: float = 45) -> None:
    wait_for(f"every client back in {server.name}'s rotations",
             lambda: set(rotation(server, 0)) == want and set(rotation(server, 1)) == want, timeout, interval=0.2)


class Browsers:
    """bench/browsers.py from the browser to one server, in the background: 8 browsers, each
    making new TLS connections with a browser's patience (a 10 s connect)."""

    def __init__(self, lab: Lab, server: Host, seconds: float) -> None:
        self.out = lab.browser.dir / f"browsers-{time.monotonic_ns()}.json"
        argv: list[Arg] = [PY, BENCH_DIR / "browsers.py", server.address, "--ca", lab.ca_cert, "--domain", DOMAIN,
                           "--browsers", "8", "--seconds", str(seconds)]
        note_command("faults", argv)
        self.proc = lab.browser.spawn(argv, log=self.out)

    def result(self) -> dict[str, Any]:
        self.proc.wait(timeout=180)
        result: dict[str, Any] = json.loads(self.out.read_text().strip().splitlines()[-1])
        return result


def crash(lab: Lab, seconds: float) -> dict[str, Any]:
    """Client c2's uplink dies under the load of 8 browsers through s1: how long until s1 takes
    it out of the rotation, how many connections failed, and the longest stall. The requests
    already connected to c2 at the cut are lost with it: counted apart."""
    s1, c2 = lab.servers[0], lab.clients[1]
    overlay = client_overlay(lab, s1)
    ip = overlay["c2"]
    browsers = Browsers(lab, s1, seconds)
    time.sleep(min(3.0, seconds / 4))
    cut = time.monotonic()
    c2.run(["ip", "link", "set", "eth0", "down"])
    note_command("faults", [f"[{c2.name}]", "ip", "link", "set", "eth0", "down"])
    try:
        detection = wait_for("c2 out of s1's rotation", lambda: ip not in rotation(s1, 0), 20, interval=0.05)
    finally:
        time.sleep(0.5)
        c2.run(["ip", "link", "set", "eth0", "up"])
        c2.run(["ip", "route", "replace", "default", "via", "10.99.100.1"])
    result = browsers.result()
    cut_at = cut - result["started"]  # both are CLOCK_MONOTONIC
    requests = result["requests"]  # [browser, t_start, duration, ok, client or error, connect]
    lost = [r for r in requests if r[5] is not None and r[1] + r[5] < cut_at < r[1] + r[2] and (not r[3] or r[4] == "c2")]
    rest = [r for r in requests if r not in lost]
    failed = [r for r in rest if not r[3]]
    _all_back(s1, set(overlay.values()))
    row = {"detection_s": round(detection, 2), "requests": len(requests), "failed": len(failed),
           "lost_at_cut": len(lost), "lost_failed": sum(not r[3] for r in lost),
           "longest_s": round(max(r[2] for r in rest), 2), "p50_s": result["summary"]["p50"],
           "failures": [[round(r[1] - cut_at, 2), r[4]] for r in failed[:5]], "cut_at_s": round(cut_at, 3),
           "timeline": [[round(r[1], 3), r[3], r[4], round(r[2], 3)] for r in requests]}
    log(f"crash: out of the rotation after {detection:.2f} s; {len(failed)}/{len(rest)} connections failed, the "
        f"slowest request took {row['longest_s']} s; {len(lost)} were connected to c2 at the cut")
    return row


def crash_with_leases(lab: Lab, seconds: float, leases: int) -> dict[str, Any]:
    """The crash again, with s1 holding `leases` leases and its health checks running: the lab's
    three clients, and fresh keys registered from the browser (real registrations, peers
    that never handshake: a server's stale leases). Run last: s1 keeps them."""
    from bench.control import add_sources

    s1 = lab.servers[0]
    for _ in range(5):  # a server busy with thousands of new peers turns some away: register those again
        need = leases - len(overlay_ips(s1))
        if need <= 0:
            break
        argv: list[Arg] = [PY, BENCH_DIR / "regclient.py", s1.address, "51821", DOMAIN, s1.dir / "tokens" / DOMAIN,
                           str(need), "64", ",".join(add_sources(lab))]
        note_command("faults", argv)
        out = json.loads(lab.browser.run(argv, timeout=900))
        log(f"{out['ok']} more leases on s1 ({out['per_second']:.0f}/s), failures {out['failures']}")
    held = len(overlay_ips(s1))
    time.sleep(3)  # a health round or more over all of them
    row = crash(lab, seconds)
    row["leases"] = held
    return row


def join(lab: Lab, repeats: int) -> dict[str, Any]:
    """A client joining: c3 down (`sptun down`: out of every rotation), then `sptun up`, timed
    from the command to its registration answered (the command returns), to its overlay
    address in s1's map, and to the first request through s1 that c3 answers (a browser
    opening new connections meanwhile, bench/firstserved.py)."""
    s1, c3 = lab.servers[0], lab.clients[2]
    ip = client_overlay(lab, s1)["c3"]
    rows = []
    for _ in range(repeats):
        c3.run(sptun("down", "-c", config_path(c3)), timeout=120)
        wait_for("c3 out of s1's rotation", lambda: ip not in rotation(s1, 0), 30, interval=0.1)
        out = lab.browser.dir / f"firstserved-{time.monotonic_ns()}.json"
        argv: list[Arg] = [PY, BENCH_DIR / "firstserved.py", s1.address, "c3", "60"]
        note_command("join", [f"[{lab.browser.name}]", *argv])
        poller = lab.browser.spawn(argv, log=out)
        time.sleep(1.0)  # the poller is up and answered by c1 and c2
        up = sptun("up", "-c", config_path(c3))
        note_command("join", [f"[{c3.name}]", *up])
        started = time.monotonic()
        c3.run(up, timeout=120)
        registered = time.monotonic() - started
        in_map = wait_for("c3 in s1's rotation", lambda: ip in rotation(s1, 0), 60, interval=0.02) + registered
        poller.wait(timeout=90)
        served_at = json.loads(out.read_text().strip().splitlines()[-1])["served_at"]
        rows.append({"registered_s": round(registered, 3), "in_map_s": round(in_map, 3),
                     "served_s": round(served_at - started, 3) if served_at else None})
    _all_back(s1, set(client_overlay(lab, s1).values()))
    log("join: " + "; ".join(f"registered {r['registered_s']} s, in the map {r['in_map_s']} s, served {r['served_s']} s"
                             for r in rows))
    return {"runs": rows}


def _respawn(host: Host, role: str, log_name: str) -> None:
    host.spawn(sptun(role, "run", "-c", config_path(host)), log=host.dir / log_name)


def _stop(pid: int, sig: int, timeout: float = 30) -> None:
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # our grandchild through nsenter? collect it if it is ours
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"pid {pid} did not exit after signal {sig}")


def restarts(lab: Lab, seconds: float) -> list[dict[str, Any]]:
    """Failed requests through s1 while a client drains, and while each daemon restarts."""
    s1, c1, c3 = lab.servers[0], lab.clients[0], lab.clients[2]
    want = set(client_overlay(lab, s1).values())

    def drain() -> None:
        c1.run(sptun("down", "-c", config_path(c1)), timeout=60)

    def drain_back() -> None:
        c1.run(sptun("up", "-c", config_path(c1)), timeout=60)

    def kill(host: Host, role: str, sig: int) -> None:
        _stop(daemon_pid(host), sig)
        _respawn(host, role, f"sptun-{role}-restart-{time.monotonic_ns()}.log")

    cases = [
        ("drain", "drain (sptun down on a client)", drain, drain_back, [sptun("down", "-c", config_path(c1))]),
        ("agent_kill", "agent kill -9 and restart", lambda: kill(c3, "agent", signal.SIGKILL), None,
         [["kill", "-9", "AGENT_PID"], sptun("agent", "run", "-c", config_path(c3))]),
        ("agent_term", "agent stop (SIGTERM) and restart", lambda: kill(c3, "agent", signal.SIGTERM), None,
         [["kill", "-TERM", "AGENT_PID"], sptun("agent", "run", "-c", config_path(c3))]),
        ("server_kill", "server kill -9 and restart", lambda: kill(s1, "server", signal.SIGKILL), None,
         [["kill", "-9", "SERVER_PID"], sptun("server", "run", "-c", config_path(s1))]),
        ("server_term", "server stop (SIGTERM) and restart", lambda: kill(s1, "server", signal.SIGTERM), None,
         [["kill", "-TERM", "SERVER_PID"], sptun("server", "run", "-c", config_path(s1))]),
    ]
    rows = []
    for key, name, inject, restore, argvs in cases:
        since = time.time()
        for argv in argvs:
            note_command("faults", argv)
        browsers = Browsers(lab, s1, seconds)
        time.sleep(min(2.0, seconds / 4))
        t = time.monotonic()
        inject()
        took = time.monotonic() - t
        result = browsers.result()
        results = result["requests"]  # [browser, t_start, duration, ok, client or error, connect]
        if restore:
            restore()
        _all_back(s1, want)
        if "server" in key:  # the new daemon is up before the next case looks for it
            wait_for("the restarted server's control socket", partial(_control_socket, s1, since), 30, interval=0.2)
        failed = [r for r in results if not r[3]]
        rows.append({"key": key, "case": name, "requests": len(results), "failed": len(failed), "inject_s": round(took, 2),
                     "longest_s": result["summary"]["longest"],
                     "failures": [[round(r[1] - (t - result["started"]), 2), r[4]] for r in failed[:5]],
                     "answered_by": sorted({r[4] for r in results if r[3]})})
        log(f"{name}: {len(failed)}/{len(results)} requests failed")
    return rows


def _control_socket(host: Host, since: float) -> bool:
    """A daemon started after `since` (time.time()) has opened its control socket. (Not `status`:
    that can take long on a server right after a load.)"""
    try:
        return (host.dir / "state" / "control.sock").stat().st_mtime >= since
    except FileNotFoundError:
        return False


def dns_change(lab: Lab) -> dict[str, Any]:
    """DNS starts listing s3: the time until a request through s3 is served."""
    s3 = lab.servers[2]
    assert not lab.curl(s3.address, timeout=1).ok, "s3 serves before it is in DNS"
    started = time.monotonic()
    lab.set_txt([f"r=superprotocol;ip={s.address}" for s in lab.servers], a=[s.address for s in lab.servers])
    note_command("faults", ["knotc", "zone-reload", "example.test", "# TXT for s1, s2 and s3"])
    wait_for("a request served through s3", lambda: lab.curl(s3.address, timeout=1).ok, lab.ttl + 30, interval=0.1)
    took = time.monotonic() - started
    log(f"DNS change: served through s3 {took:.1f} s after the zone changed (TTL {lab.ttl} s)")
    return {"served_s": round(took, 2), "ttl_s": lab.ttl}
