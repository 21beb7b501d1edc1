"""The Engine API side of the attach transport: the create body, the attach call, the hello.

The container is the policy's container (:func:`kernelexec.policy.container_config`) with the
host's socket directory taken out: nothing of the host is mounted, the relay is pid 1 (no
docker-init), stdin stays open across attaches, and the relay's private directory is a tmpfs
at the path the kernel's files have always had (``/run/kernelexec``; ``kernel_side`` filters
tracebacks by it). :class:`AttachSandbox` is the lifecycle the backend seam will wrap; the
session does not use it yet.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...container import (
    LAUNCH_FILE,
    PORTS,
    STARTUP_FILE,
    ConnectionInfo,
    DockerSandbox,
    kernel_launch_source,
    kernel_startup_source,
)
from ...dockerapi import DockerAPI, api, close_stream
from ...errors import KernelDied, SandboxError
from ...policy import (
    EGRESS_PORT,
    KERNEL_PYTHON,
    SOCKET_MOUNT,
    Policy,
    ScratchDir,
    container_config,
    parse_size,
    sandbox_env,
)
from ...protocol import MAX_IDENTITIES
from ...sockdir import CONNECTION_FILE
from .. import engines
from ..base import Channels, ChannelsClosed
from .channels import AttachChannels
from .framing import Limits, encode_boot
from .relay import BOOTSTRAP

__all__ = ["AttachSandbox", "RELAY_DIR", "RELAY_DIR_SIZE", "attach", "attach_env", "boot_message",
           "bootstrap_command", "create_body", "kernel_argv", "limits_for"]

#: The relay's private directory (a tmpfs): the kernel's files and its ipc sockets.
RELAY_DIR = SOCKET_MOUNT
#: Its size: the kernel's few files and sockets.
RELAY_DIR_SIZE = 4 << 20
#: Env the ipc transport's orphan watchdog reads; the relay watches for orphans on this transport.
_IPC_ONLY_ENV = ("KERNELEXEC_OWNER_SOCKET", "KERNELEXEC_ORPHAN_TIMEOUT")


def bootstrap_command(prelude: str = "") -> list[str]:
    """The container's command. ``prelude`` is Python run first, for an orchestrator with no field for
    what the relay needs set before it starts (Kubernetes has none for rlimits)."""
    # -I: no PYTHON* variables, no user site, no working directory on sys.path
    return [KERNEL_PYTHON, "-I", "-c", prelude + BOOTSTRAP]


def attach_env(policy: Policy) -> dict[str, str]:
    """The container's environment on this transport: the policy's, without the ipc watchdog's variables."""
    return {k: v for k, v in sandbox_env(policy).items() if k not in _IPC_ONLY_ENV}


def kernel_argv(policy: Policy) -> list[str]:
    """The kernel's command line, as the ipc transport's ``Sandbox.command()`` builds it."""
    main = [f"{RELAY_DIR}/{LAUNCH_FILE}"] if policy.fast_kernel else ["-m", "ipykernel_launcher"]
    return [KERNEL_PYTHON, *main, "-f", f"{RELAY_DIR}/{CONNECTION_FILE}", "--HistoryManager.hist_file=:memory:",
            "--IPKernelApp.quiet=True", f"--IPKernelApp.exec_files={RELAY_DIR}/{STARTUP_FILE}"]


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


def limits_for(policy: Policy) -> Limits:
    return Limits(max_frame_bytes=parse_size(policy.max_message_bytes))


@functools.cache
def _source(name: str) -> str:
    return (Path(__file__).parent / name).read_text()


def boot_message(policy: Policy, key: bytes, session_id: str) -> bytes:
    """The bootstrap hello: the relay, the framing, and what the kernel needs (key included).

    It travels only over the attach connection and lives in the container's tmpfs."""
    conn = ConnectionInfo(key=key, session_id=session_id).file_contents()
    files = {CONNECTION_FILE: json.dumps(conn), STARTUP_FILE: kernel_startup_source().decode()}
    if policy.fast_kernel:
        files[LAUNCH_FILE] = kernel_launch_source().decode()
    config = {
        "dir": RELAY_DIR, "ip": conn["ip"], "ports": {name: port for name, port in PORTS.items()},
        "files": files, "argv": kernel_argv(policy), "limits": limits_for(policy).to_dict(),
        "orphan_timeout": policy.orphan_timeout,
        "egress_port": EGRESS_PORT if policy.egress else 0,
        "delimiter_within": MAX_IDENTITIES + 1,  # where the host's parser looks for <IDS|MSG>
    }
    return encode_boot({"relay": _source("relay.py"), "framing": _source("framing.py"), "zmtp": _source("zmtp.py"),
                        "config": config})


async def attach(api: DockerAPI, cid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The container's stdin, stdout and stderr as one upgraded connection."""
    status, _, reader, writer = await api._send(
        "POST", f"/containers/{cid}/attach", {"stream": "1", "stdin": "1", "stdout": "1", "stderr": "1"}, None, "",
        upgrade=True)
    if status not in (101, 200):
        await close_stream(writer)
        raise SandboxError(f"Docker refused to attach to the sandbox's stdin and stdout (HTTP {status})")
    return reader, writer


def keepalive_interval(policy: Policy) -> float:
    """Often enough that a few lost or late keepalives never look like a dead host."""
    return min(policy.orphan_timeout / 4, 5.0)


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
                reader, writer, boot_message(self.policy, self.conn.key, self.conn.session_id),
                limits_for(self.policy), keepalive=keepalive_interval(self.policy),
                dead_after=self.policy.orphan_timeout, timeout=self.policy.start_timeout, egress=self.egress)
        except ChannelsClosed as e:
            raise await self._start_failed(e.reason, "before it was ready") from e
        self._channels, self._channels_loop = channels, asyncio.get_running_loop()
        return channels

    @property
    def can_reattach(self) -> bool:  # type: ignore[override]
        """Docker resumes a lost attach; Podman does not deliver stdin to a second one
        (:mod:`kernelexec.backend.engines`)."""
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
