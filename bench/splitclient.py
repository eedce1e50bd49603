"""Run inside the browser namespace: N new TLS connections to HOST:PORT, CONCURRENCY at a
time, each reading the lab page (`client=cN remote=...`); prints who answered how often.

    python bench/splitclient.py HOST PORT CA DOMAIN N CONCURRENCY
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    host, port, ca, domain = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    n, concurrency = int(sys.argv[5]), int(sys.argv[6])
    ctx = ssl.create_default_context(cafile=ca)

    def one(_: int) -> str:
        try:
            with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=domain) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n".encode())
                body = b""
                while chunk := s.recv(4096):
                    body += chunk
            return body.decode(errors="replace").rsplit("client=", 1)[1].split()[0]
        except Exception as e:  # counted, not raised: a failure is a result
            return f"failed: {type(e).__name__}"

    with ThreadPoolExecutor(concurrency) as pool:
        counts = Counter(pool.map(one, range(n)))
    print(json.dumps(dict(counts)))


if __name__ == "__main__":
    main()
