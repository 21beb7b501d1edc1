"""The egress proxy on loopback, with no engine: the tests run the target servers, an upstream proxy and
the proxy itself (``asyncio.start_server`` on 127.0.0.1 feeding :class:`StreamPair` into ``handle``).

A target is reachable only because an entry names ``127.0.0.1:PORT`` literally; host names are mapped to
addresses by a fake resolver, never the host's. Nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from kernelexec.backend.base import StreamPair
from kernelexec.egress.proxy import (
    EgressEvent,
    EgressLimits,
    EgressProxy,
    ProxyURL,
    UpstreamProxies,
    UpstreamProxyError,
    _parse_request,
)
from kernelexec.egress.rules import parse_egress

from .remote.certs import make_authority

NAME = "files.example.test"
#: the tests' proxies connect directly unless a test gives them an upstream
NO_UPSTREAM = UpstreamProxies()


# --- the tests' own servers ------------------------------------------------------------------------


@dataclass
class Target:
    """A server on 127.0.0.1 that counts its connections and records what it was sent."""

    server: asyncio.Server
    port: int
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serve(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter, Target], Awaitable[None]],
                ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Target]:
    target: Target

    handlers: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target.connections += 1
        me = asyncio.current_task()
        assert me is not None
        handlers.add(me)
        try:
            await handler(reader, writer, target)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away mid-answer: what some tests do on purpose (a cut download)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_context)
    target = Target(server, server.sockets[0].getsockname()[1])
    try:
        async with server:
            yield target
    finally:
        # Python 3.11's server close does not wait for its connections' handlers: end them here, so
        # that none is left pending when the test's loop closes
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def http_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target,
                      body: bytes = b"hello from the target") -> None:
    """One HTTP/1.1 response; the head it was sent is recorded."""
    head = await reader.readuntil(b"\r\n\r\n")
    target.heads.append(head)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def big_answer(size: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter, Target], Awaitable[None]]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target) -> None:
        target.heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
    return answer


async def upstream_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target) -> None:
    """A tiny CONNECT-only proxy, like a corporate one: records the request head, then splices."""
    head = await reader.readuntil(b"\r\n\r\n")
    target.heads.append(head)
    host, _, port = head.split(b" ")[1].decode().rpartition(":")
    r2, w2 = await asyncio.open_connection(host.strip("[]"), int(port))
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()

    try:
        await asyncio.gather(copy(reader, w2), copy(r2, writer))
    finally:
        w2.close()


# --- the proxy under test --------------------------------------------------------------------------


class FakeResolver:
    """Names to chosen addresses; records every lookup. An unknown name fails as getaddrinfo does."""

    def __init__(self, names: dict[str, list[str]] | None = None) -> None:
        self.names = names or {}
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.names[host]


@dataclass
class Harness:
    proxy: EgressProxy
    port: int
    events: list[EgressEvent]
    ended: asyncio.Condition
    accepted: int = 0

    async def wait_events(self, n: int) -> list[EgressEvent]:
        """Until ``n`` connections have ended (the proxy emits one event each)."""
        async with self.ended:
            await self.ended.wait_for(lambda: len(self.events) >= n)
        return self.events

    async def wait_accepted(self, n: int) -> None:
        """Until ``n`` connections have been handed to the proxy."""
        async with self.ended:
            await self.ended.wait_for(lambda: self.accepted >= n)


@contextlib.asynccontextmanager
async def running(entries: list[str], limits: EgressLimits | None = None, *,
                  resolver: FakeResolver | None = None, upstream: UpstreamProxies | None = NO_UPSTREAM,
                  clock: Callable[[], float] | None = None) -> AsyncIterator[Harness]:
    events: list[EgressEvent] = []
    ended = asyncio.Condition()

    def on_event(event: EgressEvent) -> None:
        events.append(event)

        async def notify() -> None:
            async with ended:
                ended.notify_all()

        asyncio.get_running_loop().create_task(notify())

    extra = {"clock": clock} if clock else {}
    proxy = EgressProxy(parse_egress(entries), limits or EgressLimits(), on_event, resolver or FakeResolver(),
                        upstream, **extra)  # type: ignore[arg-type]
    harness: Harness

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        harness.accepted += 1
        async with ended:
            ended.notify_all()
        await proxy.handle(StreamPair(reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    harness = Harness(proxy, server.sockets[0].getsockname()[1], events, ended)
    try:
        async with server:
            yield harness
    finally:
        await proxy.aclose()


async def ask(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a request head to the proxy; returns the connection and the answer's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    answer = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, answer


async def refused(port: int, head: bytes) -> tuple[int, str]:
    """Status and body of an answer that ends the connection."""
    reader, writer, answer = await ask(port, head)
    body = await reader.read()
    writer.close()
    await writer.wait_closed()
    return int(answer.split(b" ")[1]), body.decode()


def connect(host: str, port: int) -> bytes:
    return f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from a test CA; the server's name is NAME and 127.0.0.1."""
    directory = tmp_path_factory.mktemp("egress-ca")
    ca = make_authority(directory)
    pair = ca.issue(directory, "target", server_ips=("127.0.0.1",), server_names=(NAME,))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pair.cert, pair.key)
    client = ssl.create_default_context(cafile=str(ca.cert_path))
    return server, client


# --- what goes through ------------------------------------------------------------------------------


def test_connect_carries_tls_end_to_end(tls):
    """An https request through the proxy as http.client (pip's stack) makes it: the client verifies the
    target's own certificate, so the proxy cannot have read or changed a byte."""
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with serve(http_answer, server_ctx) as target, running([f"127.0.0.1:{target.port}"]) as h:
            def get() -> tuple[int, bytes, str]:
                conn = http.client.HTTPSConnection("127.0.0.1", h.port, context=client_ctx, timeout=60)
                conn.set_tunnel("127.0.0.1", target.port)
                try:
                    conn.request("GET", "/simple/", headers={"X-Secret": "inside-tls"})
                    subject = dict(x[0] for x in conn.sock.getpeercert()["subject"])["commonName"]
                    response = conn.getresponse()
                    return response.status, response.read(), subject
                finally:
                    conn.close()

            status, body, subject = await asyncio.to_thread(get)
            assert (status, body, subject) == (200, b"hello from the target", "target")
            assert b"X-Secret: inside-tls" in target.heads[0]
            (event,) = await h.wait_events(1)
        assert (event.verdict, event.host, event.port, event.address, event.kind, event.status) == \
            ("allowed", "127.0.0.1", target.port, "127.0.0.1", "connect", 200)
        assert event.bytes_up > len(b"GET /simple/") and event.bytes_down > len(body)  # TLS records both ways
        assert not event.cut and event.duration >= 0

    asyncio.run(main())


def test_plain_http_is_forwarded_in_origin_form_without_proxy_headers():
    async def main() -> None:
        async with serve(http_answer) as target, running([f"127.0.0.1:{target.port}"]) as h:
            head = (f"GET http://127.0.0.1:{target.port}/simple/pkg/?x=1 HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{target.port}\r\nProxy-Connection: keep-alive\r\n"
                    "Proxy-Authorization: Basic c2VjcmV0\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
                    "Keep-Alive: 300\r\nX-Kept: 2\r\n\r\n").encode()
            reader, writer, answer = await ask(h.port, head)
            body = await reader.read()
            writer.close()
            await writer.wait_closed()
            (event,) = await h.wait_events(1)
        assert answer.startswith(b"HTTP/1.1 200 OK") and body == b"hello from the target"
        sent = target.heads[0].decode()
        assert sent.startswith("GET /simple/pkg/?x=1 HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{target.port}\r\n" in sent and "X-Kept: 2\r\n" in sent
        assert "Connection: close\r\n" in sent
        for gone in ("Proxy-", "X-Hop", "Keep-Alive", "keep-alive"):
            assert gone not in sent
        assert (event.verdict, event.kind, event.status, event.bytes_up) == ("allowed", "http", 0, len(sent))
        assert event.bytes_down == len(answer) + len(body)

    asyncio.run(main())


def test_half_closes_go_through_and_the_servers_end_ends_the_tunnel():
    """The code's end of input reaches the server as a half-close (a request sent, the answer awaited);
    the server's end ends the connection even when the code keeps its side open."""
    async def goodbye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target) -> None:
        writer.write(b"bye")
        await writer.drain()

    async def main() -> None:
        async with serve(echo) as target, serve(goodbye) as closer, \
                running([f"127.0.0.1:{target.port}", f"127.0.0.1:{closer.port}"]) as h:
            reader, writer, _ = await ask(h.port, connect("127.0.0.1", target.port))
            writer.write(b"ping")
            writer.write_eof()
            assert await reader.read() == b"ping"  # the echo server saw the end of input, answered, closed
            (first,) = await h.wait_events(1)
            writer.close()
            await writer.wait_closed()
            reader, writer, _ = await ask(h.port, connect("127.0.0.1", closer.port))
            assert await reader.read() == b"bye"
            events = await h.wait_events(2)  # the code's side is still open: the proxy ended it
            writer.close()
            await writer.wait_closed()
        assert (first.bytes_up, first.bytes_down, first.reason) == (4, 4, "closed by the server")
        assert (events[1].bytes_up, events[1].bytes_down, events[1].reason) == (0, 3, "closed by the server")

    asyncio.run(main())


# --- what is refused --------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("169.254.169.254", "metadata"), ("10.20.30.40", "private"),
    ("::ffff:127.0.0.1", "loopback"), ("fd00:ec2::254", "metadata"),
])
def test_an_allowed_name_resolving_to_an_internal_address_is_refused(address, why):
    """Even with the target's address on the list literally: only the literal entry reaches it, never a
    name (a DNS answer the code's side may control)."""
    async def main() -> None:
        async with serve(echo) as target:
            entries = [f"{NAME}:{target.port}", f"127.0.0.1:{target.port}"]
            async with running(entries, resolver=FakeResolver({NAME: [address]})) as h:
                status, body = await refused(h.port, connect(NAME, target.port))
                (event,) = await h.wait_events(1)
            assert status == 403 and why in body and "resolves to" in body and "literally" in body
            assert (event.verdict, event.host, event.address, event.status) == ("refused", NAME, "", 403)
            assert why in event.reason
            assert target.connections == 0

    asyncio.run(main())


def test_every_resolved_address_is_checked_and_the_next_is_tried_on_failure(monkeypatch):
    """All of a name's addresses are refused: 403 naming each. Then, with loopback counted as public for
    this test only (the servers here can only be on loopback), an address that does not answer is
    followed by the next one, and the connection goes to that checked address."""
    async def main() -> None:
        async with serve(echo) as target:
            resolver = FakeResolver({NAME: ["127.0.0.1", "192.0.2.1"]})  # 192.0.2.1 is documentation: refused
            async with running([f"{NAME}:{target.port}"], resolver=resolver) as h:
                status, body = await refused(h.port, connect(NAME, target.port))
            assert status == 403 and "127.0.0.1 (loopback)" in body and "192.0.2.1" in body
            assert target.connections == 0
            monkeypatch.setattr("kernelexec.egress.proxy.address_problem",
                                lambda a: None if str(a).startswith("127.") else "not loopback")
            resolver = FakeResolver({NAME: ["127.0.0.2", "192.0.2.1", "127.0.0.1"]})
            with socket.socket() as silent:  # bound, not listening: a refused connection
                silent.bind(("127.0.0.2", target.port))
                async with running([f"{NAME}:{target.port}"], resolver=resolver) as h:
                    reader, writer, answer = await ask(h.port, connect(NAME, target.port))
                    writer.write(b"ping")
                    assert answer.startswith(b"HTTP/1.1 200") and await reader.readexactly(4) == b"ping"
                    writer.close()
                    await writer.wait_closed()
                    (event,) = await h.wait_events(1)
            assert (event.verdict, event.host, event.address) == ("allowed", NAME, "127.0.0.1")
            assert target.connections == 1

    asyncio.run(main())


def test_a_name_not_on_the_list_is_refused_without_a_lookup():
    async def main() -> None:
        resolver = FakeResolver({"other.example.test": ["8.8.8.8"]})
        async with running(["pypi"], resolver=resolver) as h:
            status, body = await refused(h.port, connect("other.example.test", 443))
            status80, _ = await refused(h.port, b"GET http://pypi.org/simple/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n")
            events = await h.wait_events(2)
        assert status == 403
        assert body == "kernelexec egress: other.example.test:443 is not on this session's allowlist (Policy.egress)\n"
        assert status80 == 403  # "pypi" allows pypi.org on 443 only
        assert resolver.asked == []
        assert [(e.verdict, e.host, e.port) for e in events] == [("refused", "other.example.test", 443),
                                                                 ("refused", "pypi.org", 80)]

    asyncio.run(main())


def test_an_unresolvable_or_unreachable_target_is_a_502():
    async def main() -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there now
        async with running([NAME, f"127.0.0.1:{port}"]) as h:
            status, body = await refused(h.port, connect(NAME, 443))
            assert status == 502 and f"cannot resolve {NAME}" in body
            status, body = await refused(h.port, connect("127.0.0.1", port))
            assert status == 502 and f"cannot connect to 127.0.0.1:{port}" in body
            events = await h.wait_events(2)
        assert [e.verdict for e in events] == ["refused", "refused"]

    asyncio.run(main())


@pytest.mark.parametrize(("head", "status", "says"), [
    (b"hello\r\n\r\n", 400, "cannot read the request line"),
    (b"GET /simple/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n", 400, "not an absolute http:// URL"),
    (b"GET https://pypi.org/ HTTP/1.1\r\n\r\n", 400, "CONNECT host:443"),
    (b"CONNECT pypi.org:99999 HTTP/1.1\r\n\r\n", 400, "no valid port"),
    (b"CONNECT [::1 HTTP/1.1\r\n\r\n", 400, "[address]:port"),
    (b"CONNECT pypi.org:443 HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed header line"),
    (b"CONNECT pypi.org:443 HTTP/1.1\r\nX: a\rb\r\n\r\n", 400, "control characters"),
    (b"GET http://user:pw@pypi.org/ HTTP/1.1\r\n\r\n", 400, "credentials"),
    (b"CONNECT pypi.org:443 HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 5000, 431, "larger than 1024 bytes"),
])
def test_malformed_or_oversized_heads_are_answered_and_logged(head, status, says):
    async def main() -> None:
        async with running(["pypi"], EgressLimits(head_bytes=1024)) as h:
            got, body = await refused(h.port, head)
            (event,) = await h.wait_events(1)
        assert got == status and says in body
        assert (event.verdict, event.status) == ("refused", status) and says in event.reason

    asyncio.run(main())


def test_a_silent_client_is_answered_408_and_one_that_leaves_is_logged():
    async def main() -> None:
        async with running(["pypi"], EgressLimits(head_timeout=0.2)) as h:
            status, body = await refused(h.port, b"CONNECT pypi.org:443 HTTP/1.1\r\n")
            _, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.close()
            await writer.wait_closed()
            events = await h.wait_events(2)
        assert status == 408 and "no complete request" in body
        assert [e.status for e in events] == [408, 0]
        assert "closed the connection before" in events[1].reason

    asyncio.run(main())


# --- bounds ------------------------------------------------------------------------------------------


def test_the_byte_budget_cuts_a_big_download_and_refuses_the_next():
    budget = 1 << 20

    async def main() -> None:
        async with serve(big_answer(8 << 20)) as target, \
                running([f"127.0.0.1:{target.port}"], EgressLimits(max_bytes=budget)) as h:
            url = f"http://127.0.0.1:{target.port}/big"
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = len(await reader.read())  # to EOF: the proxy ends the connection
            writer.close()
            await writer.wait_closed()
            (cut,) = await h.wait_events(1)
            status, body = await refused(h.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            events = await h.wait_events(2)
        assert received == cut.bytes_down and cut.bytes_up + cut.bytes_down == budget == h.proxy.bytes_used
        assert cut.cut and cut.verdict == "allowed" and "budget of 1 MiB is spent" in cut.reason
        assert status == 403 and "budget of 1 MiB is spent" in body and events[1].verdict == "refused"

    asyncio.run(main())


def test_connections_beyond_the_cap_are_refused_until_one_closes():
    async def main() -> None:
        async with serve(echo) as target, \
                running([f"127.0.0.1:{target.port}"], EgressLimits(max_connections=2)) as h:
            open_ = [await ask(h.port, connect("127.0.0.1", target.port)) for _ in range(2)]
            assert all(a.startswith(b"HTTP/1.1 200") for _, _, a in open_)
            status, body = await refused(h.port, connect("127.0.0.1", target.port))
            assert status == 503 and "2 connections are already open" in body
            (over,) = await h.wait_events(1)
            assert (over.verdict, over.status) == ("refused", 503)
            reader, writer, _ = open_[0]
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"  # the tunnels still work
            writer.close()
            await writer.wait_closed()
            await h.wait_events(2)
            again = await ask(h.port, connect("127.0.0.1", target.port))
            assert again[2].startswith(b"HTTP/1.1 200")
            for _, w, _ in (open_[1], again):
                w.close()
                await w.wait_closed()
            events = await h.wait_events(4)
        assert [e.verdict for e in events] == ["refused", "allowed", "allowed", "allowed"]
        assert events[1].bytes_up == events[1].bytes_down == 4

    asyncio.run(main())


def test_new_connections_are_rate_limited_by_a_token_bucket():
    now = [1000.0]

    async def main() -> None:
        async with serve(echo) as target, running([f"127.0.0.1:{target.port}"], EgressLimits(rate_per_minute=2),
                                                  clock=lambda: now[0]) as h:
            for _ in range(2):
                _, writer, answer = await ask(h.port, connect("127.0.0.1", target.port))
                assert answer.startswith(b"HTTP/1.1 200")
                writer.close()
                await writer.wait_closed()
            status, body = await refused(h.port, connect("127.0.0.1", target.port))
            assert status == 429 and "more than 2 new connections a minute (Policy.egress_rate)" in body
            now[0] += 30.0  # half a minute: one token back
            _, writer, answer = await ask(h.port, connect("127.0.0.1", target.port))
            assert answer.startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()
            status, _ = await refused(h.port, connect("127.0.0.1", target.port))
            events = await h.wait_events(5)
        assert status == 429
        assert sorted(e.status for e in events) == [200, 200, 200, 429, 429]
        assert target.connections == 3

    asyncio.run(main())


def test_a_flood_of_refused_connections_is_recorded_as_counted_summaries():
    """Code looping on a refused name must not grow the host's audit log at the speed it can connect:
    past ``refusal_events_per_minute`` refusals are counted, then recorded as one summary event (when the
    next refusal may be recorded, and at the end); allowed connections are recorded one by one throughout."""
    now = [1000.0]

    async def main() -> list[EgressEvent]:
        async with serve(echo) as target, running([f"127.0.0.1:{target.port}"],
                                                  EgressLimits(refusal_events_per_minute=3),
                                                  clock=lambda: now[0]) as h:
            for _ in range(10):
                assert (await refused(h.port, connect("blocked.example", 443)))[0] == 403
            assert (await refused(h.port, connect("other.example", 80)))[0] == 403
            _, writer, answer = await ask(h.port, connect("127.0.0.1", target.port))
            assert answer.startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()
            await h.wait_events(4)  # 3 refusals one by one, then the allowed one; 8 refusals counted
            now[0] += 20.0  # one token back: the next refusal is recorded, after a summary of the others
            assert (await refused(h.port, connect("blocked.example", 443)))[0] == 403
            await h.wait_events(6)
            for _ in range(2):  # over again: counted until the end
                assert (await refused(h.port, connect("blocked.example", 443)))[0] == 403
        return h.events  # the proxy is closed: the last summary is out

    events = asyncio.run(main())
    kinds = [(e.verdict, e.kind, e.count) for e in events]
    assert kinds == [("refused", "connect", 1)] * 3 + [("allowed", "connect", 1), ("refused", "summary", 8),
                                                       ("refused", "connect", 1), ("refused", "summary", 2)]
    summary = events[4]
    assert summary.reason.startswith("8 refused connections not recorded one by one (more than 3 a minute)")
    assert "blocked.example:443 (403) x7" in summary.reason and "other.example:80 (403) x1" in summary.reason
    assert sum(e.count for e in events if e.verdict == "refused") == 14  # every one counted


# --- the host's own proxy -------------------------------------------------------------------------


def test_the_hosts_https_proxy_carries_the_onward_connection(monkeypatch, tls):
    """HTTPS_PROXY in the proxy's environment: the onward connection is a CONNECT to the checked
    address through it (credentials from the URL); TLS still ends at the target."""
    server_ctx, client_ctx = tls
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)

    async def main() -> None:
        async with serve(upstream_proxy) as up, serve(http_answer, server_ctx) as target, \
                serve(http_answer) as plain:
            monkeypatch.setenv("HTTPS_PROXY", f"http://egress%40corp:p%3Ass@127.0.0.1:{up.port}")
            monkeypatch.setenv("http_proxy", f"127.0.0.1:{up.port}")
            entries = [f"{NAME}:{target.port}", f"127.0.0.1:{plain.port}"]
            async with running(entries, resolver=FakeResolver({NAME: ["127.0.0.1"]}), upstream=None) as h:
                assert h.proxy.upstream.https == ProxyURL("127.0.0.1", up.port, False,
                                                          "Basic " + base64.b64encode(b"egress@corp:p:ss").decode())
                # the name resolves to loopback, which only a literal entry may reach: refused before any
                # byte goes to the upstream
                status, _ = await refused(h.port, connect(NAME, target.port))
                assert status == 403 and up.connections == 0
                h.proxy.allowlist = parse_egress([f"127.0.0.1:{target.port}", f"127.0.0.1:{plain.port}"])

                def get() -> bytes:
                    conn = http.client.HTTPSConnection("127.0.0.1", h.port, context=client_ctx, timeout=60)
                    conn.set_tunnel("127.0.0.1", target.port)
                    try:
                        conn.request("GET", "/")
                        return conn.getresponse().read()
                    finally:
                        conn.close()

                assert await asyncio.to_thread(get) == b"hello from the target"
                reader, writer, answer = await ask(h.port, f"GET http://127.0.0.1:{plain.port}/p HTTP/1.1\r\n"
                                                           "Host: x\r\n\r\n".encode())
                assert answer.startswith(b"HTTP/1.1 200") and await reader.read() == b"hello from the target"
                writer.close()
                await writer.wait_closed()
                await h.wait_events(3)
        assert up.connections == 2
        tunnel, http_ = (head.decode() for head in up.heads)
        assert tunnel.startswith(f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\n")
        assert "Proxy-Authorization: Basic " + base64.b64encode(b"egress@corp:p:ss").decode() in tunnel
        assert http_.startswith(f"CONNECT 127.0.0.1:{plain.port} HTTP/1.1\r\n")
        assert "Proxy-Authorization" not in http_
        assert plain.heads[0].startswith(b"GET /p HTTP/1.1\r\n")

    asyncio.run(main())


def test_no_proxy_and_a_refusing_upstream():
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target) -> None:
        target.heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 403 Forbidden by policy\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with serve(refuse) as upstream, serve(echo) as target:
            proxies = UpstreamProxies(https=ProxyURL("127.0.0.1", upstream.port))
            async with running([f"127.0.0.1:{target.port}"], upstream=proxies) as h:
                status, body = await refused(h.port, connect("127.0.0.1", target.port))
                (event,) = await h.wait_events(1)
            assert status == 502 and f"the host's proxy http://127.0.0.1:{upstream.port} answered" in body
            assert "403 Forbidden by policy" in body and event.verdict == "refused"
            assert target.connections == 0 and upstream.connections == 1
            bypass = UpstreamProxies(https=ProxyURL("127.0.0.1", upstream.port), no_proxy=("127.0.0.0/8",))
            async with running([f"127.0.0.1:{target.port}"], upstream=bypass) as h:
                _, writer, answer = await ask(h.port, connect("127.0.0.1", target.port))
                writer.close()
                await writer.wait_closed()
            assert answer.startswith(b"HTTP/1.1 200") and upstream.connections == 1 and target.connections == 1

    asyncio.run(main())


def test_upstream_settings_from_the_environment():
    env = {"https_proxy": "http://lower:3128", "HTTPS_PROXY": "http://upper:3128", "ALL_PROXY": "http://all:8080",
           "no_proxy": "localhost, .corp.example, 10.0.0.0/8, [fd00::1], internal:8443"}
    up = UpstreamProxies.from_environ(env)
    assert up.https == ProxyURL("lower", 3128) and up.http == ProxyURL("all", 8080)
    import ipaddress

    def via(host: str, address: str, port: int = 443) -> bool:
        return up.for_target(host, ipaddress.ip_address(address), port, tls=True) is not None

    assert via("pypi.org", "151.101.0.223")
    assert not via("localhost", "151.101.0.223") and not via("a.corp.example", "151.101.0.223")
    assert not via("corp.example", "151.101.0.223") and not via("x.org", "10.2.3.4")
    assert not via("x.org", "fd00::1") and not via("internal", "151.101.0.223", 8443)
    assert via("internal", "151.101.0.223", 443) and via("notcorp.example", "151.101.0.223")
    assert UpstreamProxies.from_environ({"NO_PROXY": "*", "HTTPS_PROXY": "http://p:1"}).for_target(
        "pypi.org", ipaddress.ip_address("151.101.0.223"), 443, tls=True) is None
    assert UpstreamProxies.from_environ({}) == UpstreamProxies()
    assert ProxyURL.parse("https://proxy.corp") == ProxyURL("proxy.corp", 443, True)
    with pytest.raises(UpstreamProxyError, match="ALL_PROXY='socks5://p:1080': only http:// and https://"):
        UpstreamProxies.from_environ({"ALL_PROXY": "socks5://p:1080"})


def test_the_forwarded_head_keeps_the_body_framing():
    request = _parse_request(b"POST http://h.example/u HTTP/1.1\r\nHost: other\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection: Upgrade\r\nUpgrade: websocket\r\nTE: trailers\r\n\r\n")
    assert (request.kind, request.host, request.port) == ("http", "h.example", 80)
    assert request.head == (b"POST /u HTTP/1.1\r\nHost: h.example\r\nTransfer-Encoding: chunked\r\n"
                            b"Connection: close\r\n\r\n")
    assert _parse_request(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n").host == "2001:db8::1"
    assert _parse_request(b"CONNECT Files.Example.Test. HTTP/1.1\r\n\r\n").port == 443


# --- the end of a session ---------------------------------------------------------------------------


def test_aclose_ends_every_connection_and_leaves_no_task_or_fd():
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        async with serve(echo) as target:
            base_fds = fds()
            h_cm = running([f"127.0.0.1:{target.port}"])
            h = await h_cm.__aenter__()
            try:
                reader, writer, answer = await ask(h.port, connect("127.0.0.1", target.port))
                assert answer.startswith(b"HTTP/1.1 200")
                r2, w2 = await asyncio.open_connection("127.0.0.1", h.port)
                w2.write(b"CONNECT 127.0.0.1")  # half a head
                await w2.drain()
                await h.wait_accepted(2)
                await h.proxy.aclose()
                assert await reader.read() == b"" and await r2.read() == b""
                events = await h.wait_events(2)
                assert sorted(e.verdict for e in events) == ["allowed", "refused"]
                assert all("egress proxy (or its transport) closed" in e.reason for e in events)
                r3, w3 = await asyncio.open_connection("127.0.0.1", h.port)
                assert await r3.read() == b""  # a closed proxy closes new connections at once
                assert "is closed" in (await h.wait_events(3))[2].reason
                for w in (writer, w2, w3):
                    w.close()
                    await w.wait_closed()
            finally:
                await h_cm.__aexit__(None, None, None)
            assert not h.proxy._tasks and h.proxy.active == 0
            for _ in range(3):
                await asyncio.sleep(0)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert others == [] or all(t.done() for t in others)
            assert fds() == base_fds

    asyncio.run(main())


@pytest.fixture(autouse=True)
def _no_host_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy must never consult the host's resolver in these tests: names go to the fake one."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the host's resolver was asked: {args}")

    monkeypatch.setattr("kernelexec.egress.proxy.system_resolver", refuse)



def test_a_proxy_for_a_policy_takes_its_entries_and_bounds():
    from kernelexec import Policy

    proxy = EgressProxy.for_policy(Policy(egress=("pypi",), egress_max_bytes="64m", egress_max_connections=3,
                                          egress_rate=5), lambda e: None, upstream=NO_UPSTREAM)
    assert proxy.limits == EgressLimits(max_bytes=64 << 20, max_connections=3, rate_per_minute=5)
    assert proxy.allowlist.allows("files.pythonhosted.org", 443) and not proxy.allowlist.allows("pypi.org", 80)
    assert EgressLimits.from_policy(Policy()) == EgressLimits()  # the Policy defaults are the proxy's
