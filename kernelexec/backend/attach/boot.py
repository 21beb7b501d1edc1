"""What a sandbox on the attach transport is started with, whatever the engine: the relay's
command and environment, its private directory, and the hello that carries the relay, the framing
and the kernel's files over the stream (Docker's attach, or Kubernetes' when that backend comes).

The relay's directory is a tmpfs at the path the kernel's files have always had
(``/run/kernelexec``; :mod:`kernelexec.kernel.startup` filters tracebacks by it).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ...kernel.contract import (
    CONNECTION_FILE,
    LAUNCH_FILE,
    PORTS,
    STARTUP_FILE,
    connection_file,
    kernel_argv,
    launch_source,
    startup_source,
)
from ...kernel.protocol import MAX_IDENTITIES
from ...policy import EGRESS_PORT, KERNEL_PYTHON, SOCKET_MOUNT, Policy, parse_size, sandbox_env
from .framing import Limits, encode_boot
from .relay import BOOTSTRAP

__all__ = ["RELAY_DIR", "RELAY_DIR_SIZE", "attach_env", "boot_message", "bootstrap_command", "keepalive_interval",
           "limits_for"]

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


def limits_for(policy: Policy) -> Limits:
    return Limits(max_frame_bytes=parse_size(policy.max_message_bytes))


@functools.cache
def _source(name: str) -> str:
    return (Path(__file__).parent / name).read_text()


def boot_message(policy: Policy, key: bytes) -> bytes:
    """The bootstrap hello: the relay, the framing, and what the kernel needs (key included).

    It travels only over the attach connection and lives in the container's tmpfs."""
    conn = connection_file(RELAY_DIR, key)
    files = {CONNECTION_FILE: json.dumps(conn), STARTUP_FILE: startup_source().decode()}
    if policy.fast_kernel:
        files[LAUNCH_FILE] = launch_source().decode()
    config = {
        "dir": RELAY_DIR, "ip": conn["ip"], "ports": {name: port for name, port in PORTS.items()},
        "files": files, "argv": kernel_argv(KERNEL_PYTHON, RELAY_DIR, fast=policy.fast_kernel),
        "limits": limits_for(policy).to_dict(),
        "orphan_timeout": policy.orphan_timeout,
        "egress_port": EGRESS_PORT if policy.egress else 0,
        "delimiter_within": MAX_IDENTITIES + 1,  # where the host's parser looks for <IDS|MSG>
    }
    return encode_boot({"relay": _source("relay.py"), "framing": _source("framing.py"), "zmtp": _source("zmtp.py"),
                        "config": config})


def keepalive_interval(policy: Policy) -> float:
    """Often enough that a few lost or late keepalives never look like a dead host."""
    return min(policy.orphan_timeout / 4, 5.0)
