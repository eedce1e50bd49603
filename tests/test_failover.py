"""Failover that browsers do not see: faults under the load of real browsers.

Eight browsers (bench/browsers.py in the browser namespace) each open a new TCP and TLS
connection per request, with a browser's patience: a 10 s connect timeout (SYNs at 0, 1, 3,
7 s; every second at first on Linux 6.5+) and 15 s for the whole request. Each test injects one fault, prints what the browsers
saw (failed connections by kind, the longest stall), restores the lab, and then asserts the
targets of the issue: no failed connection, and for a dead client no request slower than
3.5 s. Requests already connected to a client whose uplink or web server dies cannot be
saved by any failover: they are counted and printed, and left out of those targets. A long
download (about 30 s, nginx `limit_rate`) must survive daemon restarts, a reload and another
client's drain.

    .venv/bin/python -m pytest -q -s tests/test_failover.py     # -s prints the figures
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import LAB_TOOLS, netns_marks
from test_faults import BACKEND, _pids, daemon_pid, in_rotation, wait_for

from sptun.control import control_request
from sptun.lab import DOMAIN, Host, Lab, config_path, slow, sptun, start_daemons, status, wait_served, write_configs

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go")

PREFIX = f"sfo{os.getpid() % 100000}"
BROWSERS = Path(__file__).resolve().parents[1] / "bench" / "browsers.py"
LOAD_SECONDS = 15
STREAM_SECONDS = 30
STREAM_RATE = 128 * 1024  # bytes a second: `limit_rate 128k`
SLOWEST_OK = 3.5  # a SYN retransmitted at 3 s reaches a live client (times slow() in an emulated VM)
# (The passive check sees the first retransmission, at 1 s: the next one, at 2 or 3 s, is rescued.)

# Added to each client's nginx: a file that takes STREAM_SECONDS to send, whose lines name the client.
STREAM_LOCATION = """\
        location = /stream.txt {{
            root {www};
            limit_rate {rate};
        }}
        location / {{"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """One server, three clients, each client's nginx serving /stream.txt too."""
    lab = Lab(PREFIX, servers=1)
    try:
        lab.up()
        for client in lab.clients:
            serve_stream(client)
        write_configs(lab, BACKEND)
        start_daemons(lab)
        wait_served(lab)
        yield lab
    finally:
        lab.down()


def serve_stream(client: Host) -> None:
    """client's nginx also serves /stream.txt: STREAM_SECONDS at STREAM_RATE (its `location /` only
    returns a one-line page), whose lines name the client; nginx reloads, as `nginx -s reload` does."""
    www = client.dir / "www"
    www.mkdir()
    line = f"client={client.name} ".encode().ljust(63, b".") + b"\n"
    (www / "stream.txt").write_bytes(line * (STREAM_RATE * STREAM_SECONDS // len(line)))
    conf = client.dir / "nginx.conf"
    text = conf.read_text()
    assert text.count("        location / {") == 1
    conf.write_text(text.replace("        location / {", STREAM_LOCATION.format(www=www, rate=STREAM_RATE)))
    os.kill(nginx_pids(client)[0], signal.SIGHUP)  # nginx reloads its config
    probe = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-r", "0-9", "--max-time", "2",
             "https://127.0.0.1/stream.txt"]
    wait_for(f"{client.name} serving /stream.txt", lambda: client.run(probe, check=False) == "206", 10)


# --- the browsers ----------------------------------------------------------------------------------


class Browsers:
    """bench/browsers.py from the browser to one server (or to @NAMESERVER: the domain's
    addresses resolved there), in the background."""

    def __init__(self, lab: Lab, server: Host | str, *args: str) -> None:
        self.out = lab.browser.dir / f"browsers-{time.monotonic_ns()}.json"
        self.until = self.out.with_suffix(".stop")
        target = server if isinstance(server, str) else server.address
        self.proc = lab.browser.spawn([sys.executable, BROWSERS, target, "--ca", lab.ca_cert, "--domain", DOMAIN,
                                       "--until", self.until, *args], log=self.out)

    def stop(self) -> None:
        """No new request from now on: they end before their --seconds."""
        self.until.touch()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.startswith("{")]

    def result(self, seconds: float = STREAM_SECONDS) -> dict[str, Any]:
        """What they saw, once they are done (seconds: as long as they were told to run)."""
        self.proc.wait(timeout=seconds + 60)
        out: dict[str, Any] = self.lines()[-1]
        return out


def load(lab: Lab, seconds: float = LOAD_SECONDS) -> Browsers:
    return Browsers(lab, lab.servers[0], "--browsers", "8", "--seconds", str(seconds))


def stream(lab: Lab) -> tuple[Browsers, str]:
    """A download of STREAM_SECONDS through the server; and the client that serves it."""
    download = Browsers(lab, lab.servers[0], "--stream", "/stream.txt", "--seconds", str(STREAM_SECONDS))
    wait_for("the stream started", lambda: any(line.get("event") == "streaming" for line in download.lines()), 15)
    return download, download.lines()[0]["client"]


def report(name: str, result: dict[str, Any], fault: float, extra: str = "") -> dict[str, Any]:
    """Print what the browsers saw (times from the fault, a time.monotonic()); return the summary."""
    s: dict[str, Any] = result["summary"]
    fault_at = fault - result["started"]
    failed = [r for r in result["requests"] if not r[3]]
    span = f", failures from {failed[0][1] - fault_at:+.1f} s to {failed[-1][1] - fault_at:+.1f} s" if failed else ""
    slowest_ok = max((r[2] for r in result["requests"] if r[3]), default=0.0)
    print(f"\n{name}: {s['requests']} requests, {s['failed']} failed {s['failed_by_kind']}{span}; longest stall "
          f"{s['longest']:.2f} s (slowest served {slowest_ok:.2f} s), p50 {s['p50']:.3f} s, p99 {s['p99']:.3f} s; "
          f"by client {s['by_client']}{extra}")
    worst = sorted(result["requests"], key=lambda r: (r[3], -r[2]))[:8]  # failed first, then the slowest
    print("  worst (browser, start from the fault, seconds, served, client or error, connected after):",
          *(f"    {[r[0], round(r[1] - fault_at, 3), *r[2:]]}" for r in worst), sep="\n")
    return s


# --- faults -----------------------------------------------------------------------------------------


def kill_group(host: Host) -> list[str]:
    """SIGKILL the sptun daemon's whole process group (as a supervisor's group kill does); the
    group's members, by name. The lab spawns the daemon in a new session: it leads its group."""
    pid = daemon_pid(host)
    pgid = os.getpgid(pid)
    assert pgid == pid, f"{host.name}'s daemon {pid} is not a process group leader"
    members = [p for p in _pids(host) if _stat(p)[3] == str(pgid)]
    names = [_stat(p)[0] for p in members]
    os.killpg(pgid, signal.SIGKILL)
    return names


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat as [comm, state, ppid, pgrp, ...]; empty strings once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ["", "", "", ""]
    comm, rest = text.split(" (", 1)[1].rsplit(") ", 1)
    return [comm, *rest.split()]


def restart(host: Host) -> None:
    role = "server" if host.spec.role == "server" else "agent"
    host.spawn(sptun(role, "run", "-c", config_path(host)), log=host.dir / "sptun-restarted.log")


def nginx_pids(client: Host) -> list[int]:
    """The lab's nginx on client: its master (first), then its workers."""
    master = int((client.dir / "nginx.pid").read_text())
    pids = _pids(client)
    assert master in pids and _stat(master)[0] == "nginx", f"no nginx master {master} on {client.name}"
    return [master, *(p for p in pids if _stat(p)[2] == str(master) and _stat(p)[0] == "nginx")]


def start_nginx(client: Host) -> None:
    """As the lab starts it (sptun.lab.net), with the config on disk."""
    home = client.dir
    client.spawn(["nginx", "-p", home, "-e", home / "error.log", "-c", home / "nginx.conf", "-g", "daemon off;"],
                 log=home / "nginx.log")
    wait_for(f"nginx listening on {client.name}", lambda: ":443 " in client.run(["ss", "-Hltn", "sport", "=", ":443"]), 15)


def overlay_ip(client: Host, server: Host) -> str:
    return str([t for t in status(client)["tunnels"] if t["server"] == server.address][0]["overlay_ip"])


# --- the baseline -----------------------------------------------------------------------------------


def test_the_browsers_see_no_failure_without_a_fault(lab: Lab) -> None:
    """The baseline the faults are measured against: what a stall costs on this machine."""
    s = report("no fault (baseline)", load(lab, 10).result(), time.monotonic())
    assert s["requests"] > 50
    assert s["failed"] == 0


# --- a, b: a daemon's whole process group killed, then restarted ------------------------------------


@pytest.mark.vm
@pytest.mark.parametrize("role", ["server", "agent"])
def test_a_daemon_process_group_killed_and_restarted_fails_no_connection(lab: Lab, role: str) -> None:
    host = lab.servers[0] if role == "server" else lab.clients[2]
    browsers = load(lab)
    time.sleep(3)
    fault = time.monotonic()
    killed = kill_group(host)
    time.sleep(1)
    restart(host)
    s = report(f"{role} {host.name}: process group kill -9, restart after 1 s", browsers.result(), fault,
               f"; the group was {killed}")
    wait_served(lab)
    assert s["requests"] > 50
    assert s["failed"] == 0


# --- c: a client's uplink dies ----------------------------------------------------------------------


@pytest.mark.vm
def test_a_dead_client_fails_no_connection_and_stalls_none_past_3_5_s(lab: Lab) -> None:
    s1, c2 = lab.servers[0], lab.clients[1]
    c2_ip = overlay_ip(c2, s1)
    browsers = load(lab)
    time.sleep(3)
    # The browser's connections to c2 at the cut (an ACK may still be on its way), counted in the
    # same breath as the cut itself.
    established = c2.run(["sh", "-c", "ss -Htn state established state syn-recv '( sport = :443 )' "
                                      f"dst {lab.browser.address}; ip link set eth0 down"])
    cut = time.monotonic()
    try:
        detection = seconds_until(lambda: c2_ip not in in_rotation(s1), 12)
        time.sleep(max(0.0, cut + LOAD_SECONDS - 3 - 2 - time.monotonic()))  # back 2 s before the load ends
    finally:
        c2.run(["ip", "link", "set", "eth0", "up"])
        c2.run(["ip", "route", "replace", "default", "via", "10.99.100.1"])
    result = browsers.result()
    unsavable, rest = in_flight(result, cut, "c2")
    failed = [r for r in rest if not r[3]]
    slowest = max(r[2] for r in rest)
    out = "NOT within 12 s" if detection is None else f"{detection:.1f} s after the cut"
    report("client c2 uplink cut", result, cut,
           f"; out of the rotation {out}; {len(established.splitlines())} connections established to c2 at the cut "
           f"(ss), {len(unsavable)} requests in them ({sum(not r[3] for r in unsavable)} failed, the slowest served "
           f"took {max((r[2] for r in unsavable if r[3]), default=0):.2f} s); the others: {len(failed)} failed, the "
           f"slowest took {slowest:.2f} s")
    wait_served(lab)
    assert failed == []
    assert slowest <= SLOWEST_OK * slow()


def seconds_until(check: Callable[[], bool], timeout: float) -> float | None:
    """Poll check() until true: the seconds it took, or None after timeout."""
    try:
        return wait_for("", check, timeout)
    except AssertionError:
        return None


def in_flight(result: dict[str, Any], at: float, client: str, until: float | None = None) -> tuple[list[list[Any]], list[list[Any]]]:
    """The browsers' requests split in two: those connected to client before `until` and not
    done by `at` (time.monotonic()s; until defaults to at), which no failover can save, and the
    others."""
    t, u = at - result["started"], (at if until is None else until) - result["started"]
    caught = [r for r in result["requests"]
              if r[5] is not None and r[1] + r[5] < u and t < r[1] + r[2] and (not r[3] or r[4] == client)]
    return caught, [r for r in result["requests"] if r not in caught]


# --- d: a client's web server dies ------------------------------------------------------------------


def test_a_dead_web_server_fails_no_connection(lab: Lab) -> None:
    c1 = lab.clients[0]
    browsers = load(lab)
    time.sleep(3)
    try:
        pids = nginx_pids(c1)
        kill = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        # Until the last nginx process is gone, its kernel still completes handshakes into the
        # listen backlog, and those die with it: the web server is dead when its socket is.
        deadline = time.monotonic() + 10
        while any(_stat(p)[1] not in ("", "Z") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.005)
        dead = time.monotonic()
        time.sleep(6)
    finally:
        start_nginx(c1)
    result = browsers.result()
    # The requests nginx had accepted die with it; the target is for the rest.
    caught, rest = in_flight(result, kill, "c1", dead)
    failed = [r for r in rest if not r[3]]
    report("client c1 nginx kill -9, restarted after 6 s", result, kill,
           f"; nginx gone {dead - kill:.3f} s after the kill; {len(caught)} requests connected to c1 by then ({sum(not r[3] for r in caught)} failed); the "
           f"others: {len(failed)} failed, the slowest took {max(r[2] for r in rest):.2f} s")
    wait_served(lab)
    assert failed == []
    assert max(r[2] for r in rest) <= SLOWEST_OK * slow()


# --- e: a long download survives restarts, a reload, and another client's drain ---------------------


def stream_through(lab: Lab, name: str, event: Callable[[str], str], restore: Callable[[], None] = lambda: None) -> None:
    """A download of STREAM_SECONDS and the browsers' load through the server; event(the streaming
    client) about 5 s into it, then restore() once both are over; both must see no failure.
    event returns a note for the report."""
    download, client = stream(lab)
    browsers = load(lab, STREAM_SECONDS)
    try:
        time.sleep(5)
        fault = time.monotonic()
        note = event(client)
        got = download.result()
        result = browsers.result()
    finally:
        restore()
    s = report(f"stream from {client}, {name}", result, fault,
               f"; {note}; the stream: {'completed' if got['completed'] else 'FAILED'}, {got['bytes']} of "
               f"{got['expected']} bytes in {got['duration']:.1f} s, stalled at most {got['stall']:.1f} s {got['error']}")
    wait_served(lab)
    assert got["completed"], got
    assert s["failed"] == 0


@pytest.mark.vm
def test_a_stream_survives_a_server_process_group_kill(lab: Lab) -> None:
    s1 = lab.servers[0]

    def kill(_client: str) -> str:
        killed = kill_group(s1)
        time.sleep(1)
        restart(s1)
        return f"server group kill -9 {killed}, restart after 1 s"

    stream_through(lab, "server s1 process group kill -9", kill)


def test_a_stream_survives_its_agents_process_group_kill(lab: Lab) -> None:
    def kill(client: str) -> str:
        host = lab.hosts[client]
        killed = kill_group(host)
        time.sleep(1)
        restart(host)
        return f"agent group kill -9 {killed}, restart after 1 s"

    stream_through(lab, "its agent's process group kill -9", kill)


def test_a_stream_survives_its_agents_reload(lab: Lab) -> None:
    def reload(client: str) -> str:
        os.kill(daemon_pid(lab.hosts[client]), signal.SIGHUP)
        return "agent SIGHUP"

    stream_through(lab, "its agent reloaded (SIGHUP)", reload)


def test_a_stream_survives_another_clients_drain(lab: Lab) -> None:
    drained: list[Host] = []

    def drain(client: str) -> str:
        other = next(c for c in lab.clients if c.name != client)
        drained.append(other)
        started = time.monotonic()
        other.run(sptun("down", "-c", config_path(other)), timeout=60)
        return f"{other.name} drained (sptun down) in {time.monotonic() - started:.1f} s"

    def undrain() -> None:
        for other in drained:
            other.run(sptun("up", "-c", config_path(other)), timeout=60)

    stream_through(lab, "another client drained", drain, undrain)


def test_a_drain_of_the_streams_own_client_waits_for_it_up_to_drain_timeout(lab: Lab) -> None:
    """`sptun down` on the client serving the download: the download goes on through the drain,
    which lasts drain_timeout (10 s, the default: less than the download's 30 s), and is cut
    then. No other request fails: the client left the rotation first."""
    drain_timeout = 10.0
    download, client = stream(lab)
    host = lab.hosts[client]
    browsers = load(lab, 20)
    try:
        time.sleep(3)
        fault = time.monotonic()
        # Straight to the daemon's control socket, as `sptun down` does: a Python start of the
        # CLI takes seconds in the VM tier, and the drain is what is timed here.
        reply = control_request(host.dir / "state", "down", timeout=60 * slow())
        took = time.monotonic() - fault
        assert reply is not None and reply["ok"], reply
        got = download.result()
        result = browsers.result()
    finally:
        host.run(sptun("up", "-c", config_path(host)), timeout=60)
    flowed = got["started"] + got["last"] - fault
    s = report(f"stream from {client}, its own client drained", result, fault,
               f"; sptun down took {took:.1f} s; the stream's last bytes came {flowed:.1f} s after the down began, "
               f"{got['bytes']} of {got['expected']} bytes ({got['error'] or 'completed'})")
    wait_served(lab)
    logs = "".join(f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                   for log in sorted(host.dir.glob("sptun*.log")))
    assert drain_timeout - 1 <= took <= drain_timeout + 5 * slow(), f"sptun down took {took:.1f} s; {client}'s logs:{logs}"
    assert flowed >= drain_timeout - 1.5, "the download stopped before drain_timeout"
    assert not got["completed"]
    assert s["failed"] == 0
