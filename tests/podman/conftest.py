"""Podman engines (rootful and rootless) started by the tests; see engine.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import engine as podman


def _started(start, kernel_image: str) -> Iterator[podman.PodmanEngine]:
    if not podman.available():
        pytest.fail("podman is not installed: scripts/setup.sh installs Debian's podman, uidmap, slirp4netns "
                    "and fuse-overlayfs")
    engine = start()
    try:
        podman.copy_image(kernel_image, engine)
        yield engine
    finally:
        left = podman.stop(engine)
    assert not left, f"the tests left these on {engine.name}: {left}"


@pytest.fixture(scope="session")
def podman_rootful(kernel_image) -> Iterator[podman.PodmanEngine]:
    """``podman system service`` as root on its own socket, with the kernel image."""
    yield from _started(podman.start_rootful, kernel_image)


@pytest.fixture(scope="session")
def podman_rootless(kernel_image) -> Iterator[podman.PodmanEngine]:
    """``podman system service`` as a user made for the run, on its own socket, with the kernel image."""
    yield from _started(podman.start_rootless, kernel_image)


@pytest.fixture(scope="session", params=["rootful", "rootless"])
def podman_engine(request) -> podman.PodmanEngine:
    return request.getfixturevalue(f"podman_{request.param}")
