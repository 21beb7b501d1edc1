"""``kernelexec audit``: is this sandbox as safe as it claims?

Three things are inspected, because a hardened container is only as good as
what surrounds it:

* the effective policy (and the profile file it came from),
* the Docker daemon (who can reach its socket, TCP without TLS, user-namespace
  remapping, rootless mode, live-restore, the runtimes available),
* every running session container, against the policy it was started with.

Each finding has a severity and the fix. High severity makes the command exit
non-zero, so it can gate CI or a deployment.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .._loop import run_blocking
from ..backend.docker.api import api, socket_path
from ..backend.docker.config import apparmor_enabled, container_deviations
from ..backend.docker.sandbox import LABEL, LABEL_POLICY
from ..egress.rules import parse_egress, review
from ..policy import Policy
from ..profiles import profiles_path

Severity = Literal["high", "medium", "low", "info"]
_RANK = {"high": 0, "medium": 1, "low": 2, "info": 3}


@dataclass
class Finding:
    severity: Severity
    area: Literal["policy", "profile", "daemon", "container"]
    check: str
    detail: str
    fix: str


_POLICY_SEVERITY: dict[str, Severity] = {
    "network": "high", "read_only": "high", "cap_add": "high", "no_new_privileges": "high",
    "seccomp": "high", "apparmor": "high", "workspace": "medium", "timeout": "medium",
    "log_driver": "low", "egress": "medium",
}


def audit_policy(policy: Policy, *, name: str = "effective policy") -> list[Finding]:
    out = []
    for r in policy.relaxations():
        field = r.split("=")[0]
        sev = _POLICY_SEVERITY.get(field, "low")
        if field == "seccomp" and "docker-default" in r:
            sev = "medium"
        if field == "workspace" and "read-write" in r:
            sev = "high"
        out.append(Finding(sev, "policy", f"{name}: {field}", r,
                           "egress lets the code send what it reads to the hosts named: list only hosts you "
                           "trust with the session's data" if field == "egress" else
                           f"keep the default for {field}, or confine this role with a stricter profile"))
    for sev, why in review(parse_egress(policy.egress)):
        out.append(Finding(sev, "policy", f"{name}: egress entry", why,
                           "name the exact hosts (and ports) the code needs instead"))
    return out


def audit_profiles(path: Path | None) -> list[Finding]:
    if path is None or not path.exists():
        return [Finding("info", "profile", "profile file", "no profile file; only built-in profiles",
                        "define roles in kernelexec.toml to give each agent only what it needs")]
    out = []
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        out.append(Finding("high", "profile", "profile file permissions",
                           f"{path} is writable by group or others (mode {stat.filemode(st.st_mode)}): "
                           "anyone who can write it can widen every role", f"chmod go-w {path}"))
    from ..profiles import ProfileError, check_profiles

    try:
        good, bad = check_profiles(path)
    except ProfileError as e:
        return out + [Finding("high", "profile", "profile file", str(e), f"fix {path}: it is not read at all")]
    for name, why in bad.items():
        out.append(Finding("high", "profile", f"profile {name!r}", why,
                           f"fix the [profiles.{name}] table in {path}; sessions using it fail to start"))
    for name, pol in good.items():
        out += audit_policy(pol, name=f"profile {name!r}")
    return out


async def _daemon() -> list[Finding]:
    out: list[Finding] = []
    info = await api().call("GET", "/info", what="engine info")
    version = await api().version()
    endpoint = api().endpoint
    if endpoint.is_local:
        out += _socket_permissions(Path(socket_path(endpoint)))
    elif endpoint.scheme == "tcp" and not (endpoint.tls and endpoint.verify and endpoint.cert):
        out.append(Finding("high", "daemon", "engine connection",
                           f"the engine is reached at {endpoint.describe()}: without verified TLS and a client "
                           "certificate, anyone on the path can read or drive it",
                           "serve the engine with --tlsverify and connect with DOCKER_TLS_VERIFY=1 and client "
                           "certificates (or a Docker context that has them)"))
    elif endpoint.scheme == "ssh":
        out.append(Finding("info", "daemon", "engine connection",
                           f"the engine is reached over ssh at {endpoint.describe()}: ssh encrypts and "
                           "authenticates the connection, and whoever can log in there as that user drives the "
                           "engine; its socket permissions and dockerd flags are not visible from here",
                           "audit that host too, and keep the ssh login to a key (ssh-agent), with a known host "
                           "key"))
    else:
        out.append(Finding("info", "daemon", "engine connection",
                           f"the engine is reached at {endpoint.describe()}; its host's socket permissions "
                           "and dockerd flags are not visible from here", "audit that host too"))
    tcp = _dockerd_tcp_without_tls()
    if tcp:
        out.append(Finding("high", "daemon", "TCP without TLS", f"dockerd listens on {', '.join(tcp)} without "
                           "--tlsverify: anyone who reaches that port controls the host",
                           "remove the tcp:// host or add --tlsverify with client certificates"))
    opts = " ".join(info.get("SecurityOptions") or [])
    kind = await api().engine_kind()
    out.append(Finding("info", "daemon", "engine", f"{kind.describe()}, default runtime {kind.default_runtime}",
                       "none"))
    if kind.is_podman and kind.rootless and kind.cgroup_version == "1":
        out.append(Finding("high", "daemon", "resource limits",
                           f"{kind.describe()}: rootless Podman on cgroup v1 drops memory, CPU and pids limits "
                           "(kernelexec refuses to start sessions there)",
                           "use cgroup v2 with the cpu, memory and pids controllers delegated to the user, or "
                           "rootful Podman"))
    if kind.rootless:
        out.append(Finding("info", "daemon", "rootless", f"the engine runs rootless ({kind.kind}): a container "
                           "escape lands as an unprivileged host user", "none"))
    elif "name=userns" in opts:
        out.append(Finding("info", "daemon", "user namespaces", "userns-remap is on: container uids map to "
                           "unprivileged host uids", "none"))
    else:
        out.append(Finding("medium", "daemon", "user namespaces",
                           "no userns-remap and not rootless: a container escape lands as a real host uid "
                           "(kernelexec never runs the kernel as root, which limits this)",
                           "run Podman rootless (`podman system service` as an unprivileged user)" if kind.is_podman
                           else 'set "userns-remap": "default" in /etc/docker/daemon.json, or run rootless Docker'))
    if "name=seccomp" not in opts:
        out.append(Finding("high", "daemon", "seccomp", "the engine has no seccomp support",
                           "use a kernel and engine built with seccomp"))
    if not info.get("LiveRestoreEnabled") and not kind.is_podman:  # Podman has no daemon holding containers
        out.append(Finding("low", "daemon", "live-restore",
                           "live-restore is off: restarting the daemon kills every session",
                           'set "live-restore": true in /etc/docker/daemon.json'))
    if not apparmor_enabled() and "selinux" not in opts:
        out.append(Finding("low", "daemon", "LSM", "neither AppArmor nor SELinux confines containers on this "
                           "host; kernelexec relies on its seccomp profile, capabilities and read-only mounts",
                           "enable AppArmor (Debian/Ubuntu) or SELinux where the host allows"))
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    out.append(Finding("info", "daemon", "runtimes", f"available: {', '.join(runtimes)}; engine "
                       f"{version.get('Version')} (API {version.get('ApiVersion')})",
                       "install gVisor (runsc) for a user-space kernel boundary: Policy(runtime='runsc')"
                       if "runsc" not in runtimes else "none"))
    return out


def _socket_permissions(sock: Path) -> list[Finding]:
    st = sock.stat()
    if st.st_mode & stat.S_IWOTH:
        return [Finding("high", "daemon", "docker socket permissions",
                        f"{sock} is world-writable: any local user is root on this host", f"chmod o-rw {sock}")]
    return [Finding("info", "daemon", "docker socket permissions",
                    f"{sock} mode {stat.filemode(st.st_mode)}, group gid {st.st_gid}: members of that "
                    "group are root-equivalent on this host", "keep the group to administrators")]


def _dockerd_tcp_without_tls() -> list[str]:
    """tcp:// hosts dockerd was started with (command line or daemon.json), when TLS is not verified."""
    hosts: list[str] = []
    tls = False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"dockerd"):
            continue
        args = [a.decode(errors="replace") for a in argv[1:] if a]
        tls = tls or any(a.startswith("--tlsverify") for a in args)
        for i, a in enumerate(args):
            value = a.split("=", 1)[1] if a.startswith(("-H=", "--host=")) else (
                args[i + 1] if a in ("-H", "--host") and i + 1 < len(args) else "")
            if value.startswith("tcp://"):
                hosts.append(value)
    try:
        cfg = json.loads(Path("/etc/docker/daemon.json").read_text())
        hosts += [h for h in cfg.get("hosts", []) if str(h).startswith("tcp://")]
        tls = tls or bool(cfg.get("tlsverify"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        hosts.append(f"(daemon.json unreadable: {e})")
    return [] if tls else hosts


async def _containers() -> list[Finding]:
    out: list[Finding] = []
    for c in await api().containers(LABEL):
        if c.get("State") != "running":
            continue
        info = await api().inspect(c["Id"])
        name = info.get("Name", c["Id"][:12]).lstrip("/")
        try:
            policy = Policy.from_json(info["Config"]["Labels"][LABEL_POLICY])
        except (KeyError, TypeError, ValueError) as e:
            out.append(Finding("high", "container", f"{name}: policy label",
                               f"the container's policy label is missing or unreadable ({e})",
                               "remove it with `kernelexec gc --all`"))
            continue
        for problem in container_deviations(info, policy):
            out.append(Finding("high", "container", name, problem,
                               "the container was changed or started outside kernelexec: close it "
                               "(`kernelexec gc --all`) and start a new session"))
        out += audit_policy(policy, name=name)
    return out


def run_audit(policy: Policy | None = None, profiles_file: str | os.PathLike[str] | None = None,
              *, daemon: bool = True, containers: bool = True) -> list[Finding]:
    """Every finding, most severe first."""
    findings = audit_policy(policy or Policy())
    findings += audit_profiles(profiles_path(profiles_file))

    async def engine() -> list[Finding]:
        return (await _daemon() if daemon else []) + (await _containers() if containers else [])

    findings += run_blocking(engine())
    return sorted(findings, key=lambda f: (_RANK[f.severity], f.area, f.check))


def format_table(findings: list[Finding]) -> str:
    rows = [("SEVERITY", "AREA", "CHECK", "FINDING", "FIX")]
    rows += [(f.severity.upper(), f.area, f.check, f.detail, f.fix) for f in findings]
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((8, 9, 34, 200, 200))]
    lines = []
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) if i < 3 else r[i] for i in range(3)) + "  " + r[3]
                     + ("" if r is rows[0] else f"\n{'':{sum(widths[:3]) + 6}}fix: {r[4]}"))
    return "\n".join(lines)


def to_json(findings: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings], indent=2)
