"""`sptun status` as rich tables (the --json form is the status dict itself)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f}m ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.0f} TiB"


def _health(ok: bool, ok6: bool | None = None) -> str:
    """A backend's health; with an IPv6 twin whose checks disagree, each family's."""
    if ok6 is None or ok6 == ok:
        return "[green]healthy[/]" if ok else "[red]unhealthy[/]"
    return f"IPv4 {_health(ok)}, IPv6 {_health(ok6)}"


def _why(reason: str, ok6: bool | None, reason6: str | None) -> str:
    return reason if ok6 is None or reason6 in (None, reason) else f"{reason}; IPv6: {reason6}"


def _daemon(status: dict[str, Any]) -> str:
    p = status.get("process")
    if not p:
        return "no daemon runs (status read from the kernel)"
    return f"daemon pid {p['pid']}, up {p['uptime']:.0f} s, rss {_bytes(p['rss_bytes'])}, cpu {p['cpu_seconds']} s"


def view(status: dict[str, Any]) -> Group:
    """The status as rich renderables, per role."""
    state = "[red]down (sptun up brings it back)[/]" if status.get("down") else "[green]up[/]"
    parts: list[Any] = []
    if status["role"] == "agent":
        parts.append(f"agent for [bold]{status['domain']}[/] ({status['wireguard']} WireGuard): {state}; "
                     f"service {'listening' if status.get('listening') else '[red]not listening[/]'} on "
                     f"{', '.join(status['ports'])}")
        if status["dns"].get("error"):  # without tunnels, it is why the agent does not serve
            alarm = "[bold red]not serving: " if not status["tunnels"] else "[yellow]"
            parts.append(f"{alarm}DNS: {escape(status['dns']['error'])}[/]")
        if status.get("attestation_key"):
            parts.append(f"attestation key {status['attestation_key']}")
        checks_servers = any(t.get("server_attested") is not None for t in status["tunnels"])
        table = Table("server", "interface", "overlay address", "handshake", "rx", "tx", "registered", "health",
                      *(["server attested"] if checks_servers else []))
        for t in status["tunnels"]:
            table.add_row(t["server"], t["interface"], _both(t["overlay_ip"], t.get("overlay_ip6")), _age(t["handshake_age"]),
                          _bytes(t["rx_bytes"]), _bytes(t["tx_bytes"]), "yes" if t["registered"] else
                          f"[red]no[/] {escape(t.get('error') or '')}", _health(t["healthy"]),
                          *([_attested(t.get("server_attested"), t.get("server_attestation"))] if checks_servers else []))
    else:
        parts.append(f"server [bold]{status['interface']}[/] {_both(status['overlay_ip'], status.get('overlay_ip6'))} "
                     f"({status['wireguard']} WireGuard, "
                     f"udp/{status['listen_port']}, api tcp/{status['api_port']}): {state}")
        if pub := status.get("publication"):
            parts.append(f"DNS {pub['zone']}: " + (f"[red]{pub['error']}[/]" if pub["error"] else
                                                   "published" if pub["published"] else "not published yet")
                         + "".join(f"; {d}'s addresses withdrawn (no healthy client)" for d in pub["withdrawn"]))
        if att := status.get("attestation"):
            parts.append(f"attestation ({escape(att['verify'])}, {'required' if att['require'] else 'not required'}): "
                         f"{att['verified']} verified, {att['refused']} refused, {att['admitted']} admitted unverified"
                         + "".join(f"\n  [red]refused[/] {r['public_key']} ({r['domain']}): {escape(r['reason'])}"
                                   for r in att["refusals"][-3:]))
        attests = bool(status.get("attestation"))
        table = Table("domain", "listen", "forwarded", "backend", "health", "why", "handshake", "rx", "tx", "active",
                      *(["attested"] if attests else []))
        for d in status["domains"]:
            listen = f"{','.join(d['listen'])} {','.join(d['ports'])}"
            connections = str(sum(f["connections"] for f in d.get("forwards", [])))
            if not d["backends"]:
                table.add_row(d["name"], listen, connections, "[yellow]no clients[/]", *[""] * (6 + attests))
            for i, b in enumerate(d["backends"]):
                first = i == 0
                table.add_row(d["name"] if first else "", listen if first else "", connections if first else "",
                              _both(b["overlay_ip"], b.get("overlay_ip6")), _health(b["healthy"], b.get("healthy6")),
                              _why(b.get("reason", ""), b.get("healthy6"), b.get("reason6")), _age(b["handshake_age"]),
                              _bytes(b["rx_bytes"]), _bytes(b["tx_bytes"]), str(b["active_connections"]) if b.get("active_connections") is not None else "?",
                              *([_attested(b.get("attested"), b.get("attestation"))] if attests else []))
    parts += [table, _daemon(status)]
    return Group(*parts)


def _attested(ok: bool | None, detail: str | None) -> str:
    if ok is None:
        return "not checked yet"
    return "[green]yes[/]" if ok else f"[red]no[/]: {escape(detail or '')}"


def _both(ip: str | None, ip6: str | None) -> str:
    """An overlay address, and its IPv6 twin on a dual-stack tunnel."""
    return f"{ip or '-'} {ip6}" if ip6 else ip or "-"


def _console() -> Console:
    # Piped output is still read by people: do not squeeze it into 80 columns.
    return Console(width=None if Console().is_terminal else 160)


def render(status: dict[str, Any], console: Console | None = None) -> None:
    (console or _console()).print(view(status))


def watch(read: Callable[[], dict[str, Any]], interval: float, rounds: int | None = None) -> None:
    """Refresh the status in place until Ctrl-C (or `rounds` refreshes, for tests). Into a
    pipe or a file, where nothing can be redrawn, each refresh is printed after the last."""
    console = _console()
    if not console.is_terminal:
        n = 0
        while True:
            console.print(view(read()))
            console.file.flush()
            n += 1
            if rounds is not None and n > rounds:
                return
            time.sleep(interval)
    with Live(view(read()), console=console, auto_refresh=False) as live:
        n = 0
        while rounds is None or n < rounds:
            time.sleep(interval)
            live.update(view(read()), refresh=True)
            n += 1
