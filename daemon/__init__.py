"""The daemon: broker, supervisor, readings forwarder and systemd notification."""

from pvhub.daemon.broker import Broker, default_readings_address
from pvhub.daemon.routing import Router
from pvhub.daemon.supervisor import Supervisor

__all__ = ["Broker", "Router", "Supervisor", "default_readings_address"]
