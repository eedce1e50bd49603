"""Fault timings under a bounded load: a crashed client's way out of the rotation, failed
requests during a drain and each kind of restart, and a DNS change to the first request
served through a new server."""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial
from typing import Any

from bench.benchlab import client_overlay, rotation
from bench.common import BENCH_DIR, PY, daemon_pid, log, note_command, wait_for
from sptun.lab import DOMAIN, Arg, Host, Lab, config_path, sptun


class Load:
    """Requests through one server from the browser, one new TLS connection each, in the background."""

    def __init__(self, lab: Lab, server: Host, seconds: float) -> None:
        self.out = lab.browser.dir / f"load-{time.monotonic_ns()}.json"
        argv: list[Arg] = [PY, BENCH_DIR / "loadclient.py", server.address, str(seconds), lab.ca_cert, DOMAIN]
        note_command("faults", argv)
        self.proc = lab.browser.spawn(argv, log=self.out)
        self.started = time.monotonic()

    def results(self) -> list[list[Any]]:
        self.proc.wait(timeout=180)
        results: list[list[Any]] = json.loads(self.out.read_text().strip().splitlines()[-1])
        return results


def _all_back(server: Host, want: set[str], timeout: float = 45) -> None:
    wait_for(f"every client back in {server.name}'s rotations",
             lambda: set(rotation(server, 0)) == want and set(rotation(server, 1)) == want, timeout, interval=0.2)


def crash(lab: Lab, seconds: float) -> dict[str, Any]:
    """Client c2's uplink dies under load: how long until s1 takes it out of the rotation."""
    s1, c2 = lab.servers[0], lab.clients[1]
    overlay = client_overlay(lab, s1)
    ip = overlay["c2"]
    load = Load(lab, s1, seconds)
    time.sleep(min(2.0, seconds / 4))
    cut = time.monotonic()
    c2.run(["ip", "link", "set", "eth0", "down"])
    note_command("faults", [f"[{c2.name}]", "ip", "link", "set", "eth0", "down"])
    try:
        detection = wait_for("c2 out of s1's rotation", lambda: ip not in rotation(s1, 0), 20, interval=0.05)
    finally:
        time.sleep(0.5)
        c2.run(["ip", "link", "set", "eth0", "up"])
        c2.run(["ip", "route", "replace", "default", "via", "10.99.100.1"])
    results = load.results()
    cut_at = cut - load.started
    failed = [r for r in results if not r[1]]
    _all_back(s1, set(overlay.values()))
    row = {"detection_s": round(detection, 2), "requests": len(results), "failed": len(failed),
           "last_failure_after_cut_s": round(max((r[0] for r in failed), default=cut_at) - cut_at, 2),
           "failures": failed[:5], "cut_at_s": round(cut_at, 3), "timeline": results}
    log(f"crash: out of the rotation after {detection:.2f} s; {len(failed)}/{len(results)} requests failed")
    return row


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
        load = Load(lab, s1, seconds)
        time.sleep(min(2.0, seconds / 4))
        t = time.monotonic()
        inject()
        took = time.monotonic() - t
        results = load.results()
        if restore:
            restore()
        _all_back(s1, want)
        if "server" in key:  # the new daemon is up before the next case looks for it
            wait_for("the restarted server's control socket", partial(_control_socket, s1, since), 30, interval=0.2)
        failed = [r for r in results if not r[1]]
        rows.append({"key": key, "case": name, "requests": len(results), "failed": len(failed), "inject_s": round(took, 2),
                     "failures": failed[:5],
                     "answered_by": sorted({r[2] for r in results if r[1]})})
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
