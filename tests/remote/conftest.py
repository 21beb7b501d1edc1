"""The remote test engine: a second dockerd over TCP+TLS that shares no filesystem with the tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import engine as remote


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
