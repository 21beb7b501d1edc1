"""Hostile code flooding its output: every execution comes back cut at the
Policy's budget with the truncation marker, the host's memory stays bounded,
and the session goes on.

Two layers are tested: the kernel-side cut (``kernel/startup.py``, a courtesy the
code can undo) and the host's own bounds, by code that bypasses the kernel's
streams and publishes straight onto the IOPub socket.
"""

from __future__ import annotations

import pytest

from kernelexec import KernelDied
from kernelexec.policy import parse_size
from kernelexec.results import TRUNCATION_MARKER

from .conftest import MB, HostMemory, assert_healthy

RSS_BOUND = 200 * MB
#: publish on IOPub directly, as ipykernel does, skipping every kernel-side cut
RAW_SEND = """
k = get_ipython().kernel
# hostile code undoes what the kernel side set up (its message bounds included) and sends as it likes
vars(k.session).pop("serialize", None)
def raw(msg_type, content):
    k.session.send(k.iopub_socket, msg_type, content, parent=k.get_parent())
"""


def _limit(session) -> int:
    return parse_size(session.policy.max_output_bytes)


def _assert_cut(r, limit: int) -> None:
    marker = TRUNCATION_MARKER.format(limit=limit)
    assert r.truncated is True
    assert marker in r.stdout + r.stderr + "".join(b.text or "" for b in r.results)
    kept = sum(len(o.text.encode()) for o in r.outputs if hasattr(o, "name"))
    kept += sum(len(str(b.data)) for b in r.results)
    assert kept <= limit + 2 * len(marker) + 16, kept


def test_printing_1gb_in_chunks_is_cut(module_session):
    with HostMemory() as mem:
        r = module_session.execute("for _ in range(1024):\n    print('x' * (1 << 20))", timeout=60)
    assert r.ok
    _assert_cut(r, _limit(module_session))
    assert r.stdout.startswith("x" * 1000)
    assert mem.growth < RSS_BOUND, mem.growth
    assert_healthy(module_session)


def test_one_300mb_line_is_cut(module_session):
    with HostMemory() as mem:
        r = module_session.execute("print('y' * 300_000_000)", timeout=60)
    assert r.ok
    _assert_cut(r, _limit(module_session))
    assert mem.growth < RSS_BOUND, mem.growth
    assert_healthy(module_session)


def test_200mb_display_data_is_replaced_by_the_marker(module_session):
    with HostMemory() as mem:
        r = module_session.execute("display({'text/plain': 'z' * 200_000_000, 'text/html': 'h' * 1000}, raw=True)",
                                   timeout=60)
    assert r.ok
    _assert_cut(r, _limit(module_session))
    assert all(len(str(b.data)) < 4096 for b in r.results)
    assert mem.growth < RSS_BOUND, mem.growth
    assert_healthy(module_session)


@pytest.mark.slow
def test_a_loop_of_100k_displays_is_cut(module_session):
    with HostMemory() as mem:
        r = module_session.execute("for i in range(100_000):\n    display(i)", timeout=80)
    assert r.ok
    _assert_cut(r, _limit(module_session))
    assert 0 < len(r.results) < 100_000
    assert r.results[0].text == "0"
    assert mem.growth < RSS_BOUND, mem.growth
    assert_healthy(module_session)


def test_execute_result_with_a_giant_repr_is_cut(module_session):
    with HostMemory() as mem:
        r = module_session.execute("class Huge:\n    def __repr__(self):\n        return 'r' * 150_000_000\nHuge()",
                                   timeout=60)
    assert r.ok
    assert r.result is not None
    assert r.truncated is True
    assert r.text == TRUNCATION_MARKER.format(limit=_limit(module_session))
    assert mem.growth < RSS_BOUND, mem.growth
    assert_healthy(module_session)


def test_raw_fd_writes_are_cut(module_session):
    """os.write(1, ...) goes through ipykernel's pipe capture, which is cut too."""
    with HostMemory() as mem:
        r = module_session.execute("import os\nfor _ in range(200):\n    os.write(1, b'w' * (1 << 20))", timeout=60)
    assert r.ok
    _assert_cut(r, _limit(module_session))
    assert mem.growth < RSS_BOUND, mem.growth
    assert_healthy(module_session)


def test_the_limit_is_the_policys(fresh):
    s = fresh(max_output_bytes="64k")
    r = s.execute("print('q' * 1_000_000)")
    _assert_cut(r, 64 * 1024)
    assert TRUNCATION_MARKER.format(limit=65536) in r.stdout
    assert 64 * 1024 <= len(r.stdout) <= 64 * 1024 + len(TRUNCATION_MARKER) + 16
    # the next cell has a fresh budget
    r = s.execute("print('small')")
    assert r.stdout == "small\n" and r.truncated is False
    assert_healthy(s)


def test_output_that_fills_the_budget_exactly_then_goes_on_is_marked(fresh):
    """Exactly the budget, then more: what follows is dropped, and that must be said."""
    s = fresh(max_output_bytes="64k")
    r = s.execute("import time\nprint('e' * (64 * 1024 - 1), flush=True)\ntime.sleep(0.5)\n"
                  "print('this line is over the budget')")
    assert r.stdout.startswith("e" * 65535 + "\n")
    assert "this line is over the budget" not in r.stdout
    assert r.truncated is True
    assert TRUNCATION_MARKER.format(limit=65536) in r.stdout + r.stderr
    assert_healthy(s)


def test_host_cuts_output_that_bypasses_the_kernel_side_cap(module_session):
    """200 x 1 MB stream messages published straight on IOPub: the host keeps its budget."""
    with HostMemory() as mem:
        r = module_session.execute(RAW_SEND + """
for _ in range(200):
    raw('stream', {'name': 'stdout', 'text': 'B' * (1 << 20)})
""", timeout=60)
    assert r.ok
    limit = _limit(module_session)
    assert r.truncated is True
    assert r.stdout.endswith("\n" + TRUNCATION_MARKER.format(limit=limit) + "\n")
    assert len(r.stdout.encode()) <= limit + len(TRUNCATION_MARKER) + 16
    assert r.output_bytes == limit
    assert mem.growth < RSS_BOUND, mem.growth
    assert_healthy(module_session)


def test_host_cuts_display_data_that_bypasses_the_kernel_side_cap(fresh):
    s = fresh(max_output_bytes="64k")
    with HostMemory() as mem:
        r = s.execute(RAW_SEND + """
for i in range(300):
    raw('display_data', {'data': {'text/plain': str(i) + ' ' + 'D' * 100_000}, 'metadata': {}, 'transient': {}})
""", timeout=60)
    assert r.ok
    assert r.truncated is True
    assert TRUNCATION_MARKER.format(limit=65536) in r.stderr
    assert sum(len(str(b.data)) for b in r.results) <= 65536
    assert mem.growth < RSS_BOUND, mem.growth
    assert_healthy(s)


def test_a_message_over_max_message_bytes_ends_the_session_cleanly(fresh, docker):
    """A 20 MB message (the cap is 16 MB) bypassing the kernel's streams: the host drops the
    connection without buffering it, says why, and restart() gives a working kernel."""
    s = fresh()
    first = s.container_id
    with HostMemory() as mem:
        with pytest.raises(KernelDied) as info:
            s.execute(RAW_SEND + "raw('stream', {'name': 'stdout', 'text': 'C' * (20 << 20)})\n"
                      "import time; time.sleep(20)", timeout=25)
    assert "max_message_bytes" in str(info.value)
    assert info.value.state_lost is True
    assert mem.growth < RSS_BOUND, mem.growth
    assert not s.alive
    with pytest.raises(Exception, match="No such container"):
        docker.api.inspect_container(first)  # the broken kernel's container is gone
    s.restart()
    assert_healthy(s)
