"""Servers that publish themselves in DNS (`[dns]`, issue 17), timed in a lab of their own
whose zone no one edits by hand: from `sptun server run` on a new server to the first
request served through it, to browsers that resolve the domain and keep its records for
their TTL; and from the death of a server's last healthy client (its tunnels black-holed)
to the withdrawal of its address."""

from __future__ import annotations

import json
import time
from typing import Any

from bench.benchlab import WIREGUARD
from bench.common import BENCH_DIR, PY, log, note_command, wait_for
from sptun.lab import (
    DNS_ADDRESS,
    Arg,
    DOMAIN,
    LAB_HOLD_DOWN,
    Lab,
    config_path,
    sptun,
    start_daemons,
    wait_served,
    write_configs,
)

# In the server's namespace: every WireGuard packet from its clients is dropped.
BLACK_HOLE = """table inet bench_dark {
    chain input { type filter hook input priority -10; udp dport 51820 drop; }
}
"""


def addresses(lab: Lab) -> set[str]:
    """DOMAIN's A records as the lab's DNS server answers them now."""
    out = lab.dns.run(["kdig", f"@{DNS_ADDRESS}", "+short", "+tcp", DOMAIN, "A"])
    return {line.strip() for line in out.splitlines() if line.strip()}


def publication(prefix: str, seconds: float) -> dict[str, Any]:
    lab = Lab(prefix, servers=2, clients=2)
    try:
        lab.up()
        lab.allow_updates()
        write_configs(lab, WIREGUARD, publish=True)
        s1, s2 = lab.servers
        start_daemons(lab, [s1, *lab.clients])
        wait_served(lab, expected={"s2": 0}, timeout=90)
        wait_for("s1's address published", lambda: addresses(lab) == {s1.address}, 30)
        out = lab.browser.dir / "browsers-publication.json"
        argv: list[Arg] = [PY, BENCH_DIR / "browsers.py", f"@{DNS_ADDRESS}", "--ca", lab.ca_cert, "--domain", DOMAIN,
                "--browsers", "8", "--seconds", str(seconds)]
        note_command("publication", argv)
        browsers = lab.browser.spawn(argv, log=out)
        time.sleep(2)  # they resolve the domain, and keep its one address for the TTL
        started = time.monotonic()
        note_command("publication", ["[s2]", *sptun("server", "run", "-c", config_path(s2))])
        start_daemons(lab, [s2])
        published = wait_for("s2's address published", lambda: s2.address in addresses(lab), 60, interval=0.05)
        browsers.wait(timeout=seconds + 60)
        result = json.loads(out.read_text().splitlines()[-1])
        through_s2 = [result["started"] + r[1] + r[2] for r in result["requests"] if r[3] and r[6] == s2.address]
        if not through_s2:
            raise RuntimeError(f"no request went through s2 in {seconds:g} s: {result['summary']}")
        served = min(through_s2) - started
        log(f"publication: s2's address in DNS {published:.1f} s after its start, first request served through it "
            f"{served:.1f} s after (TTL {lab.ttl} s); {result['summary']['failed']} of "
            f"{result['summary']['requests']} requests failed")
        s2.run(["nft", "-f", "-"], input=BLACK_HOLE)
        note_command("publication", ["[s2]", "nft", "-f", "-", "# udp dport 51820 drop: its clients die for it"])
        try:
            withdrawn = wait_for("s2's address withdrawn", lambda: s2.address not in addresses(lab),
                                 LAB_HOLD_DOWN + 60, interval=0.05)
        finally:
            s2.run(["nft", "delete", "table", "inet", "bench_dark"])
        log(f"publication: s2's address withdrawn {withdrawn:.1f} s after its clients died (hold-down {LAB_HOLD_DOWN} s)")
        return {"ttl_s": lab.ttl, "hold_down_s": LAB_HOLD_DOWN, "published_s": round(published, 2),
                "served_s": round(served, 2), "withdrawn_s": round(withdrawn, 2),
                "requests": result["summary"]["requests"], "failed": result["summary"]["failed"]}
    finally:
        lab.down()
