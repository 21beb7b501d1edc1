"""A hostile kernel: the code in the sandbox controls the kernel process and its
signing key, so it can send anything. A test image replaces ipykernel with a
fake (``fake_kernel/ipykernel_launcher.py``) that misbehaves on purpose; the
host must answer each violation with a clear, typed outcome (never a hang),
keep its memory bounded, and leave nothing behind.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kernelexec import ExecutionTimeout, KernelDied, Policy, ProtocolError, Session
from kernelexec.policy import parse_size
from kernelexec.results import TRUNCATION_MARKER

from .conftest import MB, HostMemory, assert_nothing_left

FAKE_SOURCE = Path(__file__).parent / "fake_kernel" / "ipykernel_launcher.py"
RSS_BOUND = 200 * MB


@pytest.fixture(scope="module")
def fake_image(docker, kernel_image) -> Iterator[str]:
    """``FROM <kernel image>`` plus the fake kernel in /fake; removed after the module."""
    base_id = docker.images.get(kernel_image).id
    digest = hashlib.sha256(FAKE_SOURCE.read_bytes() + base_id.encode()).hexdigest()[:12]
    tag = f"kernelexec-test-fakekernel:{digest}"
    ctx = Path(tempfile.mkdtemp(prefix="kx-fake-"))
    try:
        (ctx / "fake").mkdir()
        shutil.copy(FAKE_SOURCE, ctx / "fake" / "ipykernel_launcher.py")
        (ctx / "Dockerfile").write_text(f"FROM {kernel_image}\nCOPY fake/ /fake/\n")
        docker.images.build(path=str(ctx), tag=tag, rm=True, forcerm=True, pull=False)
    finally:
        shutil.rmtree(ctx)
    yield tag
    docker.images.remove(tag, force=True)


@contextmanager
def hostile(fake_image: str, docker, mode: str, **policy) -> Iterator[Session]:
    """A session on the fake kernel in ``mode``; after it, nothing of it may remain."""
    policy.setdefault("timeout", 30.0)
    policy.setdefault("interrupt_grace", 1.0)
    # the fake stands in for `python -m ipykernel_launcher` (the stock launcher); what the host
    # receives is the same whichever launcher runs, since code in the kernel controls the process
    policy.setdefault("fast_kernel", False)
    s = Session(Policy(image=fake_image, env={"PYTHONPATH": "/fake", "FAKE_MODE": mode}, **policy))
    dirs = [s.socket_dir]
    try:
        assert s._async.kernel_info.get("implementation") == "fake"  # the fake really is what runs
        yield s
    finally:
        dirs.append(s.socket_dir)
        s.close()
    for d in dirs:  # the first kernel's and the last one's (restarts keep the session id)
        assert_nothing_left(docker, s.id, d)


def good_again(s: Session) -> None:
    """restart() gives a working kernel: the fake answers ordinary code properly."""
    first = s.container_id
    s.restart()
    assert s.container_id != first
    r = s.execute("1 + 1", timeout=20)
    assert r.text == "2" and r.ok


def test_the_fake_kernel_speaks_the_protocol_when_not_attacking(fake_image, docker):
    with hostile(fake_image, docker, "good") as s:
        assert s.execute("1 + 1").text == "2"
        r = s.execute("x = 6")
        assert r.ok and r.outputs == []
        assert s.execute("x * 7").text == "42"
        r = s.execute("1 / 0")
        assert r.status == "error" and r.error.ename == "ZeroDivisionError"


VIOLATIONS = [
    ("no_delimiter", "a message without the <IDS|MSG> delimiter"),
    ("short", "a message with 2 frames after the delimiter; 5 needed"),
    ("many_buffers", "a message with 50 buffers; at most 8"),
    ("not_json", "a content that is not valid JSON"),
    ("not_object", "a content that is not a JSON object"),
    ("no_msg_type", "a message header without a msg_type"),
    ("deep", "a content nested too deeply to parse"),
    ("deep_iopub", "a content nested deeper than 64 levels"),
    ("unsigned", "a message with a wrong HMAC signature"),
    ("badsig", "a message with a wrong HMAC signature"),
    ("badsig_iopub", "a message with a wrong HMAC signature"),
]


@pytest.mark.parametrize("mode,says", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_protocol_violation_ends_the_session_with_a_clear_error(fake_image, docker, mode, says):
    with hostile(fake_image, docker, mode) as s:
        first = s.container_id
        with HostMemory() as mem:
            with pytest.raises(KernelDied) as info:
                s.execute("attack()", timeout=20)
        assert str(info.value).startswith("the kernel died (the kernel broke the protocol: the kernel sent " + says)
        assert isinstance(info.value.__cause__, ProtocolError)
        assert info.value.state_lost is True
        assert not s.alive
        assert docker.api.containers(all=True, filters={"id": first}) == []  # the broken kernel is gone
        with pytest.raises(KernelDied):
            s.execute("1 + 1")  # remembered, not retried against a kernel that cannot be trusted
        assert mem.growth < RSS_BOUND, mem.growth
        good_again(s)


def test_forged_idle_does_not_end_the_execution_early(fake_image, docker):
    with hostile(fake_image, docker, "forged_idle") as s:
        r = s.execute("attack()")
        assert r.ok
        assert r.stdout == "real output\n"  # sent after the forged idle: the wait did not end there
        assert s.execute("1 + 1").text == "2"


def test_forged_reply_to_another_message_is_ignored(fake_image, docker):
    with hostile(fake_image, docker, "forged_reply") as s:
        r = s.execute("attack()")
        assert r.ok and r.error is None
        assert r.execution_count != 999
        assert r.stdout == "real output\n"  # sent after the forged reply: the wait did not end there
        assert s.execute("1 + 1").text == "2"


def test_a_100mb_message_is_refused_without_being_buffered(fake_image, docker):
    with hostile(fake_image, docker, "huge") as s:
        with HostMemory() as mem:
            with pytest.raises(KernelDied) as info:
                s.execute("attack()", timeout=25)
        assert "larger than max_message_bytes (16777216 bytes)" in str(info.value)
        assert mem.growth < RSS_BOUND, mem.growth  # 100 MB never reached the host's memory
        good_again(s)


@pytest.mark.slow
def test_a_flood_of_a_million_iopub_messages_is_bounded(fake_image, docker):
    # a 1 MB budget, so that the share of the flood that ZeroMQ delivers (most is dropped at the
    # kernel's high-water mark) always exceeds it
    with hostile(fake_image, docker, "flood", timeout=150.0, max_output_bytes="1m") as s:
        limit = parse_size(s.policy.max_output_bytes)
        with HostMemory() as mem:
            r = s.execute("attack()")
        assert r.ok
        assert r.truncated is True
        assert r.output_bytes <= limit
        assert r.stdout.endswith(TRUNCATION_MARKER.format(limit=limit) + "\n")
        assert len(r.stdout.encode()) <= limit + len(TRUNCATION_MARKER) + 16
        assert mem.growth < RSS_BOUND, mem.growth
        r = s.execute("1 + 1", timeout=30)
        assert r.text == "2" and r.stdout == ""  # none of the flood leaks into the next execution
        assert s.execute("flood_sent").text == "1000000"  # the fake did send all 1,000,000


def test_output_after_the_reply_does_not_leak_into_the_next_execution(fake_image, docker):
    with hostile(fake_image, docker, "late_output") as s:
        with HostMemory() as mem:
            r = s.execute("attack()")
            assert r.ok and r.stdout == "on time\n" and r.results == []
            later = []
            for _ in range(5):  # while the late thread is still publishing with the old parent
                later.append(s.execute("1 + 1"))
                time.sleep(0.2)
        for x in later:
            assert x.text == "2" and x.stdout == "" and [b.text for b in x.results] == ["2"]
        assert "late" not in r.stdout
        assert mem.growth < RSS_BOUND, mem.growth


def test_a_kernel_that_never_replies_is_replaced_after_the_timeout(fake_image, docker):
    with hostile(fake_image, docker, "never_reply") as s:
        first = s.container_id
        with pytest.raises(ExecutionTimeout) as info:
            s.execute("attack()", timeout=2)
        assert info.value.state_lost is True
        assert s.container_id != first
        assert docker.api.containers(all=True, filters={"id": first}) == []
        assert s.alive
        assert s.execute("1 + 1").text == "2"
