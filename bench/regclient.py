"""Run inside the lab's browser namespace: N real registrations (fresh WireGuard keys, the
domain's token, sptun.proto.exchange_async, as agents register), all started at once, at most
INFLIGHT in flight.

    python bench/regclient.py SERVER PORT DOMAIN TOKEN_FILE N INFLIGHT SOURCE[,SOURCE...]

The load comes from as many processes as the machine has cores, each an event loop: one
process of 100 threads measured its own GIL as much as the server (100 at once: p50 112-188
ms with threads, 77-114 ms with processes, in runs side by side). The server allows 16 connections per source address (and
256 in all), so each of the INFLIGHT slots binds one of the SOURCE addresses, at most 16 slots
to a source. Prints one JSON object: per-registration latencies (ms), throughput, and failures
by reason.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from typing import Any

from sptun import proto
from sptun.errors import ProtocolError, SptunError
from sptun.keys import generate_private_key, public_key

_open_connection = asyncio.open_connection
_source_of: contextvars.ContextVar[str] = contextvars.ContextVar("source")  # each slot's task has its own


async def _bound_open_connection(host: str, port: int, **kwargs: Any) -> Any:
    """proto.exchange_async's asyncio.open_connection, from this slot's source address."""
    return await _open_connection(host, port, local_addr=(_source_of.get(), 0), **kwargs)


async def _slots(server: str, port: int, jobs: list[tuple[str, proto.Request]], sources: list[str],
                 out: dict[str, Any]) -> None:
    async def slot(source: str) -> None:
        _source_of.set(source)
        while jobs:
            key, request = jobs.pop()
            started = time.monotonic()
            try:
                await proto.exchange_async(server, port, request, key, timeout=30)
                out["latencies_ms"].append((time.monotonic() - started) * 1e3)
            except ProtocolError as e:
                out["failures"][e.reason] += 1
            except SptunError as e:
                out["failures"][str(e)[:60]] += 1
            out["ends"].append(time.monotonic())

    await asyncio.gather(*(slot(s) for s in sources))


def _process(server: str, port: int, jobs: list[tuple[str, proto.Request]], sources: list[str],
             gate: Any, results: Any) -> None:
    asyncio.open_connection = _bound_open_connection  # type: ignore[assignment]
    out: dict[str, Any] = {"latencies_ms": [], "failures": Counter(), "ends": []}
    gate.wait()
    asyncio.run(_slots(server, port, jobs, sources, out))
    results.put(out)


def main() -> None:
    server, port, domain, token_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    n, inflight, sources = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7].split(",")
    if inflight > 16 * len(sources):
        raise SystemExit(f"{inflight} in flight needs {-(-inflight // 16)} source addresses")
    token = open(token_file).read().strip()
    keys = [generate_private_key() for _ in range(n)]  # made before the clock starts
    jobs = [(k, proto.Request("register", domain, token, public_key(k))) for k in keys]
    slots = [sources[i % len(sources)] for i in range(min(inflight, n))]  # at most 16 to a source
    processes = min(len(slots), os.cpu_count() or 1)
    ctx = multiprocessing.get_context("fork")
    gate, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [ctx.Process(target=_process, args=(server, port, jobs[i::processes], slots[i::processes], gate, results))
               for i in range(processes)]
    for w in workers:
        w.start()
    gate.wait()
    began = time.monotonic()
    outs = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    latencies = [x for o in outs for x in o["latencies_ms"]]
    failures: Counter[str] = sum((o["failures"] for o in outs), Counter())
    ends = [x for o in outs for x in o["ends"]]
    elapsed = (max(ends) - began) if ends else 0.0
    print(json.dumps({"n": n, "inflight": len(slots), "sources": len(sources), "processes": processes,
                      "ok": len(latencies), "failures": dict(failures), "elapsed_s": round(elapsed, 3),
                      "per_second": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
                      "latencies_ms": [round(x, 2) for x in latencies]}))


if __name__ == "__main__":
    main()
