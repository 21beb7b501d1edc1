"""Shared fixtures: a real Docker engine, the real kernel image, real sessions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from kernelexec import Policy, Session
from kernelexec.container import docker_client
from kernelexec.sockdir import PREFIX, socket_root


@pytest.fixture(scope="session")
def docker():
    return docker_client()


@pytest.fixture(scope="session")
def kernel_image(docker) -> str:
    """The content-tagged kernel image, built (offline when needed) if missing."""
    override = os.environ.get("KERNELEXEC_TEST_IMAGE")
    if override:
        return override
    from kernelexec.image import build_image, image_present, image_tag

    tag = image_tag()
    if not image_present(docker, tag):
        build_image(docker, progress=lambda line: print(line, file=sys.stderr))
    return tag


@pytest.fixture(scope="session")
def policy(kernel_image) -> Policy:
    return Policy(image=kernel_image)


@pytest.fixture
def session(policy):
    with Session(policy) as s:
        yield s


@pytest.fixture(scope="module")
def shared_session(kernel_image):
    """One session for tests that only read; saves a container start each."""
    with Session(Policy(image=kernel_image)) as s:
        yield s


def leftovers(docker) -> tuple[list[str], list[str], list[str]]:
    """Containers, volumes and socket directories of this process's sessions."""
    pid = str(os.getpid())
    containers = [c["Id"] for c in docker.api.containers(all=True, filters={"label": f"kernelexec.owner_pid={pid}"})]
    volumes = [v["Name"] for v in docker.api.volumes(filters={"label": f"kernelexec.owner_pid={pid}"}).get("Volumes") or []]
    dirs = [p.name for p in Path(socket_root()).glob(f"{PREFIX}{pid}-*")]
    return containers, volumes, dirs


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(docker):
    yield
    assert leftovers(docker) == ([], [], []), "the test run left sandboxes behind"
