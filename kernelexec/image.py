"""Building the kernel image, with a registry or without one.

The recipe is ``kernel-image/`` (Dockerfile, ``requirements.lock`` with a hash
for every package). Its content names the image: ``kernelexec-kernel:<hash>``,
so a session always runs the image its library version was written for, and a
rebuild is skipped when nothing changed.

Two paths build the same recipe:

* **online**: the Dockerfile as is, from a public Python base, packages from
  the index (``docker build kernel-image/`` does the same);
* **offline**: for hosts with no registry (air-gapped, or a proxy whose CA the
  container lacks): a Debian base made with ``debootstrap`` and
  ``docker import``, and the packages from a wheelhouse that the *host's* pip
  downloads (with the host's index and CA configuration), installed with
  ``--no-index --require-hashes``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

from .errors import DockerUnavailable, ImageBuildError

Progress = Callable[[str], None]
REPO = "kernelexec-kernel"
BASE_TAG = "kernelexec-base:bookworm"
PUBLIC_BASE = "python:3.11-slim-bookworm"
RECIPE = ("Dockerfile", "requirements.lock", ".dockerignore")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64",
             "manylinux_2_5_x86_64", "manylinux_2_12_x86_64", "linux_x86_64")


def kernel_image_dir() -> Path:
    """``kernel-image/`` of a checkout, or the copy packaged in the wheel."""
    env = os.environ.get("KERNELEXEC_IMAGE_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "kernel-image", here / "_kernel_image"):
        if (candidate / "Dockerfile").is_file():
            return candidate
    raise ImageBuildError("the kernel image recipe (kernel-image/) is missing from this installation")


def image_tag(recipe_dir: Path | None = None) -> str:
    """``kernelexec-kernel:<12 hex>`` from the recipe's content."""
    d = recipe_dir or kernel_image_dir()
    h = hashlib.sha256()
    for name in RECIPE:
        p = d / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return f"{REPO}:{h.hexdigest()[:12]}"


def image_present(client: Any = None, tag: str | None = None) -> bool:
    import docker.errors

    from .container import docker_client

    try:
        (client or docker_client()).images.get(tag or image_tag())
        return True
    except docker.errors.ImageNotFound:
        return False


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


def _run(cmd: list[str], what: str, progress: Progress | None, timeout: float, **kw: Any) -> None:
    """Run a command with a deadline, streaming its output lines to progress."""
    _say(progress, f"$ {' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what}: {cmd[0]} is not installed ({e})") from e
    deadline = time.monotonic() + timeout
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        _say(progress, "  " + line.rstrip())
        if time.monotonic() > deadline:
            proc.kill()
            break
    try:
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = -9
    if code != 0:
        raise ImageBuildError(f"{what} failed (exit {code}):\n" + "\n".join(tail[-15:]))


def debian_mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 .sources or one-line .list files)."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")] + \
        sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for f in candidates:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "debian" in m.group(1) and "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "debian" in m.group(1) and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def ensure_base_image(client: Any, progress: Progress | None = None, suite: str = "bookworm") -> str:
    """A minimal Debian with python3, made with debootstrap and imported (no registry needed)."""
    import docker.errors

    try:
        client.images.get(BASE_TAG)
        _say(progress, f"base image {BASE_TAG} is present")
        return BASE_TAG
    except docker.errors.ImageNotFound:
        pass
    if os.geteuid() != 0:
        raise ImageBuildError("the offline base image is made with debootstrap, which needs root; run "
                              "`sudo kernelexec image build --offline` once, or build online with a registry")
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed; `apt-get install debootstrap` (scripts/setup.sh does)")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="kernelexec-rootfs-") as root:
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", suite,
              root, mirror], "debootstrap", progress, timeout=900)
        _say(progress, f"importing the root filesystem as {BASE_TAG}")
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        try:
            imp = subprocess.run(["docker", "import", "-", BASE_TAG], stdin=tar.stdout, capture_output=True,
                                 timeout=600)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
        if imp.returncode != 0:
            raise ImageBuildError(f"docker import failed: {imp.stderr.decode(errors='replace')[-2000:]}")
    return BASE_TAG


def wheelhouse_dir() -> Path:
    return Path(os.environ.get("KERNELEXEC_WHEELHOUSE") or Path.home() / ".cache" / "kernelexec" / "wheelhouse")


def _pip_download_args(dest: Path) -> list[str]:
    args = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
            "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "-d", str(dest)]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def download_wheelhouse(recipe: Path, progress: Progress | None = None) -> Path:
    """Every locked wheel, fetched by the host's pip (its index, proxy and CA settings)."""
    dest = wheelhouse_dir()
    dest.mkdir(parents=True, exist_ok=True)
    _run(_pip_download_args(dest) + ["--no-deps", "--require-hashes", "-r", str(recipe / "requirements.lock")],
         "downloading the wheelhouse", progress, timeout=1200)
    return dest


def lock_requirements(progress: Progress | None = None, recipe: Path | None = None) -> Path:
    """Re-pin requirements.lock from requirements.in (maintainers run this; commit the result)."""
    recipe = recipe or kernel_image_dir()
    with tempfile.TemporaryDirectory() as tmp:
        _run(_pip_download_args(Path(tmp)) + ["-r", str(recipe / "requirements.in")], "resolving", progress,
             timeout=1200)
        lines = ["# Generated by kernelexec.image.lock_requirements from requirements.in: do not edit.",
                 "# CPython 3.11, manylinux x86_64 wheels, every one pinned by hash."]
        for whl in sorted(Path(tmp).glob("*.whl"), key=lambda p: p.name.lower()):
            name, version = whl.name.split("-")[:2]
            digest = hashlib.sha256(whl.read_bytes()).hexdigest()
            lines.append(f"{name.replace('_', '-').lower()}=={version} \\\n    --hash=sha256:{digest}")
    out = recipe / "requirements.lock"
    out.write_text("\n".join(lines) + "\n")
    return out


def _context(recipe: Path, wheels: Path | None, extra_ca: Path | None) -> bytes:
    """The build context as a tar: the recipe, plus the wheelhouse or a CA bundle."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in RECIPE:
            if (recipe / name).is_file():
                tar.add(recipe / name, arcname=name)
        for d in ("wheelhouse", "ca"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        if wheels is not None:
            for whl in sorted(wheels.glob("*.whl")):
                tar.add(whl, arcname=f"wheelhouse/{whl.name}")
        if extra_ca is not None:
            tar.add(extra_ca, arcname="ca/extra.pem")
    return buf.getvalue()


def _docker_build(client: Any, context: bytes, tag: str, buildargs: dict[str, str], progress: Progress | None,
                  timeout: float = 1800) -> None:
    import docker.errors

    start = time.monotonic()
    try:
        stream = client.api.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag, buildargs=buildargs,
                                  rm=True, forcerm=True, decode=True, timeout=timeout, pull=False)
        for chunk in stream:
            if "stream" in chunk:
                for line in chunk["stream"].splitlines():
                    if line.strip():
                        _say(progress, f"  [{time.monotonic() - start:5.0f}s] {line}")
            if "error" in chunk:
                raise ImageBuildError(f"docker build failed: {chunk['error'].strip()}")
    except docker.errors.APIError as e:
        raise ImageBuildError(f"docker build failed: {e.explanation}") from e


def base_pullable(client: Any, image: str = PUBLIC_BASE, timeout: float = 20) -> bool:
    """Whether the public base is here or can be pulled within ``timeout``."""
    import docker.errors

    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        pass
    proc = subprocess.run(["docker", "pull", "-q", image], capture_output=True, timeout=timeout + 5, text=True) \
        if shutil.which("docker") else None
    return proc is not None and proc.returncode == 0


def build_image(client: Any = None, *, mode: Literal["auto", "online", "offline"] = "auto", force: bool = False,
                progress: Progress | None = None, base_image: str | None = None,
                extra_ca: str | os.PathLike[str] | None = None, tag: str | None = None,
                recipe: Path | None = None) -> str:
    """Build the kernel image unless it is already there; return its tag.

    ``auto`` builds online when the public base image can be had, else offline.
    ``extra_ca`` (online) is a CA bundle for pip inside the build, for hosts
    behind a TLS-intercepting proxy; ``base_image`` overrides the base.
    """
    from .container import docker_client

    try:
        client = client or docker_client()
    except DockerUnavailable as e:
        raise ImageBuildError(str(e)) from e
    recipe = recipe or kernel_image_dir()
    tag = tag or image_tag(recipe)
    if not force and image_present(client, tag):
        _say(progress, f"{tag} is up to date (recipe unchanged); nothing to build")
        return tag
    t0 = time.monotonic()
    if mode == "auto":
        mode = "online" if base_image or base_pullable(client) else "offline"
        _say(progress, f"building {tag} ({mode}: " + ("public base image reachable)" if mode == "online"
                                                       else "no registry reachable, using debootstrap and a wheelhouse)"))
    if mode == "offline":
        base = base_image or ensure_base_image(client, progress)
        wheels = download_wheelhouse(recipe, progress)
        context = _context(recipe, wheels, None)
    else:
        base = base_image or PUBLIC_BASE
        context = _context(recipe, None, Path(extra_ca) if extra_ca else None)
    try:
        _docker_build(client, context, tag, {"BASE_IMAGE": base}, progress)
    finally:
        # the build stage's image (wheelhouse and all) is ours to remove; other dangling images are not
        client.images.prune(filters={"dangling": True, "label": "kernelexec.build-stage=1"})
    client.images.get(tag).tag(REPO, "latest")
    _say(progress, f"built {tag} in {time.monotonic() - t0:.0f} s")
    return tag


def describe(client: Any = None, tag: str | None = None) -> dict[str, Any]:
    """Size and creation time of the image, for doctor and the README."""
    from .container import docker_client

    img = (client or docker_client()).images.get(tag or image_tag())
    return {"tag": tag or image_tag(), "id": img.id, "size_mb": round(img.attrs["Size"] / 1e6),
            "created": img.attrs["Created"], "labels": json.dumps(img.labels)}
