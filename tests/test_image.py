"""The kernel image: content tag, what is (not) in it, and both build paths."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from kernelexec.image import BASE_TAG, build_image, image_tag, kernel_image_dir


def test_tag_is_deterministic_and_follows_the_recipe(tmp_path):
    recipe = tmp_path / "recipe"
    shutil.copytree(kernel_image_dir(), recipe)
    assert image_tag(recipe) == image_tag(recipe) == image_tag()
    lock = recipe / "requirements.lock"
    lock.write_text(lock.read_text() + "\n# changed\n")
    assert image_tag(recipe) != image_tag()
    (recipe / "wheelhouse" / "extra.whl").write_bytes(b"not part of the recipe")
    lock.write_text((kernel_image_dir() / "requirements.lock").read_text())
    assert image_tag(recipe) == image_tag()


def run_in(docker, image: str, cmd: list[str], user: str | None = None) -> str:
    return docker.containers.run(image, cmd, remove=True, network_mode="none", log_config={"type": "json-file"},
                                 stdout=True, stderr=True, user=user).decode()


SETUID = ["find", "/", "-xdev", "-perm", "/6000", "-type", "f"]


def test_image_contents(docker, kernel_image):
    assert run_in(docker, kernel_image, SETUID, user="0") == ""  # root, so that find sees every directory
    assert run_in(docker, kernel_image, ["id", "-u"]).strip() == "10001"
    cfg = docker.images.get(kernel_image).attrs["Config"]
    assert cfg.get("Healthcheck") is None and cfg["User"] == "10001:10001"
    versions = run_in(docker, kernel_image, ["/opt/kernel/bin/python", "-c",
                      "import ipykernel, numpy, pandas, matplotlib, PIL; print(ipykernel.__version__)"])
    major, minor = (int(x) for x in versions.strip().split(".")[:2])
    assert (major, minor) >= (7, 4)
    assert run_in(docker, kernel_image, ["sh", "-c", "ls /opt/kernel/share/matplotlib"]).startswith("fontlist")
    assert run_in(docker, kernel_image, ["sh", "-c", "command -v pip || echo none"]).strip() == "none"


def test_second_build_is_skipped(docker, kernel_image):
    t0 = time.monotonic()
    lines: list[str] = []
    assert build_image(docker, progress=lines.append) == image_tag()
    assert any("up to date" in line for line in lines) and time.monotonic() - t0 < 10


@pytest.mark.slow
def test_online_path_installs_from_the_index_with_hashes(docker, tmp_path):
    """Path (a): the Dockerfile as a registry user runs it, with no wheelhouse. The public base cannot be
    pulled here, so the debootstrap base stands in for it; pip inside the build reaches the index with
    the host's CA bundle (the build arg for TLS-intercepting proxies)."""
    tag = "kernelexec-test-online:latest"
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    lines: list[str] = []
    try:
        build_image(docker, mode="online", base_image=BASE_TAG, extra_ca=ca if ca.exists() else None, tag=tag,
                    force=True, progress=lines.append)
        log = "\n".join(lines)
        assert "Downloading" in log  # from the index ...
        assert "Processing /build/wheelhouse" not in log  # ... not from a wheelhouse
        out = run_in(docker, tag, ["/opt/kernel/bin/python", "-c", "import ipykernel, pandas; print('ok')"])
        assert out.strip() == "ok"
        assert run_in(docker, tag, SETUID, user="0") == ""
    finally:
        if docker.images.list(name=tag):
            docker.images.remove(tag, force=True)
