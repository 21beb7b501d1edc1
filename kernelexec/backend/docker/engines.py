"""Engine-specific adjustments, in one place: what differs between Docker and Podman at the seam.

Every sandbox is made from the policy's one create body (:func:`.config.container_config`);
an engine that reads a part of it differently gets that part rewritten here to mean the same thing,
never weakened. What an engine cannot enforce is refused before anything is created, with what to do.

Podman (its Docker-compatible service, ``podman system service``), as measured with Debian's 4.3:

* **Volume size.** Podman takes ``size=`` out of a local volume's ``o`` options as an XFS project
  quota (and fails without one), even for a tmpfs volume. The tmpfs bound is the same number of
  pages given as ``nr_blocks=`` (the kernel's own spelling of a tmpfs size), which Podman passes on.
* **Tmpfs owner.** Podman's tmpfs options have no ``uid=``/``gid=``; ``U`` gives the mount to the
  container's user, the owner the policy names.
* **Seccomp.** Podman reads ``seccomp=`` as a file path on its host (Docker takes the profile
  inline): the profile is written to a private file for the create call, removed after it.
* **Transport.** ipc needs the container's uid to own and reach unix sockets in a host directory;
  under rootless Podman the container's uids are subordinate ids of the user, and the socket
  directory's ownership does not map. Sessions go over attach (nothing of the host mounted).
* **Re-attach.** After a second attach to the same container Podman delivers stdout again but no
  longer stdin, so a resumed stream would wait for the relay forever. A lost attach ends the
  session with a typed :class:`~kernelexec.errors.KernelDied` (state lost: restart), at once.
* **Rootless on cgroup v1.** Rootless Podman cannot use cgroups v1 and ignores memory, CPU and
  pids limits with a warning. Those limits are defaults of every policy, so such an engine is
  refused (rootful Podman, or cgroup v2 with delegation, enforces them).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import SandboxStartError
from ...policy import Policy
from .endpoint import Endpoint
from .kind import EngineKind

__all__ = ["can_reattach", "check_enforceable", "create_body", "forced_transport", "volume_options"]

PAGE_SIZE = 4096


def volume_options(kind: EngineKind, options: dict[str, str]) -> dict[str, str]:
    """The working-directory volume's driver options as this engine reads them (same bound)."""
    if not kind.is_podman or options.get("type") != "tmpfs":
        return options
    parts = []
    for part in options.get("o", "").split(","):
        name, _, value = part.partition("=")
        if name == "size":
            part = f"nr_blocks={-(-int(value) // PAGE_SIZE)}"  # whole pages, rounded up as tmpfs does
        parts.append(part)
    return {**options, "o": ",".join(parts)}


def forced_transport(kind: EngineKind) -> tuple[str, str] | None:
    """The transport this engine needs whatever else holds, and why; ``None`` when any may do."""
    if kind.is_podman:
        return "attach", (f"the engine is {kind.describe()}: Podman's sessions use attach (ipc's host socket "
                          "directory is owned by uids that rootless Podman maps elsewhere, and attach mounts "
                          "nothing of the host)")
    return None


def can_reattach(kind: EngineKind) -> bool:
    """Whether a lost attach connection can be resumed with the kernel's state (Docker: yes)."""
    return not kind.is_podman


def reattach_refusal(kind: EngineKind) -> str:
    return (f"the attach connection to the sandbox was lost, and {kind.kind} cannot resume it (a second "
            "attach gets no stdin): the kernel's state is lost; restart the session")


def check_enforceable(kind: EngineKind, policy: Policy) -> None:
    """Refuse, before anything is made, a policy whose limits this engine would silently drop."""
    if kind.is_podman and kind.rootless and kind.cgroup_version == "1":
        raise SandboxStartError(
            f"the engine is {kind.describe()}: rootless Podman on cgroup v1 ignores memory, CPU and process "
            f"limits (Policy.memory={policy.memory!r}, cpus={policy.cpus}, pids={policy.pids} would not hold). "
            "Use rootful Podman or Docker, or boot the host with cgroup v2 "
            "(systemd.unified_cgroup_hierarchy=1) and delegate the cpu, memory and pids controllers to the user")


@contextlib.contextmanager
def create_body(kind: EngineKind, endpoint: Endpoint, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The create body as this engine reads it, for the duration of the create call.

    Podman reads ``seccomp=`` in ``SecurityOpt`` as a path on the engine's host (Docker takes the
    profile itself), and loads it when the container is created: the profile goes into a file of a
    private directory only for that call. A remote Podman cannot be given a file: refused."""
    if not kind.is_podman:
        yield body
        return
    body = {**body, "HostConfig": {**body["HostConfig"], "Tmpfs": _podman_tmpfs(body)}}
    options = body["HostConfig"].get("SecurityOpt") or []
    inline = [o for o in options if o.startswith("seccomp={")]
    if not inline:
        yield body
        return
    if not endpoint.is_local:
        raise SandboxStartError(
            f"the engine is {kind.describe()} at {endpoint.describe()}: Podman takes a seccomp profile only as a "
            "file on its own host, and kernelexec cannot put one there; run kernelexec on the engine's host")
    directory = Path(tempfile.mkdtemp(prefix="kernelexec-seccomp-"))
    try:
        # the engine may be another user (rootless Podman): it must read the profile (nothing secret)
        directory.chmod(0o755)
        profiles = []
        for i, option in enumerate(inline):
            path = directory / f"profile-{i}.json"
            path.write_text(option.partition("=")[2])
            path.chmod(0o644)
            profiles.append(f"seccomp={path}")
        swapped = iter(profiles)
        host = {**body["HostConfig"], "SecurityOpt": [next(swapped) if o in inline else o for o in options]}
        yield {**body, "HostConfig": host}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _podman_tmpfs(body: dict[str, Any]) -> dict[str, str]:
    """Podman's tmpfs options take no ``uid=``/``gid=``; ``U`` mounts the tmpfs owned by the container's
    user, which is the owner the policy asked for (refused if it was anyone else)."""
    user = str(body.get("User", ""))
    out = {}
    for target, options in (body["HostConfig"].get("Tmpfs") or {}).items():
        parts = options.split(",")
        owner = [p for p in parts if p.startswith(("uid=", "gid="))]
        if owner:
            uid = next((p[4:] for p in owner if p.startswith("uid=")), "")
            gid = next((p[4:] for p in owner if p.startswith("gid=")), "")
            if f"{uid}:{gid}" != user:
                raise SandboxStartError(f"the tmpfs at {target} is to be owned by {uid}:{gid}, not by the "
                                        f"container's user {user}: Podman can only give a tmpfs to the latter")
            parts = [p for p in parts if p not in owner] + ["U"]
        out[target] = ",".join(parts)
    return out
