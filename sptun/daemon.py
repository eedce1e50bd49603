"""What the server and agent daemons share: the reconcile loop, the local control socket
(`sptun up|down|status` talk to it), the lasting `down` flag, and signals."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from sptun import nft
from sptun.changes import Edges, ProcSysctls
from sptun.conntrack import NetlinkConntrack
from sptun.control import CONTROL_MAX
from sptun.errors import SptunError
from sptun.keys import ensure_private_dir, load_or_create_private_key, load_private_key, public_key
from sptun.links import Links
from sptun.snapshot import DaemonStatus, Status, to_json
from sptun.wg import backend

log = logging.getLogger("sptun")

SCRAPE_MAX_AGE = 5.0  # s a status made for a metrics scrape is served again



class Role:
    """One role (server or agent) on this host. Subclasses observe, plan and apply; this
    drives the passes, the control socket and the signals."""

    interval = 1.0  # seconds between passes
    resync_every = 30.0  # a full re-read of the kernel, to repair drift
    nft_in_process = True  # libnftables for writes (see nft.Nft)

    def __init__(self, state_dir: Path, wireguard: str, edges: Edges | None, read_only: bool = False) -> None:
        """read_only: for `status` with no daemon, which must write nothing (not even a key)."""
        self.state_dir = state_dir
        self.private_key = load_private_key(state_dir) if read_only else load_or_create_private_key(state_dir)
        self.public_key = public_key(self.private_key) if self.private_key else None
        if edges is None:
            links = Links()
            edges = Edges(links, backend(wireguard, links), nft.Nft(self.nft_in_process), ProcSysctls(), NetlinkConntrack())
        self.edges = edges
        self.fallback = wireguard == "auto" and edges.wg.kind == "userspace"
        self.daemon = False  # True under `run`: then the loop keeps checking health
        self.lock = asyncio.Lock()  # one writer to the kernel at a time; held by no network I/O
        self.wake = asyncio.Event()
        self.passes = 0
        self.failed_passes = 0
        self.pass_seconds = 0.0  # total time spent reconciling, for the metrics
        self.last_error = ""
        self.loop_: asyncio.AbstractEventLoop | None = None
        self.scrape_lock = threading.Lock()
        self.scraped: tuple[float, Status | None] = (0.0, None)  # the last status made for a scrape

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return None

    def check_config(self) -> None:
        """What the config promises and only the host can tell (token files, ...): a role's
        own checks, ConfigError (exit 2) if one fails."""

    def preflight(self) -> None:
        """What a starting daemon (`serve`) and a one-shot `sptun up` check and say before
        either touches the kernel; `status`, `down` and `export` do not come here."""
        self.check_config()
        self.warn_fallback()

    def warn_fallback(self) -> None:
        if self.fallback:
            log.warning("no wireguard kernel module here; using userspace wireguard-go (slower)")
        if self.edges.wg.kind == "userspace" and (rmem := rmem_default()) is not None and rmem < RMEM_WANTED:
            log.warning("net.core.rmem_default is %d bytes: wireguard-go's UDP sockets drop packets under load "
                        "(scripts/install sets %d in /etc/sysctl.d/60-sptun.conf)", rmem, RMEM_WANTED)

    # --- what a role implements --------------------------------------------------------

    async def prepare(self, wait: bool = False) -> None:
        """The network I/O a pass needs (DNS, registrations), outside the lock. wait: until
        it is all done (a one-shot `sptun up`), not only started."""

    def reconcile(self, undo: list[str] | None = None) -> list[str]:
        """Observe the kernel, plan, apply; return the changes, as readable lines. Runs in a
        thread under the lock. undo: roll back what this pass created if it fails, and put
        what was undone there."""
        raise NotImplementedError

    def teardown(self) -> list[str]:
        """Remove everything this role made here; idempotent."""
        raise NotImplementedError

    def read_status(self) -> Status:
        """The status from this role's state and a read of the kernel (under the lock)."""
        raise NotImplementedError

    def reload_config(self) -> str:
        """Re-read the config file and take it; raise SptunError (keeping the old one) if it
        is bad or changes what needs a restart. Returns what changed, for the log."""
        raise NotImplementedError

    async def status(self) -> Status:
        async with self.lock:
            return await asyncio.to_thread(self.read_status)

    def status_from_thread(self, timeout: float = 30, max_age: float = SCRAPE_MAX_AGE) -> Status:
        """The status for another thread (the metrics endpoint), made on the daemon's loop at
        most once per max_age: a flood of scrapes costs no more nft and conntrack reads than
        one scrape every max_age seconds."""
        if self.loop_ is None:
            raise SptunError("the daemon is not running")
        with self.scrape_lock:  # concurrent scrapes wait for one status, not one each
            made, status = self.scraped
            if status is None or time.monotonic() - made >= max_age:
                status = asyncio.run_coroutine_threadsafe(self.status(), self.loop_).result(timeout)
                self.scraped = (time.monotonic(), status)
            return status

    async def go_down(self) -> list[str]:
        """`sptun down`: drain, then remove everything. The flag is already set."""
        async with self.lock:
            return await asyncio.to_thread(self.teardown)

    async def up_once(self) -> list[str]:
        """A one-shot `sptun up` with no daemon: one pass, undone if it fails halfway."""
        self.set_down(False)
        await self.prepare(wait=True)
        undone: list[str] = []
        try:
            async with self.lock:
                return await asyncio.to_thread(self.reconcile, undone)
        except SptunError as e:
            if undone:
                raise SptunError(f"{e.message}; undid: {'; '.join(undone)}", hint=e.hint) from None
            raise

    async def reload(self) -> None:
        """SIGHUP (systemctl reload): a new config, reconciled, with no teardown."""
        async with self.lock:
            try:
                what = self.reload_config()
            except SptunError as e:
                log.error("reload refused, keeping the running config: %s", e)
                return
        log.info("reloaded the config: %s", what)
        self.wake.set()

    async def on_stop(self) -> None:
        """Called on SIGTERM/SIGINT, before the process exits."""

    async def start_services(self) -> list[asyncio.AbstractServer]:
        return []

    # --- the lasting down flag --------------------------------------------------------

    @property
    def down_flag(self) -> Path:
        return self.state_dir / "down"

    def is_down(self) -> bool:
        return self.down_flag.exists()

    def set_down(self, down: bool) -> None:
        ensure_private_dir(self.state_dir)
        if down:
            self.down_flag.touch(mode=0o600)
        else:
            self.down_flag.unlink(missing_ok=True)

    # --- one pass, as the loop and the control socket run it ---------------------------

    async def run_pass(self, wait: bool = False) -> list[str]:
        """One pass. wait: for its network I/O to finish (registrations), as `up` does."""
        if self.is_down():
            return []
        await self.prepare(wait=wait)
        async with self.lock:
            if self.is_down():
                return []
            self.passes += 1
            started = time.monotonic()
            try:
                changes = await asyncio.to_thread(self.reconcile)
            except SptunError as e:
                self.failed_passes += 1
                self.last_error = str(e)
                raise
            finally:
                self.pass_seconds += time.monotonic() - started
            self.last_error = ""
            for change in changes:
                log.info("%s", change)
            if changes:
                log.debug("pass took %.3f s", time.monotonic() - started)
            return changes

    async def loop(self) -> None:
        ready = False
        while True:
            error = self.last_error
            try:
                await self.run_pass()
                if not ready:  # READY after the first good pass, as Type=notify expects
                    ready = sd_notify("READY=1")
                if error:
                    log.info("reconcile works again")
            except SptunError as e:
                # Once per distinct error, not once a second.
                log.log(logging.ERROR if str(e) != error else logging.DEBUG, "reconcile failed: %s (retrying)", e)
            except Exception:  # a bug must not kill the daemon; log it and go on
                self.failed_passes += 1
                log.exception("reconcile failed unexpectedly (retrying)")
            sd_notify("WATCHDOG=1")  # only a loop that goes round keeps the watchdog quiet
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            self.wake.clear()

    # --- control socket ----------------------------------------------------------------

    @property
    def control_path(self) -> Path:
        return self.state_dir / "control.sock"

    async def handle_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[2]
            if uid != 0:
                reply: dict[str, Any] = {"ok": False, "error": "only root may control sptun"}
            else:
                request = json.loads(await asyncio.wait_for(reader.readline(), 10))
                arg = request.get("arg")
                reply = await self.control(str(request.get("cmd")), arg if isinstance(arg, str) else None)
        except (ValueError, TimeoutError, AttributeError) as e:
            reply = {"ok": False, "error": f"bad control request: {e}"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()
        except (ConnectionError, OSError):
            pass

    async def command(self, cmd: str, arg: str | None) -> dict[str, Any] | None:
        """A role's own control commands (evict, forget); None: not one of them."""
        return None

    async def control(self, cmd: str, arg: str | None = None) -> dict[str, Any]:
        try:
            if cmd == "status":
                return {"ok": True, "status": to_json(await self.status(), self.daemon_status())}
            if cmd == "up":
                self.set_down(False)
                changes = await self.run_pass(wait=True)
                return {"ok": True, "changes": changes, "status": to_json(await self.status())}
            if cmd == "down":
                self.set_down(True)
                return {"ok": True, "changes": await self.go_down()}
            reply = await self.command(cmd, arg)
            if reply is not None:
                return reply
        except SptunError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug: answer it plainly rather than drop the connection
            log.exception("control command %r failed", cmd)
            return {"ok": False, "error": f"the daemon failed on {cmd!r}: {e!r} (see its log)"}
        return {"ok": False, "error": f"unknown control command {cmd!r}"}

    def daemon_status(self) -> DaemonStatus:
        return DaemonStatus(process_info(), self.passes, self.failed_passes, self.last_error or None)

    # --- the daemon --------------------------------------------------------------------

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        self.daemon = True
        self.loop_ = asyncio.get_running_loop()
        self.preflight()
        ensure_private_dir(self.state_dir)
        self.control_path.unlink(missing_ok=True)
        old_umask = os.umask(0o077)  # the control socket is root's only
        try:
            control = await asyncio.start_unix_server(self.handle_control, path=str(self.control_path), limit=CONTROL_MAX)
        finally:
            os.umask(old_umask)
        try:
            services = await self.start_services()
            if self.metrics_address is not None:
                from sptun import metrics

                metrics.serve(self, self.metrics_address)
        except BaseException:
            control.close()
            self.control_path.unlink(missing_ok=True)
            raise
        servers = [control, *services]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        if self.is_down():
            log.warning("this host was taken down with `sptun down`; staying down until `sptun up`")
        task = asyncio.create_task(self.loop())
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")
        sd_notify("STOPPING=1")
        task.cancel()
        for server in servers:
            server.close()
        try:
            await self.on_stop()
        finally:
            self.control_path.unlink(missing_ok=True)


def config_changes(old: Any, new: Any, needs_restart: tuple[str, ...]) -> list[str]:
    """The keys a reloaded config changes; SptunError if one of them needs a restart."""
    changed = [f.name for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(old, f.name)]
    for key in needs_restart:
        if key in changed:
            raise SptunError(f"{key} changed in {old.path}", hint=f"that takes a restart of the {old.role}")
    return changed


RMEM_WANTED = 4 * 2**20  # bytes: systemd/60-sptun.conf


def rmem_default(path: Path = Path("/proc/sys/net/core/rmem_default")) -> int | None:
    """The receive buffer a new socket gets, which Debian 12's wireguard-go keeps."""
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def process_info() -> dict[str, Any]:
    """This daemon's own footprint, for `status`."""
    me = psutil.Process()
    with me.oneshot():
        cpu = me.cpu_times()
        return {"pid": me.pid, "rss_bytes": me.memory_info().rss, "cpu_seconds": round(cpu.user + cpu.system, 2),
                "uptime": round(time.time() - me.create_time(), 1)}


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) READY=1, WATCHDOG=1, STOPPING=1; False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", address, e)
        return False
    return True


