"""Backends: where a kernel runs and how its Jupyter channels are carried (see :mod:`.base`).

The session asks this module for a :class:`~.base.Sandbox` and never names an engine or a
transport. Today there is one engine API (Docker's, which Docker Desktop and Podman's
compatible service also speak) and two transports:

* ``ipc``: ZeroMQ unix sockets in a host directory bind-mounted into the container. Fastest;
  needs the engine on this host and a runtime that shares unix sockets with it (runc).
* ``attach``: the channels over the container's own attach stream, through a relay that is
  the container's pid 1. Nothing of the host is mounted; works with remote engines (TCP+TLS,
  contexts) and with gVisor.

``Policy.transport="auto"`` picks ipc where it works and attach everywhere else;
:func:`choose_transport` says which and why (``doctor`` and ``ps`` show it).

A session takes its sandboxes from a :class:`~.base.Backend` (``AsyncSession(backend=...)``);
:class:`DockerBackend` is the default. :class:`.local.LocalBackend` runs kernels as plain host
processes, with no isolation: a test double and a development backend, never chosen automatically.
"""

from __future__ import annotations

from .base import Backend, ByteStream, Channels, ChannelsClosed, EgressHandler, Sandbox
from .docker import DockerBackend, choose_transport

__all__ = ["Backend", "ByteStream", "Channels", "ChannelsClosed", "DockerBackend", "EgressHandler", "Sandbox",
           "choose_transport", "default_backend"]


def default_backend() -> Backend:
    """The backend of a session that names none: the Docker engine's."""
    return DockerBackend()
