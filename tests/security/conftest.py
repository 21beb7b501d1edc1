"""Helpers for the hostile-code catalogue.

Every test runs its attack in a real session on a real Docker engine and
checks two things: the attack failed in a precise way, and the host and the
session were fine afterwards. The helpers here only read; none of them
weakens what a test asserts.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernelexec import Policy, Session

from ..conftest import checked_session

MB = 1 << 20

#: syscall numbers of the native ABI, for attacks that libc does not wrap
_SYSCALLS = {
    "x86_64": {
        "kexec_load": 246, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "clock_settime": 227, "settimeofday": 164, "reboot": 169, "add_key": 248, "keyctl": 250,
        "request_key": 249, "perf_event_open": 298, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425,
        "pidfd_getfd": 438,
    },
    "aarch64": {
        "kexec_load": 104, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "clock_settime": 112, "settimeofday": 170, "reboot": 142, "add_key": 217, "keyctl": 219,
        "request_key": 218, "perf_event_open": 241, "open_by_handle_at": 265, "setns": 268,
        "process_vm_readv": 270, "bpf": 280, "userfaultfd": 282, "io_uring_setup": 425,
        "pidfd_getfd": 438,
    },
}
SYSCALLS = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])

#: Prepended to attack cells that call into libc: ``sc(name, *args)`` returns
#: ``[return value, errno]`` of a raw syscall.
LIBC = f"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
_NR = {SYSCALLS!r}
def sc(name, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(_NR[name]), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return [r, ctypes.get_errno()]
def call(fn, *args):
    ctypes.set_errno(0)
    r = fn(*args)
    return [r, ctypes.get_errno()]
def oserr(fn, *args):
    try:
        fn(*args)
        return 'succeeded'
    except OSError as e:
        return [type(e).__name__, e.errno]
"""


def inside(session: Session, code: str, timeout: float | None = 120) -> Any:
    """Run code that prints one JSON value last; return it decoded."""
    r = session.execute(code, timeout=timeout)
    assert r.ok, r.error and r.error.traceback
    lines = r.stdout.strip().splitlines()
    assert lines, f"the cell printed nothing: {r.outputs!r}"
    return json.loads(lines[-1])


def assert_healthy(session: Session) -> None:
    """The session still answers, with its state, after an attack."""
    r = session.execute("1 + 1", timeout=30)
    assert r.text == "2", r.outputs
    assert session.alive


# -- the host's own memory, read from /proc (psutil is not a dependency) --------

def _status_kb(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert m, field
    return int(m.group(1)) * 1024


class HostMemory:
    """Peak RSS growth of this (the host) process over a block.

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM), so the peak
    read at the end is the highest the block reached, not a leftover from an
    earlier test.
    """

    def __init__(self) -> None:
        self.before = 0
        self.peak = 0

    def __enter__(self) -> HostMemory:
        import gc

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # no reset: the peak is then an upper bound, the assertion only stricter
        self.before = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = _status_kb("VmHWM")

    @property
    def growth(self) -> int:
        return max(self.peak - self.before, 0)


@pytest.fixture
def host_memory() -> HostMemory:
    return HostMemory()


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_session(kernel_image) -> Iterator[Session]:
    """A session shared by one module's attacks that fail without damaging it."""
    with Session(Policy(image=kernel_image)) as s:
        yield checked_session(s)


@pytest.fixture
def fresh(kernel_image):
    """Start sessions with a given policy (image filled in); all closed at the end."""
    made: list[Session] = []

    def start(**policy: Any) -> Session:
        s = Session(Policy(image=kernel_image, **policy))
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def container_gone(docker, session_id: str) -> bool:
    return docker.api.containers(all=True, filters={"label": f"kernelexec.session={session_id}"}) == []


def assert_nothing_left(docker, session_id: str, sockdir: Path | None) -> None:
    assert container_gone(docker, session_id), f"the container of session {session_id} is still there"
    vols = docker.api.volumes(filters={"label": f"kernelexec.session={session_id}"}).get("Volumes") or []
    assert vols == [], vols
    if sockdir is not None:
        assert not sockdir.exists(), f"{sockdir} was not removed"


