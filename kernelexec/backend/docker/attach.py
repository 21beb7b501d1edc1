"""The attach transport on the Docker Engine API: the create body, the attach call, the sandbox.

The container is the policy's container (:func:`.config.container_config`) with the host's socket
directory taken out: nothing of the host is mounted, the relay is pid 1 (no docker-init), stdin
stays open across attaches. What the relay is started with is engine-agnostic
(:mod:`kernelexec.backend.attach.boot`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ...errors import KernelDied, SandboxError
from ...policy import Policy, ScratchDir
from ..attach.boot import (
    RELAY_DIR,
    RELAY_DIR_SIZE,
    attach_env,
    boot_message,
    bootstrap_command,
    keepalive_interval,
    limits_for,
)
from ..attach.channels import AttachChannels
from ..base import Channels, ChannelsClosed
from . import engines
from .api import DockerAPI, api, close_stream
from .config import container_config
from .sandbox import DockerSandbox

__all__ = ["AttachSandbox", "attach", "create_body"]


def create_body(policy: Policy, *, image: str, uid: int, gid: int, work_volume: str,
                labels: Mapping[str, str]) -> dict[str, Any]:
    """``POST /containers/create`` for the attach transport: the policy's body, host mounts removed."""
    if policy.workspace:
        raise SandboxError("Policy.workspace bind-mounts a host directory, and the attach transport mounts "
                           "nothing of the host (the engine may be on another machine); upload() the files instead")
    body = container_config(policy, image=image, command=bootstrap_command(), uid=uid, gid=gid,
                            socket_dir="/nonexistent", work_volume=work_volume, labels=labels)
    host = body["HostConfig"]
    host["Mounts"] = [m for m in host["Mounts"] if m["Type"] != "bind"]
    host["Init"] = False  # the relay is pid 1: it reaps, forwards signals, and is non-dumpable
    relay_dir = ScratchDir(RELAY_DIR, RELAY_DIR_SIZE, private=True)
    host["Tmpfs"] = {**host["Tmpfs"], RELAY_DIR: relay_dir.tmpfs_options(uid, gid)}
    body["Env"] = [f"{k}={v}" for k, v in attach_env(policy).items()]
    body.update(AttachStdin=True, AttachStdout=True, AttachStderr=True, OpenStdin=True, StdinOnce=False, Tty=False)
    return body


async def attach(api: DockerAPI, cid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The container's stdin, stdout and stderr as one upgraded connection."""
    status, _, reader, writer = await api._send(
        "POST", f"/containers/{cid}/attach", {"stream": "1", "stdin": "1", "stdout": "1", "stderr": "1"}, None, "",
        upgrade=True)
    if status not in (101, 200):
        await close_stream(writer)
        raise SandboxError(f"Docker refused to attach to the sandbox's stdin and stdout (HTTP {status})")
    return reader, writer


class AttachSandbox(DockerSandbox):
    """One container on the attach transport: nothing of the host mounted, the relay as pid 1,
    the channels over the engine's own attach stream. Works wherever the Engine API reaches (a
    remote engine over TCP+TLS, Docker Desktop) and under runtimes that cannot share unix
    sockets with the host (gVisor)."""

    transport = "attach"

    async def create(self) -> None:
        labels = self.labels()
        await self._create_container(labels, lambda volume: create_body(
            self.policy, image=self.image, uid=self.uid, gid=self.gid, work_volume=volume, labels=labels))

    async def open(self) -> Channels:
        """Attach, start, bootstrap the relay; returns once the relay has started the kernel."""
        assert self.container_id is not None
        reader, writer = await attach(api(), self.container_id)
        try:
            await self.start()
        except BaseException:
            await close_stream(writer)
            raise
        try:
            channels = await AttachChannels.open(
                reader, writer, boot_message(self.policy, self.conn.key),
                limits_for(self.policy), keepalive=keepalive_interval(self.policy),
                dead_after=self.policy.orphan_timeout, timeout=self.policy.start_timeout, egress=self.egress)
        except ChannelsClosed as e:
            raise await self._start_failed(e.reason, "before it was ready") from e
        self._channels, self._channels_loop = channels, asyncio.get_running_loop()
        return channels

    @property
    def can_reattach(self) -> bool:  # type: ignore[override]
        """Docker resumes a lost attach; Podman does not deliver stdin to a second one
        (:mod:`kernelexec.backend.docker.engines`)."""
        kind = api().known_kind
        return kind is None or engines.can_reattach(kind)

    async def death(self, wait: float = 2.0, cause: str | None = None) -> KernelDied:
        """As every sandbox's, and on an engine that cannot re-attach, says that the state is lost."""
        died = await super().death(wait, cause)
        kind = api().known_kind
        channels = self._channels
        lost_stream = isinstance(channels, AttachChannels) and channels.kernel_exit is None and not died.oom_killed
        if kind is None or engines.can_reattach(kind) or not lost_stream:
            return died
        # the stream went, not the kernel: on Podman the relay then sees its stdin end and ends the sandbox
        return type(died)(f"{engines.reattach_refusal(kind)} (the container: {died.reason})",
                          exit_code=died.exit_code, oom_killed=died.oom_killed)

    async def reattach(self, timeout: float = 10.0) -> int:
        """Continue on a new attach connection; see :meth:`AttachChannels.reattach`."""
        assert self.container_id is not None and isinstance(self._channels, AttachChannels)
        try:
            reader, writer = await attach(api(), self.container_id)
        except SandboxError as e:  # the container is gone, or the engine with it
            raise ChannelsClosed(f"cannot re-attach: {e}") from e
        resync = await self._channels.reattach(reader, writer, timeout=timeout)
        return resync.frames_lost
