"""Run inside the lab's browser namespace: N real registrations (fresh WireGuard keys, the
domain's token, sptun.proto.exchange), all started at once, at most INFLIGHT in flight.

    python bench/regclient.py SERVER PORT DOMAIN TOKEN_FILE N INFLIGHT SOURCE[,SOURCE...]

The server allows 16 connections per source address (and 256 in all), so each worker
thread binds one of the SOURCE addresses, at most 16 workers to a source. Prints one JSON
object: per-registration latencies (ms), throughput, and failures by reason.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter

from sptun import proto
from sptun.errors import ProtocolError, SptunError
from sptun.keys import generate_private_key, public_key

_create_connection = socket.create_connection
_source = threading.local()


def _bound_create_connection(address: tuple[str, int], timeout: float | None = None,
                             source_address: tuple[str, int] | None = None) -> socket.socket:
    """proto.exchange's socket.create_connection, from this worker's source address."""
    return _create_connection(address, timeout, source_address or (_source.address, 0))


def main() -> None:
    server, port, domain, token_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    n, inflight, sources = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7].split(",")
    if inflight > 16 * len(sources):
        raise SystemExit(f"{inflight} in flight needs {-(-inflight // 16)} source addresses")
    token = open(token_file).read().strip()
    keys = [generate_private_key() for _ in range(n)]  # made before the clock starts
    jobs = [(k, proto.Request("register", domain, token, public_key(k))) for k in keys]
    socket.create_connection = _bound_create_connection  # type: ignore[assignment]
    lock = threading.Lock()
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    ends: list[float] = []
    workers = min(inflight, n)
    gate = threading.Barrier(workers + 1)

    def worker(i: int) -> None:
        _source.address = sources[i % len(sources)]
        gate.wait()
        while True:
            with lock:
                if not jobs:
                    return
                key, request = jobs.pop()
            started = time.perf_counter()
            try:
                proto.exchange(server, port, request, key, timeout=30)
                ok, reason = True, ""
            except ProtocolError as e:
                ok, reason = False, e.reason
            except SptunError as e:
                ok, reason = False, str(e)[:60]
            took = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(took * 1e3)
                else:
                    failures[reason] += 1
                ends.append(time.perf_counter())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    gate.wait()
    began = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    elapsed = (max(ends) - began) if ends else 0.0
    print(json.dumps({"n": n, "inflight": workers, "sources": len(sources), "ok": len(latencies),
                      "failures": dict(failures), "elapsed_s": round(elapsed, 3),
                      "per_second": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
                      "latencies_ms": [round(x, 2) for x in latencies]}))


if __name__ == "__main__":
    main()
