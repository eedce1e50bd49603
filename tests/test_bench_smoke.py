"""`scripts/bench --smoke` end to end, so that the benchmark harness cannot rot: it must build
its lab, run every benchmark, and write RESULTS.md with every row of the targets table
measured (PASS or MISS: a missed target is a result, not a failure here), the plots and
results.json, and leave no lab behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = ["ip", "nsenter", "unshare", "nft", "knotd", "kdig", "nginx", "openssl", "curl", "wireguard-go"]
missing = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(bool(missing), reason=f"missing tools: {', '.join(missing)}"),
]

PLOTS = ["ratios.png", "dataplane_rps.png", "dataplane_latency.png", "server_cpu.png", "rcvbuf.png", "nft_change.png",
         "registration.png", "crash.png"]


def figures() -> list[tuple[str, str, str]]:
    """The rows a run on this host must measure (not the VM's, nor those with no benchmark yet)."""
    sys.path.insert(0, str(REPO))
    try:
        from bench.report import FIGURES, NOT_BUILT, VM_ONLY
    finally:
        sys.path.remove(str(REPO))
    return [row for row in FIGURES if row[0] not in VM_ONLY | NOT_BUILT]


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_bench_smoke_writes_every_row(tmp_path: Path) -> None:
    proc = subprocess.run([str(REPO / "scripts" / "bench"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "RESULTS.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results.get("errors"), results.get("errors")
    table = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    for _, figure, target in figures():
        row = next((line for line in table.splitlines() if line.startswith(f"| {figure} | ")), None)
        assert row is not None, f"no row for {figure!r} in RESULTS.md"
        assert target.replace("|", "\\|") in row
        assert re.search(r"\| \*\*(PASS|MISS)\*\* \|", row), f"not measured: {row}"
    for section in ("## Machine", "## Data plane: ratios with 95% intervals", "### Throughput, ", "## Data plane", "## wireguard-go's receive buffer", "## Path MTU", "## Control plane",
                    "## Faults", "## Analysis", "## Exact commands"):
        assert section in text
    for name in PLOTS:
        assert (tmp_path / name).stat().st_size > 1000, name
    for prefix in results["lab_prefixes"]:  # its labs are gone
        assert not [ns for ns in namespaces() if ns.startswith(f"{prefix}-")]
        assert not Path("/run/sptun-lab", prefix).exists()


# Every data path (sptun, HAProxy, routed, SNI; UDP; the flowtable), not every load shape: the
# throughput and latency steps drive the same paths, and run in the host tier's smoke.
KERNEL_DATA_PLANE = "ratios,udp,flowtable"


@pytest.mark.skipif(not Path("/sys/module/wireguard").exists(), reason="kernel WireGuard: the VM tier (scripts/test-vm)")
@pytest.mark.vm
def test_the_data_plane_steps_run_on_kernel_wireguard(tmp_path: Path) -> None:
    """What `scripts/bench --vm` runs in the guest, reduced: every path serves on the kernel's
    WireGuard, and the flowtable (which the host's kernel lacks) can be tried there."""
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--only", KERNEL_DATA_PLANE, "--ratio-seconds",
                           "2", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results.get("errors"), results.get("errors")
    ratios = results["ratios_kernel"]
    for mode in ("keep-alive http", "close http"):  # under emulation, TLS may not finish a handshake in 2 s
        for path in ("sptun", "haproxy", "routed"):
            cell = ratios["paths"][mode][path]
            assert cell["rps"] > 0 and cell["errors"] == 0, (mode, path, cell)
    assert results["udp_kernel"]["paths"]["sptun"]["pps"] > 0
    flowtable = results["flowtable_kernel"]
    assert flowtable["available"], flowtable
    assert all(r["gbit_s"] > 0 for r in flowtable["runs"])  # with the flowtable, as without, sptun serves
    for prefix in results["lab_prefixes"]:
        assert not [ns for ns in namespaces() if ns.startswith(f"{prefix}-")]
