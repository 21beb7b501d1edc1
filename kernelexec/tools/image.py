"""Building the kernel image, with a registry or without one.

The recipe is ``kernel-image/``: a Dockerfile and ``requirements.lock``, which
pins every Python package by version and hash. The recipe's content names the
image, ``kernelexec-kernel:<12 hex>``, so a library version always runs the
image written for it, an old image is never mistaken for a new one, and a
build is skipped when the tag is already there.

Two paths build the same recipe:

* **online**: the directory as ``docker build kernel-image/`` sees it: a
  public Python base image and packages from the index (``--require-hashes``).
* **offline**: for hosts that cannot pull images, or whose TLS-intercepting
  proxy the container does not trust: a Debian base made with ``debootstrap``
  and imported into Docker, and a wheelhouse that the *host's* pip downloads
  (with the host's index, proxy and CA settings), installed in a build that
  has no network at all (``--no-index --require-hashes``). Once the base
  image and the wheelhouse exist, rebuilding needs no network.

Everything that waits (subprocesses, Docker calls, the build) has a deadline,
and every failure is an :class:`ImageBuildError` that says what to do next.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from .._loop import LoopThread
from ..backend.docker.api import DockerAPI, DockerAPIError, NotFound, Stalled, api, file_chunks
from ..errors import DockerUnavailable, ImageBuildError
from ..kernel.image import REPO, image_tag, kernel_image_dir, recipe_files
from ..requirements import normalize_name

__all__ = [
    "BASE_TAG",
    "PUBLIC_BASE",
    "REPO",
    "ImageBuildError",
    "build_image",
    "debian_mirror",
    "download_wheelhouse",
    "ensure_base_image",
    "image_present",
    "image_tag",
    "kernel_image_dir",
    "lock_requirements",
    "parse_lock",
    "parse_lock_text",
    "recipe_files",
    "registry_reachable",
    "wheelhouse_dir",
]

Progress = Callable[[str], None]
Mode = Literal["auto", "online", "offline"]

#: The Dockerfile's default base (``ARG BASE_IMAGE``): what ``docker build kernel-image/`` uses.
PUBLIC_BASE = "python:3.11-slim-bookworm"
#: The base made locally by :func:`ensure_base_image` for offline builds.
BASE_TAG = "kernelexec-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: Packages the offline base needs: the Dockerfile makes a venv with the base's python3.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")


# The kernel image runs CPython 3.11 on Debian bookworm (glibc 2.36). pip in the image prefers the most
# specific manylinux tag it supports; giving the host's pip the same tags in the same order makes it pick
# the same wheel file, so the hash in requirements.lock is the one the online build finds on the index.
_GLIBC_MINOR = 36
PLATFORMS: tuple[str, ...] = tuple(
    tag
    for minor in range(_GLIBC_MINOR, 4, -1)
    for tag in (f"manylinux_2_{minor}_x86_64",)
    + {17: ("manylinux2014_x86_64",), 12: ("manylinux2010_x86_64",), 5: ("manylinux1_x86_64",)}.get(minor, ())
)

# Deadlines, in seconds.
_PIP_TIMEOUT = 1200.0
_DEBOOTSTRAP_TIMEOUT = 1200.0
_IMPORT_TIMEOUT = 900.0
_BUILD_TIMEOUT = 2400.0
_BUILD_SILENCE = 900.0  # longest a build may print nothing (pip install or compileall on a slow disk)
_PROBE_TIMEOUT = 15.0  # auto mode: how long to wait for the registry to answer


# --------------------------------------------------------------------------------------------- the recipe


def image_present(client: DockerAPI | None = None, tag: str | None = None) -> bool:
    """Whether the Docker engine has ``tag`` (default: this recipe's tag)."""
    with _engine(client, build=False) as engine:
        return engine(engine.api.image_exists(tag or image_tag()))


T = TypeVar("T")


class _Engine:
    """The Engine API client for blocking code: each call runs on the package's loop thread, held for the
    duration of the work (a build makes hundreds of calls and streams; none gets a loop of its own)."""

    def __init__(self, client: DockerAPI, loop: LoopThread) -> None:
        self.api = client
        self._loop = loop

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    def iterate(self, items: AsyncIterator[T]) -> Generator[T, None, None]:
        return self._loop.iterate(items)

    def image(self, name: str) -> dict[str, Any] | None:
        """The image's inspect data, or None when the engine has no such image."""
        try:
            return self(self.api.image_inspect(name))
        except NotFound:
            return None


@contextlib.contextmanager
def _engine(client: DockerAPI | None, *, build: bool = True) -> Iterator[_Engine]:
    """The engine of ``client`` (default: this process's, :func:`kernelexec.backend.docker.api.api`). For a build
    (``build``), an engine that cannot be reached is an :class:`ImageBuildError`, said before any work.

    ``client`` was a docker SDK client before kernelexec stopped using the SDK: one is still accepted, with a
    DeprecationWarning, when it is connected to this process's engine (the calls go through kernelexec's
    own client); pass a :class:`~kernelexec.backend.docker.api.DockerAPI` (``DockerAPI(endpoint)``) instead.
    """
    sdk = None
    if client is None:
        chosen = api()
    elif isinstance(client, DockerAPI):
        chosen = client
    elif callable(getattr(client, "info", None)) and hasattr(client, "images"):
        warnings.warn("passing a docker SDK client to kernelexec's image functions is deprecated and will be an "
                      "error in a future version: pass a kernelexec.backend.docker.api.DockerAPI (e.g. "
                      "DockerAPI(endpoint)), or nothing for the engine of this process's environment",
                      DeprecationWarning, stacklevel=4)
        chosen, sdk = api(), client
    else:
        raise TypeError("client must be a kernelexec.backend.docker.api.DockerAPI or None, "
                        f"not {type(client).__name__}")
    with LoopThread.held() as loop:
        engine = _Engine(chosen, loop)
        try:
            if sdk is not None:
                ours = engine(chosen.call("GET", "/info", what="engine info")).get("ID")
                if sdk.info().get("ID") != ours:
                    raise ImageBuildError(
                        "the docker SDK client given is connected to another engine than this process's "
                        f"({chosen.endpoint.describe()}); pass "
                        "kernelexec.backend.docker.api.DockerAPI(endpoint) for it")
            elif build:
                engine(chosen.version())
        except DockerUnavailable as e:
            if not build:
                raise
            raise ImageBuildError(str(e)) from e
        yield engine


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


# ------------------------------------------------------------------------------------------ subprocesses


def _stop(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """TERM the process group, then KILL it: debootstrap unmounts what it mounted on TERM."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _run(cmd: list[str], what: str, progress: Progress | None, timeout: float) -> list[str]:
    """Run ``cmd`` with a deadline, streaming its output lines to ``progress``; return its last lines.

    A timer stops the whole process group at the deadline, which ends the read
    loop; the loop itself never polls.
    """
    _say(progress, "$ " + " ".join(cmd[:8]) + (" ..." if len(cmd) > 8 else ""))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", start_new_session=True)
    except OSError as e:
        raise ImageBuildError(f"{what}: cannot run {cmd[0]} ({e})") from e
    expired = threading.Event()

    def on_deadline() -> None:
        expired.set()
        _stop(proc)

    timer = threading.Timer(timeout, on_deadline)
    timer.daemon = True
    tail: deque[str] = deque(maxlen=40)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                _say(progress, "  " + line)
        try:
            code = proc.wait(timeout=60)  # output closed: the process is exiting
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = proc.wait(timeout=60)
    except BaseException:
        _stop(proc)  # KeyboardInterrupt or a failing progress callback: leave nothing running
        raise
    finally:
        timer.cancel()
        if proc.stdout is not None:
            proc.stdout.close()
    if expired.is_set():
        raise ImageBuildError(f"{what} did not finish within {timeout:.0f} s and was stopped. Last output:\n"
                              + "\n".join(tail))
    if code != 0:
        raise ImageBuildError(f"{what} failed (exit status {code}). Last output:\n" + "\n".join(list(tail)[-20:]))
    return list(tail)


# ------------------------------------------------------------------------------ the offline base image


def debian_mirror(suite: str = DEBIAN_SUITE, apt_dir: Path = Path("/etc/apt")) -> str:
    """The mirror this host's apt uses for ``suite``, else deb.debian.org.

    Reads deb822 ``*.sources`` files and one-line ``sources.list`` / ``*.list``
    files; only an enabled ``deb`` entry for exactly ``suite`` counts, so an
    Ubuntu or security mirror is never picked for Debian's main archive.
    """
    apt = apt_dir
    files = [apt / "sources.list"] + sorted((apt / "sources.list.d").glob("*.list")) \
        + sorted((apt / "sources.list.d").glob("*.sources"))
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = None
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:  # continuation line
                        fields[key] += " " + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
                    uris = fields.get("uris", "").split()
                    if uris:
                        return uris[0]
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m.group(2) == suite:
                    return m.group(1)
    return DEBIAN_MIRROR


def _mount_points_under(root: Path) -> list[str]:
    points = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
                if mp == str(root) or mp.startswith(str(root) + "/"):
                    points.append(mp)
    except OSError:
        pass
    return points


def _remove_rootfs(root: Path, progress: Progress | None) -> None:
    """Delete a debootstrap target, but never through a mount (debootstrap bind-mounts /dev, /proc, /sys).

    debootstrap unmounts them itself, also when stopped with TERM; this is for
    when it was killed. A mount that cannot be detached leaves the directory in
    place rather than risk deleting the host's device nodes.
    """
    for mp in sorted(_mount_points_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=60)
    if _mount_points_under(root):
        _say(progress, f"warning: {root} still has mounts under it; left in place, remove it by hand")
        return
    shutil.rmtree(root, ignore_errors=True)


def _slim_rootfs(root: Path) -> None:
    """Drop what a container never uses (apt's downloaded packages and lists, docs, man pages, translations)
    and the host details debootstrap copies in (resolv.conf, hostname). About 140 MB of 265."""
    def clear(directory: str, keep: Callable[[Path], bool] = lambda p: False) -> None:
        d = root / directory
        if not d.is_dir():
            return
        for p in d.iterdir():
            if keep(p):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    for cache in (root / "var/cache/apt").glob("*.bin"):
        cache.unlink()
    clear("var/cache/apt/archives", keep=lambda p: p.name in ("partial", "lock"))
    clear("var/lib/apt/lists", keep=lambda p: p.name in ("partial", "lock"))
    clear("usr/share/man")
    clear("usr/share/info")
    clear("usr/share/locale", keep=lambda p: p.name == "locale.alias")
    doc = root / "usr/share/doc"
    if doc.is_dir():
        for pkg in doc.iterdir():  # keep the copyright files: they are the licences
            if pkg.is_dir() and not pkg.is_symlink():
                for p in pkg.iterdir():
                    if p.name == "copyright":
                        continue
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink()
    for name in ("etc/resolv.conf", "etc/hostname"):
        p = root / name
        if p.is_file() and not p.is_symlink():
            p.write_text("")
    for log in ("var/log/dpkg.log", "var/log/alternatives.log", "var/log/bootstrap.log"):
        (root / log).unlink(missing_ok=True)
    clear("var/log/apt")


def _chunks(stream: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk


def _import_rootfs(engine: _Engine, root: Path, tag: str, changes: list[str], progress: Progress | None) -> None:
    """Stream ``root`` as a tar into ``docker import`` (through the API: no docker CLI needed)."""
    _say(progress, f"importing the root filesystem as {tag}")
    repo, _, version = tag.rpartition(":")
    errors = tempfile.TemporaryFile()  # a file, not a pipe: tar must never block on its own warnings
    tar = subprocess.Popen(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", "-", "."],
                           stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
    # the upload has no deadline of its own: stopping tar ends it, and the engine's answer is bounded by silence
    timer = threading.Timer(_IMPORT_TIMEOUT, _stop, args=(tar,))
    timer.daemon = True
    timer.start()
    failure: str | None = None
    try:
        assert tar.stdout is not None
        for message in engine.iterate(engine.api.import_image(file_chunks(tar.stdout), repo=repo, tag=version,
                                                              changes=changes, silence=_IMPORT_TIMEOUT)):
            if message.get("error"):
                failure = str(message["error"])
    except DockerAPIError as e:
        failure = e.explanation or str(e)
    except (Stalled, DockerUnavailable) as e:
        failure = str(e)
    finally:
        timer.cancel()
        if tar.stdout is not None:
            tar.stdout.close()  # a tar still writing after a failed upload gets EPIPE and exits
        try:
            tar.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _stop(tar)
        errors.seek(0)
        err = errors.read().decode(errors="replace")
        errors.close()
    if tar.returncode != 0 and failure is None:
        failure = f"tar exited with status {tar.returncode} (stopped after {_IMPORT_TIMEOUT:.0f} s?): {err[-2000:]}"
    if failure is not None:
        # a truncated upload can still have produced the tag: it must not pass for a good base later
        with contextlib.suppress(DockerAPIError):
            engine(engine.api.remove_image(tag, force=True))
        raise ImageBuildError(f"docker import of the debootstrap root filesystem as {tag} failed: {failure}")


def ensure_base_image(client: DockerAPI | None = None, progress: Progress | None = None, *,
                      tag: str = BASE_TAG, suite: str = DEBIAN_SUITE, mirror: str | None = None) -> str:
    """Make sure the offline base exists: a minimal Debian with Python, made from Debian packages.

    Needs no image registry, only a Debian mirror (``mirror``, else
    ``$KERNELEXEC_DEBIAN_MIRROR``, else the one apt already uses),
    root (debootstrap chroots and creates device nodes) and ``debootstrap``.
    Takes about a minute; done once per machine.
    """
    with _engine(client) as engine:
        return _ensure_base_image(engine, progress, tag=tag, suite=suite, mirror=mirror)


def _ensure_base_image(engine: _Engine, progress: Progress | None, *, tag: str = BASE_TAG,
                       suite: str = DEBIAN_SUITE, mirror: str | None = None) -> str:
    if engine.image(tag) is not None:
        _say(progress, f"base image {tag} is present")
        return tag
    if not sys.platform.startswith("linux"):
        raise ImageBuildError("the offline base image is made with debootstrap, which runs on Linux only; "
                              "build online (`kernelexec image build --online`) on this machine")
    if os.geteuid() != 0:
        raise ImageBuildError(f"making the offline base image {tag} needs root (debootstrap chroots and "
                              "creates device nodes): run `sudo kernelexec image build --offline` once, "
                              "or build online with a registry (`kernelexec image build --online`)")
    debootstrap = shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.access(p, os.X_OK)), None)
    if debootstrap is None:
        raise ImageBuildError("debootstrap is not installed; install it (`apt-get install debootstrap`; "
                              "scripts/setup.sh does) or build online (`kernelexec image build --online`)")
    mirror = mirror or os.environ.get("KERNELEXEC_DEBIAN_MIRROR") or debian_mirror(suite)
    _say(progress, f"making the base image {tag}: debootstrap {suite} from {mirror} (about a minute)")
    # /var/tmp, not /tmp: /tmp is often a small or noexec tmpfs, and debootstrap executes in its target
    root = Path(tempfile.mkdtemp(prefix="kernelexec-rootfs-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    try:
        _run([debootstrap, "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), suite, str(root), mirror],
             f"debootstrap of Debian {suite} from {mirror} (is the mirror reachable? another one can be "
             "given with KERNELEXEC_DEBIAN_MIRROR)",
             progress, _DEBOOTSTRAP_TIMEOUT)
        _slim_rootfs(root)
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["/bin/bash"]',
            f'LABEL kernelexec.base.suite="{suite}" kernelexec.base.mirror="{mirror}"',
        ]
        _import_rootfs(engine, root, tag, changes, progress)
    finally:
        _remove_rootfs(root, progress)
    if engine.image(tag) is None:
        raise ImageBuildError(f"docker import reported success but {tag} is not there")
    return tag


# -------------------------------------------------------------------------------------------- wheels


def wheelhouse_dir() -> Path:
    """Where the host keeps the downloaded wheels: ``$KERNELEXEC_WHEELHOUSE`` or
    ``~/.cache/kernelexec/wheelhouse`` (kept between builds: a rebuild then
    needs no network)."""
    env = os.environ.get("KERNELEXEC_WHEELHOUSE")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "kernelexec" / "wheelhouse"


def parse_lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """``requirements.lock`` as {normalized name: (version, sha256 hashes)}; refuses anything unpinned."""
    return parse_lock_text(path.read_text(), str(path))


def parse_lock_text(text: str, source: str = "the lock") -> dict[str, tuple[str, frozenset[str]]]:
    """A lock's text as {normalized name: (version, sha256 hashes)}; ``source`` names it in errors."""
    text = re.sub(r"\\\s*\n", " ", text)
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s+(.*)$", line)
        hashes = frozenset(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
        if not m or not hashes:
            raise ImageBuildError(f"{source}: every line must be `name==version --hash=sha256:...`, not {line!r}; "
                                  "regenerate it with kernelexec.tools.image.lock_requirements()")
        pins[normalize_name(m.group(1))] = (m.group(2), hashes)
    if not pins:
        raise ImageBuildError(f"{source} pins nothing")
    return pins


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in _chunks(f):
            h.update(chunk)
    return h.hexdigest()


def _locked_wheels(directory: Path, pins: dict[str, tuple[str, frozenset[str]]]) -> dict[str, Path]:
    """The wheels in ``directory`` that the lock accepts (name, version and hash), by package name."""
    found: dict[str, Path] = {}
    for whl in sorted(directory.glob("*.whl")):
        parts = whl.name.split("-")
        if len(parts) < 5:
            continue
        name = normalize_name(parts[0])
        pin = pins.get(name)
        if pin is None or parts[1] != pin[0] or name in found:
            continue
        if _sha256(whl) in pin[1]:
            found[name] = whl
    return found


def _host_pip() -> list[str]:
    """This interpreter's pip, else the ``pip`` on PATH: either reads the host's pip configuration."""
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    if found is None:
        raise ImageBuildError("no pip on this host to download the wheelhouse with; install pip "
                              "(`python3 -m ensurepip` or `apt-get install python3-pip`)")
    return [found]


def _pip_download(dest: Path) -> list[str]:
    """``pip download`` for the image's interpreter and platform, run with the host's pip configuration."""
    cmd = _host_pip() + ["download", "--disable-pip-version-check", "--no-input",
           "--progress-bar", "off", "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
           "--abi", "cp311", "--dest", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd


def download_wheelhouse(recipe: Path | None = None, progress: Progress | None = None,
                        dest: Path | None = None) -> list[Path]:
    """Every wheel of ``requirements.lock``, checked against its hash; return their paths.

    Wheels already in the wheelhouse with the right hash are not fetched
    again, so an offline rebuild needs no network at all. The rest are
    fetched by the host's pip, which knows the host's index, proxy and CA.
    """
    recipe = recipe or kernel_image_dir()
    pins = parse_lock(recipe / "requirements.lock")
    dest = dest or wheelhouse_dir()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageBuildError(f"cannot create the wheelhouse {dest} ({e}); set KERNELEXEC_WHEELHOUSE") from e
    have = _locked_wheels(dest, pins)
    missing = sorted(set(pins) - set(have))
    if not missing:
        _say(progress, f"wheelhouse {dest}: all {len(pins)} locked wheels present")
        return [have[n] for n in sorted(have)]
    _say(progress, f"wheelhouse {dest}: downloading {len(missing)} of {len(pins)} locked wheels with the host's pip")
    with tempfile.TemporaryDirectory(prefix="kernelexec-lock-") as tmp:
        partial = Path(tmp) / "missing.txt"
        partial.write_text("".join(
            f"{n}=={pins[n][0]} " + " ".join(f"--hash=sha256:{h}" for h in sorted(pins[n][1])) + "\n"
            for n in missing))
        _run(_pip_download(dest) + ["--no-deps", "--require-hashes", "-r", str(partial)],
             f"downloading the wheelhouse into {dest} (the host's pip; check its index and network settings "
             "with `pip config list`)", progress, _PIP_TIMEOUT)
    have = _locked_wheels(dest, pins)
    still = sorted(set(pins) - set(have))
    if still:
        raise ImageBuildError(f"the wheelhouse {dest} still lacks {', '.join(still)} after pip download; "
                              "delete the directory and build again")
    return [have[n] for n in sorted(have)]


def lock_requirements(progress: Progress | None = None, recipe: Path | None = None) -> Path:
    """Re-pin ``requirements.lock`` from ``requirements.in``: resolve, download, hash.

    For maintainers: run it, review the diff, commit it (the image tag changes
    with it). Resolution runs on this host, so environment markers are
    evaluated here: it must be Linux x86_64 with CPython 3.11, like the image.
    The downloaded wheels also seed the wheelhouse.
    """
    import platform

    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"
            and sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)):
        raise ImageBuildError("lock_requirements resolves dependencies with this interpreter's environment "
                              "markers; run it with CPython 3.11 on Linux x86_64 (like the image), e.g. in "
                              "a python:3.11 container")
    recipe = recipe or kernel_image_dir()
    source = recipe / "requirements.in"
    if not source.is_file():
        raise ImageBuildError(f"{source} does not exist")
    with tempfile.TemporaryDirectory(prefix="kernelexec-lock-") as tmp:
        tmpdir = Path(tmp)
        _run(_pip_download(tmpdir) + ["-r", str(source)], f"resolving {source} with the host's pip",
             progress, _PIP_TIMEOUT)
        wheels = sorted(tmpdir.glob("*.whl"), key=lambda p: normalize_name(p.name.split("-")[0]))
        if not wheels:
            raise ImageBuildError(f"pip download of {source} produced no wheels")
        entries = []
        for whl in wheels:
            name, version = whl.name.split("-")[:2]
            entries.append(f"{normalize_name(name)}=={version} \\\n    --hash=sha256:{_sha256(whl)}")
        header = [
            "# Generated by kernelexec.tools.image.lock_requirements() from requirements.in: do not edit by hand.",
            "# CPython 3.11, manylinux x86_64 (glibc <= 2.36) wheels; one hash per package, the wheel that pip",
            "# in the image picks. Installed with --require-hashes by both build paths.",
        ]
        out = recipe / "requirements.lock"
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.write_text("\n".join(header + entries) + "\n")
        os.replace(tmp_out, out)
        try:  # the next offline build will not download them again
            cache = wheelhouse_dir()
            cache.mkdir(parents=True, exist_ok=True)
            for whl in wheels:
                if not (cache / whl.name).exists():
                    shutil.copy2(whl, cache / whl.name)
        except OSError as e:
            _say(progress, f"(could not seed the wheelhouse: {e})")
    _say(progress, f"wrote {out} ({len(entries)} packages); new image tag {image_tag(recipe)}")
    return out


# --------------------------------------------------------------------------------------------- building


def _context(recipe: Path, wheels: list[Path], ca_files: list[Path], out: IO[bytes]) -> None:
    """Write the build context tar: the recipe, ``wheelhouse/`` and ``ca/`` (both possibly empty)."""
    _write_context(recipe_files(recipe), wheels, ca_files, out)


def _write_context(files: list[tuple[str, Path]], wheels: list[Path], ca_files: list[Path], out: IO[bytes]) -> None:
    """Write a build context tar: ``files`` (relative name, path), ``wheelhouse/`` and ``ca/``.

    Owners and modes are normalized so that nothing about the host's users
    reaches the build.
    """
    def add(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
        info = tar.gettarinfo(str(path), arcname)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o644
        with open(path, "rb") as f:
            tar.addfile(info, f)

    with tarfile.open(fileobj=out, mode="w") as tar:
        for rel, path in files:
            add(tar, path, rel)
        for d in ("wheelhouse", "ca"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(info)
        for whl in wheels:
            add(tar, whl, f"wheelhouse/{whl.name}")
        for i, ca in enumerate(ca_files):
            add(tar, ca, f"ca/{i:02d}-{ca.name if ca.suffix in ('.pem', '.crt') else ca.name + '.pem'}")
    out.seek(0)


_STEP_ID = re.compile(r"^ ---> ([0-9a-f]{12,64})$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _docker_build(engine: _Engine, context: IO[bytes], tag: str, buildargs: dict[str, str],
                  labels: dict[str, str], ids: list[str], *, nocache: bool, network_mode: str | None,
                  progress: Progress | None) -> None:
    """Run the build, streaming its output; append to ``ids`` the images it made or reused, as they
    appear (so that they can be cleaned up also when the build fails).

    The response's silence limit bounds each wait for output; the loop checks the
    overall deadline at each message, and leaving the loop closes the connection,
    which makes the engine cancel the build.
    """
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=30)
    failure: str | None = None
    pending = ""  # the engine's messages do not end at line ends

    def emit(line: str) -> None:
        line = _ANSI.sub("", line).rstrip("\r")  # the engine colours the steps' stderr
        if not line.strip():
            return
        tail.append(line)
        m = _STEP_ID.match(line)
        if m:
            ids.append(m.group(1))
        _say(progress, f"  [{time.monotonic() - start:5.0f}s] {line}")

    messages = engine.iterate(engine.api.build(file_chunks(context), tag=tag, buildargs=buildargs, labels=labels,
                                               nocache=nocache, network_mode=network_mode, silence=_BUILD_SILENCE))
    try:
        for chunk in messages:
            text = chunk.get("stream") or ""
            if not text and chunk.get("status") and not chunk.get("progressDetail"):
                text = f"{chunk['status']} {chunk.get('id', '')}".rstrip() + "\n"  # the engine pulling the base
            *lines, pending = (pending + text).split("\n")
            for line in lines:
                emit(line)
            if "error" in chunk:
                emit(pending)
                pending = ""
                failure = str(chunk.get("error", "")).strip()
                break
            if time.monotonic() - start > _BUILD_TIMEOUT:
                failure = f"the build took longer than {_BUILD_TIMEOUT:.0f} s and was cancelled"
                break
    except DockerAPIError as e:
        failure = e.explanation or str(e)
    except (Stalled, DockerUnavailable) as e:
        failure = (f"lost the build output ({e}); the build printed nothing for {_BUILD_SILENCE:.0f} s or the "
                   "engine went away")
    finally:
        messages.close()  # the connection: the engine cancels a build still running
    emit(pending)
    if failure is not None:
        raise ImageBuildError(f"docker build of {tag} failed: {failure}\nLast output:\n" + "\n".join(tail))


def _remove_leftovers(engine: _Engine, ids: list[str], keep: str, progress: Progress | None) -> None:
    """Remove the untagged images this build left: the build stage (with its wheels), or a failed step.

    Only images named in this build's own output, newest first, untagged, and
    not the result; the engine refuses (and they are kept) when an image still
    has children or containers, which is how the final image's layers survive.
    """
    removed = 0
    for image_id in reversed(dict.fromkeys(ids)):
        try:
            img = engine(engine.api.image_inspect(image_id))
            if img.get("RepoTags") or img["Id"] == keep:
                continue
            engine(engine.api.remove_image(img["Id"]))
            removed += 1
        except DockerAPIError:
            continue
    if removed:
        _say(progress, f"removed {removed} untagged image(s) left by this build (its build stage, or failed steps)")


def registry_reachable(client: DockerAPI | None = None, image: str = PUBLIC_BASE,
                       timeout: float = _PROBE_TIMEOUT) -> bool:
    """Whether ``image`` is here, or the engine can reach its registry and find it, within ``timeout``.

    Asks for the manifest only (``/distribution``): cheaper than a pull, and
    the build pulls the base itself.
    """
    with _engine(client, build=False) as engine:
        return _registry_reachable(engine, image, timeout)


def _registry_reachable(engine: _Engine, image: str, timeout: float) -> bool:
    async def probe() -> bool:
        try:
            await engine.api.image_inspect(image)
            return True
        except NotFound:
            pass
        try:
            await asyncio.wait_for(engine.api.distribution(image), timeout)
        except (asyncio.TimeoutError, DockerAPIError, DockerUnavailable):
            return False
        return True

    try:
        return engine(probe())
    except (DockerAPIError, DockerUnavailable):
        return False


def build_image(client: DockerAPI | None = None, *, mode: Mode = "auto", force: bool = False,
                progress: Progress | None = None, base_image: str | None = None, index_url: str | None = None,
                extra_ca: str | os.PathLike[str] | None = None, tag: str | None = None,
                recipe: Path | None = None) -> str:
    """Build the kernel image unless its tag is already there; return the tag.

    ``mode``: ``online`` builds the recipe directory as is (public base, the
    index); ``offline`` builds from the debootstrap base and the host-side
    wheelhouse with no network in the build; ``auto`` picks online when the
    base image is here or its registry answers within a few seconds.
    ``force`` rebuilds without the build cache even when the tag exists.

    ``base_image`` replaces the base (either mode). ``index_url`` and
    ``extra_ca`` (a CA bundle file for pip in the build, e.g. a TLS-inspecting
    proxy's) are for the online path, as ``--build-arg PIP_INDEX_URL`` and a
    file in ``ca/`` are for ``docker build``. ``tag`` and ``recipe`` exist
    for tests and forks. Output lines go to ``progress``.

    ``client``: the engine (a :class:`~kernelexec.backend.docker.api.DockerAPI`), default this process's.
    """
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"mode must be 'auto', 'online' or 'offline', not {mode!r}")
    with _engine(client) as engine:
        return _build_image(engine, mode=mode, force=force, progress=progress, base_image=base_image,
                            index_url=index_url, extra_ca=extra_ca, tag=tag, recipe=recipe)


def _build_image(engine: _Engine, *, mode: Mode, force: bool, progress: Progress | None, base_image: str | None,
                 index_url: str | None, extra_ca: str | os.PathLike[str] | None, tag: str | None,
                 recipe: Path | None) -> str:
    recipe = recipe or kernel_image_dir()
    tag = tag or image_tag(recipe)
    old = engine.image(tag)
    old_id = old["Id"] if old else None
    if old_id and not force:
        _say(progress, f"{tag} is up to date (the recipe has not changed); nothing to build")
        return tag
    t0 = time.monotonic()
    if mode == "auto":
        probe = base_image or PUBLIC_BASE
        mode = "online" if _registry_reachable(engine, probe, _PROBE_TIMEOUT) else "offline"
        _say(progress, f"{probe} " + ("is available: building online" if mode == "online" else
                                      "cannot be pulled: building offline (debootstrap base, host-side wheelhouse)"))
    buildargs: dict[str, str] = {}
    if mode == "offline":
        base = base_image or _ensure_base_image(engine, progress)
        wheels = download_wheelhouse(recipe, progress)
        ca_files: list[Path] = []
        network_mode: str | None = "none"  # everything the build needs is in its context
    else:
        base = base_image or PUBLIC_BASE
        wheels = sorted((recipe / "wheelhouse").glob("*.whl"))
        ca_files = sorted(p for p in (recipe / "ca").glob("*") if p.is_file() and p.suffix in (".pem", ".crt"))
        if extra_ca is not None:
            ca = Path(extra_ca)
            if not ca.is_file():
                raise ImageBuildError(f"extra_ca {ca} is not a file")
            ca_files.append(ca)
        if index_url:
            buildargs["PIP_INDEX_URL"] = index_url
        network_mode = None
    buildargs["BASE_IMAGE"] = base
    labels = {"kernelexec.build.mode": mode, "kernelexec.build.base": base}
    _say(progress, f"building {tag} ({mode}, base {base}"
                   + (f", {len(wheels)} wheels from the wheelhouse" if wheels else ", packages from the index") + ")")
    ids: list[str] = []
    with tempfile.TemporaryFile(prefix="kernelexec-context-") as context:
        _context(recipe, wheels, ca_files, context)
        try:
            _docker_build(engine, context, tag, buildargs, labels, ids, nocache=force,
                          network_mode=network_mode, progress=progress)
        except ImageBuildError as e:
            hint = ("\nThe offline build uses the base image and the wheelhouse "
                    f"{wheelhouse_dir()}; delete the wheelhouse to re-download it." if mode == "offline" else
                    "\nWithout a registry or a reachable index, build offline: `kernelexec image build --offline`; "
                    "behind a TLS-intercepting proxy, pass its CA (extra_ca, or a .pem in kernel-image/ca/).")
            raise ImageBuildError(str(e) + hint) from None
        finally:
            new = engine.image(tag)
            new_id = new["Id"] if new else None
            _remove_leftovers(engine, ids, keep=new_id or "", progress=progress)
    if new is None or new_id is None:
        raise ImageBuildError(f"docker build of {tag} ended without error but the image is not there")
    if old_id and old_id != new_id:
        # the image the forced rebuild replaced, unless a container still uses it
        with contextlib.suppress(DockerAPIError):
            if not engine(engine.api.image_inspect(old_id)).get("RepoTags"):
                engine(engine.api.remove_image(old_id))
    size = new.get("Size", 0)
    _say(progress, f"built {tag} ({mode}, {size / 1e6:.0f} MB) in {time.monotonic() - t0:.0f} s")
    return tag
