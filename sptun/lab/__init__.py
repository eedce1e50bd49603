"""The single-machine lab, the public API that tests, the bench and scripts use.

- ``sptun.lab.net``: the namespace lab itself (hosts, DNS, NAT, web servers, cleanup);
- ``sptun.lab.demo``: sptun servers and agents on top of it (`sptun lab up|demo|down`).

Import from ``sptun.lab`` only. Nothing here reads the environment at import time:
``slow()`` reads SPTUN_LAB_SLOW on every call, and the lab's waits scale by it then.
"""

from __future__ import annotations

from sptun.lab.demo import (
    AGENT_TOML,
    LAB_HOLD_DOWN,
    LAB_OVERLAY,
    LAB_OVERLAY6,
    SERVER_TOML,
    browse,
    config_path,
    main,
    sptun,
    share_by_sni,
    sni_address,
    start_daemons,
    status,
    status_cli,
    wait_served,
    write_configs,
)
from sptun.lab.net import (
    DNS_ADDRESS,
    DOMAIN,
    KNOT_CONF,
    LAB_ROOT,
    NAT_RULESET,
    PUBLIC6,
    NGINX_CONF,
    SNI_DOMAINS,
    ZONE,
    Arg,
    CurlResult,
    Host,
    HostSpec,
    Lab,
    alive,
    destroy,
    lab_namespaces,
    mounts_below,
    ready_timeout,
    server_txt,
    slow,
    topology,
)

__all__ = [
    # the namespace lab (sptun.lab.net)
    "DNS_ADDRESS",
    "SNI_DOMAINS",
    "DOMAIN",
    "KNOT_CONF",
    "LAB_ROOT",
    "NAT_RULESET",
    "PUBLIC6",
    "NGINX_CONF",
    "ZONE",
    "Arg",
    "CurlResult",
    "Host",
    "HostSpec",
    "Lab",
    "alive",
    "destroy",
    "lab_namespaces",
    "mounts_below",
    "ready_timeout",
    "server_txt",
    "slow",
    "topology",
    # sptun on top of it (sptun.lab.demo)
    "AGENT_TOML",
    "LAB_HOLD_DOWN",
    "LAB_OVERLAY",
    "LAB_OVERLAY6",
    "SERVER_TOML",
    "browse",
    "config_path",
    "main",
    "sptun",
    "share_by_sni",
    "sni_address",
    "start_daemons",
    "status",
    "status_cli",
    "wait_served",
    "write_configs",
]
