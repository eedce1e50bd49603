"""`sptun lab demo`, the README's first command, end to end: servers that publish their own
records in DNS (RFC 2136, TSIG), dual-stack servers, a client on an IPv6-only network that
tunnels over IPv6, even splits in both families, and SNI."""

from __future__ import annotations

import os
import subprocess
import sys

from support import LAB_TOOLS, netns_marks

pytestmark = netns_marks(*LAB_TOOLS, "wireguard-go")


def test_the_lab_demo_passes_in_both_families_with_an_ipv6_only_client() -> None:
    prefix = f"dmo{os.getpid() % 100000}"
    result = subprocess.run([sys.executable, "-m", "sptun", "lab", "demo", "--prefix", prefix],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"})
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    assert out.count("published by the servers (RFC 2136, TSIG)") == 3
    assert out.count('"r=superprotocol;ip=198.51.100.10;pk=') == 1 and out.count('"r=superprotocol;ip=2001:db8::1:11;pk=') == 1
    assert "c5 has no IPv4 uplink: it tunnels over IPv6 to [2001:db8::1:11]:51820" in out
    assert "s2 2001:db8::1:11: 12/12 ok; split c1=4, c2=4, c5=4 (even); browser address kept" in out
    assert "s1 198.51.100.10: 12/12 ok; split c1=6, c2=6 (even); browser address kept" in out
    assert out.count("routed by SNI") == 2 and "demo passed" in out


def test_the_attested_demo_shows_measurements_and_a_changed_client_leaving() -> None:
    """`sptun lab demo --attest`: each host with its own swtpm, joins attested both ways."""
    prefix = f"dma{os.getpid() % 100000}"
    result = subprocess.run([sys.executable, "-m", "sptun", "lab", "demo", "--attest", "--prefix", prefix],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"})
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    flat = " ".join(out.split())  # the console wraps long lines where their figures fall
    assert "s1: its clients' evidence (tpm2 quotes by enrolled attestation keys)" in flat
    assert flat.count("0=0000000000000000…, 16=0000000000000000…") >= 8  # each client on each server
    assert "c1's PCR 16 extended (its boot chain changed): out of s1 after" in flat
    assert "says: PCR sha256:16 is" in flat and "demo passed" in flat
