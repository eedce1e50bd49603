"""The `sptun` command. Errors are one line starting `sptun:` with a hint; exit 1 for a
runtime failure, 2 for bad usage or configuration."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any, NoReturn

from sptun import __version__
from sptun.config import AGENT_CONFIG, SERVER_CONFIG, Config, ServerConfig, load, load_agent, load_server, parse_duration
from sptun.errors import SptunError, UsageError
from sptun.snapshot import to_json

log = logging.getLogger("sptun")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint="see `sptun --help`")


def setup_logging(verbose: bool) -> None:
    # Under systemd the journal stamps each line itself.
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _need_root(what: str, hint: str = "run it with sudo (it changes interfaces, routes and nftables)") -> None:
    if os.geteuid() != 0:
        raise SptunError(f"{what} needs root", hint=hint)


def make_role(cfg: Config, read_only: bool = False) -> Any:
    """The role of this config. read_only: for `status`, which writes nothing."""
    if isinstance(cfg, ServerConfig):
        from sptun.server import Server

        return Server(cfg, read_only=read_only)
    from sptun.agent import Agent

    return Agent(cfg, read_only=read_only)


def _one_shot(coroutine: Any) -> Any:
    import asyncio  # here: asyncio is slow to import, and only the one-shot commands need it

    return asyncio.run(coroutine)


def _print_changes(changes: list[str]) -> None:
    for change in changes:
        print(f"[#] {change}")


def cmd_run(args: argparse.Namespace) -> int:
    _need_root(f"sptun {args.role} run")
    path = Path(args.config) if args.config else (SERVER_CONFIG if args.role == "server" else AGENT_CONFIG)
    cfg = load_server(path) if args.role == "server" else load_agent(path)
    if _ask_daemon(cfg, "status", timeout=5) is not None:
        raise SptunError(f"an sptun {args.role} already runs with state dir {cfg.state_dir}", hint="stop it first")
    role = make_role(cfg)
    if isinstance(cfg, ServerConfig):
        role.check_overlay()  # before the event loop: pyroute2's sync calls run their own
    import asyncio  # here: `status` and `up` need no event loop, and asyncio is slow to import

    asyncio.run(role.serve())
    return 0


def _ask_daemon(cfg: Config, cmd: str, timeout: float = 120, arg: str | None = None) -> dict[str, Any] | None:
    """The running daemon's answer to cmd, or None if no daemon runs for this config."""
    from sptun.control import control_request

    reply = control_request(cfg.state_dir, cmd, timeout, arg)
    if reply is not None and not reply["ok"]:
        raise SptunError(reply["error"])
    return reply


def cmd_up(args: argparse.Namespace) -> int:
    _need_root("sptun up")
    cfg = load(Path(args.config) if args.config else None)
    reply = _ask_daemon(cfg, "up")
    if reply is not None:
        _print_changes(reply.get("changes", []))
        _check_serving(reply["status"])
        return 0
    role = make_role(cfg)
    if isinstance(cfg, ServerConfig):
        role.check_overlay()
    role.preflight()

    async def up() -> dict[str, Any]:
        _print_changes(await role.up_once())
        return to_json(await role.status())

    _check_serving(_one_shot(up()))
    if isinstance(cfg, ServerConfig):
        log.warning("no sptun server daemon runs here: forwarding is up, but new clients can register "
                    "only while `sptun server run` (or its service) runs")
    return 0


def _check_serving(status: dict[str, Any]) -> None:
    if status["role"] == "agent":
        tunnels = [t for t in status["tunnels"] if t["registered"] and t["up"]]
        if not status["listening"]:
            raise SptunError(f"nothing listens on {', '.join(status['ports'])} here, so the agent does not register",
                             hint="start the web server first")
        if not tunnels:
            errors = "; ".join(f"{t['server']}: {t['error']}" for t in status["tunnels"] if t["error"])
            raise SptunError(f"no tunnel is up{': ' + errors if errors else ''}")
        for t in status["tunnels"]:
            if t["error"]:
                log.warning("tunnel to %s: %s", t["server"], t["error"])
    elif not status["up"]:
        raise SptunError(f"interface {status['interface']} is not up")


def cmd_down(args: argparse.Namespace) -> int:
    _need_root("sptun down")
    cfg = load(Path(args.config) if args.config else None)
    dns = getattr(cfg, "dns", None)  # a server with [dns] waits one TTL between withdrawals
    reply = _ask_daemon(cfg, "down", timeout=120 + (dns.ttl if dns else 0))
    if reply is not None:
        _print_changes(reply.get("changes", []))
        return 0
    role = make_role(cfg)
    role.set_down(True)
    _print_changes(_one_shot(role.go_down()))
    return 0


def _status_without_daemon(cfg: Config) -> dict[str, Any]:
    """Read from the kernel and the state files only: creates nothing, not even a key."""
    return to_json(_one_shot(make_role(cfg, read_only=True).status()))


def cmd_status(args: argparse.Namespace) -> int:
    _need_root("sptun status")
    cfg = load(Path(args.config) if args.config else None)
    if args.watch:
        from sptun.status import watch

        def read() -> dict[str, Any]:
            reply = _ask_daemon(cfg, "status", timeout=30)
            return reply["status"] if reply is not None else _status_without_daemon(cfg)

        try:
            watch(read, args.interval)
        except KeyboardInterrupt:
            pass
        return 0
    reply = _ask_daemon(cfg, "status", timeout=30)
    status = reply["status"] if reply is not None else _status_without_daemon(cfg)
    status["daemon"] = reply is not None
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        from sptun.status import render

        render(status)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _need_root("sptun export", hint="run it with sudo (it reads the WireGuard device, and with --private the key)")
    cfg = load(Path(args.config) if args.config else None)
    from sptun.export import export

    sys.stdout.write(export(cfg, args.interface, private=args.private))
    return 0


def cmd_token_new(args: argparse.Namespace) -> int:
    from sptun.keys import ensure_private_dir
    from sptun.tokens import rotate

    if args.grace is not None and not args.force:
        raise UsageError("--grace goes with --force", hint="sptun token new DOMAIN --force --grace 1h")
    grace = parse_duration(args.grace, "--grace") if args.grace is not None else 0.0
    cfg = load_server(Path(args.config) if args.config else SERVER_CONFIG)
    domain = cfg.domain(args.domain.lower().rstrip("."))
    if domain is None:
        known = ", ".join(d.name for d in cfg.domains) or "none"
        raise UsageError(f"{args.domain} is not a domain of {cfg.path} (it has: {known})",
                         hint="add a [[domains]] table for it first")
    if domain.token_file.exists() and not args.force:
        raise SptunError(f"{domain.token_file} already exists",
                         hint="pass --force to rotate it (with --grace D, its clients have D to get the new one)")
    ensure_private_dir(domain.token_file.parent)
    rotating = domain.token_file.exists()
    token = rotate(domain.token_file, grace)
    print(token)
    if rotating:
        when = f"after {args.grace}" if grace else "now"
        print(f"sptun: clients that joined {domain.name} with the old token are evicted {when}; "
              "give the new one to those that stay", file=sys.stderr)
    return 0


def _through_daemon(cfg: Config, cmd: str, arg: str, direct: Callable[[], list[str]]) -> int:
    """Ask the running daemon to do it (it holds the state), or do it here if none runs."""
    reply = _ask_daemon(cfg, cmd, arg=arg)
    _print_changes(reply.get("changes", []) if reply is not None else direct())
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    _need_root("sptun evict")
    cfg = load_server(Path(args.config) if args.config else SERVER_CONFIG)
    return _through_daemon(cfg, "evict", args.public_key, lambda: make_role(cfg).evict(args.public_key))


def cmd_forget(args: argparse.Namespace) -> int:
    _need_root("sptun forget")
    cfg = load_agent(Path(args.config) if args.config else AGENT_CONFIG)
    from sptun.agent.registration import KnownServers

    return _through_daemon(cfg, "forget", args.server_ip, lambda: KnownServers.of(cfg.state_dir).forget(args.server_ip))


def cmd_keygen(args: argparse.Namespace) -> int:
    from sptun.keys import generate_private_key

    print(generate_private_key())
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    _need_root("sptun lab")
    from sptun import lab

    return lab.main(args.action, args.prefix, attest=args.attest)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sptun", description="Publish web servers without a public IP through WireGuard tunnel servers.")
    p.add_argument("--version", action="version", version=f"sptun {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command and netlink call")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def config_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("-c", "--config", help=f"config file (default: {SERVER_CONFIG} or {AGENT_CONFIG})")

    for role in ("server", "agent"):
        q = sub.add_parser(role, help=f"the {role} daemon")
        rsub = q.add_subparsers(dest="action", required=True, parser_class=_Parser)
        r = rsub.add_parser("run", help="run in the foreground (systemd's ExecStart)")
        config_arg(r)
        r.set_defaults(func=cmd_run, role=role)

    q = sub.add_parser("up", help="one reconcile of this host's role; exit 0 once it is serving")
    config_arg(q)
    q.set_defaults(func=cmd_up)
    q = sub.add_parser("down", help="remove everything sptun made here, and stay down until `sptun up`")
    config_arg(q)
    q.set_defaults(func=cmd_down)
    q = sub.add_parser("status", help="show tunnels, backends and health")
    config_arg(q)
    q.add_argument("--json", action="store_true", help="one JSON object")
    q.add_argument("--watch", action="store_true", help="refresh the table in place until Ctrl-C")
    q.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    q.set_defaults(func=cmd_status)

    q = sub.add_parser("token", help="join tokens")
    tsub = q.add_subparsers(dest="action", required=True, parser_class=_Parser)
    t = tsub.add_parser("new", help="create a domain's token file (0600) and print the token")
    t.add_argument("domain")
    t.add_argument("--force", action="store_true", help="rotate an existing token")
    t.add_argument("--grace", metavar="DURATION", help="with --force: the old token's clients may stay this long (30m, 1h, 7d)")
    config_arg(t)
    t.set_defaults(func=cmd_token_new)

    q = sub.add_parser("evict", help="server: remove one client now (peer, lease, rotation) until the token is rotated")
    q.add_argument("public_key")
    config_arg(q)
    q.set_defaults(func=cmd_evict)
    q = sub.add_parser("forget", help="agent: accept a server's new key (no pk= pinned in DNS)")
    q.add_argument("server_ip")
    config_arg(q)
    q.set_defaults(func=cmd_forget)

    q = sub.add_parser("export", help="print a live interface as a wg-quick config")
    q.add_argument("interface", nargs="?", help="the interface (an agent with several tunnels needs it)")
    config_arg(q)
    q.add_argument("--private", action="store_true", help="include the private key (left out by default)")
    q.set_defaults(func=cmd_export)

    q = sub.add_parser("keygen", help="print a new WireGuard private key (base64)")
    q.set_defaults(func=cmd_keygen)

    q = sub.add_parser("lab", help="the single-machine lab in network namespaces")
    q.add_argument("action", choices=["up", "demo", "down"])
    q.add_argument("--prefix", default="sptlab", help="name prefix of the lab's namespaces (default: sptlab)")
    q.add_argument("--attest", action="store_true",
                   help="give each host a software TPM (swtpm) and require attested joins both ways")
    q.set_defaults(func=cmd_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        setup_logging(args.verbose)
        return int(args.func(args))
    except SptunError as e:
        print(f"sptun: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: still one line, with the traceback under -v
        log.debug("traceback", exc_info=True)
        print(f"sptun: unexpected {type(e).__name__}: {e} (hint: this is a bug; -v shows the traceback)", file=sys.stderr)
        return 1
