"""Attested joins in the lab: every host with its own software TPM (swtpm), clients' and
servers' evidence required both ways, and one client's measurements changed while eight
browsers are served: it leaves the rotation at its next registration that completes, and no
browser sees a failure.

    .venv/bin/python -m pytest -q -s tests/test_lab_attest.py     # -s prints the figures
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from support import LAB_TOOLS, netns_marks
from test_failover import Browsers, report
from test_faults import BACKEND, wait_for

from sptun.agent.registration import REGISTER_DEADLINE, REGISTER_EVERY
from sptun.attest import EXCHANGE_GRACE
from sptun.lab import DOMAIN, Lab, slow, start_daemons, status, wait_served, write_configs
from sptun.lab.demo import attest_lab, extend_pcr

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go", "swtpm", "tpm2_quote")

PREFIX = f"sat{os.getpid() % 100000}"
# c1 is out at its next registration: within one interval, and its exchange. Under emulation
# with eight browsers, the TPMs' quotes are slow enough that a round can time out (CI saw two
# in a row), and the one after it tells: so two exchanges' whole deadlines more.
OUT_WITHIN = REGISTER_EVERY + 5 + 2 * (REGISTER_DEADLINE + EXCHANGE_GRACE)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(PREFIX, servers=1)
    try:
        lab.up()
        write_configs(lab, BACKEND)
        attest_lab(lab)
        start_daemons(lab)
        wait_served(lab)
        yield lab
    finally:
        lab.down()


def backends(lab: Lab) -> dict[str, dict[str, object]]:
    """s1's backends by client name."""
    names = {status(c)["public_key"]: c.name for c in lab.clients}
    return {names[b["public_key"]]: b for d in status(lab.servers[0])["domains"] for b in d["backends"]}


@pytest.mark.vm
def test_every_join_is_attested_both_ways(lab: Lab) -> None:
    for name, b in backends(lab).items():
        assert b["attested"] is True and b["in_rotation"], (name, b)
        assert b["measurements"] == {"sha256:0": "00" * 32, "sha256:16": "00" * 32}
    for client in lab.clients:
        agent = status(client)
        assert agent["attestation_key"] and all(t["server_attested"] for t in agent["tunnels"]), agent
    s1 = status(lab.servers[0])["attestation"]
    assert s1["require"] and s1["verified"] >= 3 and s1["refused"] == 0


def test_a_client_whose_measurements_change_leaves_and_no_browser_notices(lab: Lab) -> None:
    c1 = lab.clients[0]
    # Long enough to see c1 out in the worst case and the others serving after it (an emulated
    # VM runs slow() times slower: its quotes and checks too, and so its registrations).
    seconds = (OUT_WITHIN + 8) * slow()
    browsers = Browsers(lab, lab.servers[0], "--browsers", "8", "--seconds", str(seconds))
    time.sleep(3 * slow())  # under way (it reports at the end)
    changed = time.monotonic()
    extend_pcr(c1)
    try:
        wait_for("c1 out of the rotation", lambda: not backends(lab)["c1"]["in_rotation"], OUT_WITHIN * slow())
    except AssertionError:
        log = (c1.dir / "sptun.log").read_text().splitlines()[-12:]
        raise AssertionError(f"c1 still in the rotation: its tunnels {status(c1)['tunnels']}, s1's attestation "
                             f"{status(lab.servers[0])['attestation']}, its log {log}") from None
    out_after = time.monotonic() - changed
    now = backends(lab)  # while c1 drains: later its lease is gone
    time.sleep(8 * slow())  # c2 and c3 serve on without it; then the browsers end, not at the worst case
    browsers.stop()
    result = browsers.result(seconds)
    summary = report("c1's PCR 16 extended under load", result, changed, f"; c1 out of the rotation after {out_after:.1f} s")
    server_log = [line for line in (lab.servers[0].dir / "sptun.log").read_text().splitlines()
                  if "attestation" in line or "draining" in line]
    assert summary["failed"] == 0, server_log[-12:]  # its drain lets its last connections finish; the others take the rest
    out_at = changed + out_after - result["started"]  # on the browsers' clock
    late = [r for r in result["requests"] if r[4] == "c1" and r[1] > out_at + 0.5]
    assert not late, late  # no new connection went to c1 once it was out
    assert {r[4] for r in result["requests"] if r[1] > out_at + 0.5} == {"c2", "c3"}
    assert out_after <= OUT_WITHIN * slow()

    assert now["c1"]["attested"] is False and "PCR sha256:16" in str(now["c1"]["attestation"])
    assert now["c1"]["reason"] == "draining (attestation failed)"
    for other in ("c2", "c3"):
        assert now[other]["attested"] is True and now[other]["in_rotation"] and now[other]["healthy"]
    refusal = status(lab.servers[0])["attestation"]["refusals"][-1]
    assert refusal["public_key"] == status(c1)["public_key"] and "PCR sha256:16" in refusal["reason"]
    # The agent says why it is out.
    (tunnel,) = status(c1)["tunnels"]
    assert "attestation failed: PCR sha256:16" in (tunnel["error"] or "")
    assert (c1.dir / "sptun.log").read_text().count("attestation failed") >= 1
