"""A Prometheus endpoint on each daemon (`metrics = "127.0.0.1:9586"`; off by default).

A scrape reads a status snapshot made as `sptun status` makes it (the kernel's WireGuard
and nft counters, and the daemon's own numbers), at most SCRAPE_MAX_AGE old: a flood of
scrapes costs no more than one every few seconds.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from sptun.errors import SptunError
from sptun.snapshot import to_json

log = logging.getLogger("sptun")


class RoleCollector(Collector):
    def __init__(self, role: Any) -> None:
        self.role = role

    def collect(self) -> Iterator[Metric]:
        role = self.role
        try:
            status = to_json(role.status_from_thread())
        except (SptunError, TimeoutError) as e:  # a scrape must not take the daemon down
            log.warning("metrics: cannot read the status: %s", e)
            return
        passes = SummaryMetricFamily("sptun_reconcile_duration_seconds", "Time spent in reconcile passes")
        passes.add_metric([], count_value=role.passes, sum_value=role.pass_seconds)
        yield passes
        failed = CounterMetricFamily("sptun_reconcile_failures", "Reconcile passes that failed")
        failed.add_metric([], role.failed_passes)
        yield failed
        down = GaugeMetricFamily("sptun_down", "1 while this host is taken down with `sptun down`")
        down.add_metric([], 1 if status["down"] else 0)
        yield down
        yield from (self.server(status) if status["role"] == "server" else self.agent(status))

    def server(self, status: dict[str, Any]) -> Iterator[Metric]:
        labels = ["domain", "backend"]
        healthy = GaugeMetricFamily("sptun_backend_healthy", "1 if the backend passes its health checks", labels=labels)
        healthy6 = GaugeMetricFamily("sptun_backend_healthy_ipv6", "1 if the backend's IPv6 twin passes its own health checks",
                                     labels=labels)
        rotation = GaugeMetricFamily("sptun_backend_in_rotation", "1 if new connections go to the backend", labels=labels)
        age = GaugeMetricFamily("sptun_backend_handshake_age_seconds", "Since the backend's last WireGuard handshake",
                                labels=labels)
        rx = CounterMetricFamily("sptun_backend_received_bytes", "Bytes received from the backend", labels=labels)
        tx = CounterMetricFamily("sptun_backend_sent_bytes", "Bytes sent to the backend", labels=labels)
        conns = CounterMetricFamily("sptun_forwarded_connections", "Connections forwarded (nft rule counter, or the SNI proxy's)",
                                    labels=["domain", "listen", "port"])
        fbytes = CounterMetricFamily("sptun_forwarded_first_packet_bytes", "Bytes of the first packets counted by the rule (0 through the SNI proxy)",
                                     labels=["domain", "listen", "port"])
        for d in status["domains"]:
            for b in d["backends"]:
                key = [d["name"], b["overlay_ip"]]
                healthy.add_metric(key, 1 if b["healthy"] else 0)
                if b.get("healthy6") is not None:
                    healthy6.add_metric(key, 1 if b["healthy6"] else 0)
                rotation.add_metric(key, 1 if b["in_rotation"] else 0)
                if b["handshake_age"] is not None:
                    age.add_metric(key, b["handshake_age"])
                rx.add_metric(key, b["rx_bytes"])
                tx.add_metric(key, b["tx_bytes"])
            for f in d.get("forwards", []):
                conns.add_metric([d["name"], f["listen"], f["port"]], f["connections"])
                fbytes.add_metric([d["name"], f["listen"], f["port"]], f["bytes"])
        registrations = CounterMetricFamily("sptun_registrations", "Registration attempts, by result",
                                            labels=["result"])
        registrations.add_metric(["accepted"], status["registrations"]["accepted"])
        for reason, n in sorted(status["registrations"]["rejected"].items()):
            registrations.add_metric([f"rejected:{reason}"], n)
        yield from (healthy, healthy6, rotation, age, rx, tx, conns, fbytes, registrations)

    def agent(self, status: dict[str, Any]) -> Iterator[Metric]:
        up = GaugeMetricFamily("sptun_tunnels_up", "Tunnels registered and healthy")
        up.add_metric([], sum(1 for t in status["tunnels"] if t["healthy"]))
        healthy = GaugeMetricFamily("sptun_tunnel_healthy", "1 if the tunnel is registered with a fresh handshake",
                                    labels=["server"])
        age = GaugeMetricFamily("sptun_tunnel_handshake_age_seconds", "Since the last WireGuard handshake",
                                labels=["server"])
        rx = CounterMetricFamily("sptun_tunnel_received_bytes", "Bytes received through the tunnel", labels=["server"])
        tx = CounterMetricFamily("sptun_tunnel_sent_bytes", "Bytes sent through the tunnel", labels=["server"])
        for t in status["tunnels"]:
            healthy.add_metric([t["server"]], 1 if t["healthy"] else 0)
            if t["handshake_age"] is not None:
                age.add_metric([t["server"]], t["handshake_age"])
            rx.add_metric([t["server"]], t["rx_bytes"])
            tx.add_metric([t["server"]], t["tx_bytes"])
        refreshes = CounterMetricFamily("sptun_dns_refreshes", "DNS TXT lookups")
        refreshes.add_metric([], status["dns"]["refreshes"])
        failures = CounterMetricFamily("sptun_dns_failures", "DNS TXT lookups that failed or had no usable record")
        failures.add_metric([], status["dns"]["failures"])
        yield from (up, healthy, age, rx, tx, refreshes, failures)


def serve(role: Any, address: tuple[str, int]) -> None:
    """Start the endpoint in a thread of its own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RoleCollector(role))
    try:
        start_http_server(address[1], addr=address[0], registry=registry)
    except OSError as e:
        raise SptunError(f"cannot serve metrics on {address[0]}:{address[1]}: {e.strerror or e}",
                         hint="change or remove `metrics` in the config") from None
    log.info("metrics on http://%s:%d/metrics", *address)
    if not ipaddress.ip_address(address[0]).is_loopback:
        log.warning("metrics on %s are open to other hosts: they list client keys and addresses; "
                    "firewall the port, or bind it to 127.0.0.1", address[0])
