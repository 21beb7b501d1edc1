"""Fixtures of the egress tests: the tests' own package index (see tests/egress/README.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import EgressIndex, netns_unavailable, start_index


@pytest.fixture(scope="session")
def egress_index() -> Iterator[EgressIndex]:
    """The index in a network namespace of this run (or on loopback, with ``fallback_reason``), for the
    whole session; stopped and removed, namespace and all, when the session ends."""
    with start_index() as index:
        yield index


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``netns`` (about the namespace itself) is skipped, with the reason, only where this
    process cannot make namespaces: not root, or no iproute2."""
    if item.get_closest_marker("netns") is not None:
        reason = netns_unavailable()
        if reason is not None:
            pytest.skip(reason)
