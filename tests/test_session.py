"""The core session against a real Docker engine and a real kernel."""

from __future__ import annotations

import io
import os

import pytest

from kernelexec import (
    AsyncSession,
    ExecutionTimeout,
    ImageNotFound,
    KernelDied,
    Policy,
    SandboxError,
    SandboxStartError,
    Session,
    SessionClosed,
)
from kernelexec.results import TRUNCATION_MARKER

from .conftest import leftovers


def test_state_persists_and_restart_clears_it(session):
    session.execute("import pandas as pd; df = pd.DataFrame({'a': [1, 2, 3]})")
    assert session.execute("df.a.sum()").text == "6"
    first = session.container_id
    session.restart()
    assert session.container_id != first
    r = session.execute("df")
    assert r.error is not None and r.error.ename == "NameError"


def test_restart_gives_a_fresh_container_without_leftovers(session):
    session.execute("open('/tmp/mark', 'w').write('x'); import subprocess; p = subprocess.Popen(['sleep', '300'])")
    session.restart()
    r = session.execute("import os; (os.path.exists('/tmp/mark'), "
                        "any(open(f'/proc/{p}/cmdline','rb').read().startswith(b'sleep') for p in os.listdir('/proc') if p.isdigit()))")
    assert r.text == "(False, False)"


def test_stdout_and_stderr_are_separate(shared_session):
    r = shared_session.execute("import sys; print('to out'); print('to err', file=sys.stderr)")
    assert r.stdout == "to out\n"
    assert r.stderr == "to err\n"
    assert r.ok and r.error is None


def test_matplotlib_figure_comes_back_as_png(shared_session):
    from PIL import Image

    r = shared_session.execute("import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()")
    assert r.ok, r.error
    assert len(r.images) == 1
    img = Image.open(io.BytesIO(r.images[0]))
    img.load()
    assert img.format == "PNG" and img.width > 100


def test_dataframe_comes_back_with_html(shared_session):
    r = shared_session.execute("import pandas as pd; pd.DataFrame({'x': [1, 2]})")
    assert r.result is not None
    assert "<table" in (r.result.html or "")
    assert "x" in (r.text or "")


def test_error_is_typed_with_plain_traceback_and_session_goes_on(shared_session):
    r = shared_session.execute("1/0")
    assert r.status == "error"
    assert r.error.ename == "ZeroDivisionError"
    assert r.error.evalue == "division by zero"
    assert "\x1b[" not in r.error.traceback
    assert "1/0" in r.error.traceback
    assert shared_session.execute("40 + 2").text == "42"


def test_timeout_interrupts_and_keeps_state(session):
    session.execute("kept = 'still here'")
    with pytest.raises(ExecutionTimeout) as info:
        session.execute("import time; print('started'); time.sleep(60); finished = True", timeout=2)
    assert info.value.state_lost is False
    assert session.execute("'finished' in dir()").text == "False"  # interrupted, not waited out
    assert info.value.partial is not None and "started" in info.value.partial.stdout
    assert session.execute("kept").text == "'still here'"


def test_timeout_when_interrupt_is_ignored_restarts_and_says_so(kernel_image):
    with Session(Policy(image=kernel_image, interrupt_grace=1.0)) as s:
        s.execute("lost = 1")
        first = s.container_id
        with pytest.raises(ExecutionTimeout) as info:
            # the kernel resets SIGINT before each cell, so hostile code ignores it in the same cell
            s.execute("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)", timeout=1)
        assert info.value.state_lost is True
        assert "lost" in str(info.value)
        assert s.container_id != first
        r = s.execute("'lost' in dir()")
        assert r.text == "False"


def test_interrupt_is_public(session):
    import threading

    timer = threading.Timer(1.0, session.interrupt)
    timer.start()
    try:
        r = session.execute("import time; time.sleep(30)", timeout=20)
    finally:
        timer.join()
    assert r.error is not None and r.error.ename == "KeyboardInterrupt"
    assert session.execute("1").text == "1"


def test_kernel_killed_raises_kernel_died_with_docker_reason(session):
    with pytest.raises(KernelDied) as info:
        session.execute("import os; os.kill(os.getpid(), 9)")
    assert "SIGKILL" in info.value.reason
    assert info.value.exit_code == 137
    with pytest.raises(KernelDied):  # remembered: raised again, not a hang on a dead socket
        session.execute("1")
    session.restart()
    assert session.execute("2 + 2").text == "4"


def test_streaming_callbacks_arrive_while_code_runs(session):
    # The code prints, then sleeps until it is interrupted; the interrupt is sent only once the
    # callback has the first line. So the cell can end at all only if that line reached the host
    # while the code was still running; output held back until the end would leave the cell
    # sleeping into its timeout.
    import threading

    seen: list[str] = []
    first_line, done = threading.Event(), threading.Event()

    def on_stdout(text: str) -> None:
        seen.append(text)
        first_line.set()

    def interrupt_after_the_first_line() -> None:
        while not done.is_set():
            if first_line.wait(0.1):
                session.interrupt()
                return

    helper = threading.Thread(target=interrupt_after_the_first_line)
    helper.start()
    try:
        r = session.execute(
            # short sleeps: a SIGINT that lands just before a blocking call starts is only seen when
            # the call returns, so one long sleep could swallow an interrupt sent at that instant
            "import time\ntry:\n    print('running', flush=True)\n    for _ in range(600):\n        time.sleep(0.1)\n"
            "    print('slept')\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)",
            on_stdout=on_stdout, timeout=30)
    finally:
        done.set()
        helper.join()
    assert r.ok and r.stdout == "running\ninterrupted\n"
    assert seen[0] == "running\n" and "".join(seen) == r.stdout


def test_callback_error_is_raised_not_dropped(shared_session):
    def boom(_):
        raise ValueError("callback failed")

    with pytest.raises(ValueError, match="callback failed"):
        shared_session.execute("print('x')", on_stdout=boom)
    assert shared_session.execute("1").text == "1"


def test_clear_output_and_update_display_as_a_notebook(shared_session):
    r = shared_session.execute("from IPython.display import clear_output\nprint('a')\nclear_output()\nprint('b')")
    assert r.stdout == "b\n"
    r = shared_session.execute("print('a')\nclear_output(wait=True)\nprint('c')")
    assert r.stdout == "c\n"
    r = shared_session.execute("h = display('first', display_id=True)\nh.update('second')")
    assert [b.text for b in r.results] == ["'second'"]


def test_output_is_truncated_with_marker(kernel_image):
    with Session(Policy(image=kernel_image, max_output_bytes="64k")) as s:
        r = s.execute("print('x' * 1_000_000)")
        assert r.truncated
        marker = TRUNCATION_MARKER.format(limit=64 * 1024)
        assert marker in r.stdout
        assert len(r.stdout) <= 64 * 1024 + len(marker) + 2
        assert s.execute("1 + 1").text == "2"


def test_upload_download_roundtrip_10mb(session):
    data = os.urandom(10 * 1024 * 1024)
    path = session.upload(data, "data/blob.bin")
    assert path == "/work/data/blob.bin"
    assert session.execute("len(open('/work/data/blob.bin', 'rb').read())").text == str(len(data))
    assert session.download("data/blob.bin") == data
    session.execute("open('/work/out.txt', 'w').write('made inside')")
    assert session.download("/work/out.txt") == b"made inside"


def test_upload_from_host_path(session, tmp_path):
    p = tmp_path / "in.csv"
    p.write_text("a,b\n1,2\n")
    session.upload(p, "in.csv")
    assert session.execute("import pandas as pd; int(pd.read_csv('in.csv').b.sum())").text == "2"


def test_files_stay_in_the_working_directory(session):
    with pytest.raises(SandboxError):
        session.upload(b"x", "../etc/passwd")
    with pytest.raises(SandboxError):
        session.download("/etc/passwd")
    with pytest.raises(FileNotFoundError):
        session.download("missing.txt")
    session.execute("import os; os.symlink('/etc/passwd', '/work/link')")
    with pytest.raises(SandboxError, match="not a regular file"):
        session.download("link")


def test_close_leaves_nothing(docker, policy):
    s = Session(policy)
    cid, sockdir, sid = s.container_id, s.socket_dir, s.id
    if s.transport == "ipc":
        assert sockdir is not None and sockdir.exists()
    else:  # attach: nothing on the host to remove
        assert sockdir is None
    s.close()
    assert docker.api.containers(all=True, filters={"label": f"kernelexec.session={sid}"}) == []
    assert docker.api.volumes(filters={"label": f"kernelexec.session={sid}"}).get("Volumes") in (None, [])
    assert sockdir is None or not sockdir.exists()
    with pytest.raises(SessionClosed):
        s.execute("1")
    s.close()  # twice is fine
    assert cid


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    import threading

    return threading.active_count()


def test_twenty_cycles_leave_nothing(docker, policy):
    before = leftovers(docker)
    with Session(policy) as s:  # warm imports and caches before the baseline
        s.execute("1")
    fds, threads = _fds(), _threads()
    for _ in range(20):
        with Session(policy) as s:
            assert s.execute("21 * 2").text == "42"
    assert leftovers(docker) == before
    assert _fds() == fds
    assert _threads() == threads


def test_missing_image_says_how_to_build(docker):
    before = leftovers(docker)
    with pytest.raises(ImageNotFound, match="kernelexec image build"):
        Session(Policy(image="kernelexec-no-such-image:0"))
    assert leftovers(docker) == before


def test_image_without_kernel_fails_to_start_clearly(docker):
    before = leftovers(docker)
    with pytest.raises(SandboxStartError):
        Session(Policy(image="kernelexec-base:bookworm", start_timeout=20))
    assert leftovers(docker) == before


async def _async_roundtrip(image: str) -> tuple[str | None, str | None]:
    async with AsyncSession(Policy(image=image)) as s:
        await s.execute("x = 5")
        r = await s.execute("x * 2")
        e = await s.execute("undefined_name")
        return r.text, e.error.ename if e.error else None


def test_async_session_has_the_same_api(kernel_image):
    import asyncio

    assert asyncio.run(_async_roundtrip(kernel_image)) == ("10", "NameError")


def test_async_sessions_run_concurrently(kernel_image):
    import asyncio

    async def main() -> list[str | None]:
        async with AsyncSession(Policy(image=kernel_image)) as a, AsyncSession(Policy(image=kernel_image)) as b:
            ra, rb = await asyncio.gather(a.execute("import time; time.sleep(1); 'a'"),
                                          b.execute("import time; time.sleep(1); 'b'"))
            return [ra.text, rb.text]

    assert asyncio.run(main()) == ["'a'", "'b'"]


def test_cancelling_execute_interrupts_the_kernel(kernel_image):
    import asyncio

    async def main() -> str | None:
        async with AsyncSession(Policy(image=kernel_image)) as s:
            await s.execute("kept = 7")
            task = asyncio.ensure_future(s.execute("import time; time.sleep(30); finished = True"))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            r = await s.execute("kept, 'finished' in dir()")  # interrupted, not waited out; state intact
            return r.text

    assert asyncio.run(main()) == "(7, False)"


def test_to_notebook_is_a_valid_audit_trail(session):
    import nbformat

    session.execute("import matplotlib.pyplot as plt\nprint('hello')\nplt.plot([1, 2]); plt.show()\n6 * 7")
    session.execute("1/0")
    nb = session.to_notebook()
    nbformat.validate(nb)
    assert [c.source for c in nb.cells] == [session.history[0].code, "1/0"]
    first, second = nb.cells
    kinds = [o.output_type for o in first.outputs]
    assert kinds == ["stream", "display_data", "execute_result"]
    assert first.outputs[2].data["text/plain"] == "42" and first.execution_count == 1
    assert second.outputs[0].output_type == "error" and second.outputs[0].ename == "ZeroDivisionError"
    assert len(first.metadata["kernelexec"]["code_sha256"]) == 64
    assert nb.metadata["kernelspec"]["name"] == "kernelexec"
