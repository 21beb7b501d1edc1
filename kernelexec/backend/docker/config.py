"""A policy as the Engine API's container create body, and the inverse check on what the engine made.

Both directions side by side, so that a field added to one cannot be forgotten in the other: the
create body is exactly what ``docker inspect`` shows back, which is what the tests and
``kernelexec audit`` (:func:`container_deviations`) check.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...policy import (
    SOCKET_MOUNT,
    WORKDIR,
    Policy,
    parse_size,
    sandbox_env,
    scratch_dirs,
    ulimits,
)

__all__ = ["apparmor_enabled", "container_config", "container_deviations", "seccomp_options", "work_volume_options"]


def container_config(
    policy: Policy,
    *,
    image: str,
    command: list[str],
    uid: int,
    gid: int,
    socket_dir: str,
    work_volume: str,
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """The Engine API body of ``POST /containers/create`` that enforces ``policy``.

    What is sent here is exactly what ``docker inspect`` shows back, which is
    what the tests and ``kernelexec audit`` check.
    """
    mounts: list[dict[str, Any]] = [
        {"Type": "bind", "Source": socket_dir, "Target": SOCKET_MOUNT, "ReadOnly": False,
         "BindOptions": {"Propagation": "rprivate"}},
        {"Type": "volume", "Source": work_volume, "Target": WORKDIR, "ReadOnly": False},
    ]
    if policy.workspace:
        mounts.append({"Type": "bind", "Source": policy.workspace, "Target": f"{WORKDIR}/host",
                       "ReadOnly": policy.workspace_read_only, "BindOptions": {"Propagation": "rprivate"}})
    env = sandbox_env(policy)
    tmpfs = {d.path: d.tmpfs_options(uid, gid) for d in scratch_dirs(policy)}
    memory = parse_size(policy.memory)
    security_opt = ["no-new-privileges:true"] if policy.no_new_privileges else []
    security_opt += seccomp_options(policy)
    if apparmor_enabled():
        security_opt.append(f"apparmor={policy.apparmor}")
    host_config: dict[str, Any] = {
        "NetworkMode": policy.network,
        "ReadonlyRootfs": policy.read_only,
        "CapDrop": ["ALL"],
        "CapAdd": list(policy.cap_add) or None,
        "SecurityOpt": security_opt,
        "Privileged": False,
        "Init": True,
        "IpcMode": "private",
        "CgroupnsMode": "private",
        "Memory": memory,
        "MemorySwap": memory,
        "NanoCpus": int(policy.cpus * 1e9),
        "PidsLimit": policy.pids,
        "Ulimits": [{"Name": name, "Soft": value, "Hard": value} for name, value in ulimits(policy).items()],
        "ShmSize": parse_size(policy.shm_size),
        "Tmpfs": tmpfs,
        "Mounts": mounts,
        "LogConfig": {"Type": policy.log_driver,
                      "Config": {"max-size": "1m", "max-file": "1"} if policy.log_driver == "local" else {}},
        "RestartPolicy": {"Name": "no"},
        "OomScoreAdj": 500,
        "AutoRemove": False,
    }
    if policy.runtime:
        host_config["Runtime"] = policy.runtime
    return {
        "Image": image,
        "Cmd": command,
        "User": f"{uid}:{gid}",
        "WorkingDir": WORKDIR,
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Labels": dict(labels),
        "Hostname": "sandbox",
        "StopSignal": "SIGKILL",
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "OpenStdin": False,
        "Tty": False,
        "HostConfig": host_config,
    }


def seccomp_options(policy: Policy) -> list[str]:
    if policy.seccomp == "kernelexec":
        from ...seccomp import profile_json

        return [f"seccomp={profile_json()}"]
    if policy.seccomp == "docker-default":
        return []
    if policy.seccomp == "unconfined":
        return ["seccomp=unconfined"]
    return [f"seccomp={Path(policy.seccomp).read_text()}"]


def apparmor_enabled() -> bool:
    """Whether the host kernel has AppArmor on (Docker can only apply a profile then)."""
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def work_volume_options(policy: Policy, uid: int, gid: int) -> dict[str, str]:
    """driver_opts of the per-session working-directory volume.

    A tmpfs volume rather than ``--tmpfs``: with a read-only root filesystem
    the archive API (upload/download) cannot write into a plain tmpfs mount,
    but it can into a volume. The size option makes it bounded.
    """
    size = parse_size(policy.workdir_size)
    return {
        "type": "tmpfs",
        "device": "tmpfs",
        "o": f"size={size},uid={uid},gid={gid},mode=0700,noexec,nosuid,nodev",
    }


def container_deviations(info: dict[str, Any], policy: Policy) -> list[str]:
    """Where a running container's real settings differ from what its policy demands."""
    hc, cfg = info["HostConfig"], info["Config"]
    bad = []
    if hc.get("Privileged"):
        bad.append("runs privileged")
    if hc.get("ReadonlyRootfs") is not policy.read_only:
        bad.append(f"ReadonlyRootfs={hc.get('ReadonlyRootfs')}")
    if hc.get("CapDrop") != ["ALL"]:
        bad.append(f"CapDrop={hc.get('CapDrop')}")
    if sorted(hc.get("CapAdd") or []) != sorted(policy.cap_add):
        bad.append(f"CapAdd={hc.get('CapAdd')}")
    sec = hc.get("SecurityOpt") or []
    if policy.no_new_privileges and "no-new-privileges:true" not in sec:
        bad.append("no-new-privileges is off")
    if policy.seccomp == "kernelexec" and not any(s.startswith("seccomp={") for s in sec):
        bad.append("kernelexec's seccomp profile is not applied")
    if any(s in ("seccomp=unconfined", "apparmor=unconfined") for s in sec) and policy.seccomp != "unconfined":
        bad.append(f"SecurityOpt has {sec}")
    if hc.get("NetworkMode") != policy.network:
        bad.append(f"NetworkMode={hc.get('NetworkMode')}")
    memory = parse_size(policy.memory)
    if hc.get("Memory") != memory or hc.get("MemorySwap") != memory:
        bad.append(f"Memory={hc.get('Memory')} MemorySwap={hc.get('MemorySwap')}, policy {memory}")
    if hc.get("PidsLimit") != policy.pids:
        bad.append(f"PidsLimit={hc.get('PidsLimit')}")
    if hc.get("NanoCpus") != int(policy.cpus * 1e9):
        bad.append(f"NanoCpus={hc.get('NanoCpus')}")
    for mode in ("PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        if hc.get(mode) in ("host",):
            bad.append(f"{mode}=host")
    user = str(cfg.get("User") or "")
    if user in ("", "0", "root") or user.startswith(("0:", "root:")):
        bad.append(f"runs as root (User={user!r})")
    if hc.get("LogConfig", {}).get("Type") != policy.log_driver:
        bad.append(f"log driver {hc.get('LogConfig', {}).get('Type')}")
    allowed = {SOCKET_MOUNT, WORKDIR} | ({f"{WORKDIR}/host"} if policy.workspace else set())
    for m in info.get("Mounts") or []:
        if m.get("Destination") not in allowed:
            bad.append(f"unexpected mount {m.get('Source')} -> {m.get('Destination')}")
        if "docker.sock" in str(m.get("Source")):
            bad.append("the Docker socket is mounted")
    if hc.get("Devices"):
        bad.append(f"devices passed in: {hc['Devices']}")
    return bad
