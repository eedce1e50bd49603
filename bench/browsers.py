"""Browsers, as a failover sees them: run inside the lab's browser namespace. Standard library only,
but for DNS resolution (below).

Load (the default): N browsers at once, each in a loop: a NEW TCP and TLS connection to
SERVER:443 (SNI = DOMAIN, verified against the CA), one `GET / HTTP/1.1` with `Connection:
close`, the whole reply read, then a short pause. The waits are a browser's: a 10 s connect
timeout (the kernel retransmits the SYN after 1, 3 and 7 s; Linux 6.5+ every second for the
first four, tcp_syn_linear_timeouts) and 15 s for the whole request.
It runs for SECONDS, or until MAX_REQUESTS in all, then prints one JSON object:

    {"started": T0, "requests": [[browser, t_start, duration, ok, client or "kind: error", connect, server], ...],
     "summary": {"requests", "failed", "failed_by_kind", "by_client", "by_server", "longest", "p50", "p99"}}

SERVER may be @NAMESERVER: each browser then resolves DOMAIN's A records there (dnspython,
this file's one import from outside the standard library), keeps the answer for its TTL as a
browser's cache does, and connects to one of them at random. A failed resolution is a
failed request of kind dns.

connect is the seconds the TCP connect took (null if it never connected). t_start
is in seconds after T0, this process's time.monotonic() at the start: the system's
CLOCK_MONOTONIC, so a caller can place its own events on the same scale. An error's kind is
connect-timeout, refused, reset, tls, timeout (after the connect), closed or other. A reply
answers for the client that served it: the lab's pages contain `client=NAME`.

    python bench/browsers.py SERVER --ca CA [--domain D] [--browsers 8] [--seconds 10]
                             [--max-requests 20000] [--pause 0.05] [--until FILE]

--until ends the load early: no browser starts a request once FILE exists.

Stream: one connection that downloads URL_PATH, a response that takes about S seconds to send
(the lab's nginx sends a file under `limit_rate`: see tests/test_failover.py). It prints a
line `{"event": "streaming", "client": NAME, "t": T}` once the first bytes name the client that
serves it, then one JSON object: whether the whole response came (all of Content-Length), the
bytes read, the client, the duration, when the last bytes came (last, seconds after its
start), the longest wait for more bytes (stall), and the error if any. The whole-request timeout is S + 15 s.

    python bench/browsers.py SERVER --ca CA --stream /stream.txt --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

CONNECT_TIMEOUT = 10.0  # a browser's: SYNs at 0, 1, 3 and 7 s (Linux 6.5+: every second at first)
REQUEST_TIMEOUT = 15.0  # the whole request, connect included
CLIENT = re.compile(rb"client=(\S+)")


class Failed(Exception):
    """A failed request: its kind (connect-timeout, refused, reset, tls, timeout, closed, other), and
    the seconds its TCP connect took, None if it never connected."""

    def __init__(self, kind: str, detail: str, connect: float | None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.connect = connect


def classify(e: Exception, connect: float | None) -> Failed:
    if isinstance(e, Failed):
        return e
    detail = f"{type(e).__name__}: {str(e)[:80]}"
    if isinstance(e, TimeoutError):
        return Failed("timeout" if connect is not None else "connect-timeout", detail, connect)
    if isinstance(e, ConnectionRefusedError):
        return Failed("refused", detail, connect)
    if isinstance(e, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return Failed("reset", detail, connect)
    if isinstance(e, ssl.SSLError):
        return Failed("tls", detail, connect)
    return Failed("other", detail, connect)


def send_get(server: str, ctx: ssl.SSLContext, domain: str, path: str, deadline: float) -> tuple[ssl.SSLSocket, float]:
    """A new TCP connection (within the connect timeout), TLS, and `GET path` sent: the socket,
    and the seconds the TCP connect took."""
    started = time.monotonic()
    try:
        raw = socket.create_connection((server, 443), timeout=min(CONNECT_TIMEOUT, deadline - started))
    except Exception as e:
        raise classify(e, None) from None
    connect = time.monotonic() - started
    try:
        raw.settimeout(max(0.01, deadline - time.monotonic()))
        s = ctx.wrap_socket(raw, server_hostname=domain)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n".encode())
        return s, connect
    except Exception as e:
        raw.close()
        raise classify(e, connect) from None


def get(server: str, ctx: ssl.SSLContext, domain: str) -> tuple[str, float]:
    """One request on a new connection: the client that answered, and the seconds the TCP connect took."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    s, connect = send_get(server, ctx, domain, "/", deadline)
    reply = b""
    try:
        with s:
            while chunk := s.recv(65536):
                reply += chunk
                s.settimeout(max(0.01, deadline - time.monotonic()))
    except Exception as e:
        raise classify(e, connect) from None
    if not reply.startswith(b"HTTP/1.1 200") or not (m := CLIENT.search(reply)):
        raise Failed("closed", f"{len(reply)} bytes: {reply[:60]!r}", connect)
    return m.group(1).decode(errors="replace"), connect


def resolver(server: str, domain: str) -> Callable[[], str]:
    """The address of each new connection: SERVER, or one of DOMAIN's A records at @NAMESERVER,
    resolved again once their TTL has passed (one cache per browser)."""
    if not server.startswith("@"):
        return lambda: server
    import dns.exception
    import dns.resolver

    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [server[1:]]
    expires, addresses = 0.0, [""]

    def pick() -> str:
        nonlocal expires, addresses
        if time.monotonic() >= expires:
            try:
                answer = r.resolve(domain, "A", lifetime=5.0)
            except dns.exception.DNSException as e:
                raise Failed("dns", f"{type(e).__name__}: {str(e)[:80]}", None) from None
            expires, addresses = time.monotonic() + (answer.rrset.ttl if answer.rrset else 0), [a.address for a in answer]
        return random.choice(addresses)

    return pick


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values. bench.common.percentile's rule, here
    again because this file runs alone in the lab's namespace, with the standard library only."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def summary(requests: list[list[Any]]) -> dict[str, Any]:
    durations = [r[2] for r in requests]
    failed = [r for r in requests if not r[3]]
    kinds = Counter(r[4].split(":", 1)[0] for r in failed)
    clients = Counter(r[4] for r in requests if r[3])
    servers = Counter(r[6] for r in requests if r[6])
    return {"requests": len(requests), "failed": len(failed), "failed_by_kind": kinds, "by_client": clients,
            "by_server": servers,
            "longest": max(durations, default=0.0), "p50": percentile(durations, 50), "p99": percentile(durations, 99)}


def load(server: str, ctx: ssl.SSLContext, domain: str, browsers: int, seconds: float, max_requests: int,
         pause: float, until: str | None = None) -> dict[str, Any]:
    """until: a file whose appearance ends the load early (no new request starts)."""
    start = time.monotonic()
    requests: list[list[Any]] = []
    lock = threading.Lock()

    def browser(n: int) -> None:
        address = resolver(server, domain)
        while time.monotonic() - start < seconds and not (until and os.path.exists(until)):
            with lock:
                if len(requests) >= max_requests:
                    return
            t = time.monotonic()
            connect: float | None
            to = ""
            try:
                to = address()
                answer, connect = get(to, ctx, domain)
                ok = True
            except Failed as e:
                ok, answer, connect = False, str(e), e.connect
            row = [n, round(t - start, 3), round(time.monotonic() - t, 3), ok, answer,
                   None if connect is None else round(connect, 3), to]
            with lock:
                requests.append(row)
            time.sleep(pause)

    threads = [threading.Thread(target=browser, args=(n,), daemon=True) for n in range(browsers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + REQUEST_TIMEOUT + 5)
    with lock:
        done = sorted(requests, key=lambda r: r[1])
    return {"started": start, "requests": done, "summary": summary(done)}


def stream(server: str, ctx: ssl.SSLContext, domain: str, path: str, seconds: float) -> dict[str, Any]:
    """One long download; completed when every byte of Content-Length came. "stall" is the
    longest wait for the next bytes."""
    start = time.monotonic()
    deadline = start + seconds + REQUEST_TIMEOUT
    head, body, client, length, stall, error = b"", 0, "", -1, 0.0, ""
    connect: float | None = None
    last = start  # when the last bytes came
    try:
        s, connect = send_get(server, ctx, domain, path, deadline)
        with s:
            while chunk := s.recv(65536):
                stall, last = max(stall, time.monotonic() - last), time.monotonic()
                s.settimeout(max(0.01, deadline - last))
                if length < 0:  # still in the headers
                    head += chunk
                    if b"\r\n\r\n" not in head:
                        continue
                    head, chunk = head.split(b"\r\n\r\n", 1)
                    if not head.startswith(b"HTTP/1.1 200") or not (m := re.search(rb"(?i)content-length:\s*(\d+)", head)):
                        raise Failed("closed", f"no 200 with a Content-Length: {head[:80]!r}", connect)
                    length = int(m.group(1))
                body += len(chunk)
                if not client and (m := CLIENT.search(chunk)):
                    client = m.group(1).decode(errors="replace")
                    print(json.dumps({"event": "streaming", "client": client, "t": round(time.monotonic() - start, 3)}),
                          flush=True)
    except Exception as e:
        error = str(classify(e, connect))
    stall = max(stall, time.monotonic() - last)  # the wait for the end, or for bytes that never came
    completed = not error and body == length
    if not error and not completed:
        error = f"closed: {body} of {length} bytes"
    return {"started": start, "completed": completed, "bytes": body, "expected": length, "client": client,
            "duration": round(time.monotonic() - start, 3), "last": round(last - start, 3), "stall": round(stall, 3),
            "error": error}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("server", help="an address, or @NAMESERVER: resolve --domain's A records there")
    p.add_argument("--ca", required=True, help="the CA that signed the clients' certificates")
    p.add_argument("--domain", default="app.example.test")
    p.add_argument("--browsers", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--pause", type=float, default=0.05, help="between one browser's requests")
    p.add_argument("--stream", metavar="URL_PATH", help="one long download instead of the load")
    p.add_argument("--until", metavar="FILE", help="end the load early once FILE exists")
    a = p.parse_args(argv)
    if not 0 < a.seconds <= 600 or not 1 <= a.browsers <= 256 or not 1 <= a.max_requests <= 100000:
        p.error("--seconds must be in (0, 600], --browsers in 1..256, --max-requests in 1..100000")
    ctx = ssl.create_default_context(cafile=a.ca)
    if a.stream:
        out = stream(resolver(a.server, a.domain)(), ctx, a.domain, a.stream, a.seconds)
    else:
        out = load(a.server, ctx, a.domain, a.browsers, a.seconds, a.max_requests, a.pause, a.until)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
