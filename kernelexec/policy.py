"""The sandbox policy: every limit and every hardening switch, in one dataclass.

Defaults are the safe choice. A field can be loosened, but only by setting it
explicitly; :meth:`Policy.relaxations` lists what was loosened so that it is
logged at session start and shown by ``kernelexec audit``. Nothing here talks
to an engine: what every backend shares (the sandbox's paths, environment,
scratch directories and rlimits) is here; each backend translates the rest
(:mod:`kernelexec.backend.docker.config` for the Engine API's create body,
:mod:`kernelexec.tools.kubernetes` for a Pod).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .egress.rules import EgressRuleError, parse_egress
from .requirements import check_requirement, flavour_requirements

log = logging.getLogger("kernelexec")

#: uid:gid the kernel runs as when the host process is root. Never 0.
SANDBOX_UID = 10001
SANDBOX_GID = 10001

#: Paths inside the container. Fixed by the kernel image's recipe.
HOME = "/home/sandbox"
WORKDIR = "/work"
SOCKET_MOUNT = "/run/kernelexec"
KERNEL_PYTHON = "/opt/kernel/bin/python"
#: The socket the host holds open for the kernel's orphan watchdog.
OWNER_SOCKET = "owner"
#: The loopback port in the container where the code reaches the egress proxy (only with Policy.egress).
EGRESS_PORT = 3128
#: The socket on the host that the ipc transport carries egress connections to.
EGRESS_SOCKET = "egress"
#: Where ``%pip install`` puts packages: a tmpfs of its own, only with Policy.egress. The one place the
#: code may write and execute (compiled extensions must be mapped executable); gone with the session.
SITE_DIR = "/opt/kernelexec/site"
SITE_PACKAGES = f"{SITE_DIR}/lib/python3.11/site-packages"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: int | str) -> int:
    """``"64m"`` -> 67108864. Sizes are binary, as Docker reads them."""
    if isinstance(value, bool):
        raise TypeError("a size must be an int of bytes or a string like '64m'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"cannot read {value!r} as a size; write bytes or e.g. '512m', '1g'")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


@dataclass(frozen=True)
class Policy:
    """Limits and hardening of one sandbox.

    Every field is documented with why its default is what it is. Sizes take
    bytes or strings like ``"256m"``.
    """

    #: Kernel image. ``None`` means the image built from this version's
    #: ``kernel-image/`` recipe (tagged by content, see ``kernelexec image build``).
    image: str | None = None
    #: Python packages the kernel needs beyond the image's (requirements such as ``"scikit-learn>=1.4"``):
    #: the session runs a derived image of ``image`` with them, built on first use and then reused
    #: (see :mod:`kernelexec.tools.packages`). Empty: the image as it is.
    packages: tuple[str, ...] = ()
    #: A named package set added the same way: ``"analysis"`` (scipy, scikit-learn, seaborn,
    #: statsmodels, openpyxl, pyarrow). ``None``: none.
    image_flavour: str | None = None

    # --- resources -------------------------------------------------------
    #: Memory limit of the whole container (kernel, children and tmpfs
    #: contents). Swap is set equal to it, so there is no swap to hide in.
    memory: int | str = "1g"
    #: CPU cores the container may use (CFS quota). Spinning code is held here.
    cpus: float = 1.0
    #: Processes and threads in the container: stops fork and thread bombs.
    pids: int = 256
    #: Open files per process: stops fd exhaustion from reaching the host.
    nofile: int = 1024
    #: RLIMIT_NPROC. It counts per uid across the host, and every root-hosted
    #: sandbox shares one uid, so it must be generous; ``pids`` is the real bound.
    nproc: int = 4096
    #: Largest file a process may write (RLIMIT_FSIZE); tmpfs sizes bound the total.
    max_file_size: int | str = "1g"
    #: tmpfs sizes. All are mounted noexec,nosuid,nodev and count against ``memory``.
    tmp_size: int | str = "64m"
    home_size: int | str = "64m"
    shm_size: int | str = "64m"
    #: Size of the working directory (a per-session tmpfs volume; files are
    #: uploaded and downloaded there).
    workdir_size: int | str = "256m"

    # --- time --------------------------------------------------------------
    #: Default ``execute()`` timeout in seconds. ``None`` waits forever, which
    #: an agent should never want.
    timeout: float | None = 300.0
    #: Deadline for a container and kernel to come up.
    start_timeout: float = 60.0
    #: How long an interrupt may take before the kernel is replaced.
    interrupt_grace: float = 3.0
    #: A kernel with no host connected for this long ends itself (its owner
    #: crashed); ``kernelexec gc`` or the next start removes the container.
    orphan_timeout: float = 60.0

    # --- output bounds (the kernel is hostile: the host must stay bounded) ---
    #: Total output kept per execution; the rest is dropped with a marker.
    max_output_bytes: int | str = "8m"
    #: Largest single ZeroMQ frame accepted from the kernel. A larger one
    #: means the kernel broke its bounds: the session is closed. The kernel
    #: cuts its own messages to fit (the echo of a huge cell, a 20 MB exception
    #: message), and code larger than this is refused before it is sent.
    max_message_bytes: int | str = "16m"
    #: Output kept in ``Session.history`` (for ``to_notebook``) over all
    #: executions. Past it the oldest executions keep their code digest,
    #: status and count, and their outputs are replaced by a marker: what the
    #: sandboxed code prints must not grow the host for the life of a session.
    max_history_bytes: int | str = "16m"

    # --- isolation -----------------------------------------------------------
    #: Docker network mode. ``"none"`` leaves only the loopback interface:
    #: the kernel is reached over unix sockets, so it needs no network.
    network: str = "none"
    #: Read-only root filesystem: the code cannot change the image.
    read_only: bool = True
    #: ``"uid:gid"`` to run as. ``None``: the host's uid:gid when the host is
    #: not root (sockets need write permission to connect), else 10001:10001.
    #: Root (uid 0) is refused.
    user: str | None = None
    #: Linux capabilities to add back. All are dropped.
    cap_add: tuple[str, ...] = ()
    #: Forbid gaining privileges through setuid files or file capabilities.
    no_new_privileges: bool = True
    #: Environment variables passed in. The host's environment never is.
    env: Mapping[str, str] = field(default_factory=dict)
    #: A host directory to mount at ``/work/host`` (only when asked).
    workspace: str | None = None
    #: Mount the workspace read-only unless told otherwise.
    workspace_read_only: bool = True
    #: Container runtime, e.g. ``"runsc"`` (gVisor). ``None``: the engine's default.
    runtime: str | None = None
    #: seccomp profile: ``"kernelexec"`` (shipped, tighter than Docker's; see
    #: :mod:`kernelexec.seccomp`), ``"docker-default"``, ``"unconfined"``, or a path to a JSON profile.
    seccomp: str = "kernelexec"
    #: AppArmor profile, applied when the host has AppArmor (Docker's ``docker-default`` confines
    #: file and mount access further). ``"unconfined"`` turns it off.
    apparmor: str = "docker-default"
    #: Docker log driver. ``"none"``: code writing to /proc/1/fd/1 cannot
    #: fill the host disk through Docker's unbounded json-file log.
    log_driver: Literal["none", "local"] = "none"
    #: Extra labels for the container (the ``kernelexec.*`` ones are reserved).
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Run ipykernel through :mod:`kernelexec.kernel.launch`: same protocol, a third of the
    #: round trip (no hand-offs to ipykernel's IOPub and shell channel threads, no 0.5 ms sleep
    #: per reply). ``False`` runs the stock ``ipykernel_launcher``, e.g. for a client that needs
    #: kernel subshells (JEP 91), which the fast kernel does not offer.
    fast_kernel: bool = True
    #: How the host reaches the kernel: ``"auto"`` (ipc sockets with a local engine and runc, the
    #: engine's attach stream otherwise: remote engines, gVisor), ``"ipc"`` or ``"attach"``. Both
    #: keep every other setting: no network, nothing of the host mounted but (ipc) the socket directory.
    transport: Literal["auto", "ipc", "attach"] = "auto"

    # --- egress (see kernelexec.egress) ------------------------------------------
    #: What the code may reach through the host-side HTTP(S) proxy; the container still has no network
    #: interface. Empty (the default): nothing, as without egress. Entries: ``"pypi.org"`` (ports 443
    #: and 80), ``"host:port"``, ``"*.example.org"``, an address (``"203.0.113.7:443"``,
    #: ``"[2001:db8::7]:443"``; the only way to reach a loopback, private or metadata address), or a
    #: named set: ``"pypi"``, ``"github"``, ``"huggingface"``. Even an allowlist lets the code send what
    #: it reads to the hosts it names: allow only hosts you trust with the session's data.
    egress: tuple[str, ...] = ()
    #: Bytes through the proxy per session, both directions together: a download (or an upload of
    #: the session's data) past it is cut. A package install is tens of MiB; this bounds the rest.
    egress_max_bytes: int | str = "256m"
    #: Connections open at once through the proxy; more are refused (503) at once rather than queued,
    #: so code that opens hundreds learns it from the first refusal. pip uses a few.
    egress_max_connections: int = 8
    #: New connections per minute (a bucket of this many, refilled at this rate): bounds how fast the
    #: code can probe hosts and how many lines it writes to the audit log.
    egress_rate: int = 60
    #: The tmpfs ``%pip install`` writes to (the one place the code may write and execute), only
    #: mounted with egress; its pages count against the memory limit.
    site_size: int | str = "512m"

    # --- snapshots, pause and resume (see kernelexec.snapshot) ---------------------
    #: Largest snapshot (``snapshot()``, ``pause()``, ``fork()``): the pickled variables, /work and, when
    #: asked for, /tmp and home, together. The kernel stages its pickle in /work, so it needs room there too.
    snapshot_size: int | str = "1g"
    #: Seconds without a call after which the session pauses itself (its state saved in the host's state
    #: directory, its container removed, the memory freed) and resumes on the next call; None: never.
    idle_pause: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.packages, str):
            raise ValueError(f"Policy.packages is a list of requirements, e.g. ({self.packages!r},), not a string")
        object.__setattr__(self, "packages", tuple(self.packages))  # a list (TOML, JSON) is fine too
        for spec in self.packages:
            try:
                check_requirement(spec)
            except ValueError as e:
                raise ValueError(f"Policy.packages: {e}") from None
        try:
            flavour_requirements(self.image_flavour)
        except ValueError as e:
            raise ValueError(f"Policy.image_flavour: {e}") from None
        for name in _SIZE_FIELDS:
            try:
                parse_size(getattr(self, name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"Policy.{name}: {e}") from None
        if parse_size(self.memory) < MIN_MEMORY:
            raise ValueError(f"Policy.memory={self.memory!r} is below {MIN_MEMORY >> 20} MiB, which no kernel "
                             "starts in (an idle kernel uses about 40 MiB); use e.g. '256m'")
        if parse_size(self.max_message_bytes) < MIN_MESSAGE:
            raise ValueError(f"Policy.max_message_bytes={self.max_message_bytes!r} is below "
                             f"{MIN_MESSAGE >> 10} KiB, too small for the kernel's own replies")
        if self.cpus <= 0:
            raise ValueError("cpus must be positive")
        for name in ("pids", "nofile", "nproc"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive limit")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be positive or None")
        if self.start_timeout <= 0 or self.interrupt_grace <= 0 or self.orphan_timeout <= 0:
            raise ValueError("start_timeout and interrupt_grace must be positive")
        if self.user is not None:
            uid, _, gid = self.user.partition(":")
            if not uid.isdigit() or (gid and not gid.isdigit()):
                raise ValueError(f"user must be 'uid:gid' in numbers, got {self.user!r}")
            if int(uid) == 0 or (gid and int(gid) == 0):
                raise ValueError("the sandbox never runs as root (uid or gid 0); pick another user")
        if self.network in ("host",) or self.network.startswith("container:"):
            raise ValueError(f"network={self.network!r} shares a namespace with the host or another "
                             "container; kernelexec does not allow it")
        if any(k.startswith("kernelexec.") for k in self.labels):
            raise ValueError("labels starting with 'kernelexec.' are reserved")
        if self.seccomp not in ("kernelexec", "docker-default", "unconfined") and not self.seccomp.endswith(".json"):
            raise ValueError(
                "seccomp must be 'kernelexec', 'docker-default', 'unconfined' or a path to a .json profile")
        if self.transport not in ("auto", "ipc", "attach"):
            raise ValueError(f"transport must be 'auto', 'ipc' or 'attach', got {self.transport!r}")
        if any(c.upper() == "ALL" for c in self.cap_add):
            raise ValueError("cap_add=ALL would undo the sandbox; name the capabilities you need")
        if not isinstance(self.egress, tuple) and not isinstance(self.egress, str):
            object.__setattr__(self, "egress", tuple(self.egress))  # a list from TOML or JSON
        try:
            parse_egress(self.egress)
        except EgressRuleError as e:
            raise ValueError(f"Policy.egress: {e}") from None
        if self.idle_pause is not None and (isinstance(self.idle_pause, bool) or not self.idle_pause > 0):
            raise ValueError(f"Policy.idle_pause is seconds above 0 (or None: never), got {self.idle_pause!r}")
        for name in ("egress_max_connections", "egress_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Policy.{name} must be a positive whole number, got {value!r}")

    def replace(self, **changes: Any) -> Policy:
        new = dataclasses.replace(self, **changes)
        object.__setattr__(new, "_explicit", self.explicit_fields() | frozenset(changes))
        return new

    def explicit_fields(self) -> frozenset[str]:
        """The fields the caller set (by argument or ``replace``), whatever their value.

        A role profile fills in the rest: ``Session(Policy(memory="256m"), profile="strict")``
        takes strict's every other limit instead of the looser defaults.
        """
        explicit = self.__dict__.get("_explicit")
        if explicit is None:  # made without __init__ (unpickled from an old version): what differs
            d = Policy()
            explicit = frozenset(f.name for f in dataclasses.fields(self)
                                 if getattr(self, f.name) != getattr(d, f.name))
        return frozenset(explicit)

    def relaxations(self, base: Policy | None = None) -> list[str]:
        """What this policy loosens compared with ``base`` (the defaults), in words."""
        d = base or Policy()
        out: list[str] = []
        if self.network != d.network and self.network != "none":
            out.append(f"network={self.network!r}: the code can reach a network")
        if d.read_only and not self.read_only:
            out.append("read_only=False: the code can change the container's filesystem")
        if set(self.cap_add) - set(d.cap_add):
            out.append(f"cap_add={sorted(set(self.cap_add) - set(d.cap_add))}: capabilities given back")
        if d.no_new_privileges and not self.no_new_privileges:
            out.append("no_new_privileges=False: setuid files can raise privileges")
        if self.workspace and (self.workspace != d.workspace
                               or (d.workspace_read_only and not self.workspace_read_only)):
            mode = "read-only" if self.workspace_read_only else "read-write"
            out.append(f"workspace={self.workspace!r} mounted {mode}")
        if self.seccomp != d.seccomp and self.seccomp != "kernelexec":
            out.append(f"seccomp={self.seccomp!r}: not kernelexec's tighter syscall filter")
        if self.apparmor == "unconfined" and d.apparmor != "unconfined":
            out.append("apparmor='unconfined'")
        if self.log_driver != d.log_driver and self.log_driver != "none":
            out.append(f"log_driver={self.log_driver!r}: container output is stored on the host")
        if self.runtime != d.runtime and d.runtime is not None:
            out.append(f"runtime={self.runtime!r} instead of {d.runtime!r}")
        for name in ("timeout", "start_timeout", "interrupt_grace", "orphan_timeout"):
            mine, theirs = getattr(self, name), getattr(d, name)
            if theirs is not None and (mine is None or mine > theirs):
                out.append(f"{name}={mine!r} is above {theirs!r}" if mine is not None
                           else f"{name}=None: no limit")
        for name in _SIZE_FIELDS:
            if parse_size(getattr(self, name)) > parse_size(getattr(d, name)):
                out.append(f"{name}={getattr(self, name)!r} is above {getattr(d, name)!r}")
        wider = parse_egress(self.egress).not_covered_by(parse_egress(d.egress))
        if wider:
            out.append(f"egress={list(self.egress)!r}: the code can reach "
                       f"{', '.join(r.describe() for r in wider)} through the egress proxy")
        for name in ("cpus", "pids", "nofile", "nproc", "egress_max_connections", "egress_rate"):
            if getattr(self, name) > getattr(d, name):
                out.append(f"{name}={getattr(self, name)!r} is above {getattr(d, name)!r}")
        return out

    def __repr__(self) -> str:
        # only what differs from the defaults: a policy is read in logs and error messages
        d = Policy()
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(d, f.name)]
        return f"Policy({', '.join(changed)})"

    def to_json(self) -> str:
        """A stable JSON form, stored as a container label for audits."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        """The policy :meth:`to_json` wrote (lists back to tuples). Raises ValueError for anything else."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a policy's JSON form is an object")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        fields: dict[str, Any] = {k: (tuple(v) if isinstance(defaults.get(k), tuple) and isinstance(v, list) else v)
                  for k, v in data.items()}
        try:
            return cls(**fields)
        except TypeError as e:
            raise ValueError(f"not a policy of this kernelexec: {e}") from None


_SIZE_FIELDS = ("memory", "tmp_size", "home_size", "shm_size", "workdir_size", "max_file_size",
                "max_output_bytes", "max_message_bytes", "max_history_bytes", "egress_max_bytes",
                "site_size", "snapshot_size")
#: Docker refuses less than 6 MiB; a Python kernel needs several times that.
MIN_MEMORY = 6 << 20
MIN_MESSAGE = 64 << 10

_dataclass_init = Policy.__init__


def _recording_init(self: Policy, *args: Any, **kwargs: Any) -> None:
    _dataclass_init(self, *args, **kwargs)
    names = [f.name for f in dataclasses.fields(Policy)]
    object.__setattr__(self, "_explicit", frozenset(names[: len(args)]) | frozenset(kwargs))


Policy.__init__ = _recording_init  # type: ignore[method-assign]


def resolve_user(policy: Policy, host_uid: int, host_gid: int) -> tuple[int, int]:
    """The uid:gid the kernel runs as.

    Unix sockets created by the kernel are mode 0755 and connecting needs
    write permission, so a non-root host must share the kernel's uid. A root
    host can connect to anything, so the kernel gets a fixed unprivileged uid.
    """
    if policy.user is not None:
        uid, _, gid = policy.user.partition(":")
        return int(uid), int(gid or uid)
    if host_uid == 0:
        return SANDBOX_UID, SANDBOX_GID
    return host_uid, host_gid


@dataclass(frozen=True)
class ScratchDir:
    """One memory-backed directory the code may write (a tmpfs on Docker, an ``emptyDir`` of medium
    Memory on Kubernetes). One list for every backend, so that a size cannot differ between them."""

    path: str
    size: int
    #: mode 0700 owned by the sandbox user (home, site); else 1777 with the sticky bit (/tmp)
    private: bool
    #: mapped executable: only the site directory, where ``%pip install`` puts compiled extensions
    executable: bool = False

    def tmpfs_options(self, uid: int, gid: int) -> str:
        """Docker's ``HostConfig.Tmpfs`` options for this directory."""
        flags = "rw,exec,nosuid,nodev" if self.executable else "rw,noexec,nosuid,nodev"
        owner = f",uid={uid},gid={gid},mode=0700" if self.private else ",mode=1777"
        return f"{flags},size={self.size}{owner}"


def scratch_dirs(policy: Policy) -> list[ScratchDir]:
    """The tmpfs directories besides the working directory and /dev/shm (which have their own
    fields and, on Docker, their own mechanisms: a volume and ``ShmSize``)."""
    dirs = [ScratchDir("/tmp", parse_size(policy.tmp_size), private=False),
            ScratchDir(HOME, parse_size(policy.home_size), private=True)]
    if policy.egress:
        dirs.append(ScratchDir(SITE_DIR, parse_size(policy.site_size), private=True, executable=True))
    return dirs


def ulimits(policy: Policy) -> dict[str, int]:
    """Resource limits per process (soft = hard), by Docker's names. Kubernetes has no field for
    them, so a pod sets them itself before the relay starts (:mod:`kernelexec.tools.kubernetes`)."""
    fsize = parse_size(policy.max_file_size)
    return {"nofile": policy.nofile, "nproc": policy.nproc, "fsize": fsize, "core": 0}


def sandbox_env(policy: Policy) -> dict[str, str]:
    """The container's whole environment (the host's is never passed), egress and ``Policy.env`` included."""
    env = {
        "HOME": HOME,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": "C.UTF-8",
        "PATH": "/opt/kernel/bin:/usr/local/bin:/usr/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "JUPYTER_PLATFORM_DIRS": "1",
        "KERNELEXEC_MAX_OUTPUT": str(parse_size(policy.max_output_bytes)),
        "KERNELEXEC_MAX_MESSAGE": str(parse_size(policy.max_message_bytes)),
        "KERNELEXEC_ORPHAN_TIMEOUT": str(policy.orphan_timeout),
        "KERNELEXEC_OWNER_SOCKET": f"{SOCKET_MOUNT}/{OWNER_SOCKET}",
    }
    if policy.egress:
        env.update(egress_env())
    env.update(policy.env)
    return env


def egress_env() -> dict[str, str]:
    """What points the code's HTTP clients and pip at the egress port, and pip at the site directory.

    pip's ``--prefix`` (not ``--target``, which reinstalls every dependency the image already has)
    with the prefix's site-packages on ``PYTHONPATH``: installed packages import at once, and pip
    sees what the image has."""
    proxy = f"http://127.0.0.1:{EGRESS_PORT}"
    return {
        "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
        "NO_PROXY": "", "no_proxy": "",
        "KERNELEXEC_EGRESS_PORT": str(EGRESS_PORT),
        "PYTHONPATH": SITE_PACKAGES,
        "PIP_PREFIX": SITE_DIR,
        "PIP_NO_CACHE_DIR": "1",  # the cache would hold a second copy in the home directory's tmpfs
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PIP_PROGRESS_BAR": "off",
    }
