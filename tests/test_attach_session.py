"""Sessions on the attach transport when the connection to the engine is lost and the kernel
lives on: the session re-attaches, the state survives, and an execution in flight is reported
as OutputLost (its output went nowhere), never as a dead kernel or a hang."""

from __future__ import annotations

import threading

import pytest

from kernelexec import KernelDied, OutputLost, Policy, Session


def _drop_connection(s: Session) -> None:
    """What a network hiccup or an engine proxy restart does: the attach connection ends."""
    sandbox = s._async._sandbox
    assert sandbox is not None and sandbox.channels is not None
    writer = sandbox.channels._writer  # type: ignore[attr-defined]
    s._loop.loop.call_soon_threadsafe(writer.transport.abort)


@pytest.fixture
def attached(kernel_image):
    with Session(Policy(image=kernel_image, transport="attach")) as s:
        assert s.transport == "attach"
        yield s


def test_a_connection_lost_while_idle_is_recovered_without_a_word(attached):
    attached.execute("x = 41")
    container = attached.container_id
    _drop_connection(attached)
    assert attached.execute("x + 1").text == "42"
    assert attached.container_id == container


def test_a_connection_lost_mid_execution_is_output_lost_with_state_kept(attached):
    attached.execute("x = 41")
    timer = threading.Timer(1.0, _drop_connection, (attached,))
    timer.start()
    try:
        with pytest.raises(OutputLost) as info:
            attached.execute("import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.1)\nx += 1")
    finally:
        timer.join()
    assert info.value.state_lost is False and info.value.frames_lost >= 0
    # the cell went on running while nobody listened; the next request queues behind it
    assert attached.execute("x").text == "42"


def test_a_kernel_that_exited_is_not_reattached(attached):
    with pytest.raises(KernelDied) as info:
        attached.execute("import os; os._exit(3)")
    assert info.value.state_lost and "3" in info.value.reason
