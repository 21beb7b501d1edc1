"""Shared fixtures: a real Docker engine, the real kernel image, real sessions.

The engine is the one the environment names (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``,
``DOCKER_CERT_PATH``, contexts), so the same tests run against a remote engine (see
tests/remote/test_suites.py). Two variables run them under another runtime or transport:
``KERNELEXEC_TEST_RUNTIME`` (e.g. ``runsc``) and ``KERNELEXEC_TEST_TRANSPORT`` (``attach``)
become the default of every :class:`Policy` this test process makes that does not set the
field itself. Tests marked ``ipc`` are about the ipc transport's socket directory; the runs on
another transport deselect them by that marker (``-m "not ipc"``), never by a skip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import sys
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import TypeVar

import pytest

from kernelexec import Policy, Session
from kernelexec.backend.sockdir import PREFIX, socket_root

from .sdk import docker_client

#: Policy fields whose default a test run may change, and the variables that change them.
TEST_DEFAULTS = {"runtime": "KERNELEXEC_TEST_RUNTIME", "transport": "KERNELEXEC_TEST_TRANSPORT"}


def run_policy_defaults(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The Policy defaults this run asked for (empty in an ordinary run)."""
    return {name: env[var] for name, var in TEST_DEFAULTS.items() if env.get(var)}


def _apply_policy_defaults(defaults: dict[str, str]) -> None:
    """Every Policy made here without ``runtime``/``transport`` gets the run's.

    Given as arguments, so they count as set by the caller: a role profile keeps them too.
    Applied before any test module is imported; the library itself is not changed.
    """
    if not defaults:
        return
    names = [f.name for f in dataclasses.fields(Policy)]
    original = Policy.__init__

    def init(self: Policy, *args: object, **kwargs: object) -> None:
        given = set(names[: len(args)]) | set(kwargs)
        original(self, *args, **{**{k: v for k, v in defaults.items() if k not in given}, **kwargs})

    Policy.__init__ = init  # type: ignore[method-assign]


_apply_policy_defaults(run_policy_defaults())


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory) -> Path:
    """Paused sessions of this run (tests, their subprocesses, README examples) live in a directory of the
    run's, never in the user's ``~/.local/state``; none may be left when the run ends."""
    from kernelexec.snapshot import paused

    path = tmp_path_factory.mktemp("kernelexec-state")
    previous = os.environ.get("KERNELEXEC_STATE_DIR")
    os.environ["KERNELEXEC_STATE_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["KERNELEXEC_STATE_DIR"]
    else:
        os.environ["KERNELEXEC_STATE_DIR"] = previous
    assert [p.id for p in paused(path)] == [], "the test run left paused sessions"


def pytest_report_header(config: pytest.Config) -> list[str]:
    from kernelexec.backend.docker.endpoint import default_endpoint

    header = [f"kernelexec engine: {default_endpoint().describe()}"]
    if run_policy_defaults():
        header.append(f"kernelexec Policy defaults for this run: {run_policy_defaults()}")
    return header


def expected_transport() -> str | None:
    """The transport every session of this run must use, when the run decides it."""
    from kernelexec.backend.docker.endpoint import default_endpoint

    defaults = run_policy_defaults()
    if "transport" in defaults:
        return defaults["transport"]
    if defaults.get("runtime") == "runsc" or not default_endpoint().is_local:
        return "attach"
    return None


@pytest.fixture(scope="session")
def docker():
    return docker_client()


@pytest.fixture(scope="session")
def kernel_image(docker) -> str:
    """The content-tagged kernel image, built (offline when needed) if missing."""
    override = os.environ.get("KERNELEXEC_TEST_IMAGE")
    if override:
        return override
    from kernelexec.tools.image import build_image, image_present, image_tag

    tag = image_tag()
    if not image_present(tag=tag):
        build_image(progress=lambda line: print(line, file=sys.stderr))
    return tag


@pytest.fixture(scope="session")
def policy(kernel_image) -> Policy:
    return Policy(image=kernel_image)


def checked_session(s: Session) -> Session:
    """A session of this run's transport and runtime: a run meant for attach or runsc that fell back
    to ipc or runc would prove nothing."""
    want = expected_transport()
    assert want is None or s.transport == want, f"this run is for transport {want!r}, the session uses {s.transport!r}"
    runtime = run_policy_defaults().get("runtime")
    if runtime:
        used = docker_client().api.inspect_container(s.container_id)["HostConfig"].get("Runtime")
        assert used == runtime, f"this run is for runtime {runtime!r}, the session's container runs on {used!r}"
    return s


@pytest.fixture
def session(policy):
    with Session(policy) as s:
        yield checked_session(s)


@pytest.fixture(scope="module")
def shared_session(kernel_image):
    """One session for tests that only read; saves a container start each."""
    with Session(Policy(image=kernel_image)) as s:
        yield checked_session(s)


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


T = TypeVar("T")


def run_alone(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run a pure test's coroutine, bounded by ``timeout`` so that a broken transport fails the test
    instead of hanging it; it must leave no task behind."""

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert not left, f"tasks left behind: {left}"

    return asyncio.run(bounded())


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
