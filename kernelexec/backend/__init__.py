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

from ..policy import Policy
from .base import Backend, ByteStream, Channels, ChannelsClosed, EgressHandler, Sandbox

__all__ = ["Backend", "ByteStream", "Channels", "ChannelsClosed", "DockerBackend", "EgressHandler", "Sandbox",
           "choose_transport", "default_backend"]

#: Runtimes that cannot use a unix socket bind-mounted from the host (Debian's runsc has no
#: --host-uds): their sessions go over attach.
NO_HOST_SOCKETS = frozenset({"runsc", "kata", "kata-runtime", "io.containerd.kata.v2", "io.containerd.runsc.v1"})


def choose_transport(policy: Policy) -> tuple[str, str]:
    """The transport a session of ``policy`` uses here, and why, in words."""
    from .._loop import run_blocking
    from ..dockerapi import api
    from .engines import forced_transport

    if policy.transport != "auto":
        return policy.transport, "Policy.transport"
    docker = api()
    endpoint = docker.endpoint
    if endpoint.is_local:  # a remote engine is attach whatever it is: no need to ask it here
        # asked once per client: a session's prepare() has asked already, so no engine call here
        forced = forced_transport(docker.known_kind or run_blocking(docker.engine_kind()))
        if forced is not None:
            return forced
    if not endpoint.is_local:
        return "attach", f"the engine is remote ({endpoint.describe()})"
    if policy.runtime in NO_HOST_SOCKETS:
        return "attach", f"the runtime {policy.runtime!r} cannot share unix sockets with the host"
    return "ipc", "a local engine with a runtime that shares unix sockets"


class DockerBackend(Backend):
    """Sandboxes on the Docker engine of this process's environment (``DOCKER_HOST``, contexts), over
    the transport :func:`choose_transport` picks. The default backend."""

    name = "docker"

    def new_sandbox(self, policy: Policy, image: str, key: bytes, session_id: str, *,
                    egress: EgressHandler | None = None) -> Sandbox:
        from ..container import ConnectionInfo, IpcSandbox

        conn = ConnectionInfo(key=key, session_id=session_id)
        transport, _ = choose_transport(policy)
        if transport == "attach":
            from .attach.engine import AttachSandbox

            return AttachSandbox(policy, image, conn, egress=egress)
        return IpcSandbox(policy, image, conn, egress=egress)

    async def image_with(self, image: str, packages: tuple[str, ...], flavour: str | None) -> str:
        """The derived image of ``image`` with the packages, built on first use (a build can take
        minutes: it runs on a worker thread, and concurrent first uses wait for one build)."""
        import asyncio
        import logging

        from ..packages import build_packages

        log = logging.getLogger("kernelexec")
        return await asyncio.to_thread(build_packages, packages, base=image, flavour=flavour,
                                       progress=lambda line: log.info("image: %s", line))

    async def prepare(self) -> None:
        """Before a start: remove what dead owners left, retry cleanups that failed."""
        from ..container import retry_failed_cleanups, startup_gc
        from ..dockerapi import api

        await api().engine_kind()  # what choose_transport() and the create body need to know
        await startup_gc()
        await retry_failed_cleanups()

    def install_exit_hooks(self) -> None:
        """Remove live sandboxes at exit and on SIGTERM/SIGHUP (see :func:`kernelexec.container.install_exit_hooks`)."""
        from ..container import install_exit_hooks as install

        install()


_DOCKER = DockerBackend()


def default_backend() -> Backend:
    """The backend of a session that names none: the Docker engine's."""
    return _DOCKER
