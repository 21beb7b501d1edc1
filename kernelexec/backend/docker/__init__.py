"""The backend on the Docker Engine API (Docker, Docker Desktop, Podman's compatible service).

Modules: :mod:`.endpoint` (where the engine is, as the docker CLI finds it), :mod:`.api` (the
asyncio Engine API client; every HTTP error mapped once), :mod:`.ssh` (ssh:// engines), :mod:`.kind`
(Docker or Podman, rootless or not), :mod:`.engines` (what differs between them at the seam),
:mod:`.config` (the create body and its inverse), :mod:`.sandbox` (the lifecycle and the ipc
transport), :mod:`.attach` (the attach transport), :mod:`.sessions` (labels, listing, gc).
"""

from __future__ import annotations

from ...policy import Policy
from ..base import Backend, EgressHandler, Sandbox

__all__ = ["NO_HOST_SOCKETS", "DockerBackend", "choose_transport"]

#: Runtimes that cannot use a unix socket bind-mounted from the host (Debian's runsc has no
#: --host-uds): their sessions go over attach.
NO_HOST_SOCKETS = frozenset({"runsc", "kata", "kata-runtime", "io.containerd.kata.v2", "io.containerd.runsc.v1"})


def choose_transport(policy: Policy) -> tuple[str, str]:
    """The transport a session of ``policy`` uses here, and why, in words."""
    from ..._loop import run_blocking
    from .api import api
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
        from .attach import AttachSandbox
        from .sandbox import ConnectionInfo, IpcSandbox

        conn = ConnectionInfo(key=key, session_id=session_id)
        transport, _ = choose_transport(policy)
        kind = AttachSandbox if transport == "attach" else IpcSandbox
        return kind(policy, image, conn, egress=egress)

    async def image_with(self, image: str, packages: tuple[str, ...], flavour: str | None) -> str:
        """The derived image of ``image`` with the packages, built on first use (a build can take
        minutes: it runs on a worker thread, and concurrent first uses wait for one build)."""
        import asyncio
        import logging

        from ...tools.packages import build_packages

        log = logging.getLogger("kernelexec")
        return await asyncio.to_thread(build_packages, packages, base=image, flavour=flavour,
                                       progress=lambda line: log.info("image: %s", line))

    async def prepare(self) -> None:
        """Before a start: remove what dead owners left, retry cleanups that failed."""
        from .api import api
        from .sessions import retry_failed_cleanups, startup_gc

        await api().engine_kind()  # what choose_transport() and the create body need to know
        await startup_gc()
        await retry_failed_cleanups()

    def install_exit_hooks(self) -> None:
        """Remove live sandboxes at exit and on SIGTERM/SIGHUP (:func:`.sandbox.install_exit_hooks`)."""
        from .sandbox import install_exit_hooks as install

        install()
