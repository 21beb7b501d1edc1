"""The session's own logic against real kernels on this host (the local backend): no engine needed.

Timeouts, interrupts, replacing a kernel that ignores them, cancellation, deaths, restarts, history,
files and closing are decided by the session whatever the backend; here they run against a real
ipykernel process (:class:`kernelexec.backend.local.LocalSandbox`), fast and with no Docker at all.
The Docker suite (test_session.py, test_session_edges.py) proves the same on real sandboxes.
Every kernel made here is checked afterwards: its process group gone, its directory removed.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import threading
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from kernelexec import AsyncSession, AsyncSessionPool, Policy, Session
from kernelexec.backend.base import EgressHandler
from kernelexec.backend.local import LocalBackend, LocalSandbox
from kernelexec.errors import (
    CodeTooLarge,
    ExecutionTimeout,
    KernelDied,
    SandboxError,
    SandboxStartError,
    SessionClosed,
)
from kernelexec.kernel.protocol import new_key
from kernelexec.policy import WORKDIR
from kernelexec.results import Execution

T = TypeVar("T")

#: the code in a cell that ignores interrupts: the kernel resets SIGINT before each cell
IGNORE_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ignoring'); time.sleep(60)"
#: Prints, then waits in short sleeps. An interrupt that lands between the print and the sleep's system call
#: is handled only when that call returns (CPython runs signal handlers between bytecodes): with one long
#: sleep it would wait it out, which is not what these tests are about.
PRINT_THEN_WAIT = "import time; print('go', flush=True)\nwhile True: time.sleep(0.05)"


class Recording(LocalBackend):
    """The local backend, keeping every sandbox it made for the leftovers check."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[LocalSandbox] = []

    def new_sandbox(self, policy: Policy, image: str, key: bytes, session_id: str, *,
                    egress: EgressHandler | None = None) -> LocalSandbox:
        sb = super().new_sandbox(policy, image, key, session_id, egress=egress)
        self.made.append(sb)
        return sb


@pytest.fixture
def backend() -> Iterator[Recording]:
    b = Recording()
    yield b
    for sb in b.made:
        assert sb.dir is None or not sb.dir.exists(), f"{sb.dir} was left behind"
        if sb.proc is not None:
            assert sb.proc.returncode is not None, f"kernel {sb.proc.pid} still runs"
            with pytest.raises(ProcessLookupError):  # nothing the kernel started either
                os.killpg(sb.proc.pid, 0)


def run(coro: Awaitable[T], timeout: float = 120.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def policy(**kw: object) -> Policy:
    return Policy(**{"timeout": 30.0, **kw})


# -- executions, timeouts, interrupts ---------------------------------------------------------------

def test_state_persists_and_restart_clears_it(backend):
    with Session(policy(), backend=backend) as s:
        s.execute("x = 41")
        assert s.execute("x + 1").text == "42"
        first = s.container_id
        s.restart()
        assert s.container_id != first and s.alive
        assert s.execute("'x' in dir()").text == "False"
        assert [ex.code for ex in s.history] == ["x = 41", "x + 1", "'x' in dir()"]
    assert len(backend.made) == 2


def test_timeout_interrupts_and_keeps_state(backend):
    with Session(policy(), backend=backend) as s:
        s.execute("kept = 'still here'")
        with pytest.raises(ExecutionTimeout) as info:
            s.execute("import time; print('started', flush=True); time.sleep(60); finished = True", timeout=1)
        assert info.value.state_lost is False
        assert info.value.partial is not None and "started" in info.value.partial.stdout
        assert s.execute("kept, 'finished' in dir()").text == "('still here', False)"
        assert len(backend.made) == 1  # the same kernel


def test_ignored_interrupt_replaces_the_kernel_and_says_state_is_lost(backend, tmp_path):
    log = tmp_path / "audit.jsonl"
    with Session(policy(interrupt_grace=0.5), backend=backend, audit_log=log) as s:
        s.execute("lost = 1")
        first = s.container_id
        with pytest.raises(ExecutionTimeout) as info:
            s.execute(IGNORE_SIGINT, timeout=1)
        assert info.value.state_lost is True and "lost" in str(info.value)
        assert info.value.partial is not None and "ignoring" in info.value.partial.stdout
        assert s.container_id != first and s.alive
        assert s.execute("'lost' in dir()").text == "False"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    timeouts = [e for e in events if e["event"] == "timeout"]
    assert len(timeouts) == 1 and timeouts[0]["state_lost"] is True
    assert [e["event"] for e in events].count("restarted") == 1
    assert backend.made[0].proc is not None and backend.made[0].proc.returncode is not None  # the old one is gone


def test_interrupt_from_another_thread_keeps_state(backend):
    with Session(policy(), backend=backend) as s:
        s.execute("kept = 7")
        started = threading.Event()
        result: list[Execution] = []

        def run_it() -> None:
            result.append(s.execute(PRINT_THEN_WAIT, on_stdout=lambda _: started.set()))

        t = threading.Thread(target=run_it)
        t.start()
        try:
            assert started.wait(30)
            s.interrupt()
        finally:
            t.join(60)
        ex = result[0]
        assert ex.error is not None and ex.error.ename == "KeyboardInterrupt"
        assert s.execute("kept").text == "7"


async def _cancel(backend: Recording, code: str, log: Path, grace: float) -> tuple[str | None, int]:
    async with AsyncSession(policy(interrupt_grace=grace), backend=backend, audit_log=log) as s:
        await s.execute("kept = 7")
        started = asyncio.Event()
        task = asyncio.ensure_future(s.execute(code, on_stdout=lambda _: started.set()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        r = await s.execute("globals().get('kept'), 'finished' in dir()")
        return r.text, len(s.history)


def test_cancelling_execute_interrupts_the_kernel_and_keeps_state(backend, tmp_path):
    text, runs = run(_cancel(backend, PRINT_THEN_WAIT + "\nfinished = True", tmp_path / "a.jsonl", grace=10.0))
    assert text == "(7, False)" and runs == 2  # the cancelled execution is not in the history
    assert len(backend.made) == 1
    events = [json.loads(line)["event"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert "interrupted" in events and "restarted" not in events


def test_cancelling_code_that_ignores_the_interrupt_replaces_the_kernel(backend, tmp_path):
    text, _ = run(_cancel(backend, IGNORE_SIGINT, tmp_path / "a.jsonl", grace=0.5))
    assert text == "(None, False)"  # a fresh kernel: `kept` went with the old one
    assert len(backend.made) == 2
    events = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert any(e["event"] == "timeout" and e.get("cause") == "cancelled" and e["state_lost"] for e in events)


def test_code_too_large_is_refused_before_sending(backend):
    with Session(policy(max_message_bytes="64k"), backend=backend) as s:
        s.execute("kept = 1")
        with pytest.raises(CodeTooLarge):
            s.execute("#" * (65 << 10))
        assert s.execute("kept").text == "1" and len(s.history) == 2


# -- deaths ---------------------------------------------------------------------------------------

def test_killed_kernel_raises_kernel_died_with_its_signal(backend):
    with Session(policy(), backend=backend) as s:
        with pytest.raises(KernelDied) as info:
            s.execute("import os; os.kill(os.getpid(), 9)")
        assert info.value.reason == "killed by SIGKILL" and info.value.exit_code == 137
        assert info.value.restarted is False and not s.alive
        with pytest.raises(KernelDied):  # remembered: raised again, not a hang on a dead socket
            s.execute("1")
        s.restart()
        assert s.execute("2 + 2").text == "4"


def test_exit_status_is_the_reason_and_auto_restart_replaces_the_kernel(backend):
    with Session(policy(), backend=backend, auto_restart=True) as s:
        s.execute("x = 1")
        with pytest.raises(KernelDied) as info:
            s.execute("import os; os._exit(3)")
        assert (info.value.reason, info.value.exit_code, info.value.restarted) == ("exit code 3", 3, True)
        assert s.alive and s.execute("'x' in dir()").text == "False"
        assert len(backend.made) == 2


def test_a_kernel_that_cannot_start_says_why_and_leaves_nothing(backend, tmp_path):
    backend.python = str(tmp_path / "no-such-python")
    Path(backend.python).write_text("#!/bin/sh\necho 'no kernel here' >&2\nexit 5\n")
    Path(backend.python).chmod(0o700)
    with pytest.raises(SandboxStartError, match=r"(?s)exited before it was ready \(exit code 5\).*no kernel here"):
        Session(policy(), backend=backend)


def test_a_start_that_times_out_kills_the_process(backend, tmp_path):
    backend.python = str(tmp_path / "slow-python")
    Path(backend.python).write_text("#!/bin/sh\nexec sleep 60\n")
    Path(backend.python).chmod(0o700)
    with pytest.raises(SandboxStartError, match="did not come up within 1 s"):
        Session(policy(start_timeout=1.0), backend=backend)
    assert backend.made[0].proc is not None  # it was running: the check in the fixture means something


# -- history and closing ------------------------------------------------------------------------------

def test_history_keeps_a_bounded_amount_of_output(backend):
    with Session(policy(max_history_bytes="64k"), backend=backend) as s:
        first = s.execute("print('a' * 40000)")
        for _ in range(3):
            s.execute("print('b' * 40000)")
        assert first.stdout.startswith("a" * 40000)  # what the caller holds is untouched
        assert s.history[0].outputs_dropped and "dropped" in s.history[0].stderr
        assert not s.history[-1].outputs_dropped and s.history[-1].stdout.startswith("b")


def test_every_call_after_close_raises_session_closed(backend):
    s = Session(policy(), backend=backend)
    s.execute("x = 1")
    s.close()
    for call in (lambda: s.execute("1"), s.interrupt, s.restart, lambda: s.upload(b"x", "a.txt"),
                 lambda: s.download("a.txt")):
        with pytest.raises(SessionClosed):
            call()
    s.close()  # twice is fine
    assert "closed" in repr(s)

    async def main() -> None:
        a = AsyncSession(policy(), backend=backend)
        await a.start()
        await a.close()
        for acall in (lambda: a.execute("1"), a.interrupt, a.restart, lambda: a.upload(b"x", "a.txt"),
                      lambda: a.download("a.txt"), a.start):
            with pytest.raises(SessionClosed):
                await acall()

    run(main())


def test_a_pool_passes_the_backend_to_its_sessions(backend):
    async def main() -> None:
        async with AsyncSessionPool(size=1, max_sessions=2, backend=backend) as pool:
            s = await pool.acquire()
            assert (await s.execute("1 + 1")).text == "2"
            await pool.release(s)
            await pool.wait_warm(1)
            assert pool.stats.warm_hits == 1 and pool.stats.cold_starts == 0

    run(main())
    assert len(backend.made) == 2  # the first one, and its replacement after the release


# -- files ------------------------------------------------------------------------------------------

def test_upload_and_download_go_through_the_working_directory(backend):
    with Session(policy(), backend=backend) as s:
        data = os.urandom(1 << 20)
        assert s.upload(data, "d/e/blob.bin") == f"{WORKDIR}/d/e/blob.bin"
        assert s.execute("import hashlib; hashlib.sha256(open('d/e/blob.bin', 'rb').read()).hexdigest()").text \
            == repr(__import__("hashlib").sha256(data).hexdigest())
        s.execute("open('made.txt', 'w').write('by the kernel')")
        assert s.download("made.txt") == b"by the kernel"
        assert s.download(f"{WORKDIR}/d/e/blob.bin") == data
        with pytest.raises(FileNotFoundError):
            s.download("missing.txt")
        with pytest.raises(IsADirectoryError):
            s.download("d")
        s.execute("import os; os.symlink('/etc/passwd', 'link')")
        with pytest.raises(SandboxError, match="not a regular file"):
            s.download("link")
        for bad in ("../x", "/etc/passwd"):
            with pytest.raises(SandboxError):
                s.upload(b"x", bad)


def test_upload_that_does_not_fit_leaves_an_empty_file(backend):
    with Session(policy(workdir_size="1m"), backend=backend) as s:
        s.upload(b"k" * (600 << 10), "keep.bin")
        with pytest.raises(SandboxError, match="working directory is full"):
            s.upload(b"z" * (600 << 10), "big.bin")
        assert s.download("big.bin") == b""
        assert s.download("keep.bin") == b"k" * (600 << 10)
        with pytest.raises(SandboxError, match="do not fit"):
            s.upload(b"z" * (2 << 20), "huge.bin")


def test_local_archives_refuse_links_and_paths_out_of_the_directory(backend, tmp_path):
    async def main() -> None:
        sb = backend.new_sandbox(policy(), "", new_key(), "t")
        await sb.create()
        try:
            def tar_of(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tf:
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                return buf.getvalue()

            link = tarfile.TarInfo("l")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            for bad in (tar_of(link), tar_of(tarfile.TarInfo("../out"), b"x")):
                with pytest.raises(SandboxError):
                    await sb.put_archive(WORKDIR, bad)
            outside = tmp_path / "outside"
            outside.mkdir()
            (outside / "secret").write_text("host data")
            os.symlink(outside, sb.workdir / "out")  # as code in the kernel could
            with pytest.raises(SandboxError, match="symbolic link"):
                await sb.put_archive(f"{WORKDIR}/out", tar_of(tarfile.TarInfo("x"), b"x"))
            with pytest.raises(SandboxError, match="symbolic link"):
                await sb.get_archive(f"{WORKDIR}/out/secret", 1 << 20)
            assert sorted(p.name for p in outside.iterdir()) == ["secret"]
            await sb.put_archive(WORKDIR, tar_of(tarfile.TarInfo("ok.txt"), b"fine"))
            with pytest.raises(SandboxError, match="larger than"):
                await sb.get_archive(f"{WORKDIR}/ok.txt", 2)
        finally:
            await sb.destroy()

    run(main())
