"""`sptun status` as rich tables (the --json form is the status dict itself)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
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


def _health(ok: bool) -> str:
    return "[green]healthy[/]" if ok else "[red]unhealthy[/]"


def _daemon(status: dict[str, Any]) -> str:
    p = status.get("process")
    if not p:
        return "no daemon runs (status read from the kernel)"
    return f"daemon pid {p['pid']}, up {p['uptime']:.0f} s, rss {_bytes(p['rss_bytes'])}, cpu {p['cpu_seconds']} s"


def render(status: dict[str, Any], console: Console | None = None) -> None:
    # Piped output is still read by people: do not squeeze it into 80 columns.
    console = console or Console(width=None if Console().is_terminal else 160)
    state = "[red]down (sptun up brings it back)[/]" if status.get("down") else "[green]up[/]"
    if status["role"] == "agent":
        console.print(f"agent for [bold]{status['domain']}[/] ({status['wireguard']} WireGuard): {state}; "
                      f"service {'listening' if status.get('listening') else '[red]not listening[/]'} on "
                      f"{', '.join(status['ports'])}")
        if status["dns"].get("error"):
            console.print(f"[yellow]DNS: {status['dns']['error']}[/]")
        table = Table("server", "interface", "overlay address", "handshake", "rx", "tx", "registered", "health")
        for t in status["tunnels"]:
            table.add_row(t["server"], t["interface"], t["overlay_ip"] or "-", _age(t["handshake_age"]),
                          _bytes(t["rx_bytes"]), _bytes(t["tx_bytes"]), "yes" if t["registered"] else
                          f"[red]no[/] {t.get('error') or ''}", _health(t["healthy"]))
        console.print(table)
        console.print(_daemon(status))
        return
    console.print(f"server [bold]{status['interface']}[/] {status['overlay_ip']} ({status['wireguard']} WireGuard, "
                  f"udp/{status['listen_port']}, api tcp/{status['api_port']}): {state}")
    table = Table("domain", "listen", "backend", "health", "why", "handshake", "rx", "tx")
    for d in status["domains"]:
        listen = f"{','.join(d['listen'])} {','.join(d['ports'])}"
        if not d["backends"]:
            table.add_row(d["name"], listen, "[yellow]no clients[/]", "", "", "", "", "")
        for i, b in enumerate(d["backends"]):
            table.add_row(d["name"] if i == 0 else "", listen if i == 0 else "", b["overlay_ip"], _health(b["healthy"]),
                          b.get("reason", ""), _age(b["handshake_age"]), _bytes(b["rx_bytes"]), _bytes(b["tx_bytes"]))
    console.print(table)
    console.print(_daemon(status))
