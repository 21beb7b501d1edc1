"""Sharing a kernel's channels between clients (kernelexec.backend.fanout) and carrying them to
Jupyter's clients over host-local sockets (kernelexec.backend.bridge): pure logic, with the kernel
played by the test (LoopbackChannels). No engine, no kernel; real ZeroMQ and jupyter_client.

Waits are bounded (HANG) so that a broken hub fails a test instead of hanging it; none asserts a
duration.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable
from typing import TypeVar

import pytest
import zmq
import zmq.asyncio

from kernelexec.backend.base import Channels, ChannelsClosed
from kernelexec.backend.bridge import JupyterBridge
from kernelexec.backend.fanout import MAX_CLIENTS, QUEUE_SIZES, ChannelHub
from kernelexec.backend.loopback import LoopbackChannels, message
from kernelexec.errors import ProtocolError, SandboxError
from kernelexec.kernel.protocol import DELIM, Signer, new_key, parse

from .conftest import run_alone

T = TypeVar("T")
HANG = 20.0
KEY = new_key()
SIGNER = Signer(KEY)


async def soon(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, HANG)


async def settle() -> None:
    """Let every ready task run (the hub's pumps) until nothing moves."""
    for _ in range(50):
        await asyncio.sleep(0)


def msg_type(frames: list[bytes]) -> str:
    return parse(SIGNER, frames).msg_type


# -- the hub ------------------------------------------------------------------------------------


def test_iopub_reaches_every_client_in_order() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        sent = [message(SIGNER, "stream", {"text": str(i)})[1] for i in range(40)]

        async def produce() -> None:
            for frames in sent:
                await kernel.emit("iopub", frames)

        async def read(client: Channels) -> list[list[bytes]]:
            return [await client.recv("iopub") for _ in sent]

        got_owner, got_other, _ = await soon(asyncio.gather(read(hub.owner), read(other), produce()))
        assert got_owner == sent and got_other == sent
        assert other.dropped["iopub"] == 0
        await hub.owner.close()

    run_alone(go())


def test_replies_go_to_whoever_asked_with_their_tag() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        mine, req_a = message(SIGNER, "kernel_info_request")
        theirs, req_b = message(SIGNER, "execute_request", {"code": "1"})
        await hub.owner.send("shell", req_a)
        await other.send("shell", req_b, tag=(b"peer-identity",))
        assert await soon(kernel.take("shell")) == req_a  # frames pass unchanged: nothing re-signed
        assert await soon(kernel.take("shell")) == req_b
        await kernel.emit("shell", message(SIGNER, "execute_reply", {"status": "ok"}, parent=theirs)[1])
        await kernel.emit("shell", message(SIGNER, "kernel_info_reply", {}, parent=mine)[1])
        frames, tag = await soon(other.recv_tagged("shell"))
        assert (msg_type(frames), tag) == ("execute_reply", (b"peer-identity",))
        assert msg_type(await soon(hub.owner.recv("shell"))) == "kernel_info_reply"
        # control is routed the same way
        ctl, req_c = message(SIGNER, "interrupt_request")
        await other.send("control", req_c, tag=("c",))
        await soon(kernel.take("control"))
        await kernel.emit("control", message(SIGNER, "interrupt_reply", parent=ctl)[1])
        assert (await soon(other.recv_tagged("control")))[1] == ("c",)
        assert hub.unroutable == 0
        await hub.owner.close()

    run_alone(go())


def test_stdin_follows_the_execute_request_until_its_reply() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        ex, req = message(SIGNER, "execute_request", {"code": "input()", "allow_stdin": True})
        await other.send("shell", req, tag=("who",))
        await soon(kernel.take("shell"))
        await kernel.emit("stdin", message(SIGNER, "input_request", {"prompt": "?"}, parent=ex)[1])
        frames, tag = await soon(other.recv_tagged("stdin"))
        assert (msg_type(frames), tag) == ("input_request", ("who",))
        _, answer = message(SIGNER, "input_reply", {"value": "yes"}, parent=ex)
        await other.send("stdin", answer, tag=("who",))
        assert await soon(kernel.take("stdin")) == answer
        await kernel.emit("shell", message(SIGNER, "execute_reply", {"status": "ok"}, parent=ex)[1])
        await soon(other.recv_tagged("shell"))
        # answered: a late input_request for it has nobody to go to
        await kernel.emit("stdin", message(SIGNER, "input_request", {"prompt": "?"}, parent=ex)[1])
        await settle()
        assert hub.unroutable == 1 and not other._boxes["stdin"].items
        await hub.owner.close()

    run_alone(go())


def test_a_reply_nobody_asked_for_is_counted_and_dropped() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        await kernel.emit("shell", message(SIGNER, "execute_reply", parent="nobody-asked")[1])
        await kernel.emit("control", message(SIGNER, "interrupt_reply")[1])  # no parent at all
        await settle()
        assert hub.unroutable == 2
        assert not hub.owner._boxes["shell"].items and not other._boxes["shell"].items
        await hub.owner.close()

    run_alone(go())


def test_a_message_too_malformed_to_route_goes_to_the_owner_who_refuses_it() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        _, good = message(SIGNER, "execute_reply")
        deep = b"[" * 100 + b"]" * 100
        for bad in ([b"no delimiter"], [DELIM, b"sig"], [*good[:3], b'{"msg_id": ' + deep + b"}", *good[4:]]):
            await kernel.emit("shell", bad)
            frames = await soon(hub.owner.recv("shell"))
            assert frames == bad
            with pytest.raises(ProtocolError):
                parse(SIGNER, frames)
        assert not other._boxes["shell"].items and hub.unroutable == 0
        await hub.owner.close()

    run_alone(go())


def test_a_client_that_stops_reading_loses_iopub_counted_and_never_holds_the_owner_back() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        stuck = hub.join(stall=0.05)
        n = QUEUE_SIZES["iopub"] * 4
        sent = [message(SIGNER, "stream", {"text": str(i)})[1] for i in range(n)]

        async def produce() -> None:
            for frames in sent:
                await kernel.emit("iopub", frames)

        producer = asyncio.create_task(produce())
        got = [await soon(hub.owner.recv("iopub")) for _ in sent]
        await soon(producer)
        assert got == sent  # the owner lost nothing
        assert len(stuck._boxes["iopub"].items) == QUEUE_SIZES["iopub"]  # bounded
        assert stuck.dropped["iopub"] == n - QUEUE_SIZES["iopub"]
        # once it reads again, it gets what comes next
        kept = [await soon(stuck.recv("iopub")) for _ in range(QUEUE_SIZES["iopub"])]
        assert kept == sent[:QUEUE_SIZES["iopub"]]
        _, later = message(SIGNER, "status", {"execution_state": "idle"})
        await kernel.emit("iopub", later)
        assert await soon(stuck.recv("iopub")) == later
        assert await soon(hub.owner.recv("iopub")) == later
        await hub.owner.close()

    run_alone(go())


def test_an_owner_that_stops_reading_holds_the_kernel_back_and_loses_nothing() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join(stall=0.05)
        n = QUEUE_SIZES["iopub"] * 4
        sent = [message(SIGNER, "stream", {"text": str(i)})[1] for i in range(n)]

        async def produce() -> None:
            for frames in sent:
                await kernel.emit("iopub", frames)

        producer = asyncio.create_task(produce())
        await asyncio.sleep(0.3)  # several stalls' worth: the owner is never dropped from
        assert not producer.done()  # backpressure reached the kernel
        assert len(hub.owner._boxes["iopub"].items) == QUEUE_SIZES["iopub"]
        assert kernel.pending("iopub") <= QUEUE_SIZES["iopub"]
        got = [await soon(hub.owner.recv("iopub")) for _ in sent]
        await soon(producer)
        assert got == sent
        assert hub.owner.dropped["iopub"] == 0
        await other.close()
        await hub.owner.close()

    run_alone(go())


def test_requests_in_flight_are_bounded_per_client() -> None:
    async def go() -> None:
        kernel = LoopbackChannels({"iopub": 16, "shell": 1000, "control": 4, "stdin": 4})
        hub = ChannelHub(kernel, max_routes=10)
        other = hub.join()
        ids = []
        for _ in range(25):
            msg_id, req = message(SIGNER, "complete_request")
            ids.append(msg_id)
            await other.send("shell", req, tag=("t",))
        assert other.forgotten == 15 and len(hub._routes) == 10
        await kernel.emit("shell", message(SIGNER, "complete_reply", parent=ids[0])[1])  # forgotten
        await kernel.emit("shell", message(SIGNER, "complete_reply", parent=ids[-1])[1])
        frames, _ = await soon(other.recv_tagged("shell"))
        assert parse(SIGNER, frames).parent_id == ids[-1]
        assert hub.unroutable == 1
        await hub.owner.close()

    run_alone(go())


def test_requests_whose_reply_could_not_come_back_are_refused() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        msg_id, req = message(SIGNER, "execute_request")
        await hub.owner.send("shell", req)
        with pytest.raises(ValueError, match="in flight from another client"):
            await other.send("shell", req, tag=("t",))
        _, no_id = message(SIGNER, "execute_request", msg_id="x" * 1000)
        with pytest.raises(ValueError, match="needs a msg_id"):
            await other.send("shell", no_id)
        with pytest.raises(ValueError, match="cannot route"):
            await other.send("control", [b"garbage"])
        with pytest.raises(ValueError, match="cannot send on 'iopub'"):
            await other.send("iopub", req)
        await soon(kernel.take("shell"))
        assert kernel.pending_to_kernel("shell") == 0  # nothing refused reached the kernel
        await hub.owner.close()

    run_alone(go())


def test_the_end_delivers_what_came_before_then_closes_every_client() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        _, last = message(SIGNER, "stream", {"text": "bye"})
        await kernel.emit("iopub", last)
        kernel.end(ChannelsClosed("the kernel exited with status 3", exit_code=3))
        for client in (hub.owner, other):
            assert (await soon(client.wait_closed())).exit_code == 3
            assert await soon(client.recv("iopub")) == last
            with pytest.raises(ChannelsClosed) as e:
                await soon(client.recv("iopub"))
            assert e.value.exit_code == 3
            with pytest.raises(ChannelsClosed):
                await soon(client.recv("shell"))
            with pytest.raises(ChannelsClosed):
                await client.send("shell", message(SIGNER, "kernel_info_request")[1])
        with pytest.raises(ChannelsClosed):
            hub.join()
        await hub.owner.close()
        assert kernel.closed

    run_alone(go())


def test_a_violation_the_transport_caught_reaches_every_client_as_such() -> None:
    """The attach relay refuses a message no Jupyter client could parse; through the hub each client
    still learns that the kernel broke the protocol (ChannelsClosed.violation), not only that it went."""

    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        said = "the kernel sent a message without the <IDS|MSG> delimiter"
        kernel.end(ChannelsClosed("the kernel broke the protocol's bounds: ...", violation=said))
        for client in (hub.owner, other):
            assert (await soon(client.wait_closed())).violation == said
            for channel in ("iopub", "shell"):
                with pytest.raises(ChannelsClosed) as e:
                    await soon(client.recv(channel))
                assert e.value.violation == said
            with pytest.raises(ChannelsClosed) as e:
                await client.send("shell", message(SIGNER, "kernel_info_request")[1])
            assert e.value.violation == said
        await hub.owner.close()

    run_alone(go())


def test_a_client_leaves_alone_and_the_owner_closes_everything() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        other = hub.join()
        msg_id, req = message(SIGNER, "execute_request")
        await other.send("shell", req, tag=("t",))
        await other.close()
        assert (await soon(other.wait_closed())).reason == "the channels were closed by this host"
        assert hub.clients == 1 and msg_id not in hub._routes and not kernel.closed
        with pytest.raises(ChannelsClosed):
            await other.recv("iopub")
        _, out = message(SIGNER, "stream")
        await kernel.emit("iopub", out)
        assert await soon(hub.owner.recv("iopub")) == out  # the owner goes on
        await kernel.emit("shell", message(SIGNER, "execute_reply", parent=msg_id)[1])
        await settle()
        assert hub.unroutable == 1
        third = hub.join()
        await hub.owner.close()
        assert kernel.closed
        with pytest.raises(ChannelsClosed):
            await soon(third.recv("iopub"))
        await hub.owner.close()  # idempotent

    run_alone(go())


def test_clients_are_bounded() -> None:
    async def go() -> None:
        hub = ChannelHub(LoopbackChannels())
        for _ in range(MAX_CLIENTS - 1):
            hub.join()
        with pytest.raises(SandboxError, match="at most"):
            hub.join()
        await hub.owner.close()

    run_alone(go())


# -- the bridge: jupyter_client against host-local sockets --------------------------------------


async def kernel_plays(kernel: LoopbackChannels) -> None:
    """A kernel enough for jupyter_client: kernel_info, execute with input(), shutdown."""
    async def shell() -> None:
        while True:
            req = parse(SIGNER, await kernel.take("shell"))
            mid = req.header["msg_id"]
            await kernel.emit("iopub", message(SIGNER, "status", {"execution_state": "busy"}, parent=mid)[1])
            if req.msg_type == "execute_request":
                await kernel.emit("stdin", message(SIGNER, "input_request", {"prompt": "name? ", "password": False},
                                                   parent=mid)[1])
                answer = parse(SIGNER, await kernel.take("stdin"))
                await kernel.emit("iopub", message(SIGNER, "stream",
                                                   {"name": "stdout", "text": f"hi {answer.content['value']}"},
                                                   parent=mid)[1])
                await kernel.emit("shell", message(SIGNER, "execute_reply",
                                                   {"status": "ok", "execution_count": 1}, parent=mid)[1])
            else:
                await kernel.emit("shell", message(SIGNER, req.msg_type.replace("_request", "_reply"),
                                                   {"status": "ok", "protocol_version": "5.4"}, parent=mid)[1])
            await kernel.emit("iopub", message(SIGNER, "status", {"execution_state": "idle"}, parent=mid)[1])

    async def control() -> None:
        while True:
            req = parse(SIGNER, await kernel.take("control"))
            await kernel.emit("control", message(SIGNER, req.msg_type.replace("_request", "_reply"),
                                                 {"status": "ok"}, parent=req.header["msg_id"])[1])

    await asyncio.gather(shell(), control())


async def ping(bridge: JupyterBridge, ctx: zmq.asyncio.Context) -> bytes | None:
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{bridge.connection_info['ip']}-{bridge.connection_info['hb_port']}")
    try:
        await s.send(b"ping")
        if await s.poll(2000):
            return bytes(await s.recv())
        return None
    finally:
        s.close(linger=0)


def test_jupyter_client_reaches_the_kernel_through_the_bridge() -> None:
    from jupyter_client.asynchronous import AsyncKernelClient

    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        bridge = await JupyterBridge.open(hub.join(), max_message_bytes=1 << 20)
        plays = asyncio.create_task(kernel_plays(kernel))
        ctx = zmq.asyncio.Context()
        kc = AsyncKernelClient()
        try:
            directory = bridge.directory
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
            assert sorted(os.listdir(directory)) == [f"k-{p}" for p in range(1, 6)]
            kc.load_connection_info({**bridge.connection_info, "key": KEY.decode(),
                                     "signature_scheme": "hmac-sha256"})
            kc.start_channels(hb=False)
            await kc.wait_for_ready(timeout=HANG)
            out: list[str] = []
            reply = await kc.execute_interactive(
                "input('name? ')", allow_stdin=True, timeout=HANG,
                stdin_hook=lambda m: kc.input("ada"),
                output_hook=lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None)
            assert reply["content"]["status"] == "ok" and out == ["hi ada"]
            # the session's own client meanwhile: its requests and replies are its own
            own, req = message(SIGNER, "kernel_info_request")
            await hub.owner.send("shell", req)
            while True:
                frames = await soon(hub.owner.recv("shell"))
                if parse(SIGNER, frames).parent_id == own:
                    break
            assert await ping(bridge, ctx) == b"ping"
            assert bridge.refused == {"shell": 0, "control": 0, "stdin": 0} and bridge.error is None
            # the kernel goes: the heartbeat stops answering, as a dead kernel's does
            kernel.end()
            await soon(bridge.channels.wait_closed())
            await settle()
            assert await ping(bridge, ctx) is None
        finally:
            kc.stop_channels()
            plays.cancel()
            await asyncio.gather(plays, return_exceptions=True)
            await bridge.close()
            await hub.owner.close()
            ctx.term()
        assert not directory.exists()
        assert hub.clients == 0

    run_alone(go())


def test_the_bridge_refuses_what_it_cannot_route_and_goes_on() -> None:
    async def go() -> None:
        kernel = LoopbackChannels()
        hub = ChannelHub(kernel)
        bridge = await JupyterBridge.open(hub.join(), max_message_bytes=1 << 20)
        ctx = zmq.asyncio.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"ipc://{bridge.connection_info['ip']}-{bridge.connection_info['shell_port']}")
        try:
            await s.send_multipart([b"no", b"delimiter"])
            await s.send_multipart([DELIM, b"sig", b"{}", b"{}", b"{}", b"{}"])  # no msg_id
            await s.send_multipart([DELIM, b"too few"])
            mid, req = message(SIGNER, "kernel_info_request")
            await s.send_multipart(req)
            assert parse(SIGNER, await soon(kernel.take("shell"))).header["msg_id"] == mid
            assert bridge.refused["shell"] == 3
            _, reply = message(SIGNER, "kernel_info_reply", parent=mid)
            await kernel.emit("shell", reply)
            assert await soon(s.recv_multipart()) == reply  # identities stripped by the DEALER
        finally:
            s.close(linger=0)
            ctx.term()
            await bridge.close()
            await hub.owner.close()

    run_alone(go())
