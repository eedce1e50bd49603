"""One domain with hundreds of live clients in one rotation: a lab of one server and one client
namespace, where bench/fleetclient.py makes N WireGuard clients (no agents: each a real
registration, interface, address and policy route). Measured: the time for all N to be
registered, configured and in the server's rotation, the split of new connections, and one
client's death to its removal from the kernel's map."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from bench.benchlab import make_room, rotation
from bench.common import BENCH_DIR, PY, log, note_command, wait_for, wireguard_backend
from sptun.lab import DOMAIN, Arg, Host, Lab, config_path, sptun, write_configs

# Each wireguard-go takes an inotify instance (it watches its UAPI socket), and root gets 128
# (fs.inotify.max_user_instances) for all its processes, which the bench does not raise on
# the host: so at most this many userspace clients (at 100, one failed to start on a run
# here); the kernel module has no such limit (scripts/bench --vm).
USERSPACE_MAX = 80
# A round of 1,000 probes is a few seconds of Python under emulation (0.2 s on this machine):
# the defaults' 1 s timeout fails good backends there, so the death at that scale runs with an
# operator's settings for a slow machine (the README's advice), stated beside its figure.
SLOW_MACHINE_HEALTH = "interval = 2\ntimeout = 5"


def counter_table(addresses: list[str], port: int) -> str:
    rules = "".join(f"\t\tip daddr {ip} tcp dport {port} tcp flags syn / syn,ack counter\n" for ip in addresses)
    return (f"table inet benchfleet {{\n\tchain input {{\n\t\ttype filter hook input priority -5; policy accept;\n"
            f"{rules}\t}}\n}}\n")


def counted(host: Any) -> dict[str, int]:
    out = json.loads(host.run(["nft", "-j", "list", "chain", "inet", "benchfleet", "input"]))
    counts = {}
    for item in out["nftables"]:
        rule = item.get("rule")
        if not rule:
            continue
        ip = next(e["match"]["right"] for e in rule["expr"] if "match" in e and e["match"]["left"].get("payload", {})
                  .get("field") == "daddr")
        counts[ip] = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return counts


def syn_counters(victim: str) -> str:
    """On the server: new connections forwarded (SYNs, retransmissions too), all and the victim's."""
    return (f"table inet benchdeath {{\n\tchain forward {{\n\t\ttype filter hook forward priority 10; policy accept;\n"
            f"\t\ttcp flags syn / syn,ack counter\n\t\tip daddr {victim} tcp flags syn / syn,ack counter\n\t}}\n}}\n")


def syns(server: Host) -> tuple[int, int]:
    out = json.loads(server.run(["nft", "-j", "list", "chain", "inet", "benchdeath", "forward"]))
    every, victim = (next(e["counter"]["packets"] for e in item["rule"]["expr"] if "counter" in e)
                     for item in out["nftables"] if "rule" in item)
    return every, victim


def death(lab: Lab, home: Host, overlay: list[str]) -> dict[str, Any]:
    """One client of the rotation dies (its interface goes down) while a browser opens new
    connections through the server, 8 at a time with a browser's 10 s connect: the time until
    the server's map no longer holds it, and from the first SYN sent to it after its death
    (passive detection needs one: round robin sends it one new connection in len(overlay))."""
    s1 = lab.servers[0]
    victim = len(overlay) // 2
    ip = overlay[victim]
    s1.run(["nft", "-f", "-"], input=syn_counters(ip))
    argv: list[Arg] = ["curl", "-s", "-Z", "--parallel-max", "8", "--connect-timeout", "10", "-H", "Connection: close",
                       "-o", "/dev/null", f"http://{s1.address}/?d=[1-100000]"]  # bounded: killed once it is out
    note_command("rotation of hundreds", [f"[{lab.browser.name}]", *argv])
    load = subprocess.Popen(lab.browser.cmd(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_syn: list[float] = []

    def out_of_the_map() -> bool:  # polled: the first SYN to the dead client is timed to one poll
        if not first_syn and syns(s1)[1] > at_cut[1]:
            first_syn.append(time.monotonic() - cut)
        return ip not in rotation(s1, 1)

    try:
        time.sleep(1.0)
        at_cut = syns(s1)
        home.run(["ip", "link", "set", f"fl{victim}", "down"])
        cut = time.monotonic()
        took = wait_for("the dead client out of the map", out_of_the_map, 120, interval=0.05)
        rate = (syns(s1)[0] - at_cut[0]) / (time.monotonic() - cut)
    finally:
        load.kill()
        load.wait()
    why = next((line.split(": ", 1)[-1] for line in reversed(rotation_log(s1)) if f"backend {ip} " in line
                and " is down" in line), "?")
    after_syn = took - first_syn[0] if first_syn else None
    log(f"a dead client out of a rotation of {len(overlay)}: {took:.2f} s ({why}); the first SYN to it "
        f"{first_syn[0] if first_syn else float('nan'):.2f} s after the cut, at {rate:.0f} SYNs/s through the server")
    return {"backends": len(overlay), "detection_s": round(took, 2), "reason": why, "syns_per_s": round(rate, 1),
            "first_syn_s": round(first_syn[0], 2) if first_syn else None,
            "after_first_syn_s": None if after_syn is None else round(after_syn, 2)}


def rotation_log(server: Host) -> list[str]:
    """The server's log lines that change its rotation: a backend down or up, a rotation change."""
    text = (server.dir / "sptun.log").read_text(errors="replace")
    return [line for line in text.splitlines() if " is down" in line or " is up" in line or "backends " in line]


def fleet(prefix: str, wanted: int, per_client: int, health: str = "") -> dict[str, Any]:
    """per_client: new connections per client for the split (0: no split, only the death);
    health: a [health] table for the server, for a machine too slow for the defaults."""
    n = wanted if wireguard_backend() == "kernel" else min(wanted, USERSPACE_MAX)
    connections = n * per_client
    lab = Lab(prefix, servers=1, clients=1)
    try:
        lab.up()
        lab.set_txt([f"r=superprotocol;ip={lab.servers[0].address}"], a=[lab.servers[0].address])
        write_configs(lab, "auto", ports=("tcp/443", "tcp/80"))
        s1, home = lab.servers[0], lab.clients[0]
        if health:
            config = s1.dir / config_path(s1).rsplit("/", 1)[1]
            config.write_text(config.read_text() + f"\n[health]\n{health}\n")
        make_room(s1, 4096)
        s1.spawn(sptun("server", "run", "-c", config_path(s1)), log=s1.dir / "sptun.log")
        wait_for("the server answering registrations", lambda: "51821" in s1.run(["ss", "-Hltn"]), 60, interval=0.2)
        argv: list[Arg] = [PY, BENCH_DIR / "fleetclient.py", s1.address, DOMAIN, s1.dir / "tokens" / DOMAIN, str(n),
                           "12", home.dir / "fleet-keys"]  # under the server's 16 per source (one NAT)
        note_command("rotation of hundreds", [f"[{home.name}]", *argv])
        started = time.monotonic()
        out: dict[str, Any] = json.loads(home.run(argv, timeout=900))
        in_rotation = wait_for(f"all {n} in the rotation", lambda: len(rotation(s1, 1)) == n, max(300, n), interval=0.2)
        out.update(in_rotation_s=round(time.monotonic() - started, 3), wanted=wanted, health=health)
        log(f"{n} clients: registered {out['registered_s']} s, configured {out['configured_s']} s, all in the rotation "
            f"{out['in_rotation_s']} s ({in_rotation:.1f} s after the last was configured)")
        if per_client:
            out.update(split(lab, home, out["overlay"], connections))
        out["death"] = death(lab, home, out.pop("overlay"))
        return out
    finally:
        lab.down()


def split(lab: Lab, home: Host, overlay: list[str], connections: int) -> dict[str, Any]:
    """New connections through the server, counted where each client receives its SYNs."""
    s1 = lab.servers[0]
    home.run(["nft", "-f", "-"], input=counter_table(overlay, 80))
    curl: list[Arg] = ["curl", "-s", "-Z", "--parallel-max", "8", "-H", "Connection: close", "-o", "/dev/null",
                       f"http://{s1.address}/?n=[1-{connections}]"]
    note_command("rotation of hundreds", [f"[{lab.browser.name}]", *curl])
    before = rotation_log(s1)
    lab.browser.run(curl, timeout=600)
    changes = rotation_log(s1)[len(before):]  # numgen's count restarts on a change: an exact split needs none
    shares = sorted(counted(home).values())
    out = dict(connections=connections, counted=sum(shares), smallest=shares[0], largest=shares[-1],
               clients_seen=sum(1 for v in shares if v), rotation_changes=len(changes),
               backends_down=sum(" is down" in line for line in changes))
    log(f"{connections} connections over {len(overlay)} clients: {shares[0]}..{shares[-1]} each; the rotation changed "
        f"{len(changes)} times meanwhile ({out['backends_down']} backends found down)")
    return out
