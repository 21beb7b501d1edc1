"""What the engine at the endpoint is: Docker or Podman, rootless or not, its runtimes and cgroups.

The endpoint (:mod:`kernelexec.backend.docker.endpoint`) says where the Engine API is; this says who answers there,
as the engine says of itself. Podman's Docker-compatible service names itself in ``GET /version``'s
``Components`` ("Podman Engine"); whether it runs rootless is in its own API's ``/libpod/info``
(``host.security.rootless``), which the compatible ``/info`` does not carry. Docker says rootless
with ``name=rootless`` among ``SecurityOptions``. ``doctor``, ``ps``, ``audit`` and the backend's
engine-specific adjustments (:mod:`kernelexec.backend.docker.engines`) all read this one answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["EngineKind", "classify"]

Kind = Literal["Docker", "Podman"]


@dataclass(frozen=True)
class EngineKind:
    kind: Kind
    version: str
    api_version: str
    rootless: bool
    #: "1" or "2"
    cgroup_version: str
    #: "cgroupfs" or "systemd"
    cgroup_manager: str
    default_runtime: str
    runtimes: tuple[str, ...]
    #: ``name=userns`` (Docker's userns-remap) is on
    userns_remap: bool = False

    @property
    def is_podman(self) -> bool:
        return self.kind == "Podman"

    def describe(self) -> str:
        """One line for doctor, ps and audit: ``Podman 4.3.1 (rootless, cgroup v1 cgroupfs)``."""
        mode = "rootless" if self.rootless else ("userns-remap" if self.userns_remap else "rootful")
        return f"{self.kind} {self.version} ({mode}, cgroup v{self.cgroup_version} {self.cgroup_manager})"


def classify(version: Mapping[str, Any], info: Mapping[str, Any], libpod_info: Mapping[str, Any] | None = None
             ) -> EngineKind:
    """The engine from its ``/version``, ``/info`` and (Podman) ``/libpod/info`` answers."""
    names = " ".join(str(c.get("Name", "")) for c in version.get("Components") or [] if isinstance(c, Mapping))
    platform = str((version.get("Platform") or {}).get("Name", "")) if isinstance(version.get("Platform"),
                                                                                  Mapping) else ""
    podman = "podman" in (names + " " + platform).lower()
    options = " ".join(str(o) for o in info.get("SecurityOptions") or [])
    rootless = "name=rootless" in options
    host = (libpod_info or {}).get("host") if podman else None
    if isinstance(host, Mapping):
        security = host.get("security")
        if isinstance(security, Mapping) and isinstance(security.get("rootless"), bool):
            rootless = security["rootless"]
    cgroup_version = str(info.get("CgroupVersion") or "").lstrip("v") or "?"
    return EngineKind(
        kind="Podman" if podman else "Docker",
        version=str(version.get("Version", "?")),
        api_version=str(version.get("ApiVersion", "?")),
        rootless=rootless,
        cgroup_version=cgroup_version,
        cgroup_manager=str(info.get("CgroupDriver") or "?"),
        default_runtime=str(info.get("DefaultRuntime") or "?"),
        runtimes=tuple(sorted((info.get("Runtimes") or {}).keys())),
        userns_remap="name=userns" in options,
    )
