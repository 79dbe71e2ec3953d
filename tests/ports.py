"""Loopback ports for the servers the tests start."""

from __future__ import annotations

from posttrain.ports import free_port, port_in_use

__all__ = ["free_port", "port_is_free"]


def port_is_free(port: int) -> bool:
    """Whether the port on 127.0.0.1 can be bound again (its server has let it go)."""
    return not port_in_use("127.0.0.1", port)
