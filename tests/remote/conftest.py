"""The remote test engine: a second dockerd over TCP+TLS that shares no filesystem with the tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import engine as remote
from . import sshd


@pytest.fixture(scope="session")
def remote_engine(kernel_image) -> Iterator[remote.RemoteEngine]:
    """A running engine with the kernel image; ``.env`` has DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH.

    Tests remove what they create there; anything left fails the run at the end (and is removed).
    """
    engine = remote.start(kernel_image)
    try:
        yield engine
    finally:
        left = remote.stop(engine)
    assert not left, f"the tests left these on the remote engine: {left}"


@pytest.fixture(scope="session")
def ssh_front(remote_engine, tmp_path_factory) -> Iterator[sshd.Sshd]:
    """An sshd on loopback whose sessions run ``docker system dial-stdio`` against the remote engine;
    ``.env`` has DOCKER_HOST=ssh://... and KERNELEXEC_SSH_OPTS (the test key and known hosts)."""
    with sshd.running(remote_engine, tmp_path_factory.mktemp("sshd") / "d") as front:
        yield front
