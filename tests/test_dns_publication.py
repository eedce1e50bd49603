"""Servers that publish themselves in DNS (issue 17), end to end through the lab's Knot,
whose update policy gives each server's TSIG key the lab's domains only.

The zone starts without the domains' records. s1 and s2 publish theirs; a third server
started with only `sptun server run` appears in TXT and A, and every agent tunnels to it.
When every client goes dark, all servers but the last withdraw their addresses after the
hold-down, and publish them again when the clients answer. The third server's `sptun down`
withdraws its addresses first, its TXT one TTL later, and leaves the other servers' records
alone. Browsers that resolve the domain see no failed connection throughout.

    .venv/bin/python -m pytest -q -s tests/test_dns_publication.py
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import LAB_TOOLS, netns_marks

from test_failover import Browsers

from sptun.lab import (
    DNS_ADDRESS,
    DOMAIN,
    LAB_HOLD_DOWN,
    Lab,
    config_path,
    slow,
    sptun,
    start_daemons,
    status,
    wait_served,
    write_configs,
)

# Not in the VM tier (no `vm` mark): DNS updates are the same on any kernel.
pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go")

BACKEND = os.environ.get("SPTUN_TEST_WIREGUARD", "auto")
PREFIX = f"dnp{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(PREFIX, servers=3, clients=2)
    try:
        lab.up()
        lab.allow_updates()
        write_configs(lab, BACKEND, publish=True)
        s1, s2, _ = lab.servers
        start_daemons(lab, [s1, s2, *lab.clients])
        wait_served(lab, expected={"s3": 0})
        yield lab
    finally:
        lab.down()


def published(lab: Lab) -> tuple[set[str], set[str]]:
    """The servers' addresses in DOMAIN's TXT records (ip=) and in its A records."""
    records = lab.zone_records(DOMAIN)
    txt = {r.split("ip=")[1].split(";")[0] for r in records if "ip=" in r}
    return txt, {r for r in records if r.count(".") == 3 and "=" not in r}


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout * slow()
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_each_server_publishes_its_own_records_with_its_key(lab: Lab) -> None:
    s1, s2, s3 = lab.servers
    wait_until("s1 and s2 in TXT and A", lambda: published(lab) == ({s1.address, s2.address}, {s1.address, s2.address}))
    for server in (s1, s2):
        key = status(server)["public_key"]
        assert any(f"ip={server.address};pk={key}" in r for r in lab.zone_records(DOMAIN)), lab.zone_records(DOMAIN)


def resolving_browsers(lab: Lab, seconds: float) -> Browsers:
    """8 browsers making new TLS connections, each waiting 10 s for a connect, that resolve the
    domain at the lab's DNS server (its answers kept for their TTL, as browsers keep them)."""
    return Browsers(lab, f"@{DNS_ADDRESS}", "--browsers", "8", "--seconds", str(seconds))


def summary_of(browsers: Browsers) -> dict[str, Any]:
    result = browsers.result()
    summary: dict[str, Any] = result["summary"]
    failed = Counter(r[6] for r in result["requests"] if not r[3])
    first = {server: min(r[1] for r in result["requests"] if not r[3] and r[6] == server) for server in failed}
    print(f"\nbrowsers: {summary['requests']} requests, {summary['failed']} failed {summary['failed_by_kind']}; "
          f"by server {summary['by_server']}; longest {summary['longest']:.2f} s"
          + "".join(f"; {n} failed at {server}, from {first[server]:.1f} s" for server, n in failed.items()))
    return summary


def test_a_third_server_started_alone_appears_in_dns_and_every_agent_joins_it(lab: Lab) -> None:
    """While browsers resolve the domain: no connection fails, and once its address is
    published they reach the new server too."""
    s1, s2, s3 = lab.servers
    browsers = resolving_browsers(lab, seconds=40 * slow())
    start_daemons(lab, [s3])
    wait_until("s3 in TXT and A", lambda: s3.address in published(lab)[0] and s3.address in published(lab)[1])
    wait_served(lab)  # every client healthy and in rotation on all three servers
    for client in lab.clients:
        assert {t["server"] for t in status(client)["tunnels"] if t["healthy"]} == {s1.address, s2.address, s3.address}
    summary = summary_of(browsers)
    assert summary["failed"] == 0 and summary["by_server"].get(s3.address, 0) > 0, summary


# In each client: the web server stops answering through the tunnels (it still listens, so
# the agents stay registered), and every server's health checks fail.
DARK = """table inet sptest_dark {
    chain input { type filter hook input priority -10; iifname != "lo" tcp dport 443 drop; }
}
"""


def test_servers_whose_clients_all_go_away_withdraw_their_addresses_but_never_the_last(lab: Lab) -> None:
    """Every client goes dark at once: after the hold-down two of the three servers withdraw
    their addresses (their TXT records stay, so clients still join) and one, the last, keeps
    its own; none withdraws it later. When the clients answer again, every address is back."""
    s1, s2, s3 = lab.servers
    everyone = {s1.address, s2.address, s3.address}
    wait_until("all three in TXT and A", lambda: published(lab) == (everyone, everyone))
    for client in lab.clients:
        client.run(["nft", "-f", "-"], input=DARK)
    dark = time.monotonic()
    states: list[tuple[set[str], set[str]]] = []
    try:
        while len((state := published(lab))[1]) > 1:
            states.append(state)
            assert time.monotonic() < dark + 60 * slow(), states[-1]
            time.sleep(0.2)
        withdrawn_after = time.monotonic() - dark
        held = time.monotonic()
        while time.monotonic() < held + LAB_HOLD_DOWN + 3:  # and it stays so: the last one holds
            states.append(published(lab))
            time.sleep(0.3)
    finally:
        for client in lab.clients:
            client.run(["nft", "delete", "table", "inet", "sptest_dark"])
    back = time.monotonic()
    assert all(txt == everyone and len(a) >= 1 for txt, a in states), states
    assert len(states[-1][1]) == 1, states[-1]
    (last,) = states[-1][1]
    print(f"\naddresses withdrawn {withdrawn_after:.1f} s after the clients went dark "
          f"(health checks, then a hold-down of {LAB_HOLD_DOWN} s); {last} kept its own")
    assert LAB_HOLD_DOWN - 1 <= withdrawn_after <= (LAB_HOLD_DOWN + 15) * slow(), withdrawn_after
    for server in lab.servers:
        publication = status(server)["publication"]
        assert publication["withdrawn"] == ([] if server.address == last else [DOMAIN]), (server.name, publication)
    wait_until("every address back", lambda: published(lab) == (everyone, everyone))
    print(f"every address back {time.monotonic() - back:.1f} s after the clients answered again")
    wait_served(lab)


def test_down_withdraws_the_addresses_first_and_the_txt_a_ttl_later(lab: Lab) -> None:
    s1, s2, s3 = lab.servers
    wait_until("s3 in TXT and A", lambda: published(lab) == ({s1.address, s2.address, s3.address},) * 2)
    browsers = resolving_browsers(lab, seconds=30 * slow())  # they outlast the down: no connection fails
    time.sleep(3)  # they use s3 too
    down = subprocess.Popen(s3.cmd(sptun("down", "-c", config_path(s3))), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    states = []
    while down.poll() is None:
        states.append(published(lab))
        time.sleep(0.2)
    out = down.communicate()[0]
    assert down.returncode == 0, out
    states.append(published(lab))
    others = {s1.address, s2.address}
    # Its address left while its TXT was still there, then the TXT; the others' stayed throughout.
    assert (others | {s3.address}, others) in states, states
    assert states[-1] == (others, others), states
    assert all(others <= txt and others <= a for txt, a in states), states
    summary = summary_of(browsers)
    assert summary["failed"] == 0 and summary["by_server"].get(s3.address, 0) > 0, summary
    # The agents learn it from DNS and let the tunnel go; the others keep serving.
    wait_until("the agents drop s3", lambda: all(s3.address not in {t["server"] for t in status(c)["tunnels"]}
                                                 for c in lab.clients))
