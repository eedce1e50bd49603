"""The benchmark's statistics and report, as pure code: intervals, paired ratios, verdicts
that need the interval to clear the target, merging a VM run, and prose from the figures."""

from __future__ import annotations

import copy
from typing import Any

from bench import ratios, report
from bench.run import merge


def run_row(rnd: int, path: str, keep: str, scheme: str, rps: float, busy: float = 1.0) -> dict[str, Any]:
    requests = int(rps * 3)
    return {"round": rnd, "path": path, "keep": keep, "scheme": scheme, "rps": rps, "requests": requests,
            "errors": 0, "p50_ms": 1.0, "p99_ms": 2.0, "machine_busy_s": busy, "loadgen_s": 0.1}


def test_the_bootstrap_interval_holds_the_median_and_widens_with_spread() -> None:
    tight = [1.50, 1.51, 1.49, 1.50, 1.52, 1.48, 1.50, 1.51]
    wide = [1.1, 1.9, 1.3, 1.7, 1.2, 1.8, 1.5, 1.6]
    lo, hi = ratios.bootstrap_interval(tight)
    assert lo <= 1.50 <= hi and hi - lo <= 0.03
    wlo, whi = ratios.bootstrap_interval(wide)
    assert whi - wlo > 5 * (hi - lo)
    assert ratios.bootstrap_interval(wide) == (wlo, whi)  # seeded: a rerun gives the same interval
    assert ratios.bootstrap_interval([2.0]) == (2.0, 2.0)


def test_ratios_are_paired_within_a_round() -> None:
    # Round 1 is twice as fast for every path (the machine's noise): paired ratios stay 1.5 exactly.
    rows = []
    for rnd, speed in ((0, 1.0), (1, 2.0), (2, 1.0)):
        for keep, scheme in ratios.MODES:
            rows += [run_row(rnd, "sptun", keep, scheme, 1500 * speed, busy=1.0),
                     run_row(rnd, "haproxy", keep, scheme, 1000 * speed, busy=1.0),
                     run_row(rnd, "routed", keep, scheme, 1500 * speed, busy=1.0)]
    summary = ratios.summarize(rows, 3)
    r = summary["ratios"]["keep-alive http"]
    assert r["rps_haproxy"]["rounds"] == [1.5, 1.5, 1.5]
    assert (r["rps_haproxy"]["lo"], r["rps_haproxy"]["hi"]) == (1.5, 1.5)
    assert r["rps_routed"]["median"] == 1.0
    # The same CPU for 1.5 times the requests: two thirds of HAProxy's CPU per request.
    assert abs(r["cpu_haproxy"]["median"] - 2 / 3) < 0.01
    assert "rps_sni_haproxy" not in r  # no SNI runs: no ratio made up


def kernel_results(values: list[float]) -> dict[str, Any]:
    cell = ratios.summarize_ratio(values)
    return {"ratios_kernel": {"rounds": len(values), "ratios": {
        mode: {"rps_haproxy": cell, "cpu_haproxy": ratios.summarize_ratio([0.5] * len(values)),
               "rps_routed": cell} for mode in ("keep-alive http", "close https")}}}


def test_a_target_passes_only_when_its_interval_clears_it() -> None:
    clear = {row.key: row for row in report.rows(kernel_results([1.6, 1.62, 1.58, 1.61, 1.6, 1.59, 1.63, 1.6]))}
    assert clear["kernel_haproxy"].result == "PASS"
    assert clear["kernel_cpu"].result == "PASS"
    # The same median, but the interval reaches below 1.5: a MISS.
    noisy = {row.key: row for row in report.rows(kernel_results([1.2, 1.9, 1.3, 1.6, 1.7, 1.25, 1.65, 1.8]))}
    assert noisy["kernel_haproxy"].result == "MISS"
    assert "[" in noisy["kernel_haproxy"].measured  # the interval is shown


def test_a_vm_run_is_merged_beside_the_hosts_figures() -> None:
    host = {"machine": {"kernel": "host"}, "ratios_wireguard-go": {"x": 1}, "nft": [1], "step_seconds": {"nft": 3},
            "errors": {"ratios": "old failure"}, "commands": {"lab": ["a"]}}
    guest = {"machine": {"kernel": "guest"}, "smoke": False, "ratios_kernel": {"y": 2}, "step_seconds": {"ratios": 9},
             "commands": {"ratios": ["b"]}, "only": ["ratios"], "profile": {}}
    merged = merge(copy.deepcopy(host), guest, "vm_machine")
    assert merged["machine"] == {"kernel": "host"} and merged["vm_machine"] == {"kernel": "guest"}
    assert merged["ratios_wireguard-go"] == {"x": 1} and merged["ratios_kernel"] == {"y": 2}
    assert "errors" not in merged  # the rerun step's old failure is gone
    assert merged["commands"] == {"lab": ["a"], "ratios": ["b"]}
    assert "only" not in merged and merged["vm_smoke"] is False


def test_the_prose_follows_the_figures() -> None:
    base = {"mtu": {"runs": [{"clamp": False, "responses": 3, "bytes": 9, "ms": 1.0, "too_big": {"s1": 4},
                              "retransmits": {}},
                             {"clamp": True, "responses": 3, "bytes": 9, "ms": 1.0, "too_big": {}, "retransmits": {}}],
                    "client_sockets": {"c1": {"mss": 1448, "pmtu": 1500}}}}
    text = report._mtu_md(base)
    assert "an MSS too large for the tunnel" in text and "4 and 0 packets" in text
    base["mtu"]["client_sockets"]["c1"] = {"mss": 1368, "pmtu": 1420}
    assert "the MSS fits the tunnel" in report._mtu_md(base)
    table = report.rows(kernel_results([1.2, 1.9, 1.3, 1.6, 1.7, 1.25, 1.65, 1.8]))
    analysis = report._analysis_md(table)
    missed = next(r for r in table if r.key == "kernel_haproxy")
    assert f"**{missed.figure}**: {missed.measured}" in analysis
    assert "[^baseline]: Hand baseline (2026-11-22" in analysis


def test_the_largest_rotation_measured_is_the_one_judged() -> None:
    fleet = {"kernel": True, "registered_s": 1.0, "configured_s": 2.0, "in_rotation_s": 3.0, "connections": 2000}
    results = {"fleet_wireguard-go": {**fleet, "kernel": False, "n": 100, "counted": 1000, "smallest": 10, "largest": 10},
               "fleet_kernel": {**fleet, "n": 200, "counted": 2000, "smallest": 9, "largest": 11}}
    row = next(r for r in report.rows(results) if r.key == "rotation_200")
    assert row.result == "MISS" and row.measured.startswith("2 (9–11 each of 200 clients")  # uneven by 2: a miss
    results["fleet_kernel"].update(smallest=10, largest=10)
    assert next(r for r in report.rows(results) if r.key == "rotation_200").result == "PASS"
    del results["fleet_kernel"]  # 100 clients, however even, are not 200
    assert next(r for r in report.rows(results) if r.key == "rotation_200").result == "MISS"


def test_a_death_in_a_rotation_of_1000_is_judged_from_its_own_run_before_the_composite() -> None:
    health = [{"mode": "crash", "backends": n, "work_ms_median": ms, "trials": 5} for n, ms in ((3, 1.0), (1000, 41.0))]
    results: dict[str, Any] = {"crash": {"detection_s": 1.2, "failed": 0, "longest_s": 1.0, "requests": 10, "lost_at_cut": 0},
                               "health_scale": health}
    row = next(r for r in report.rows(results) if r.key == "crash_1k")
    assert row.measured == "1.24 s" and "plus the server's extra work" in row.note
    results["fleet_1000"] = {"in_rotation_s": 80.0, "health": "interval = 2\ntimeout = 5",
                             "death": {"backends": 1000, "detection_s": 4.5, "reason": "no answer to 2 probes",
                                       "first_syn_s": 3.3, "after_first_syn_s": 1.2, "syns_per_s": 300.0}}
    row = next(r for r in report.rows(results) if r.key == "crash_1k")
    assert (row.measured, row.result) == ("4.50 s", "MISS")
    assert "1,000 live kernel clients" in row.note and "interval = 2, timeout = 5" in row.note
    assert "out 1.20 s after the first SYN sent to it, which came 3.30 s after its death" in row.note
