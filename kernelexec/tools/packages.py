"""Kernel images with the packages a team needs: derived images, their locks, flavours.

A derived image is the kernel image plus Python packages, built once and
reused by every session that asks for the same packages on the same base:

* **Resolved on the host.** The host's pip (its index, proxy and CA
  settings, or ``--find-links`` and ``--no-index``) resolves the requirements
  for the image's interpreter and platform, *constrained to the versions the
  base image already has*, so numpy or pandas are never replaced: a request
  that needs another version of one of them fails and says so.
* **Pinned by hash.** What the base does not have becomes a lock
  (``name==version --hash=sha256:...``), stored in the image's label
  ``kernelexec.lock`` (the lock travels with the image: ``kernelexec image
  lock TAG`` prints it, and a lock file given back with ``--requirements`` is
  installed as is, with no resolution).
* **Tagged by content.** ``kernelexec-kernel:<base>-<lock>``: the base's
  12 hex (its recipe hash; for another base image, its image id) and the
  first 12 hex of the lock's sha256. The request (base + requirements) is a
  label too, so a second request is answered from the engine alone, with no
  resolution and no network.
* **Installed offline** (default): the wheels are checked against the lock
  in the host-side wheelhouse (the base image's, see
  :func:`kernelexec.tools.image.wheelhouse_dir`), downloaded there when missing,
  and installed in a build with no network (``--no-index --require-hashes``).
  ``mode="online"`` has pip in the build fetch the same hashes from the
  index instead, as the base image's online path does.
* **Nothing half-built.** A failure names the package; the build's
  intermediate images, the temporary directories and the lock go with it
  (the lock exists only as the label of an image that was built).

The new files go to the kernel's site-packages in one layer on top of the
base; the base's layers are shared, so a derived image costs its packages only.
Concurrent first uses (sessions of one role starting together) build once:
the build holds a lock file per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..backend.docker.api import DockerAPI, DockerAPIError, NotFound
from ..errors import ImageBuildError
from ..requirements import (
    FLAVOURS,
    REQUIREMENT_RE,
    check_requirement,
    flavour_requirements,
    normalize_name,
    requirement_name,
)

if TYPE_CHECKING:  # pragma: no cover
    from .image import _Engine

__all__ = [
    "FLAVOURS",
    "DerivedImage",
    "KernelImage",
    "build_packages",
    "check_requirement",
    "derived_tag",
    "image_with",
    "list_images",
    "read_requirements",
    "remove_image",
    "render_lock",
    "request_digest",
    "requirement_name",
]

#: Labels of a derived image.
LABEL_BASE = "kernelexec.derived.base"
LABEL_REQUEST = "kernelexec.derived.request"
LABEL_REQUIREMENTS = "kernelexec.derived.requirements"
LABEL_FLAVOUR = "kernelexec.derived.flavour"
LABEL_LOCK = "kernelexec.lock"
LABEL_KIND = "kernelexec.image"  # "kernel" on the base (its Dockerfile) and hence on every derived image

#: The kernel's site-packages: the base recipe's venv (its Dockerfile refuses any Python but 3.11).
SITE_PACKAGES = "/opt/kernel/lib/python3.11/site-packages"

Progress = Callable[[str], None]
Mode = Literal["offline", "online"]

_PIP_TIMEOUT = 1200.0


# ------------------------------------------------------------------------------------ pure logic


def read_requirements(path: str | os.PathLike[str]) -> tuple[list[str], str | None]:
    """A requirements file: (requirements, None), or ([], lock text) when every line is pinned by
    hash (a lock, e.g. printed by ``kernelexec image lock``): a lock is installed as is."""
    from .image import parse_lock_text

    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageBuildError(f"cannot read the requirements file {p}: {e}") from e
    if "--hash=" in text:
        parse_lock_text(text, str(p))  # all or nothing: a half-hashed file is an error, not a mix
        return [], text
    specs: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        try:
            specs.append(check_requirement(line))
        except ValueError as e:
            raise ImageBuildError(f"{p}, line {n}: {e}") from None
    return specs, None


def render_lock(pins: Mapping[str, tuple[str, Iterable[str]]]) -> str:
    """The lock's text: one ``name==version --hash=sha256:...`` per package, sorted; stable, so its
    digest names the image."""
    lines = []
    for name in sorted(pins):
        version, hashes = pins[name]
        lines.append(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hashes)))
    return "\n".join(lines) + "\n"


def _base_part(base: str, base_id: str) -> str:
    """12 hex naming the base: the recipe hash of a ``kernelexec-kernel:<12 hex>`` base, else its image id."""
    from .image import REPO

    repo, _, tag = base.rpartition(":")
    if repo == REPO and re.fullmatch(r"[0-9a-f]{12}", tag):
        return tag
    return base_id.split(":")[-1][:12]


def derived_tag(base: str, base_id: str, lock: str) -> str:
    """``kernelexec-kernel:<base 12 hex>-<first 12 hex of sha256(lock)>``."""
    from .image import REPO

    return f"{REPO}:{_base_part(base, base_id)}-{hashlib.sha256(lock.encode()).hexdigest()[:12]}"


def request_digest(base_id: str, requirements: Sequence[str], lock: str | None = None) -> str:
    """What was asked for, as a hash: the base image's id and the requirements (order and
    spelling of names aside) or a given lock. A second identical request finds its image by it."""
    if lock is not None:
        what = "lock:" + render_lock(_lock_pins(lock))
    else:
        what = "\n".join(sorted({_canonical(r) for r in requirements}))
    return hashlib.sha256(f"{base_id}\n{what}".encode()).hexdigest()


def _canonical(spec: str) -> str:
    """A requirement with its name normalized and no blanks: ``Scikit_Learn >= 1`` -> ``scikit-learn>=1``."""
    m = REQUIREMENT_RE.match(check_requirement(spec))
    assert m is not None
    return normalize_name(m.group(1)) + re.sub(r"\s+", "", spec.strip()[m.end(1) - m.start(0):])


def _lock_pins(lock: str) -> dict[str, tuple[str, frozenset[str]]]:
    from .image import parse_lock_text

    return parse_lock_text(lock)




# ---------------------------------------------------------------------------------- engine and host


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kernelexec`` (default ``~/.cache/kernelexec``): the build lock files."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "kernelexec"


@contextlib.contextmanager
def _build_lock(digest: str, progress: Progress | None) -> Iterator[None]:
    """One build per request at a time, across processes: the others wait, then find the image."""
    from .image import _say

    d = cache_dir() / "build-locks"
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"{digest[:24]}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ImageBuildError(f"cannot create the build lock in {d} ({e}); set XDG_CACHE_HOME to a writable "
                              "directory") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, "another process is building this image; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: a build has its own deadlines
        yield
    finally:
        os.close(fd)  # releases the lock


def _find_request(engine: _Engine, digest: str) -> str | None:
    """The tag of an image built for this request, if the engine has one."""
    for img in engine(engine.api.images(label=f"{LABEL_REQUEST}={digest}")):
        for tag in _tags(img):
            return tag
    return None


def _tags(img: dict[str, Any]) -> list[str]:
    """An image's tags (the engine says ``<none>:<none>`` or nothing for an untagged one)."""
    return [str(t) for t in img.get("RepoTags") or () if t and t != "<none>:<none>"]


_INSTALLED = ("import importlib.metadata as m, json; "
              "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")


_PROBE_TIMEOUT = 120.0


def installed_packages(client: DockerAPI | None, image: str) -> dict[str, str]:
    """{normalized name: version} of what ``image``'s kernel has, read by running it once
    (no network, removed at once): works for any base, derived ones included."""
    from .image import _engine

    with _engine(client) as engine:
        return _installed_packages(engine, image)


def _installed_packages(engine: _Engine, image: str) -> dict[str, str]:
    import asyncio

    from ..policy import KERNEL_PYTHON

    config = {"Image": image, "Cmd": [KERNEL_PYTHON, "-c", _INSTALLED], "User": "10001:10001",
              "NetworkDisabled": True, "Labels": {"kernelexec.probe": "installed-packages"},
              "HostConfig": {"NetworkMode": "none", "ReadonlyRootfs": True}}
    try:
        code, out, err = engine(engine.api.run(config, timeout=_PROBE_TIMEOUT, name_prefix="kernelexec-probe-"))
        if code != 0:
            raise ImageBuildError(f"the kernel's Python exited with status {code}: "
                                  f"{err.decode(errors='replace').strip()[-500:]}")
        found = json.loads(out.decode().strip().splitlines()[-1])
    except (DockerAPIError, ImageBuildError, asyncio.TimeoutError, ValueError, IndexError) as e:
        raise ImageBuildError(f"cannot list the packages of the base image {image} ({e}); is it a kernelexec "
                              "kernel image (Python at /opt/kernel/bin/python)?") from e
    return {normalize_name(k): str(v) for k, v in found.items()}


def _source_options(find_links: Sequence[str | os.PathLike[str]], index_url: str | None,
                    no_index: bool) -> list[str]:
    opts: list[str] = []
    if no_index:
        opts.append("--no-index")
    if index_url:
        opts += ["--index-url", index_url]
    for link in find_links:
        opts += ["--find-links", str(link)]
    return opts


_NOT_FOUND = (re.compile(r"No matching distribution found for ([^\s;]+)"),
              re.compile(r"satisfies the requirement ([^\s;]+)"),
              re.compile(r"Cannot install ([^\s]+) because"),
              re.compile(r"requirements? ([A-Za-z0-9._-]+==\S+) .*do(?:es)? not match"))


def _named_failure(e: ImageBuildError, what: str, hint: str) -> ImageBuildError:
    """pip's failure, with the packages it names in the first line."""
    text = str(e)
    causes = re.findall(r"^\s*(\S+ \S+ depends on \S.*?)\s*$", text, re.M)
    pinned = list(dict.fromkeys(re.findall(r"\(constraint\) (\S+)", text)))
    names = list(dict.fromkeys(m.group(1) for rx in _NOT_FOUND for m in rx.finditer(text)))
    if causes and pinned:
        head = (f"{what}: it conflicts with the base image's packages: {'; '.join(causes)}, and the base image "
                f"has {', '.join(pinned)} (a derived image never replaces them)")
    else:
        head = f"{what}: " + (f"pip could not get {', '.join(names)}" if names else "pip failed")
    return ImageBuildError(f"{head}. {hint}\n{e}")


def _resolve(requirements: Sequence[str], installed: Mapping[str, str], source: list[str],
             progress: Progress | None) -> tuple[str, list[Path], tempfile.TemporaryDirectory[str]]:
    """Resolve on the host: (lock of what the base lacks, its wheels, the temporary directory that holds them)."""
    from .image import _pip_download, _run, _say, _sha256

    tmp = tempfile.TemporaryDirectory(prefix="kernelexec-resolve-")
    try:
        root = Path(tmp.name)
        (root / "requirements.txt").write_text("\n".join(requirements) + "\n")
        # the base's versions are constraints: the resolution keeps them, or fails naming the conflict
        (root / "constraints.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(installed.items())))
        _say(progress, f"resolving {', '.join(requirements)} with the host's pip, constrained to the base image's "
                       f"{len(installed)} packages")
        try:
            _run(_pip_download(root / "wheels") + source + ["-c", str(root / "constraints.txt"),
                                                            "-r", str(root / "requirements.txt")],
                 f"resolving {', '.join(requirements)}", progress, _PIP_TIMEOUT)
        except ImageBuildError as e:
            raise _named_failure(e, f"cannot resolve {', '.join(requirements)}",
                                 "Check the names and versions; kernelexec installs wheels only (CPython 3.11, "
                                 "manylinux x86_64), and the base image's packages keep their versions "
                                 "(`kernelexec image ls`).") from None
        pins: dict[str, tuple[str, frozenset[str]]] = {}
        wheels: list[Path] = []
        for whl in sorted((root / "wheels").glob("*.whl")):
            name, version = normalize_name(whl.name.split("-")[0]), whl.name.split("-")[1]
            if name in installed:
                continue
            pins[name] = (version, frozenset({_sha256(whl)}))
            wheels.append(whl)
        if not pins:
            raise ImageBuildError(f"{', '.join(requirements)}: the base image already has all of it; nothing to add")
        return render_lock(pins), wheels, tmp
    except BaseException:
        tmp.cleanup()
        raise


def _store_wheels(wheels: Iterable[Path], dest: Path) -> None:
    """Copy into the wheelhouse, each file whole or not at all (concurrent builds share it)."""
    dest.mkdir(parents=True, exist_ok=True)
    for whl in wheels:
        target = dest / whl.name
        if target.exists():
            continue
        partial = dest / f".{whl.name}.{os.getpid()}.part"
        try:
            shutil.copyfile(whl, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def _wheels_for(lock: str, dest: Path, source: list[str], progress: Progress | None) -> list[Path]:
    """Every wheel of ``lock`` from the wheelhouse, checked by hash; the missing ones downloaded by
    the host's pip (``--require-hashes``). A package still missing is named."""
    from .image import _locked_wheels, _pip_download, _run, _say

    pins = _lock_pins(lock)
    have = _locked_wheels(dest, pins) if dest.is_dir() else {}
    missing = sorted(set(pins) - set(have))
    if missing:
        _say(progress, f"wheelhouse {dest}: downloading {', '.join(missing)} with the host's pip")
        with tempfile.TemporaryDirectory(prefix="kernelexec-wheels-") as tmp:
            partial = Path(tmp) / "missing.txt"
            partial.write_text(render_lock({n: pins[n] for n in missing}))
            try:
                _run(_pip_download(Path(tmp) / "dl") + source + ["--no-deps", "--require-hashes", "-r", str(partial)],
                     f"downloading {', '.join(missing)}", progress, _PIP_TIMEOUT)
            except ImageBuildError as e:
                raise _named_failure(e, f"no wheel matching the lock for {', '.join(missing)}",
                                     "The wheelhouse and the index have no file with the locked version and "
                                     "hash (a changed file, a wrong lock, or no network).") from None
            got = _locked_wheels(Path(tmp) / "dl", pins) if (Path(tmp) / "dl").is_dir() else {}
            _store_wheels(got.values(), dest)
        have = _locked_wheels(dest, pins)
        still = sorted(set(pins) - set(have))
        if still:
            raise ImageBuildError(f"no wheel matching the lock for {', '.join(still)} (name, version and sha256); "
                                  f"the wheelhouse is {dest}")
    return [have[n] for n in sorted(have)]


DOCKERFILE = f"""\
# A kernelexec derived image: the base kernel image plus the packages of requirements.lock (generated by
# kernelexec.tools.packages; every package pinned by hash, none of the base's replaced).
ARG BASE_IMAGE
FROM ${{BASE_IMAGE}} AS build
LABEL kernelexec.build-stage="1"
USER 0:0
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
COPY requirements.lock /build/
COPY wheelhouse/ /build/wheelhouse/
COPY ca/ /build/ca/
# pip for this stage only (the kernel image has none); the packages go to /opt/extra, which is all the
# final stage takes; `pip check` sees the base's packages and the new ones together
RUN set -eu; \\
    PY=/opt/kernel/bin/python; \\
    $PY -m ensurepip --default-pip >/dev/null; \\
    if ls /build/wheelhouse/*.whl >/dev/null 2>&1; then \\
        echo "kernelexec: installing from the wheelhouse in the build context (no index)"; \\
        set -- --no-index --find-links /build/wheelhouse; \\
    else \\
        echo "kernelexec: installing from the package index"; \\
        set --; \\
        if [ -z "${{PIP_INDEX_URL}}" ]; then unset PIP_INDEX_URL; fi; \\
        if [ -z "${{PIP_EXTRA_INDEX_URL}}" ]; then unset PIP_EXTRA_INDEX_URL; fi; \\
        if [ -n "$(find /build/ca -maxdepth 1 -type f \\( -name '*.pem' -o -name '*.crt' \\))" ]; then \\
            cat "$($PY -c 'from pip._vendor import certifi; print(certifi.where())')" /build/ca/*.pem \\
                > /build/ca-bundle.pem 2>/dev/null || true; \\
            export PIP_CERT=/build/ca-bundle.pem; \\
        fi; \\
    fi; \\
    $PY -m pip install --disable-pip-version-check --no-cache-dir --no-input --progress-bar off --no-compile \\
        --only-binary=:all: --require-hashes --no-deps --target /opt/extra "$@" -r /build/requirements.lock; \\
    mkdir -p /opt/extra-bin; \\
    if [ -d /opt/extra/bin ]; then cp -a /opt/extra/bin/. /opt/extra-bin/; rm -rf /opt/extra/bin; fi; \\
    PYTHONPATH=/opt/extra $PY -m pip check; \\
    $PY -m compileall -f -q -j 0 --invalidation-mode unchecked-hash /opt/extra >/dev/null \\
        || echo "kernelexec: compileall reported files that do not compile (they could not be imported anyway)"; \\
    chmod -R a-s,go-w /opt/extra /opt/extra-bin

FROM ${{BASE_IMAGE}}
COPY --from=build /opt/extra/ {SITE_PACKAGES}/
COPY --from=build /opt/extra-bin/ /opt/kernel/bin/
"""


@dataclass(frozen=True)
class KernelImage:
    """A kernelexec image on the engine (``kernelexec image ls``)."""

    tag: str
    id: str
    size: int
    created: str
    #: the image it was derived from; None for a base kernel image
    base: str | None
    #: what it adds to its base, ``name==version`` (empty for a base image)
    packages: tuple[str, ...]
    #: what was asked for (requirements, or "lock" when a lock was given)
    requested: tuple[str, ...]
    flavour: str | None


DerivedImage = KernelImage


def _build(engine: _Engine, base: str, lock: str, tag: str, labels: dict[str, str], mode: Mode,
           source: list[str], wheels_from: list[Path], index_url: str | None,
           extra_ca: str | os.PathLike[str] | None, progress: Progress | None) -> None:
    from .image import _docker_build, _remove_leftovers, _say, _write_context, wheelhouse_dir

    if mode == "offline":
        if wheels_from:
            _store_wheels(wheels_from, wheelhouse_dir())
        wheels = _wheels_for(lock, wheelhouse_dir(), source, progress)
        ca_files: list[Path] = []
        network_mode: str | None = "none"
    else:
        wheels = []
        ca_files = [Path(extra_ca)] if extra_ca is not None else []
        network_mode = None
    buildargs = {"BASE_IMAGE": base}
    if index_url and mode == "online":
        buildargs["PIP_INDEX_URL"] = index_url
    ids: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kernelexec-derive-") as tmp:
        (Path(tmp) / "Dockerfile").write_text(DOCKERFILE)
        (Path(tmp) / "requirements.lock").write_text(lock)
        with tempfile.TemporaryFile(prefix="kernelexec-context-") as context:
            files = [("Dockerfile", Path(tmp) / "Dockerfile"), ("requirements.lock", Path(tmp) / "requirements.lock")]
            _write_context(files, wheels, ca_files, context)
            _say(progress, f"building {tag} ({mode}, on {base}, {len(_lock_pins(lock))} packages)")
            new_id = ""
            try:
                _docker_build(engine, context, tag, buildargs, labels, ids, nocache=False,
                              network_mode=network_mode, progress=progress)
            except ImageBuildError as e:
                names = ", ".join(f"{n}=={v}" for n, (v, _) in sorted(_lock_pins(lock).items()))
                raise ImageBuildError(f"installing {names} into {tag} failed (the packages are named in pip's "
                                      f"output below; nothing was kept)\n{e}") from None
            finally:
                if (new := engine.image(tag)) is not None:
                    new_id = new["Id"]
                _remove_leftovers(engine, ids, keep=new_id, progress=progress)


def build_packages(requirements: Sequence[str] = (), *, base: str | None = None, flavour: str | None = None,
                   lock: str | None = None, mode: Mode = "offline", force: bool = False,
                   find_links: Sequence[str | os.PathLike[str]] = (), index_url: str | None = None,
                   no_index: bool = False, extra_ca: str | os.PathLike[str] | None = None,
                   progress: Progress | None = None, client: DockerAPI | None = None) -> str:
    """The tag of ``base`` (default: this version's kernel image, built if missing) plus
    ``requirements`` and ``flavour``'s packages, or exactly ``lock``; built unless an image of
    the same request is on the engine.

    ``find_links``, ``index_url``, ``no_index``: where the host's pip looks (else its own
    configuration). ``mode="online"``: pip in the build fetches the locked files from the index
    (``index_url``, ``extra_ca`` for a TLS-inspecting proxy) instead of the host's wheelhouse.
    ``client``: the engine (a :class:`~kernelexec.backend.docker.api.DockerAPI`), default this process's.
    """
    from .image import _engine

    if mode not in ("offline", "online"):
        raise ValueError(f"mode must be 'offline' or 'online', not {mode!r}")
    specs = [check_requirement(r) for r in (*flavour_requirements(flavour), *requirements)]
    if lock is not None:
        if specs:
            raise ValueError("give a lock or requirements, not both")
        lock = render_lock(_lock_pins(lock))
    elif not specs:
        raise ValueError("no packages asked for: give requirements, a flavour or a lock")
    with _engine(client) as engine:
        return _build_packages(engine, specs, base=base, flavour=flavour, lock=lock, mode=mode, force=force,
                               find_links=find_links, index_url=index_url, no_index=no_index, extra_ca=extra_ca,
                               progress=progress)


def _build_packages(engine: _Engine, specs: list[str], *, base: str | None, flavour: str | None, lock: str | None,
                    mode: Mode, force: bool, find_links: Sequence[str | os.PathLike[str]], index_url: str | None,
                    no_index: bool, extra_ca: str | os.PathLike[str] | None, progress: Progress | None) -> str:
    from .image import _build_image, _say, image_tag

    t0 = time.monotonic()
    if base is None:
        base = image_tag()
        if engine.image(base) is None:
            base = _build_image(engine, mode="auto", force=False, progress=progress, base_image=None,
                                index_url=None, extra_ca=None, tag=None, recipe=None)
    base_img = engine.image(base)
    if base_img is None:
        raise ImageBuildError(f"the base image {base} is not on this engine; build it (`kernelexec image build`) "
                              "or pull it")
    base_id = str(base_img["Id"])
    digest = request_digest(base_id, specs, lock)
    if not force and (found := _find_request(engine, digest)):
        _say(progress, f"{found} is up to date (same base and packages); nothing to build")
        return found
    source = _source_options(find_links, index_url, no_index)
    with _build_lock(digest, progress):
        if not force and (found := _find_request(engine, digest)):  # another process built it meanwhile
            _say(progress, f"{found} was built meanwhile by another process")
            return found
        installed = _installed_packages(engine, base)
        tmp: tempfile.TemporaryDirectory[str] | None = None
        try:
            wheels: list[Path] = []
            if lock is None:
                lock, wheels, tmp = _resolve(specs, installed, source, progress)
            else:
                clash = sorted(n for n, (v, _) in _lock_pins(lock).items() if installed.get(n) not in (None, v))
                if clash:
                    raise ImageBuildError(f"the lock pins {', '.join(clash)} at other versions than the base image "
                                          f"{base} has ({', '.join(f'{n}=={installed[n]}' for n in clash)}); "
                                          "a derived image never replaces the base's packages")
            tag = derived_tag(base, base_id, lock)
            labels = {LABEL_BASE: base, LABEL_REQUEST: digest, LABEL_LOCK: lock,
                      LABEL_REQUIREMENTS: json.dumps(specs or ["lock"]),
                      "org.opencontainers.image.description": "kernelexec kernel with "
                      + ", ".join(f"{n}=={v}" for n, (v, _) in sorted(_lock_pins(lock).items()))}
            if flavour:
                labels[LABEL_FLAVOUR] = flavour
            old = engine.image(tag)
            _build(engine, base, lock, tag, labels, mode, source, wheels, index_url, extra_ca, progress)
            built = engine(engine.api.image_inspect(tag))
            if old and old["Id"] != built["Id"]:  # a forced rebuild: the image it replaced
                with contextlib.suppress(DockerAPIError):
                    engine(engine.api.remove_image(old["Id"]))
        finally:
            if tmp is not None:
                tmp.cleanup()
    size = built.get("Size", 0)
    _say(progress, f"built {tag} ({size / 1e6:.0f} MB in all) in {time.monotonic() - t0:.0f} s")
    return tag


def image_with(packages: Sequence[str] = (), flavour: str | None = None, *, base: str | None = None,
               progress: Progress | None = None) -> str:
    """The image a session with these packages runs: ``base`` itself when nothing is added, else
    the derived image, built on first use (what ``Policy(packages=..., image_flavour=...)`` does)."""
    if not packages and flavour is None:
        from .image import image_tag

        return base or image_tag()
    return build_packages(packages, base=base, flavour=flavour, progress=progress)


def _describe(img: dict[str, Any]) -> KernelImage | None:
    labels = img.get("Labels") or {}
    tags = _tags(img)
    if labels.get(LABEL_KIND) != "kernel" or not tags:
        return None
    lock = labels.get(LABEL_LOCK)
    packages: tuple[str, ...] = ()
    if lock:
        try:
            packages = tuple(f"{n}=={v}" for n, (v, _) in sorted(_lock_pins(lock).items()))
        except ImageBuildError:
            packages = ("(unreadable lock)",)
    try:
        requested = tuple(json.loads(labels.get(LABEL_REQUIREMENTS, "[]")))
    except ValueError:
        requested = ()
    created = img.get("Created", "")
    if isinstance(created, int):  # the list gives seconds since the epoch, inspect an ISO time
        from datetime import datetime, timezone

        created = datetime.fromtimestamp(created, timezone.utc).isoformat()
    return KernelImage(tag=tags[0], id=str(img["Id"]), size=int(img.get("Size", 0)),
                       created=str(created)[:19].replace("T", " "),
                       base=labels.get(LABEL_BASE) if lock else None, packages=packages,
                       requested=requested, flavour=labels.get(LABEL_FLAVOUR))


def list_images(client: DockerAPI | None = None) -> list[KernelImage]:
    """The kernelexec kernel images on the engine, base and derived, oldest first."""
    from .image import _engine

    with _engine(client) as engine:
        found = [d for img in engine(engine.api.images(label=f"{LABEL_KIND}=kernel"))
                 if (d := _describe(img)) is not None]
    return sorted(found, key=lambda d: (d.created, d.tag))


def image_lock(tag: str, client: DockerAPI | None = None) -> str:
    """The lock a derived image was built from (its label)."""
    from .image import _engine

    with _engine(client) as engine:
        img = engine.image(tag)
    if img is None:
        raise ImageBuildError(f"no image {tag} on this engine (`kernelexec image ls` lists them)")
    lock = ((img.get("Config") or {}).get("Labels") or {}).get(LABEL_LOCK)
    if not lock:
        raise ImageBuildError(f"{tag} is not a derived image (it has no {LABEL_LOCK} label): its packages are "
                              "those of the kernel image recipe's requirements.lock")
    return str(lock)


def remove_image(tag: str, client: DockerAPI | None = None) -> None:
    """Remove a kernelexec image; refused while a session's container runs it, and when the engine
    refuses (e.g. a derived image still stands on it)."""
    from ..backend.docker.sandbox import LABEL as LABEL_SESSION
    from .image import _engine

    with _engine(client) as engine:
        img = engine.image(tag)
        if img is None:
            raise ImageBuildError(f"no image {tag} on this engine (`kernelexec image ls` lists them)")
        if ((img.get("Config") or {}).get("Labels") or {}).get(LABEL_KIND) != "kernel":
            raise ImageBuildError(f"{tag} is not a kernelexec kernel image; remove it with docker itself")
        users = engine(engine.api.image_containers(img["Id"], LABEL_SESSION))
        if users:
            names = ", ".join(c["Id"][:12] for c in users)
            raise ImageBuildError(f"{tag} is used by {len(users)} session container(s) ({names}); end those "
                                  "sessions (`kernelexec ps`, `kernelexec gc`) and remove it then")
        try:
            engine(engine.api.remove_image(tag))
        except NotFound:
            raise ImageBuildError(f"no image {tag} on this engine (`kernelexec image ls` lists them)") from None
        except DockerAPIError as e:
            raise ImageBuildError(f"the engine refused to remove {tag}: {e.explanation or e}") from None
