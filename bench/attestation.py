"""Attested registrations: the latency a TPM quote and its check add to a registration, and
registrations per second with attestation required.

One real `sptun server run` in a scratch namespace, and software TPMs (swtpm) for the
clients, whose attestation keys are enrolled with it. The server's config is switched
between `[attestation] require = true` and no attestation at all by a reload, in
interleaved rounds, so both kinds of registration meet the same daemon, interface and
lease count. The client always holds a prover: it quotes only when the server asks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from bench.common import (BENCH_DIR, PY, daemon_pid, log, median, note_command, percentile, proc_cpu_with_children,
                          scratch, wait_for)
from bench.control import SCALE_TOML
from sptun.attest import Tpm2Prover
from sptun.keys import ensure_private_dir, write_file_atomic
from sptun.lab import DOMAIN, Arg, Host, sptun

REFERENCE = {0: "00" * 32, 16: "00" * 32}  # a fresh swtpm: nothing measured


def attestation_bench(prefix: str, rounds: int, per_round: int, rate_n: int, tpms: int = 4) -> dict[str, Any]:
    with scratch(prefix) as host:
        home = host.dir
        host.run(["ip", "addr", "add", "198.51.100.10/32", "dev", "lo"])
        ensure_private_dir(home / "state")
        ensure_private_dir(home / "tokens")
        write_file_atomic(home / "tokens" / DOMAIN, "bench-token-" + "y" * 32 + "\n")
        provers = [_tpm(host, i) for i in range(tpms)]
        enrolled = home / "enrolled"
        enrolled.mkdir()
        for i, (state, _) in enumerate(provers):
            shutil.copy(state / "attestation-key.pem", enrolled / f"client{i}.pem")
        pcrs = ", ".join(f'{i} = "{v}"' for i, v in REFERENCE.items())
        plain = SCALE_TOML.format(home=home, domain=DOMAIN) + "max_clients = 100000\n"
        attested = plain + f'\n[attestation]\nrequire = true\nenrolled = "{enrolled}"\npcrs = {{ {pcrs} }}\n'
        conf = home / "server.toml"
        conf.write_text(plain)
        argv = sptun("server", "run", "-c", str(conf))
        note_command("attested registrations (in a scratch namespace)", argv)
        host.spawn(argv, log=home / "sptun.log")
        wait_for("the registration api", lambda: "registration api on port" in _log(host), 60)
        pid = daemon_pid(host)

        def switch(text: str) -> None:
            reloads = _log(host).count("reloaded the config")
            conf.write_text(text)
            os.kill(pid, signal.SIGHUP)
            wait_for("the reload", lambda: _log(host).count("reloaded the config") > reloads, 30)

        def clients(n: int, inflight: int, tpm_count: int) -> dict[str, Any]:
            specs = ",".join(f"{state}:{tcti}" for state, tcti in provers[:tpm_count])
            cmd: list[Arg] = [PY, BENCH_DIR / "attestclient.py", "127.0.0.1", "51821", DOMAIN, home / "tokens" / DOMAIN,
                              str(n), str(inflight), specs]
            note_command("attested registrations (in a scratch namespace)", cmd)
            out: dict[str, Any] = json.loads(host.run(cmd, timeout=600))
            return out

        by_mode: dict[str, list[float]] = {"plain": [], "attested": []}
        per_round_p50: list[dict[str, float]] = []
        failures: dict[str, dict[str, int]] = {"plain": {}, "attested": {}}
        for r in range(rounds):  # one after the other, alternating which goes first
            medians = {}
            for mode in (("plain", "attested") if r % 2 == 0 else ("attested", "plain")):
                switch(attested if mode == "attested" else plain)
                out = clients(per_round, 1, 1)
                by_mode[mode] += out["latencies_ms"]
                medians[mode] = median(out["latencies_ms"])
                for k, v in out["failures"].items():
                    failures[mode][k] = failures[mode].get(k, 0) + v
            per_round_p50.append(medians)
        rate: dict[str, dict[str, Any]] = {}
        for mode in ("plain", "attested"):
            switch(attested if mode == "attested" else plain)
            before = proc_cpu_with_children(pid)
            out = clients(rate_n, 16, tpms)
            after = proc_cpu_with_children(pid)
            # The server's own CPU (tpm2_checkquote included): what bounds its rate, where each
            # client quotes on its own TPM rather than on these cores.
            cpu_ms = 1e3 * (after - before) / max(1, len(out["latencies_ms"])) if before is not None and after is not None else None
            rate[mode] = {"per_second": out["per_second"], "p50_ms": median(out["latencies_ms"]),
                          "p99_ms": percentile(out["latencies_ms"], 99), "failures": out["failures"], "n": rate_n,
                          "server_cpu_ms": cpu_ms}
        status = json.loads(host.run(sptun("status", "--json", "-c", str(conf)), timeout=60))
    result: dict[str, Any] = {
        "rounds": rounds, "per_round": per_round, "tpms": tpms,
        "p50_ms": {m: median(v) for m, v in by_mode.items()}, "p99_ms": {m: percentile(v, 99) for m, v in by_mode.items()},
        "added_p50_ms": median(by_mode["attested"]) - median(by_mode["plain"]),
        "added_p99_ms": percentile(by_mode["attested"], 99) - percentile(by_mode["plain"], 99),
        "added_by_round_ms": [round(m["attested"] - m["plain"], 2) for m in per_round_p50],
        "failures": failures, "rate": rate,
        "verified": (status.get("attestation") or {}).get("verified"),
    }
    log(f"attested registration: p50 {result['p50_ms']['attested']:.1f} ms against {result['p50_ms']['plain']:.1f} ms "
        f"(+{result['added_p50_ms']:.1f} ms; p99 +{result['added_p99_ms']:.1f} ms); with attestation required, "
        f"{rate['attested']['per_second']:.0f}/s against {rate['plain']['per_second']:.0f}/s (16 in flight, {tpms} TPMs); "
        f"server CPU per registration {rate['attested']['server_cpu_ms'] or 0:.1f} ms against {rate['plain']['server_cpu_ms'] or 0:.1f} ms")
    return result


def _tpm(host: Host, i: int) -> tuple[Path, str]:
    """A software TPM for client i, with sptun's attestation key in it: (state dir, TCTI)."""
    where = host.dir / f"tpm{i}"
    where.mkdir()
    sock = where / "tpm.sock"
    host.spawn(["swtpm", "socket", "--tpmstate", f"dir={where}", "--tpm2", "--server", f"type=unixio,path={sock}",
                "--ctrl", f"type=unixio,path={sock}.ctrl", "--flags", "not-need-init,startup-clear"],
               log=where / "swtpm.log")
    wait_for(f"swtpm {i}", lambda: Path(f"{sock}.ctrl").exists(), 10)
    Tpm2Prover(where, tcti=f"swtpm:path={sock}").provision()
    return where, f"swtpm:path={sock}"


def _log(host: Host) -> str:
    path = host.dir / "sptun.log"
    return path.read_text(errors="replace") if path.exists() else ""
