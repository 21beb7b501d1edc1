"""The attach transport against the real engine and the real kernel image.

A container created from the policy with nothing of the host mounted, the relay bootstrapped
over the attach stream as pid 1, and real Jupyter messages (kernelexec.kernel.protocol, HMAC) through
AttachChannels. The waits below bound a test that would otherwise hang; none asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest

from kernelexec import Policy
from kernelexec.backend.attach.boot import boot_message
from kernelexec.backend.base import Channels, ChannelsClosed
from kernelexec.backend.docker.api import DockerAPI, DockerAPIError, api, close_stream
from kernelexec.backend.docker.attach import AttachSandbox, attach
from kernelexec.backend.docker.sandbox import ConnectionInfo
from kernelexec.kernel.protocol import Message, Signer, build, new_key, parse

T = TypeVar("T")
#: A bound on every wait, so that a broken transport fails the test instead of hanging it.
HANG = 60.0

#: every test here starts containers of its own
pytestmark = pytest.mark.docker


def run(coro: Awaitable[T], timeout: float = 240.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def runtimes() -> list[Any]:
    """runc always; runsc when the engine has it (registered with --network=none)."""
    try:
        info = json.loads(os.popen("docker info --format '{{json .Runtimes}}'").read() or "{}") or {}
    except ValueError:
        info = {}
    runsc = pytest.param("runsc", marks=pytest.mark.skipif(
        "runsc" not in info, reason="the engine has no runsc runtime (gVisor is not registered on this host)"))
    return [None, runsc]


class Kernel:
    """A minimal Jupyter client over any Channels: enough to prove the transport."""

    def __init__(self, channels: Channels, key: bytes) -> None:
        self.ch = channels
        self.signer = Signer(key)
        self.session = secrets.token_hex(8)
        self.iopub: dict[str, list[Message]] = defaultdict(list)
        self.idle: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.welcome = asyncio.Event()
        self.arrived = asyncio.Condition()  # notified on every IOPub message
        self.iopub_error: BaseException | None = None
        self._pump = asyncio.get_running_loop().create_task(self._read_iopub())

    async def _read_iopub(self) -> None:
        try:
            while True:
                msg = parse(self.signer, await self.ch.recv("iopub"))
                self.welcome.set()
                if msg.parent_id:
                    self.iopub[msg.parent_id].append(msg)
                    if msg.msg_type == "status" and msg.content.get("execution_state") == "idle":
                        self.idle[msg.parent_id].set()
                async with self.arrived:
                    self.arrived.notify_all()
        except BaseException as e:
            self.iopub_error = e
            for ev in self.idle.values():
                ev.set()
            if not isinstance(e, (ChannelsClosed, asyncio.CancelledError)):
                raise

    async def stop(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, ChannelsClosed):
            await self._pump

    async def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg_id, frames = build(self.signer, msg_type, content, session=self.session)
        await self.ch.send(channel, frames)
        return msg_id

    async def reply(self, channel: str, msg_id: str) -> Message:
        while True:
            msg = parse(self.signer, await asyncio.wait_for(self.ch.recv(channel), HANG))
            if msg.parent_id == msg_id:
                return msg

    async def ready(self) -> dict[str, Any]:
        info = await self.reply("shell", await self.send("shell", "kernel_info_request", {}))
        while not self.welcome.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.welcome.wait(), 0.1)
            if not self.welcome.is_set():
                await self.reply("shell", await self.send("shell", "kernel_info_request", {}))
        return info.content

    async def submit(self, code: str) -> str:
        return await self.send("shell", "execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False,
            "stop_on_error": True})

    async def finish(self, msg_id: str) -> tuple[Message, list[Message]]:
        reply = await self.reply("shell", msg_id)
        await asyncio.wait_for(self.idle[msg_id].wait(), HANG)
        if self.iopub_error is not None:
            raise self.iopub_error
        return reply, self.iopub.pop(msg_id, [])

    async def execute(self, code: str) -> tuple[Message, list[Message]]:
        return await self.finish(await self.submit(code))


def result_text(outputs: list[Message]) -> str:
    return "".join(str(m.content.get("data", {}).get("text/plain", "")) for m in outputs
                   if m.msg_type == "execute_result")


def stream_text(outputs: list[Message]) -> str:
    return "".join(str(m.content.get("text", "")) for m in outputs if m.msg_type == "stream")


@contextlib.asynccontextmanager
async def attached(policy: Policy) -> AsyncIterator[tuple[AttachSandbox, Kernel]]:
    key = new_key()
    sb = AttachSandbox(policy, policy.image or "", ConnectionInfo(key=key, session_id=secrets.token_hex(6)))
    kernel: Kernel | None = None
    try:
        await sb.create()
        channels = await asyncio.wait_for(sb.open(), HANG)
        kernel = Kernel(channels, key)
        await asyncio.wait_for(kernel.ready(), HANG)
        yield sb, kernel
    finally:
        if kernel is not None:
            await kernel.stop()
        await sb.destroy()  # by id: the container and its volume


async def wait_exit(api: DockerAPI, cid: str, bound: float) -> dict[str, Any]:
    await asyncio.wait_for(api.wait(cid), bound)
    return dict((await api.inspect(cid))["State"])


# -- the container -----------------------------------------------------------------------------

def test_nothing_of_the_host_is_mounted(kernel_image: str) -> None:
    async def go() -> None:
        async with attached(Policy(image=kernel_image)) as (sb, k):
            assert sb.container_id is not None
            info = await api().inspect(sb.container_id)
            mounts = info["Mounts"]
            assert [m for m in mounts if m["Type"] == "bind"] == []
            assert not info["HostConfig"].get("Binds")
            assert {m["Type"] for m in mounts} == {"volume"}  # only the /work tmpfs volume
            assert info["HostConfig"]["NetworkMode"] == "none"
            assert info["HostConfig"]["Init"] is False
            assert info["Config"]["OpenStdin"] is True and info["Config"]["StdinOnce"] is False
            assert info["Config"]["Tty"] is False
            assert "/run/kernelexec" in info["HostConfig"]["Tmpfs"]
            # pid 1 is the relay; the kernel reads stdin from /dev/null and its stdout is not the stream
            reply, out = await k.execute(
                "import os\n"
                "print(open('/proc/1/cmdline','rb').read().split(b'\\0')[:2])\n"
                "print(os.readlink('/proc/self/fd/0'))\n"
                "print(os.getppid(), os.getsid(0) == os.getpid())")
            assert reply.content["status"] == "ok"
            lines = stream_text(out).splitlines()
            assert lines[0] == str([b"/opt/kernel/bin/python", b"-I"])
            assert lines[1] == "/dev/null"
            assert lines[2] == "1 True"

    run(go())


# -- a Jupyter round trip ----------------------------------------------------------------------

@pytest.mark.parametrize("runtime", runtimes())
def test_round_trip(kernel_image: str, runtime: str | None) -> None:
    async def go() -> None:
        async with attached(Policy(image=kernel_image, runtime=runtime)) as (sb, k):
            info = await k.ready()
            assert info["status"] == "ok" and info["language_info"]["name"] == "python"
            reply, out = await k.execute("1+1")
            assert reply.content["status"] == "ok"
            kinds = [(m.msg_type, m.content.get("execution_state")) for m in out]
            assert kinds == [("status", "busy"), ("execute_input", None), ("execute_result", None),
                             ("status", "idle")]
            assert result_text(out) == "2"
            reply, out = await k.execute("x = 20\nprint('hello', x)")
            assert stream_text(out) == "hello 20\n"
            reply, out = await k.execute("x + 22")
            assert result_text(out) == "42"

    run(go())


@pytest.mark.parametrize("runtime", runtimes())
def test_ten_megabyte_print_arrives_whole(kernel_image: str, runtime: str | None) -> None:
    async def go() -> None:
        async with attached(Policy(image=kernel_image, max_output_bytes="32m", runtime=runtime)) as (sb, k):
            reply, out = await k.execute("print('x' * 10_000_000)")
            assert reply.content["status"] == "ok"
            text = stream_text(out)
            assert len(text) == 10_000_001 and text == "x" * 10_000_000 + "\n"
            reply, out = await k.execute("6 * 7")  # the stream is in step afterwards
            assert result_text(out) == "42"

    run(go())


@pytest.mark.parametrize("runtime", runtimes())
def test_interrupt_on_control_keeps_state(kernel_image: str, runtime: str | None) -> None:
    async def go() -> None:
        async with attached(Policy(image=kernel_image, runtime=runtime)) as (sb, k):
            await k.execute("x = 41")
            msg_id = await k.submit("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
            async with k.arrived:  # the cell is inside its sleep
                await asyncio.wait_for(k.arrived.wait_for(
                    lambda: any(m.msg_type == "stream" for m in k.iopub.get(msg_id, []))), HANG)
            interrupted = await k.reply("control", await k.send("control", "interrupt_request", {}))
            assert interrupted.content["status"] == "ok"
            reply, _ = await k.finish(msg_id)
            assert reply.content["status"] == "error" and reply.content["ename"] == "KeyboardInterrupt"
            reply, out = await k.execute("x + 1")
            assert result_text(out) == "42"

    run(go())


def test_a_host_that_stops_reading_holds_the_kernel_back_and_loses_nothing(kernel_image: str) -> None:
    """Backpressure, not growth: the boxes and the decoder stay within their bounds while the
    host reads nothing, and every line arrives once it reads again."""

    async def go() -> None:
        async with attached(Policy(image=kernel_image, max_output_bytes="64m")) as (sb, k):
            ch = sb.channels
            assert ch is not None
            await k.stop()  # nobody reads IOPub from now on
            code = "import sys\nfor i in range(20_000):\n    print(f'{i:>1000}')\n    sys.stdout.flush()"  # 20 MB
            msg_id, frames = build(k.signer, "execute_request", {"code": code, "silent": False}, session=k.session)
            await ch.send("shell", frames)
            await asyncio.sleep(2.0)  # the kernel prints into a host that does not read
            assert len(ch._boxes["iopub"].items) <= 16
            assert ch._decoder.buffered <= ch.limits.max_buffered
            text, done = [], False
            while not done:
                msg = parse(k.signer, await asyncio.wait_for(ch.recv("iopub"), HANG))
                if msg.parent_id != msg_id:
                    continue
                if msg.msg_type == "stream":
                    text.append(msg.content["text"])
                done = msg.msg_type == "status" and msg.content.get("execution_state") == "idle"
            assert "".join(text) == "".join(f"{i:>1000}\n" for i in range(20_000))
            reply = parse(k.signer, await asyncio.wait_for(ch.recv("shell"), HANG))
            assert reply.parent_id == msg_id and reply.content["status"] == "ok"

    run(go())


# -- the relay holds against the code in the container ----------------------------------------

def test_code_cannot_reach_the_stream_or_kill_the_relay(kernel_image: str) -> None:
    """Under runc: the relay is non-dumpable and pid 1, so neither its fds nor SIGKILL reach it."""
    async def go() -> None:
        async with attached(Policy(image=kernel_image)) as (sb, k):
            reply, out = await k.execute(
                "import os, signal\n"
                "for path in ('/proc/1/fd/0', '/proc/1/fd/1', '/proc/1/fd/2'):\n"
                "    try:\n"
                "        open(path, 'wb')\n"
                "        print(path, 'opened')\n"
                "    except OSError as e:\n"
                "        print(path, type(e).__name__)\n"
                "try:\n"
                "    os.listdir('/proc/1/fd')\n"
                "    print('listed')\n"
                "except OSError as e:\n"
                "    print('listdir', type(e).__name__)\n"
                "os.kill(1, signal.SIGKILL)\n"
                "os.kill(1, signal.SIGSTOP)\n"
                "print('sent')")
            assert reply.content["status"] == "ok"
            assert stream_text(out).splitlines() == [
                "/proc/1/fd/0 PermissionError", "/proc/1/fd/1 PermissionError", "/proc/1/fd/2 PermissionError",
                "listdir PermissionError", "sent"]
            reply, out = await k.execute("2 + 2")  # the relay is alive and still forwarding
            assert result_text(out) == "4"
            assert sb.container_id is not None
            assert (await api().inspect(sb.container_id))["State"]["Running"] is True

    run(go())


@pytest.mark.parametrize("runtime", runtimes())
def test_bytes_injected_from_inside_never_hang_the_host(kernel_image: str, runtime: str | None) -> None:
    """Code writing into the relay's stdout. runc refuses the open (non-dumpable pid 1). gVisor
    lets it through (its /proc does not honour PR_SET_DUMPABLE): then the host's decoder refuses
    the bytes and the channels close with a typed error; the kernel's own code broke its session,
    which it could anyway (os._exit), and the host neither hangs nor grows."""

    async def go() -> None:
        async with attached(Policy(image=kernel_image, runtime=runtime)) as (sb, k):
            inject = ("import os\n"
                      "try:\n"
                      "    fd = os.open('/proc/1/fd/1', os.O_WRONLY)\n"
                      "except OSError as e:\n"
                      "    print(type(e).__name__)\n"
                      "else:\n"
                      "    os.write(fd, b'KXA' + os.urandom(1 << 16))\n")
            if runtime is None:
                reply, out = await k.execute(inject)
                assert stream_text(out) == "PermissionError\n"
                reply, out = await k.execute("2 + 2")
                assert result_text(out) == "4"
                return
            with pytest.raises(ChannelsClosed, match="broke its framing"):
                await asyncio.wait_for(k.execute(inject), HANG)

    run(go())


def test_a_kernel_over_its_message_bound_closes_the_channels_for_good(kernel_image: str) -> None:
    """A message part over max_message_bytes, sent by code on the kernel's own IOPub socket
    (bypassing the kernel's cutting): the relay refuses it, the host hears why, and refuses to
    resume with that kernel."""

    async def go() -> None:
        async with attached(Policy(image=kernel_image, max_message_bytes="1m")) as (sb, k):
            code = ("t = get_ipython().kernel.iopub_thread\n"
                    "with t.lock:\n"
                    "    t.socket.send_multipart([b'x', b'<IDS|MSG>', b'y' * (2 << 20)])\n")
            with pytest.raises(ChannelsClosed, match="broke the protocol's bounds"):
                await asyncio.wait_for(k.execute(code + "import time\ntime.sleep(30)"), HANG)
            await k.stop()
            with pytest.raises(ChannelsClosed, match="broke the protocol's bounds"):
                await sb.reattach(timeout=HANG)

    run(go())


def test_garbage_from_the_host_is_a_typed_error_and_reattach_resumes(kernel_image: str) -> None:
    async def go() -> None:
        async with attached(Policy(image=kernel_image)) as (sb, k):
            await k.execute("x = 41")
            assert sb.channels is not None
            sb.channels._writer.write(b"\x00garbage" + os.urandom(4096))  # not a frame: the relay must say so
            with pytest.raises(ChannelsClosed, match="could not decode what this host sent"):
                await asyncio.wait_for(k.reply("shell", await k.submit("1")), HANG)
            await k.stop()
            assert await sb.reattach(timeout=HANG) >= 0
            k2 = Kernel(sb.channels, sb.conn.key)
            try:
                await k2.ready()
                reply, out = await k2.execute("x + 1")  # the kernel and its state survived
                assert result_text(out) == "42"
            finally:
                await k2.stop()

    run(go())


def test_reattach_after_a_lost_connection_keeps_state(kernel_image: str) -> None:
    async def go() -> None:
        async with attached(Policy(image=kernel_image)) as (sb, k):
            await k.execute("x = 41")
            assert sb.channels is not None
            msg_id = await k.submit("import time\ntime.sleep(0.5)\nprint('in flight')")
            sb.channels._writer.transport.abort()  # the engine dropped us mid-request
            with pytest.raises(ChannelsClosed):
                await asyncio.wait_for(k.finish(msg_id), HANG)
            await k.stop()
            await asyncio.sleep(1.0)  # the output of the request in flight goes nowhere meanwhile
            lost = await sb.reattach(timeout=HANG)
            assert lost > 0  # its output and reply were dropped by the engine, and counted
            k2 = Kernel(sb.channels, sb.conn.key)
            try:
                await k2.ready()
                reply, out = await k2.execute("x + 1")
                assert result_text(out) == "42"
            finally:
                await k2.stop()

    run(go())


@pytest.mark.parametrize("runtime", runtimes())
def test_the_container_ends_itself_when_keepalives_stop(kernel_image: str, runtime: str | None) -> None:
    async def go() -> None:
        policy = Policy(image=kernel_image, orphan_timeout=2.0, runtime=runtime)
        async with attached(policy) as (sb, k):
            assert sb.channels is not None and sb.container_id is not None
            for t in sb.channels._tasks:  # the host hangs: its connection stays open, its keepalives stop
                if t.get_name() == "kernelexec-attach-keepalive":
                    t.cancel()
            state = await wait_exit(api(), sb.container_id, HANG)
            assert state["Running"] is False and state["ExitCode"] == 0
            with pytest.raises(ChannelsClosed, match="stream ended"):
                await asyncio.wait_for(k.execute("1"), HANG)

    run(go())


@pytest.mark.parametrize("runtime", runtimes())
def test_kernel_crash_reports_its_exit_status(kernel_image: str, runtime: str | None) -> None:
    async def go() -> None:
        async with attached(Policy(image=kernel_image, runtime=runtime)) as (sb, k):
            assert sb.container_id is not None
            with pytest.raises(ChannelsClosed) as caught:
                await k.execute("import os\nos._exit(3)")
            assert caught.value.exit_code == 3 and caught.value.kernel_exited
            assert "exited with status 3" in caught.value.reason
            with pytest.raises(ChannelsClosed):
                await k.send("shell", "kernel_info_request", {})
            state = await wait_exit(api(), sb.container_id, HANG)
            assert state["ExitCode"] == 3

    run(go())


def test_kernel_killed_by_a_signal(kernel_image: str) -> None:
    async def go() -> None:
        async with attached(Policy(image=kernel_image)) as (sb, k):
            with pytest.raises(ChannelsClosed) as caught:
                await k.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
            assert caught.value.signal == 9 and caught.value.exit_code is None

    run(go())


def test_nothing_is_left_behind(kernel_image: str) -> None:
    async def go() -> tuple[str | None, str | None]:
        async with attached(Policy(image=kernel_image)) as (sb, k):
            await k.execute("1")
            ids = sb.container_id, sb.volume
        api = DockerAPI()
        for what, look in ((ids[0], lambda i: api.inspect(i)),
                           (ids[1], lambda i: api.call("GET", f"/volumes/{i}", what="inspect volume"))):
            with pytest.raises(DockerAPIError) as caught:
                await look(what)
            assert caught.value.status == 404
        return ids

    fds = len(os.listdir("/proc/self/fd"))
    run(go())
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_raw_attach_sees_only_framed_bytes(kernel_image: str) -> None:
    """What the relay writes before and after the hello: nothing, then frames only."""
    from kernelexec.backend.attach.framing import MAGIC, DockerDemux

    async def go() -> None:
        key = new_key()
        policy = Policy(image=kernel_image)
        sb = AttachSandbox(policy, kernel_image, ConnectionInfo(key=key, session_id=secrets.token_hex(6)))
        try:
            await sb.create()
            assert sb.container_id is not None
            reader, writer = await attach(api(), sb.container_id)
            try:
                await api().start(sb.container_id)
                with pytest.raises(asyncio.TimeoutError):  # nothing before the hello
                    await asyncio.wait_for(reader.read(1), 1.0)
                writer.write(boot_message(policy, key))
                await writer.drain()
                demux, stdout = DockerDemux(), b""
                while len(stdout) < len(MAGIC):
                    data = await asyncio.wait_for(reader.read(65536), HANG)
                    assert data, "the stream ended before the relay's hello"
                    stdout += b"".join(bytes(c) for s, c in demux.split(data) if s == 1)
                assert stdout.startswith(MAGIC)  # the first byte on stdout is a frame's
            finally:
                await close_stream(writer)
        finally:
            await sb.destroy()

    run(go())
