"""The host side of a session's egress: an HTTP/1.1 proxy over byte streams from the sandbox.

The container has no network interface. Each TCP connection its code opens to the proxy port inside
the container is carried to the host as a :class:`~kernelexec.backend.base.ByteStream` (by the
transport, whatever it is) and handed to :meth:`EgressProxy.handle`, which speaks:

* ``CONNECT host:port``: for TLS. After ``200 Connection established`` bytes are spliced both ways
  untouched: TLS stays end to end, the sandbox needs no CA of ours, the proxy sees no content.
* absolute-form plain http (``GET http://host[:port]/path``): forwarded once, in origin form, with
  hop-by-hop and ``Proxy-*`` headers removed and ``Connection: close``; the connection ends with the
  response (clients such as pip and requests open another one; keep-alive is not worth the parsing).

What it decides, before any byte leaves the host: the target is on the allowlist
(:mod:`.rules`); the name is resolved here, every address checked (loopback, private, link-local,
metadata... are refused unless the entry names that address literally), and the connection is made
to a checked address, never to the name again (no DNS rebinding). Per session: bytes both ways,
connections open at once and new connections per minute are bounded. Every connection, allowed or
refused, ends with one :class:`EgressEvent` for the audit log. Refusals are answered with a status
line and a one-line body that tell the code why (pip shows the status line).

The onward connection honours the host's own proxy settings (``HTTPS_PROXY``, ``HTTP_PROXY``,
``ALL_PROXY``, ``NO_PROXY``, read once at construction): it is then a ``CONNECT`` to the checked
address through that proxy, for https and plain http alike.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit

from ..backend.base import ByteStream, StreamPair
from .rules import Address, Allowlist, EgressRuleError, address_problem, normalize_target, parse_egress

if TYPE_CHECKING:  # pragma: no cover
    from ..policy import Policy

__all__ = ["EgressEvent", "EgressLimits", "EgressProxy", "ProxyURL", "Resolver", "UpstreamProxies",
           "UpstreamProxyError", "system_resolver"]

log = logging.getLogger("kernelexec")

#: ``(host, port) -> addresses``, in the order to try them.
Resolver = Callable[[str, int], Awaitable[list[str]]]

CHUNK = 64 << 10
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "upgrade", "host"})


@dataclass(frozen=True)
class EgressLimits:
    """A session's egress bounds (from its Policy) and the proxy's own guards against a stuck client."""

    #: bytes both ways over the session's life (``Policy.egress_max_bytes``)
    max_bytes: int = 256 << 20
    #: connections open at once (``Policy.egress_max_connections``); more are refused with 503
    max_connections: int = 8
    #: new onward connections a minute (``Policy.egress_rate``): a bucket this big, refilled at this rate
    rate_per_minute: int = 60
    #: largest request head: a proxy request is a line and a few headers
    head_bytes: int = 32 << 10
    #: seconds for the whole request head to arrive: a silent client does not hold a slot
    head_timeout: float = 30.0
    #: seconds for a name to resolve, and for one onward connection (with the upstream's answer)
    resolve_timeout: float = 10.0
    connect_timeout: float = 15.0
    #: refused connections recorded one by one a minute (a bucket this big); past it they are counted and
    #: recorded as one summary event, so that code looping on a refused name cannot grow the host's audit log
    #: at the speed it can open connections. Allowed connections are always recorded one by one (the rate
    #: limit bounds them).
    refusal_events_per_minute: int = 120

    @classmethod
    def from_policy(cls, policy: Policy) -> EgressLimits:
        from ..policy import parse_size

        return cls(max_bytes=parse_size(policy.egress_max_bytes), max_connections=policy.egress_max_connections,
                   rate_per_minute=policy.egress_rate)


@dataclass
class EgressEvent:
    """One connection through the proxy, allowed or refused, as the audit log records it."""

    #: the target as the code asked for it ("" when the request could not be read)
    host: str
    port: int
    #: the address connected to ("" when none was)
    address: str
    verdict: Literal["allowed", "refused"]
    #: why it was refused, or how an allowed one ended (a cut is said here too)
    reason: str
    bytes_up: int = 0
    bytes_down: int = 0
    #: seconds from the connection's arrival to its end
    duration: float = 0.0
    #: "connect" (a tunnel), "http" (a plain request), "" (unreadable), or "summary": refused connections
    #: not recorded one by one (``count`` of them; ``reason`` names the targets most refused)
    kind: str = ""
    #: the status the proxy answered (200 for a tunnel; 0 when the response was the server's)
    status: int = 0
    #: the byte budget ran out during this connection and it was cut
    cut: bool = False
    #: how many connections this event stands for (more than 1 only for a summary)
    count: int = 1


class UpstreamProxyError(ValueError):
    """The host's proxy settings name a proxy this proxy cannot use."""


@dataclass(frozen=True)
class ProxyURL:
    """A host-side proxy from ``HTTPS_PROXY`` and friends."""

    host: str
    port: int
    tls: bool = False
    #: the ``Proxy-Authorization`` value when the URL has credentials
    authorization: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, *, variable: str = "the proxy URL") -> ProxyURL:
        text = url.strip() if "://" in url else f"http://{url.strip()}"
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            raise UpstreamProxyError(f"{variable}={url!r}: only http:// and https:// proxies can carry the "
                                     "sandbox's egress (a CONNECT tunnel); set it to an HTTP proxy or unset it")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise UpstreamProxyError(f"{variable}={url!r}: {e}") from None
        if not parts.hostname:
            raise UpstreamProxyError(f"{variable}={url!r} names no host")
        auth = None
        if parts.username is not None:
            creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth = "Basic " + base64.b64encode(creds).decode("ascii")
        return cls(parts.hostname, port, parts.scheme == "https", auth)

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamProxies:
    """The host's outbound proxies: which one (if any) the onward connection goes through.

    ``UpstreamProxies()`` is none at all; :meth:`from_environ` reads the usual variables (lower case
    first, as curl and urllib do)."""

    https: ProxyURL | None = None
    http: ProxyURL | None = None
    #: ``NO_PROXY`` entries: ``*``, host names and domain suffixes (``.corp`` or ``corp``), addresses, CIDRs
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> UpstreamProxies:
        env = os.environ if environ is None else environ

        def get(name: str) -> tuple[str, str] | None:
            for var in (name, name.upper()):
                if env.get(var, "").strip():
                    return var, env[var]
            return None

        def proxy(*names: str) -> ProxyURL | None:
            found = next((v for v in map(get, names) if v is not None), None)
            return ProxyURL.parse(found[1], variable=found[0]) if found else None

        no = get("no_proxy")
        entries = tuple(e.strip().lower() for e in (no[1] if no else "").split(",") if e.strip())
        return cls(https=proxy("https_proxy", "all_proxy"), http=proxy("http_proxy", "all_proxy"), no_proxy=entries)

    def for_target(self, host: str, address: Address, port: int, *, tls: bool) -> ProxyURL | None:
        """The proxy to reach ``host`` (at ``address``) through, or ``None`` to connect directly."""
        chosen = self.https if tls else self.http
        if chosen is None or self._bypass(host, address, port):
            return None
        return chosen

    def _bypass(self, host: str, address: Address, port: int) -> bool:
        for entry in self.no_proxy:
            if entry == "*":
                return True
            name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            if entry_port and entry_port != str(port):
                continue
            name = name.strip("[]")
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
                continue
            except ValueError:
                pass
            suffix = name.lstrip("*").lstrip(".")
            if suffix and (host == suffix or host.endswith("." + suffix)):
                return True
        return False


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's resolver (``getaddrinfo``), addresses in its order, each once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Refusal(Exception):
    """Answer the code with ``status`` and ``reason`` and end the connection."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


class _Closed(Exception):
    """The code closed its side before a whole request arrived: nothing to answer."""


@dataclass
class _Request:
    kind: Literal["connect", "http"]
    host: str  # normalised (an address in canonical text)
    port: int
    #: what to send the server first: the rewritten head for http, nothing for a tunnel
    head: bytes = b""


@dataclass
class _Conn:
    """What is known of one connection so far: becomes its event."""

    started: float
    host: str = ""
    port: int = 0
    address: str = ""
    verdict: Literal["allowed", "refused"] = "refused"
    reason: str = ""
    up: int = 0
    down: int = 0
    kind: str = ""
    status: int = 0
    cut: bool = False
    #: holds one of the ``max_connections`` slots
    counted: bool = False
    #: the stream is closed and the event emitted
    finished: bool = False


class _Bucket:
    """A token bucket: ``capacity`` at once, refilled at ``capacity`` a minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class EgressProxy:
    """One session's egress proxy. :meth:`handle` is the sandbox's ``EgressHandler``.

    ``resolver`` is for tests (names mapped to chosen addresses); ``upstream`` defaults to the host's
    environment, read once here; ``clock`` drives the rate limit (tests step it instead of waiting).
    """

    def __init__(self, allowlist: Allowlist, limits: EgressLimits, on_event: Callable[[EgressEvent], None],
                 resolver: Resolver | None = None, upstream: UpstreamProxies | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allowlist = allowlist
        self.limits = limits
        self.on_event = on_event
        self.resolver: Resolver = resolver or system_resolver
        self.upstream = UpstreamProxies.from_environ() if upstream is None else upstream
        self.clock = clock
        self._bucket = _Bucket(limits.rate_per_minute, clock)
        self._refusals_recorded = _Bucket(limits.refusal_events_per_minute, clock)
        #: refused connections not yet recorded, by target and status
        self._unrecorded: collections.Counter[tuple[str, int]] = collections.Counter()
        self._tasks: dict[asyncio.Task[None], tuple[ByteStream, _Conn]] = {}
        self._active = 0
        self._bytes = 0
        self._closed = False

    @classmethod
    def for_policy(cls, policy: Policy, on_event: Callable[[EgressEvent], None], resolver: Resolver | None = None,
                   upstream: UpstreamProxies | None = None) -> EgressProxy:
        """The proxy ``policy`` asks for (its ``egress`` and bounds)."""
        return cls(parse_egress(policy.egress), EgressLimits.from_policy(policy), on_event, resolver, upstream)

    @property
    def bytes_used(self) -> int:
        """Bytes through the proxy so far, both ways (what the budget counts)."""
        return self._bytes

    @property
    def active(self) -> int:
        """Connections being served now (counted against ``max_connections``)."""
        return self._active

    async def handle(self, stream: ByteStream) -> None:
        """Serve one connection from the sandbox until it ends; the stream is closed on return.

        The work runs in a task of its own, so :meth:`aclose` can end it without cancelling the caller."""
        conn = _Conn(self.clock())
        if self._closed:
            conn.reason = "the session's egress proxy is closed"
            await self._finish(stream, conn)
            return
        conn.counted = self._active < self.limits.max_connections
        if conn.counted:
            self._active += 1
        task = asyncio.create_task(self._serve(stream, conn), name="kernelexec-egress")
        self._tasks[task] = (stream, conn)
        task.add_done_callback(self._tasks_done)
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait({task})
            raise
        finally:
            await self._finish(stream, conn)  # for a task cancelled before it ran
        if not task.cancelled():
            task.result()

    async def aclose(self) -> None:
        """End every connection (their events are emitted before it returns) and refuse new ones. Idempotent."""
        self._closed = True
        served = dict(self._tasks)
        for task in served:
            task.cancel()
        if served:
            await asyncio.wait(served)
        for task, (stream, conn) in served.items():
            await self._finish(stream, conn)
            if not task.cancelled() and task.exception() is not None:
                log.error("egress connection failed", exc_info=task.exception())
        self._record_unrecorded()

    def _tasks_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    # --- one connection ----------------------------------------------------------------------------

    async def _serve(self, stream: ByteStream, conn: _Conn) -> None:
        try:
            await self._serve_request(stream, conn, conn.counted)
        finally:
            await self._finish(stream, conn)

    async def _finish(self, stream: ByteStream, conn: _Conn) -> None:
        """Close the code's side and emit the connection's event, once, whoever gets here first."""
        if conn.finished:
            return
        conn.finished = True
        if conn.counted:
            self._active -= 1
        conn.reason = conn.reason or "ended early: the session's egress proxy (or its transport) closed"
        try:
            await stream.close()
        finally:
            self._emit(conn)

    async def _serve_request(self, stream: ByteStream, conn: _Conn, counted: bool) -> None:
        try:
            try:
                head, rest = await asyncio.wait_for(self._read_head(stream), self.limits.head_timeout)
            except asyncio.TimeoutError:
                raise _Refusal(408, f"kernelexec egress: no complete request within {self.limits.head_timeout:g} s; "
                                    "send the request head at once") from None
            request = _parse_request(head)
            conn.host, conn.port, conn.kind = request.host, request.port, request.kind
            if not counted:
                raise _Refusal(503, f"kernelexec egress: {self.limits.max_connections} connections are already "
                                    "open (Policy.egress_max_connections); close one, or use fewer at once")
            remote, address = await self._open(request)
        except _Closed as e:
            conn.reason = str(e)
            return
        except _Refusal as r:
            conn.status, conn.reason = r.status, r.reason
            await self._answer(stream, conn, r.status, r.reason)
            return
        conn.verdict, conn.address = "allowed", address
        try:
            if request.kind == "connect":
                conn.status = 200
                await stream.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await self._splice(stream, remote, conn, request.head + rest)
        except OSError as e:
            conn.reason = conn.reason or f"the code's connection failed: {e}"
        finally:
            await remote.close()

    async def _read_head(self, stream: ByteStream) -> tuple[bytes, bytes]:
        buf = bytearray()
        limit = self.limits.head_bytes
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(buf[:end + 4]), bytes(buf[end + 4:])
            if len(buf) >= limit:
                raise _Refusal(431, f"kernelexec egress: the request head is larger than {limit} bytes; "
                                    "a proxy request is one line and a few headers")
            chunk = await stream.read(min(CHUNK, limit + 4 - len(buf)))
            if not chunk:
                raise _Closed("the code closed the connection before sending a whole request")
            buf += chunk

    async def _answer(self, stream: ByteStream, conn: _Conn, status: int, reason: str) -> None:
        line = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in reason)
        body = (line + "\n").encode("ascii")
        head = (f"HTTP/1.1 {status} {line}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\nProxy-Connection: close\r\n\r\n")
        try:
            await stream.write(head.encode("ascii") + body)
        except OSError as e:
            conn.reason += f" (the answer was not delivered: {e})"

    async def _open(self, request: _Request) -> tuple[ByteStream, str]:
        """Check ``request`` and connect to a checked address; raises :class:`_Refusal`."""
        target = _display(request.host, request.port)
        rule = self.allowlist.match(request.host, request.port)
        if rule is None:
            raise _Refusal(403, f"kernelexec egress: {target} is not on this session's allowlist (Policy.egress)")
        if self._bytes >= self.limits.max_bytes:
            raise _Refusal(403, f"kernelexec egress: this session's egress budget of {_size(self.limits.max_bytes)} "
                                "is spent (Policy.egress_max_bytes)")
        if not self._bucket.take():
            raise _Refusal(429, f"kernelexec egress: more than {self.limits.rate_per_minute} new connections a "
                                "minute (Policy.egress_rate); wait a little and retry")
        if rule.address is not None:
            addresses: list[Address] = [rule.address]  # named literally by the entry: no classification
        else:
            addresses = await self._resolve(request.host, request.port, target)
        errors: list[str] = []
        timeouts = 0
        for address in addresses:
            proxy = self.upstream.for_target(request.host, address, request.port, tls=request.kind == "connect")
            try:
                stream = await asyncio.wait_for(self._connect(address, request.port, proxy),
                                                self.limits.connect_timeout)
                return stream, str(address)
            except asyncio.TimeoutError:
                timeouts += 1
                errors.append(f"{address}: no answer within {self.limits.connect_timeout:g} s"
                              + (f" (through {proxy})" if proxy else ""))
            except OSError as e:
                errors.append(f"{address}: {e.strerror or e}" + (f" (through {proxy})" if proxy else ""))
        status = 504 if timeouts == len(addresses) else 502
        raise _Refusal(status, f"kernelexec egress: cannot connect to {target}: {'; '.join(errors)}")

    async def _resolve(self, host: str, port: int, target: str) -> list[Address]:
        try:
            names = await asyncio.wait_for(self.resolver(host, port), self.limits.resolve_timeout)
        except asyncio.TimeoutError:
            raise _Refusal(504, f"kernelexec egress: resolving {host} took more than "
                                f"{self.limits.resolve_timeout:g} s") from None
        except OSError as e:
            raise _Refusal(502, f"kernelexec egress: cannot resolve {host}: {e.strerror or e}") from None
        allowed: list[Address] = []
        refused: list[str] = []
        for name in names:
            try:
                address = ipaddress.ip_address(name)
            except ValueError:
                refused.append(f"{name!r} (not an address)")
                continue
            problem = address_problem(address)
            if problem is None:
                allowed.append(address)
            else:
                refused.append(f"{address} ({problem})")
        if not allowed:
            if not refused:
                raise _Refusal(502, f"kernelexec egress: {host} resolves to no address")
            raise _Refusal(403, f"kernelexec egress: {target} resolves to {', '.join(refused)}, which a host name "
                                "may not reach; only an entry naming that address literally allows it")
        return allowed

    async def _connect(self, address: Address, port: int, proxy: ProxyURL | None) -> ByteStream:
        if proxy is None:
            reader, writer = await asyncio.open_connection(str(address), port)
            return StreamPair(reader, writer)
        context = ssl.create_default_context() if proxy.tls else None
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port, ssl=context,
                                                       server_hostname=proxy.host if proxy.tls else None)
        pair = StreamPair(reader, writer)
        try:
            target = _display(str(address), port)
            auth = f"Proxy-Authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
            await pair.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode("ascii"))
            try:
                answer = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                raise ConnectionError(f"the host's proxy {proxy} closed the connection") from None
            except asyncio.LimitOverrunError:
                raise ConnectionError(f"the host's proxy {proxy} answered with an oversized head") from None
            status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or parts[1] != "200":
                raise ConnectionError(f"the host's proxy {proxy} answered {status_line!r}")
        except BaseException:
            await pair.close()
            raise
        return pair

    # --- the tunnel --------------------------------------------------------------------------------

    async def _splice(self, client: ByteStream, remote: ByteStream, conn: _Conn, first: bytes) -> None:
        """Bytes both ways until the server ends (or either side fails, or the budget is spent).

        The code's end of input half-closes the server's side (a request sent, the answer awaited);
        the server's end ends the connection."""
        up = asyncio.create_task(self._pump(client, remote, conn, True, first))
        down = asyncio.create_task(self._pump(remote, client, conn, False, b""))
        try:
            pending: set[asyncio.Task[str | None]] = {up, down}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    end = task.result()
                    if end is not None or task is down:
                        conn.reason = conn.reason or end or "closed by the server"
                        return
        finally:
            await _cancel_and_wait([up, down])

    async def _pump(self, src: ByteStream, dst: ByteStream, conn: _Conn, upward: bool, first: bytes) -> str | None:
        """Copy ``src`` to ``dst``; ``None`` at a clean end, else why it stopped."""
        data = first
        try:
            while True:
                if data:
                    room = max(0, self.limits.max_bytes - self._bytes)
                    part = data[:room]
                    self._bytes += len(part)
                    if upward:
                        conn.up += len(part)
                    else:
                        conn.down += len(part)
                    if part:
                        await dst.write(part)
                    if len(part) < len(data):
                        conn.cut = True
                        return (f"cut: this session's egress budget of {_size(self.limits.max_bytes)} is spent "
                                "(Policy.egress_max_bytes)")
                data = await src.read(CHUNK)
                if not data:
                    await dst.write_eof()
                    return None
        except OSError as e:
            side = "the code's" if upward else "the server's"
            return f"{side} connection failed: {e.strerror or e}"

    def _emit(self, conn: _Conn) -> None:
        if conn.verdict == "refused":
            if not self._refusals_recorded.take():
                self._unrecorded[(_display(conn.host, conn.port) if conn.host else "(unreadable)", conn.status)] += 1
                return
            self._record_unrecorded()
        self._deliver(EgressEvent(conn.host, conn.port, conn.address, conn.verdict, conn.reason, conn.up, conn.down,
                                  round(self.clock() - conn.started, 6), conn.kind, conn.status, conn.cut))

    def _record_unrecorded(self) -> None:
        """One summary event for the refusals counted but not recorded, if any."""
        if not self._unrecorded:
            return
        counts, self._unrecorded = self._unrecorded, collections.Counter()
        total = sum(counts.values())
        most = ", ".join(f"{target} ({status or 'closed'}) x{n}" for (target, status), n in counts.most_common(5))
        more = f" and {len(counts) - 5} more targets" if len(counts) > 5 else ""
        self._deliver(EgressEvent(
            "", 0, "", "refused", f"{total} refused connections not recorded one by one (more than "
                                  f"{self.limits.refusal_events_per_minute} a minute): {most}{more}",
            kind="summary", count=total))

    def _deliver(self, event: EgressEvent) -> None:
        try:
            self.on_event(event)
        except Exception:
            # the audit sink failing must not take the session's egress down with it; it is said loudly
            log.exception("the egress audit callback failed for %s", event)


async def _cancel_and_wait(tasks: list[asyncio.Task[str | None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("egress pump failed", exc_info=task.exception())


def _parse_request(head: bytes) -> _Request:
    """The proxy request in ``head``; raises :class:`_Refusal` (400) saying what is wrong."""
    usage = "this is an HTTP proxy: send 'CONNECT host:port' for https, or an absolute-form request " \
            "('GET http://host/path') for plain http"
    lines = head[:-4].decode("latin-1").split("\r\n")
    if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for line in lines for c in line):
        raise _Refusal(400, f"kernelexec egress: control characters in the request head; {usage}")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise _Refusal(400, f"kernelexec egress: cannot read the request line {lines[0][:80]!r}; {usage}")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name or "\t" in line[: len(name)]:
            raise _Refusal(400, f"kernelexec egress: malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    if method.upper() == "CONNECT":
        host, port = _authority(target, usage)
        return _Request("connect", host, port)
    if target.lower().startswith("https://"):
        raise _Refusal(400, "kernelexec egress: https goes through 'CONNECT host:443' (TLS stays end to end); "
                            "the proxy does not fetch https URLs itself")
    if not target.lower().startswith("http://"):
        raise _Refusal(400, f"kernelexec egress: {target[:80]!r} is not an absolute http:// URL; {usage}")
    url = urlsplit(target)
    if url.username is not None or url.password is not None:
        raise _Refusal(400, "kernelexec egress: credentials in the URL are not forwarded; send an Authorization "
                            "header instead")
    try:
        port = url.port or 80
        host = normalize_target(url.hostname or "")
    except (ValueError, EgressRuleError) as e:
        raise _Refusal(400, f"kernelexec egress: cannot read the host in {target[:80]!r}: {e}") from None
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    listed = {t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",")}
    kept = [(n, v) for n, v in headers
            if n.lower() not in _HOP_BY_HOP and n.lower() not in listed and not n.lower().startswith("proxy-")]
    out = [f"{method} {path} {version}", f"Host: {url.netloc}", *(f"{n}: {v}" for n, v in kept),
           "Connection: close", "", ""]
    return _Request("http", host, port, "\r\n".join(out).encode("latin-1"))


def _authority(target: str, usage: str) -> tuple[str, int]:
    """``host:port`` of a CONNECT (443 when the port is missing)."""
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
        if not sep or port_text == "x":
            raise _Refusal(400, f"kernelexec egress: cannot read {target[:80]!r} as [address]:port; {usage}")
    else:
        host, _, port_text = target.partition(":")
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise _Refusal(400, f"kernelexec egress: {target[:80]!r} has no valid port (1-65535)")
    try:
        return normalize_target(host), int(port_text) if port_text else 443
    except EgressRuleError as e:
        raise _Refusal(400, f"kernelexec egress: cannot read the host in {target[:80]!r}: {e}") from None


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
