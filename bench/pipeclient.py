"""Run inside the browser namespace: N pipelined plain-HTTP requests on one connection from
SOURCE to HOST:PORT (about 27 bytes each way per request: several packets' worth both ways
once N is in the hundreds); prints the bytes read and the milliseconds it took.

    python bench/pipeclient.py HOST PORT N SOURCE
"""

from __future__ import annotations

import json
import socket
import sys
import time


def main() -> None:
    host, port, n, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with socket.create_connection((host, port), timeout=10, source_address=(source, 0)) as s:
        started = time.perf_counter()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * n)
        got = b""
        while got.count(b"HTTP/1.1 200") < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        took = (time.perf_counter() - started) * 1e3
    print(json.dumps({"bytes": len(got), "responses": got.count(b"HTTP/1.1 200"), "ms": round(took, 1)}))


if __name__ == "__main__":
    main()
