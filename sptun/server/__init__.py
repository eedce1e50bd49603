"""The tunnel server (`sptun server`): plan.py plans the kernel purely, role.py runs the
passes, api.py serves registrations, health.py checks the backends, conntrack.py counts
their connections."""

from sptun.conntrack import active_connections
from sptun.server.health import Health
from sptun.server.plan import forwards, peer_of
from sptun.server.role import Server

__all__ = ["Health", "Server", "active_connections", "forwards", "peer_of"]
