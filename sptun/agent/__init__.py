"""The tunnel client (`sptun agent`): registration.py talks to the servers, plan.py plans
the kernel purely, role.py runs the passes, sockets.py asks the kernel about the service."""

from sptun.agent.plan import RULE_PRIORITY, endpoint, interface_name
from sptun.agent.role import Agent
from sptun.agent.sockets import in_flight, listening

__all__ = ["Agent", "RULE_PRIORITY", "endpoint", "in_flight", "interface_name", "listening"]
