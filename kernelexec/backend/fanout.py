"""One kernel's channels shared by several clients: the session's own, and Jupyter's.

On a transport that offers no sockets on this host (attach) there is one :class:`~.base.Channels`
per kernel, and the session's client reads all of it. For Jupyter's clients to reach the same kernel
at the same time (the provisioner, through :mod:`.bridge`), a :class:`ChannelHub` reads the kernel's
channels once and hands each message to whoever it is for:

* iopub to every client: each sees every output, as the subscribers of a kernel's own iopub do;
* shell, control and stdin to the client that sent the request the message answers, found by the
  message's ``parent_header.msg_id`` (stdin's ``input_request`` answers an ``execute_request``
  sent on shell). The header is parsed for that alone, with :mod:`kernelexec.kernel.protocol`'s bounds;
  frames are passed on as they came, signature included: every client holds the kernel's key, and
  nothing is re-signed. A message too malformed to route goes to the owner, whose parser refuses
  it as it would without the hub (the session then treats the kernel as broken).

Every client has a bounded box per channel. The owner (the session's client) gets backpressure:
while its box is full the hub stops reading that channel and the transport holds the kernel back,
as without the hub. Another client gets the same backpressure for ``stall`` seconds, then a counted
drop (``dropped``) until it reads again: a client that stops reading never holds the session back
and never grows the host. Requests in flight are bounded per client (``max_routes``; past it the
oldest is forgotten and counted in ``forgotten``, its reply then dropped as unroutable).

It costs a task hop and a header parse per message, so a session builds a hub only when asked
(``AsyncSession(share_channels=True)``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from typing import Generic, TypeVar

from ..errors import ProtocolError, SandboxError
from ..kernel.protocol import MAX_MSG_ID, peek_msg_id
from .base import Channels, ChannelsClosed

__all__ = ["MAX_CLIENTS", "MAX_ROUTES", "QUEUE_SIZES", "STALL", "ChannelHub", "Mailbox", "SharedChannels"]

log = logging.getLogger("kernelexec")

T = TypeVar("T")

#: Messages each client's box holds per channel (as the transports' own bounds).
QUEUE_SIZES = {"iopub": 16, "shell": 4, "control": 4, "stdin": 4}
SENDABLE = ("shell", "control", "stdin")
#: Channels whose messages are requests the kernel answers (stdin carries the client's answers).
REQUESTS = ("shell", "control")
#: Requests in flight per client.
MAX_ROUTES = 256
#: Clients of one hub, the owner included.
MAX_CLIENTS = 8
#: Seconds a client other than the owner may leave a full box unread before messages for it drop.
STALL = 5.0


class Mailbox(Generic[T]):
    """A bounded FIFO for one reader and one writer that can fail or be shut.

    After :meth:`fail`, what was put (before or after) is still delivered, then the error is
    raised: a transport's last messages are not lost. After :meth:`shut`, nothing is delivered."""

    __slots__ = ("items", "size", "error", "is_shut", "_readable", "_writable")

    def __init__(self, size: int) -> None:
        self.items: deque[T] = deque()
        self.size = size
        self.error: ChannelsClosed | None = None
        self.is_shut = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    def full(self) -> bool:
        return len(self.items) >= self.size

    def put(self, item: T) -> None:
        if self.is_shut:
            return
        self.items.append(item)
        self._readable.set()

    async def room(self) -> None:
        """Until there is room (or the box is shut): the writer's backpressure."""
        while self.full() and not self.is_shut:
            self._writable.clear()
            await self._writable.wait()

    async def get(self) -> T:
        while not self.items:
            if self.error is not None:
                raise self.error.again()
            self._readable.clear()
            await self._readable.wait()
        item = self.items.popleft()
        self._writable.set()
        return item

    def fail(self, error: ChannelsClosed) -> None:
        if self.error is None:
            self.error = error
        self._readable.set()

    def shut(self, error: ChannelsClosed) -> None:
        self.is_shut = True
        self.items.clear()
        self.fail(error)
        self._writable.set()


class SharedChannels(Channels):
    """One client's channels to a kernel shared through a :class:`ChannelHub`.

    A :class:`~.base.Channels` like any other; :meth:`send` and :meth:`recv_tagged` also carry a
    tag per request (the bridge's ZeroMQ routing identities), given back with its replies."""

    def __init__(self, hub: ChannelHub, *, owner: bool, stall: float | None) -> None:
        self._hub = hub
        #: the session's own client: closing it closes the hub
        self.owner = owner
        self._stall = stall
        self._boxes: dict[str, Mailbox[tuple[list[bytes], object]]] = {
            c: Mailbox(n) for c, n in QUEUE_SIZES.items()}
        self._stalled = dict.fromkeys(QUEUE_SIZES, False)
        self._requests: OrderedDict[str, object] = OrderedDict()  # msg_id -> tag, in flight
        self._left: ChannelsClosed | None = None
        self._closed: asyncio.Future[ChannelsClosed] = asyncio.get_running_loop().create_future()
        #: messages dropped per channel because this client left its box full for ``stall`` seconds
        self.dropped = dict.fromkeys(QUEUE_SIZES, 0)
        #: requests forgotten unanswered (more than ``max_routes`` in flight); their replies drop
        self.forgotten = 0

    async def send(self, channel: str, frames: list[bytes], tag: object = None) -> None:
        """As :meth:`Channels.send`; a shell or control request's replies come back with ``tag``.

        Raises ValueError for a request whose reply could not be routed back (no msg_id, or one
        in flight from another client)."""
        await self._hub._send(self, channel, frames, tag)

    async def recv(self, channel: str) -> list[bytes]:
        return (await self.recv_tagged(channel))[0]

    async def recv_tagged(self, channel: str) -> tuple[list[bytes], object]:
        """The next message on ``channel`` and the tag of the request it answers (None on iopub)."""
        box = self._boxes.get(channel)
        if box is None:
            raise ValueError(f"no channel {channel!r}; one of {', '.join(self._boxes)}")
        item = await box.get()
        self._stalled[channel] = False
        return item

    async def wait_closed(self) -> ChannelsClosed:
        return await asyncio.shield(self._closed)

    async def close(self) -> None:
        """Leave the hub; the owner's close closes the hub and the kernel's channels."""
        if self.owner:
            await self._hub.close()
        else:
            self._hub._leave(self, ChannelsClosed("the channels were closed by this host"))

    # -- the hub's side --------------------------------------------------------------------

    async def _deliver(self, channel: str, frames: list[bytes], tag: object) -> None:
        box = self._boxes[channel]
        if self._left is not None:
            return
        if box.full():
            if self._stall is None:
                await box.room()
            elif self._stalled[channel]:
                self.dropped[channel] += 1
                return
            else:
                try:
                    await asyncio.wait_for(box.room(), self._stall)
                except asyncio.TimeoutError:
                    self._stalled[channel] = True
                    self.dropped[channel] += 1
                    log.warning("a client of the kernel left its %s messages unread for %g s; dropping them "
                                "until it reads again", channel, self._stall)
                    return
        box.put((frames, tag))

    def _ended(self, error: ChannelsClosed) -> None:
        if not self._closed.done():
            self._closed.set_result(error)

    def _shut(self, why: ChannelsClosed) -> None:
        if self._left is None:
            self._left = why
        for box in self._boxes.values():
            box.shut(why)
        self._ended(why)


class ChannelHub:
    """Reads a kernel's channels once and shares them between clients (see the module's docstring).

    Built inside a running event loop; ``owner`` is the first client's :class:`SharedChannels`."""

    def __init__(self, channels: Channels, *, max_routes: int = MAX_ROUTES) -> None:
        loop = asyncio.get_running_loop()
        self._under = channels
        self._max_routes = max_routes
        self._routes: dict[str, SharedChannels] = {}
        self._error: ChannelsClosed | None = None
        self._closing = False
        #: replies whose request no client has in flight (unknown, answered already, or forgotten)
        self.unroutable = 0
        self.owner = SharedChannels(self, owner=True, stall=None)
        self._clients: list[SharedChannels] = [self.owner]
        self._tasks = [loop.create_task(self._pump(c), name=f"kernelexec-hub-{c}") for c in QUEUE_SIZES]
        self._tasks.append(loop.create_task(self._watch(), name="kernelexec-hub-watch"))

    def join(self, *, stall: float = STALL) -> SharedChannels:
        """Another client's channels to the kernel; close them to leave."""
        if self._error is not None:
            raise self._error.again()
        if len(self._clients) >= MAX_CLIENTS:
            raise SandboxError(f"a kernel's channels are shared by at most {MAX_CLIENTS} clients; close one first "
                               "(one bridge serves any number of Jupyter clients)")
        client = SharedChannels(self, owner=False, stall=stall)
        self._clients.append(client)
        return client

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def close(self) -> None:
        """Close every client's channels and the kernel's. Idempotent."""
        if self._closing:
            return
        self._closing = True
        why = ChannelsClosed("the channels were closed by this host")
        self._fail(why)
        for client in list(self._clients):
            self._leave(client, why)
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._under.close()

    # -- internals ---------------------------------------------------------------------------

    async def _send(self, client: SharedChannels, channel: str, frames: list[bytes], tag: object) -> None:
        if channel not in SENDABLE:
            raise ValueError(f"cannot send on {channel!r}; one of {', '.join(SENDABLE)}")
        if client._left is not None:
            raise client._left.again()
        if self._error is not None:
            raise self._error.again()
        msg_id = None
        if channel in REQUESTS:
            try:
                msg_id = peek_msg_id(frames, parent=False)
            except ProtocolError as e:
                raise ValueError(f"cannot route the reply of this {channel} request: {e}") from None
            if msg_id is None:
                raise ValueError(f"a {channel} request needs a msg_id (a string of 1 to {MAX_MSG_ID} characters) "
                                 "for its reply to find its way back")
            holder = self._routes.get(msg_id)
            if holder is not None and holder is not client:
                raise ValueError(f"msg_id {msg_id[:64]!r} is in flight from another client of this kernel; "
                                 "every request needs its own")
            self._routes[msg_id] = client
            client._requests[msg_id] = tag
            client._requests.move_to_end(msg_id)
            while len(client._requests) > self._max_routes:
                old, _ = client._requests.popitem(last=False)
                self._routes.pop(old, None)
                client.forgotten += 1
        try:
            await self._under.send(channel, frames)
        except BaseException:
            if msg_id is not None and self._routes.get(msg_id) is client:
                del self._routes[msg_id]
                client._requests.pop(msg_id, None)
            raise

    async def _pump(self, channel: str) -> None:
        try:
            while True:
                frames = await self._under.recv(channel)
                if channel == "iopub":
                    for client in tuple(self._clients):
                        await client._deliver(channel, frames, None)
                else:
                    await self._route(channel, frames)
        except ChannelsClosed as e:
            # this channel is drained: its last messages were delivered, now its end
            self._fail(e)
            for client in self._clients:
                client._boxes[channel].fail(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours: every client hears of it, on every channel
            log.exception("the channel hub's %s reader failed", channel)
            closed = ChannelsClosed(f"the channel hub's {channel} reader failed: {e!r}")
            closed.__cause__ = e
            self._fail(closed)
            for client in self._clients:
                for box in client._boxes.values():
                    box.fail(closed)

    async def _route(self, channel: str, frames: list[bytes]) -> None:
        try:
            parent = peek_msg_id(frames, parent=True)
        except ProtocolError:
            await self.owner._deliver(channel, frames, None)  # its parser refuses it, as without the hub
            return
        client = self._routes.get(parent) if parent is not None else None
        if client is None:
            self.unroutable += 1
            log.debug("dropped a %s message whose parent no client has in flight", channel)
            return
        assert parent is not None
        if channel == "stdin":  # an input_request: its execute_request is still waiting for its reply
            tag = client._requests.get(parent)
        else:
            del self._routes[parent]
            tag = client._requests.pop(parent, None)
        await client._deliver(channel, frames, tag)

    async def _watch(self) -> None:
        self._fail(await self._under.wait_closed())

    def _fail(self, error: ChannelsClosed) -> None:
        """The kernel's channels ended: no more sends, every client's ``wait_closed`` returns. Each
        channel's boxes fail once its pump has drained it (what came before is still delivered)."""
        if self._error is None:
            self._error = error
        for client in self._clients:
            client._ended(self._error)

    def _leave(self, client: SharedChannels, why: ChannelsClosed) -> None:
        if client in self._clients:
            self._clients.remove(client)
        for msg_id in client._requests:
            if self._routes.get(msg_id) is client:
                del self._routes[msg_id]
        client._requests.clear()
        client._shut(why)
