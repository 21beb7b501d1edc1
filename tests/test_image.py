"""The kernel image: its content tag, what is (and is not) in it, and both build paths, on a real engine."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from kernelexec.tools.image import (
    BASE_TAG,
    ImageBuildError,
    _run,
    build_image,
    debian_mirror,
    image_present,
    image_tag,
    kernel_image_dir,
    parse_lock,
    recipe_files,
)

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_TMPFS = {"/home/sandbox": "uid=10001,gid=10001", "/tmp": ""}


def run(docker, image: str, cmd: list[str], *, user: str | None = None, read_only: bool = False,
        tmpfs: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str, str]:
    """Run a throwaway container with no network; return exit status, stdout and stderr separately."""
    container = docker.containers.create(image, cmd, user=user, network_mode="none", read_only=read_only,
                                         tmpfs=tmpfs or {}, log_config={"type": "json-file"})
    try:
        container.start()
        code = container.wait(timeout=timeout)["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode()
        err = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    return code, out, err


def check(docker, image: str, cmd: list[str], **kw) -> str:
    code, out, err = run(docker, image, cmd, **kw)
    assert code == 0, f"{cmd} exited {code}: {err}"
    return out


# ------------------------------------------------------------------------------------------------ tag


def test_tag_is_deterministic_and_follows_the_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe"
    shutil.copytree(kernel_image_dir(), recipe)
    tag = image_tag()
    assert re.fullmatch(r"kernelexec-kernel:[0-9a-f]{12}", tag)
    assert image_tag(recipe) == image_tag(recipe) == tag
    # the same in a fresh interpreter (nothing depends on hash seeds or dict order)
    fresh = subprocess.run([sys.executable, "-c", "from kernelexec.tools.image import image_tag; print(image_tag())"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert fresh.stdout.strip() == tag, fresh.stderr

    dockerfile = recipe / "Dockerfile"
    original = dockerfile.read_bytes()
    dockerfile.write_bytes(original.replace(b"USER 10001:10001", b"USER 10001:10002"))  # one byte
    assert image_tag(recipe) != tag
    dockerfile.write_bytes(original)
    assert image_tag(recipe) == tag

    (recipe / "extra.sh").write_text("echo new recipe file\n")  # a new recipe file counts without being listed
    assert image_tag(recipe) != tag
    (recipe / "extra.sh").unlink()

    # per-build inputs and droppings do not change what the image is
    (recipe / "wheelhouse" / "numpy-0-py3-none-any.whl").write_bytes(b"a wheel")
    (recipe / "ca" / "proxy.pem").write_text("a CA")
    (recipe / "__pycache__").mkdir()
    (recipe / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"bytecode")
    (recipe / "README.md").write_text("notes")
    (recipe / "Dockerfile~").write_text("editor backup")
    assert image_tag(recipe) == tag
    assert [rel for rel, _ in recipe_files(recipe)] == [rel for rel, _ in recipe_files()]

    monkeypatch.setenv("KERNELEXEC_IMAGE_DIR", str(recipe))
    assert kernel_image_dir() == recipe.resolve() and image_tag() == tag
    monkeypatch.setenv("KERNELEXEC_IMAGE_DIR", str(tmp_path))  # not a recipe: a clear error, not a guess
    with pytest.raises(ImageBuildError, match="KERNELEXEC_IMAGE_DIR"):
        kernel_image_dir()


def test_lock_pins_every_package_by_hash():
    recipe = kernel_image_dir()
    pins = parse_lock(recipe / "requirements.lock")
    wanted = {re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower()
              for line in (recipe / "requirements.in").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert wanted == {"ipykernel", "numpy", "pandas", "matplotlib", "pillow", "pip", "dill"}
    assert wanted <= set(pins)
    for name, (version, hashes) in pins.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!]*", version), (name, version)
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    assert tuple(int(x) for x in pins["ipykernel"][0].split(".")[:2]) >= (7, 4)


def test_packaged_recipe_is_the_checkout_recipe_and_nothing_else(tmp_path):
    """A wheel carries kernel-image/ as kernelexec/_kernel_image (same tag), without the wheels or CA files
    someone left in the checkout's wheelhouse/ and ca/."""
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (the build backend)")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "kernelexec", project / "kernelexec", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(kernel_image_dir(), project / "kernel-image", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "kernel-image" / "wheelhouse" / "numpy-0-py3-none-any.whl").write_bytes(b"left over")
    (project / "kernel-image" / "ca" / "proxy.pem").write_text("a private CA")
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(project)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("kernelexec-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        packaged = sorted(n for n in z.namelist() if n.startswith("kernelexec/_kernel_image/"))
        names = z.namelist()
        z.extractall(installed)
    assert not [n for n in packaged if n.endswith((".whl", ".pem", ".crt"))], packaged
    assert "kernelexec/py.typed" in names  # the type information is shipped (PEP 561)
    recipe = installed / "kernelexec" / "_kernel_image"
    assert (recipe / "wheelhouse").is_dir() and (recipe / "ca").is_dir()  # docker build needs both
    assert image_tag(recipe) == image_tag()
    # without a checkout next to it, the library finds its packaged copy
    env = {k: v for k, v in os.environ.items() if k != "KERNELEXEC_IMAGE_DIR"}
    env["PYTHONPATH"] = str(installed)
    probe = subprocess.run([sys.executable, "-c", "from kernelexec.tools.image import kernel_image_dir, image_tag; "
                            "print(kernel_image_dir()); print(image_tag())"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert probe.stdout.split() == [str(recipe), image_tag()], probe.stderr


def test_debian_mirror_comes_from_apt_sources(tmp_path):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    assert debian_mirror("bookworm", apt) == "http://deb.debian.org/debian"  # nothing configured
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb deb-src\nURIs: http://mirror.example/debian http://other.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert debian_mirror("bookworm", apt) == "http://mirror.example/debian"
    (apt / "sources.list").write_text("# deb http://commented.example/debian bookworm main\n"
                                      "deb [arch=amd64 signed-by=/k.gpg] http://oneline.example/debian bookworm main\n")
    assert debian_mirror("bookworm", apt) == "http://oneline.example/debian"
    assert debian_mirror("trixie", apt) == "http://deb.debian.org/debian"


def test_subprocesses_have_a_deadline():
    lines: list[str] = []
    with pytest.raises(ImageBuildError, match=r"did not finish within 1 s[\s\S]*started") as info:
        # a 60 s child in the background, off the output pipe, its pid and group printed: the deadline must
        # stop the whole group, not only sh (whose end alone would close the pipe and end the wait)
        _run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo started $! $$; wait"], "sleeping", lines.append, timeout=1)
    pid, group = map(int, str(info.value).rsplit("started ", 1)[1].split()[:2])
    assert any(line.strip() == f"started {pid} {group}" for line in lines), lines
    assert not _sleeping_in_group(pid, group), f"the sleep ({pid}) still runs after the deadline"
    with pytest.raises(ImageBuildError, match=r"exit status 3[\s\S]*why"):
        _run(["sh", "-c", "echo why; exit 3"], "failing", None, timeout=30)


def _sleeping_in_group(pid: int, group: int) -> bool:
    """``pid`` is still there, in process group ``group``, and asleep or stopped: alive, not on its way out."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    state, pgrp = fields[0], int(fields[2])
    return pgrp == group and state in ("S", "T", "t")


# ------------------------------------------------------------------------------- the image, offline path


@pytest.fixture(scope="module")
def offline_image(docker) -> str:
    """The real kernel image, built by the offline path if it is not there (and left there)."""
    tag = build_image(mode="offline", progress=lambda line: print(line, file=sys.stderr))
    assert tag == image_tag() and image_present(tag=tag)
    return tag


def test_no_setuid_or_setgid_files(docker, offline_image):
    # as root, so that find sees into every directory
    assert check(docker, offline_image, ["find", "/", "-xdev", "-perm", "/6000", "-type", "f"], user="0") == ""
    assert check(docker, offline_image, ["find", "/", "-xdev", "-perm", "/6000"], user="0") == ""  # dirs too


def test_runs_as_sandbox_user_with_the_promised_layout(docker, offline_image):
    assert check(docker, offline_image, ["id", "-u"]).strip() == "10001"
    assert check(docker, offline_image, ["id", "-g"]).strip() == "10001"
    config = docker.images.get(offline_image).attrs["Config"]
    assert config["User"] == "10001:10001" and config["WorkingDir"] == "/work"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/kernel/bin:") and env["HOME"] == "/home/sandbox"
    assert env["PYTHONUNBUFFERED"] == "1" and env["MPLBACKEND"] == "module://matplotlib_inline.backend_inline"
    layout = check(docker, offline_image, ["sh", "-c", "stat -c '%n %u:%g' /work /home/sandbox /run/kernelexec; "
                                           "find /work /run/kernelexec -mindepth 1; getent passwd sandbox"])
    assert layout.splitlines() == ["/work 10001:10001", "/home/sandbox 10001:10001", "/run/kernelexec 0:0",
                                   "sandbox:x:10001:10001::/home/sandbox:/usr/sbin/nologin"]  # both dirs empty
    assert check(docker, offline_image, ["/opt/kernel/bin/python", "-c", "import sys; print(sys.prefix)"]).strip() \
        == "/opt/kernel"


def test_no_healthcheck(docker, offline_image):
    attrs = docker.images.get(offline_image).attrs
    assert attrs["Config"].get("Healthcheck") is None
    assert (attrs.get("ContainerConfig") or {}).get("Healthcheck") is None


def test_has_exactly_the_locked_packages(docker, offline_image):
    out = check(docker, offline_image, ["/opt/kernel/bin/python", "-c",
                "import ipykernel, numpy, pandas, matplotlib, PIL, json, importlib.metadata as m; "
                "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"])
    installed = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in json.loads(out).items()}
    pins = parse_lock(kernel_image_dir() / "requirements.lock")
    assert installed == {name: version for name, (version, _) in pins.items()}  # pip as locked; no setuptools
    assert tuple(int(x) for x in installed["ipykernel"].split(".")[:2]) >= (7, 4)


def test_nothing_of_the_build_is_left(docker, offline_image):
    """No wheelhouse, CA bundle, pip cache or setuptools in the kernel's venv (pip stays, as locked, for %pip
    with egress, with its own vendored CA list). (The base's own Python may carry ensurepip's bundled
    wheels: not the kernel's.)"""
    out = check(docker, offline_image, ["sh", "-c", "ls -d /build /root/.cache 2>/dev/null; "
                "find /opt /root /tmp /var/tmp /home /work /run/kernelexec \\( -name '*.whl' -o -name '*.pem' \\) "
                "-not -path '*/site-packages/pip/_vendor/certifi/*'; "
                "ls /opt/kernel/bin /opt/kernel/lib/python3.11/site-packages | grep -E '^(setuptools|_distutils_hack)' || true"],
                user="0")
    assert out == ""


def test_matplotlib_import_reuses_the_prebuilt_font_list(docker, offline_image):
    # exactly what a session has: read-only root, an empty tmpfs home
    code, out, err = run(docker, offline_image, ["/opt/kernel/bin/python", "-c", "import matplotlib.pyplot"],
                         read_only=True, tmpfs=SANDBOX_TMPFS)
    assert code == 0 and out == "" and err == "", err  # no "Matplotlib created a temporary cache directory" warning
    # with matplotlib's log on: it loaded the font list the image carries, and did not build one
    code, out, err = run(docker, offline_image, ["/opt/kernel/bin/python", "-c",
                         "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
                         "import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.savefig('/tmp/x.png'); "
                         "import matplotlib; print('cache', matplotlib.get_cachedir())"],
                         read_only=True, tmpfs=SANDBOX_TMPFS)
    assert code == 0 and err == "", err
    assert "generated new fontManager" not in out and "cache /home/sandbox/.cache/matplotlib" in out, out


def test_second_build_is_skipped(docker, offline_image):
    image_id = docker.images.get(offline_image).id
    lines: list[str] = []
    assert build_image(mode="offline", progress=lines.append) == offline_image
    assert any("up to date" in line for line in lines), lines
    assert not any("Step " in line for line in lines)
    assert docker.images.get(offline_image).id == image_id


def test_failed_build_says_why_and_leaves_nothing(docker, tmp_path, monkeypatch):
    """A build that fails raises ImageBuildError with the step's output, and no tag or intermediate image
    of it stays behind. (A small recipe and a fake wheel: the offline path reads the wheelhouse, no network.)"""
    recipe = tmp_path / "recipe"
    (recipe / "wheelhouse").mkdir(parents=True)
    (recipe / "ca").mkdir()
    label = f"kernelexec-test-failing-{os.getpid()}"
    (recipe / "Dockerfile").write_text(
        "ARG BASE_IMAGE=python:3.11-slim-bookworm\nFROM ${BASE_IMAGE}\n"
        f"LABEL kernelexec.test={label}\nCOPY requirements.lock wheelhouse/ /build/\n"
        "RUN ls /build && echo about to fail && exit 3\n")
    wheel = b"not really a wheel"
    (recipe / "requirements.lock").write_text(
        f"cycler==0.12.1 \\\n    --hash=sha256:{hashlib.sha256(wheel).hexdigest()}\n")
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "cycler-0.12.1-py3-none-any.whl").write_bytes(wheel)
    monkeypatch.setenv("KERNELEXEC_WHEELHOUSE", str(wheelhouse))
    tag = f"kernelexec-test-failing:{os.getpid()}"
    with pytest.raises(ImageBuildError) as failure:
        build_image(mode="offline", base_image=BASE_TAG, recipe=recipe, tag=tag)
    message = str(failure.value)
    assert "non-zero code: 3" in message and "about to fail" in message and "cycler-0.12.1" in message
    assert "wheelhouse" in message  # what to do next
    assert not image_present(tag=tag)
    assert docker.images.list(all=True, filters={"label": f"kernelexec.test={label}"}) == []


# -------------------------------------------------------------------------------------- the online path


def host_pip_setting(key: str) -> str | None:
    """A setting of the host's pip (environment first, then its config files)."""
    value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if value:
        return value
    got = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"global.{key}"], capture_output=True,
                         text=True, timeout=60)
    return (got.stdout.strip() or None) if got.returncode == 0 else None


@pytest.mark.slow
def test_online_path_installs_from_the_index_with_hashes(docker):
    """Path (a): the recipe as `docker build kernel-image/` sees it, with no wheelhouse, so pip in the build
    fetches every package from the index and checks its hash. The public base cannot be pulled on a machine
    without a registry, so the debootstrap base stands in for it; the host's index (if it set one that a
    container can reach) and CA bundle go in through the build args / ca/ as they would behind a proxy."""
    assert not list((kernel_image_dir() / "wheelhouse").glob("*.whl")), "the checkout's wheelhouse must be empty"
    index = host_pip_setting("index-url")
    index = index if index and index.startswith(("http://", "https://")) else None
    ca = host_pip_setting("cert") or "/etc/ssl/certs/ca-certificates.crt"
    ca = ca if os.path.isfile(ca) else None
    tag = f"kernelexec-test-online:{os.getpid()}"
    lines: list[str] = []
    try:
        build_image(mode="online", base_image=BASE_TAG, index_url=index, extra_ca=ca, tag=tag,
                    force=True, progress=lines.append)
        log = "\n".join(lines)
        # (the engine echoes each RUN command, so look for whole output lines, not substrings of the script)
        assert re.search(r"\] kernelexec: installing from the package index$", log, re.M), log[-3000:]
        assert re.search(r"\] +Downloading \S*numpy-\S+\.whl", log, re.M), log[-3000:]
        assert "Processing /build/wheelhouse" not in log
        if ca:
            assert re.search(r"\] kernelexec: pip also trusts /build/ca/\S+$", log, re.M)
        assert docker.images.get(tag).labels["kernelexec.build.mode"] == "online"
        out = check(docker, tag, ["/opt/kernel/bin/python", "-c",
                                  "import ipykernel, numpy, pandas, matplotlib, PIL; print(ipykernel.__version__)"])
        assert out.strip() == parse_lock(kernel_image_dir() / "requirements.lock")["ipykernel"][0]
        assert check(docker, tag, ["find", "/", "-xdev", "-perm", "/6000", "-type", "f"], user="0") == ""
        assert check(docker, tag, ["id", "-u"]).strip() == "10001"
        # the index URL and CA stayed in the (removed) build stage
        history = json.dumps(docker.api.history(tag))
        assert "PIP_INDEX_URL" not in history and "ca-bundle" not in history
    finally:
        if image_present(tag=tag):
            docker.images.remove(tag, force=True)
    assert any(line.startswith("removed") and "left by this build" in line for line in lines)  # the CA's stage


# ------------------------------------------------------------------------------ deadlines of a build


def small_recipe(tmp_path: Path, run: str) -> Path:
    recipe = tmp_path / "recipe"
    (recipe / "wheelhouse").mkdir(parents=True)
    (recipe / "ca").mkdir()
    (recipe / "requirements.lock").write_text("")
    (recipe / "Dockerfile").write_text(f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN {run}\n")
    return recipe


@pytest.mark.parametrize("limit, run, said", [
    ("_BUILD_SILENCE", "echo going quiet; sleep 120", "printed nothing for 3 s"),
    ("_BUILD_TIMEOUT", "while true; do echo still busy; sleep 1; done", "took longer than 3 s and was cancelled"),
])
def test_a_silent_or_endless_build_is_stopped_and_leaves_nothing(docker, kernel_image, tmp_path, monkeypatch,
                                                                 limit, run, said):
    """The build's silence limit and its overall deadline both end it: the connection closes, the engine
    cancels the step (its container goes), and the error says which limit it was."""
    import kernelexec.tools.image

    monkeypatch.setattr(kernelexec.tools.image, limit, 3.0)
    marker = f"kx-limit-{os.getpid()}-{limit.lower()}"
    tag = f"kernelexec-test-limit:{os.getpid()}"
    lines: list[str] = []
    with pytest.raises(ImageBuildError, match=said):
        build_image(mode="online", base_image=kernel_image, recipe=small_recipe(tmp_path, f"{run} # {marker}"),
                    tag=tag, progress=lines.append)
    assert any(line.endswith(("] going quiet", "] still busy")) for line in lines), lines
    assert not image_present(tag=tag)

    def steps() -> list[str]:
        return [c.id for c in docker.containers.list(all=True) if marker in " ".join(c.attrs["Config"]["Cmd"] or [])]

    deadline = time.monotonic() + 60  # the engine removes the cancelled step's container a moment later
    while steps() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert steps() == []


def test_a_docker_sdk_client_is_deprecated_but_still_names_the_engine(docker, kernel_image):
    with pytest.warns(DeprecationWarning, match="kernelexec.backend.docker.api.DockerAPI"):
        assert image_present(docker, kernel_image)
    with pytest.raises(TypeError, match="DockerAPI"):
        image_present("unix:///var/run/docker.sock", kernel_image)  # type: ignore[arg-type]
