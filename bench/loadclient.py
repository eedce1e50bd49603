"""Run inside the browser namespace: requests to SERVER:443, a new TLS connection each, one
every ~20 ms, until SECONDS or 20000 requests; prints [[t, ok, client or error], ...].

    python bench/loadclient.py SERVER SECONDS CA DOMAIN
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time


def main() -> None:
    server, seconds, ca, domain = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
    ctx = ssl.create_default_context(cafile=ca)
    start = time.monotonic()
    results: list[list[object]] = []
    while time.monotonic() - start < seconds and len(results) < 20000:
        t = time.monotonic() - start
        try:
            with socket.create_connection((server, 443), timeout=3) as raw, ctx.wrap_socket(raw, server_hostname=domain) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n".encode())
                body = b""
                while chunk := s.recv(4096):
                    body += chunk
            client = body.decode(errors="replace").rsplit("client=", 1)[1].split()[0]
            results.append([round(t, 3), True, client])
        except Exception as e:  # a failed request is a result
            results.append([round(t, 3), False, type(e).__name__ + ": " + str(e)[:80]])
        time.sleep(0.02)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
