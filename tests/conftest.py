"""Shared fixtures: a real Docker engine, the real kernel image, real sessions."""

from __future__ import annotations

import gc
import logging
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
def nothing_left_behind(request):
    """Fails the run if it left sandboxes behind; asks the engine only when engine tests were selected."""
    if not any(item.get_closest_marker("docker") for item in request.session.items):
        yield
        return
    docker = request.getfixturevalue("docker")
    yield
    assert leftovers(docker) == ([], [], []), "the test run left sandboxes behind"


# -- the fast tier: `pytest -m "not docker"` runs with no engine at all ----------------------------------

#: Fixtures that reach the Docker engine: a test that uses one, directly or through another fixture, needs it.
DOCKER_FIXTURES = frozenset({"docker", "kernel_image", "policy", "session", "shared_session"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Marks ``docker`` every test that needs the engine: it uses a fixture of DOCKER_FIXTURES, or its
    module says ``pytestmark = pytest.mark.docker`` (it starts sessions of its own)."""
    for item in items:
        if DOCKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.docker)


#: What asyncio logs when a task or future ends with nobody to hear it: an error lost.
ORPHAN_MARKERS = ("never retrieved", "Task was destroyed but it is pending")


def orphan_errors(text: str) -> list[str]:
    """Lines of a subprocess's output in which asyncio reported a lost error."""
    return [line for line in text.splitlines() if any(m in line for m in ORPHAN_MARKERS)]


class _OrphanCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(m in message for m in ORPHAN_MARKERS):
            self.seen.append(message)


_orphans = _OrphanCatcher()
logging.getLogger("asyncio").addHandler(_orphans)


def pytest_collection_finish(session):
    """What collection imported lives for the whole run: frozen out of the collector, so that the
    gc.collect() after each test (below) scans only what tests made (a full one takes about 0.5 s here)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def no_unretrieved_asyncio_errors():
    """Fails the test during which asyncio reported a task or future whose exception nobody read."""
    yield
    gc.collect()  # such reports are made when the task is collected
    seen, _orphans.seen[:] = list(_orphans.seen), []
    assert not seen, f"asyncio reported lost errors: {seen}"
