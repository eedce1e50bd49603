"""The systemd units: `systemd-analyze verify` is clean, `systemd-analyze security` rates
them OK (exposure at most 3.0), and they agree with the paths sptun and scripts/install use.
systemd need not run: both checks work offline on the unit files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sptun.config import AGENT_CONFIG, DEFAULT_STATE_DIR, SERVER_CONFIG
from sptun.wg import UAPI_DIR

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"server": ROOT / "systemd" / "sptun-server.service", "agent": ROOT / "systemd" / "sptun-agent.service"}
CONFIGS = {"server": SERVER_CONFIG, "agent": AGENT_CONFIG}
EXEC = "/usr/local/bin/sptun"  # where scripts/install links it
MAX_EXPOSURE = 3.0

analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                             reason="systemd-analyze is not installed (Debian: the systemd package)")


def service(role: str) -> dict[str, list[str]]:
    """The [Service] section: each key with all its values, in order."""
    values: dict[str, list[str]] = {}
    section = None
    for line in UNITS[role].read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@analyze
@pytest.mark.parametrize("role", UNITS)
def test_verify_is_clean(role: str, tmp_path: Path) -> None:
    # verify insists that ExecStart= is an executable file. Check a copy whose ExecStart is
    # a real sptun (this interpreter's), the same unit otherwise.
    sptun = tmp_path / "sptun"
    sptun.write_text(f'#!/bin/sh\nexec {sys.executable} -m sptun "$@"\n')
    sptun.chmod(0o755)
    unit = tmp_path / UNITS[role].name
    text = UNITS[role].read_text()
    assert text.count(f"ExecStart={EXEC} ") == 1
    unit.write_text(text.replace(f"ExecStart={EXEC} ", f"ExecStart={sptun} "))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


@analyze
@pytest.mark.parametrize("role", UNITS)
def test_security_exposure_is_ok(role: str) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNITS[role])],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    exposure = float(match.group(1))
    print(f"{UNITS[role].name}: exposure {exposure} {match.group(2)}")
    assert exposure <= MAX_EXPOSURE, proc.stdout


@pytest.mark.parametrize("role", UNITS)
def test_units_match_sptun(role: str) -> None:
    """What the daemon and scripts/install expect, and what the hardening must not take away."""
    s = service(role)
    assert s["ExecStart"] == [f"{EXEC} {role} run -c {CONFIGS[role]}"]
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"] and s["WatchdogSec"]
    # Keys and leases: the only state sptun writes, and it may write there.
    assert DEFAULT_STATE_DIR == Path("/var/lib/sptun") and s["StateDirectory"] == ["sptun"]
    writable = " ".join(s["ReadWritePaths"]).split()
    assert str(DEFAULT_STATE_DIR) in writable
    # wireguard-go's UAPI sockets (/var/run is /run): kept across restarts.
    assert UAPI_DIR == Path("/var/run/wireguard") and s["RuntimeDirectory"] == ["wireguard"]
    assert s["RuntimeDirectoryPreserve"] == ["yes"] and "/run/wireguard" in writable
    # ip_forward (server), rp_filter (agent) under a read-only /proc/sys.
    assert s["ProtectKernelTunables"] == ["yes"] and "/proc/sys/net" in writable
    # wireguard-go's tun, and the TPM for attested joins (tpm2-tools through the resource manager).
    assert s["DeviceAllow"] == ["/dev/net/tun rw", "/dev/tpmrm0 rw"] and s["DevicePolicy"] == ["closed"]
    # The server's SNI proxy binds the public ports (443): it inherits the server's set.
    wanted_caps = "CAP_NET_ADMIN CAP_NET_BIND_SERVICE" if role == "server" else "CAP_NET_ADMIN"
    assert s["CapabilityBoundingSet"] == [wanted_caps]
    # wireguard-go (and the SNI proxy) must outlive a restart of the daemon.
    assert s["KillMode"] == ["process"]
    # SIGHUP reloads the config with no teardown (tests/test_faults.py checks the daemon side).
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]

