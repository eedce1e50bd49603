"""Run inside the bench's scratch namespace: N real registrations with fresh WireGuard keys,
at most INFLIGHT at once, each presenting a TPM quote (sptun's tpm2 prover) from one of the
given software TPMs in turn, or none ("-").

    python bench/attestclient.py SERVER PORT DOMAIN TOKEN_FILE N INFLIGHT STATE_DIR:TCTI[,...] | -

Prints one JSON object: per-registration latencies (ms), throughput, failures by reason.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

from sptun import proto
from sptun.attest import Tpm2Prover
from sptun.errors import ProtocolError, SptunError
from sptun.keys import generate_private_key, public_key


async def main() -> None:
    server, port, domain, token_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    n, inflight = int(sys.argv[5]), int(sys.argv[6])
    provers = []
    if sys.argv[7] != "-":
        for spec in sys.argv[7].split(","):
            state_dir, tcti = spec.split(":", 1)
            prover = Tpm2Prover(Path(state_dir), tcti=tcti)
            prover.provision()  # made (or found) before the clock starts
            provers.append(prover)
    token = Path(token_file).read_text().strip()
    keys = [generate_private_key() for _ in range(n)]
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    slots = asyncio.Semaphore(inflight)

    async def one(i: int, key: str) -> None:
        attestation = proto.Attestation(provers[i % len(provers)]) if provers else None
        async with slots:
            started = time.perf_counter()
            try:
                await proto.exchange_async(server, port, proto.Request("register", domain, token, public_key(key)), key,
                                           timeout=30, attestation=attestation)
                latencies.append((time.perf_counter() - started) * 1e3)
            except ProtocolError as e:
                failures[e.reason] += 1
            except SptunError as e:
                failures[str(e)[:60]] += 1

    began = time.perf_counter()
    await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
    took = time.perf_counter() - began
    print(json.dumps({"n": n, "inflight": inflight, "tpms": len(provers), "latencies_ms": latencies,
                      "seconds": round(took, 3), "per_second": len(latencies) / took if took else 0.0,
                      "failures": dict(failures)}))


if __name__ == "__main__":
    asyncio.run(main())
