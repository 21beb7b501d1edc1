"""A small asyncio client for the Docker Engine API, over a unix socket, TCP (with TLS) or ssh.

kernelexec's only way to the engine: sessions, pools, gc and image builds alike.
Why not the docker SDK: it blocks, so every call needs a worker thread, and
used that way it leaves a connection open per create/remove call (measured:
five fds per session); and two clients would be two readings of the endpoint
and two mappings of errors. This client opens one connection per request
(``Connection: close``), bounds every response, streams the bodies that can
be large (a build context, a root filesystem) and the responses that report
progress (a build's, an import's), can be cancelled at any await, and needs
no thread. Blocking code (image builds) runs it on the package's loop thread
(:mod:`kernelexec._loop`). Which engine, and how to reach it,
is :mod:`kernelexec.backend.docker.endpoint`'s concern (the docker CLI's rules); what needs the
engine on this host (bind-mounted sockets) asks ``Endpoint.is_local``. An ssh:// engine's connections are
ssh subprocesses (:mod:`kernelexec.backend.docker.ssh`); :meth:`DockerAPI.close` ends the ssh master they share.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import IO, Any
from urllib.parse import quote, urlencode

from ...errors import DockerUnavailable, ResponseTooLarge, SandboxError
from .endpoint import Endpoint, default_endpoint
from .kind import EngineKind, classify
from .ssh import SshDialer, SshStream

__all__ = ["Conflict", "DockerAPI", "DockerAPIError", "NotFound", "Stalled", "api", "close_stream", "file_chunks",
           "socket_path"]

MIN_API = (1, 41)  # Docker 20.10: CgroupnsMode, Init, Mounts, tmpfs volumes
MAX_BODY = 16 << 20
_HEADER_LIMIT = 64 << 10
CONNECT_TIMEOUT = 20.0  # TCP connect and TLS handshake; an unreachable host must not hang a call for minutes
_UPLOAD_CHUNK = 1 << 20

#: A request body: bytes, or chunks as they come (sent with chunked transfer encoding, length unknown).
Body = bytes | AsyncIterable[bytes] | None


class DockerAPIError(SandboxError):
    """The engine answered with an HTTP error. Raised as :class:`NotFound` or :class:`Conflict`
    for those statuses (mapped here once, as docker-py does), so callers catch what they mean."""

    def __init__(self, status: int, message: str, what: str) -> None:
        self.status = status
        self.explanation = message
        super().__init__(f"{what}: Docker answered {status}: {message}")

    @staticmethod
    def of(status: int, message: str, what: str) -> DockerAPIError:
        cls = {404: NotFound, 409: Conflict}.get(status, DockerAPIError)
        return cls(status, message, what)


class NotFound(DockerAPIError):
    """404: no such container, volume or image (often what a cleanup wanted)."""


class Conflict(DockerAPIError):
    """409: the object is in a state that forbids the call (a name in use, a container running)."""


class Stalled(SandboxError):
    """A streamed response (a build's progress, an import) sent nothing for longer than its silence limit;
    the connection was closed, which makes the engine cancel the work."""


def socket_path(endpoint: Endpoint | None = None) -> str:
    """The engine's unix socket on this host; an error that says why for an engine elsewhere."""
    ep = endpoint or default_endpoint()
    if not ep.is_local:
        raise DockerUnavailable(
            f"the Docker engine is at {ep.describe()}, not a unix socket on this host; this needs a local "
            "engine (the ipc transport bind-mounts unix sockets into the container)"
        )
    return ep.address


class DockerAPI:
    """Engine API calls used by sessions, pools and gc. Safe to share across event loops."""

    def __init__(self, endpoint: Endpoint | str | None = None) -> None:
        """``endpoint``: an :class:`Endpoint`, a unix socket path, or ``None`` for this process's environment."""
        if isinstance(endpoint, str):
            endpoint = Endpoint("unix", endpoint, source="argument")
        self.endpoint = endpoint or default_endpoint()
        self.endpoint.require_supported()
        self._ssl = self.endpoint.ssl_context()
        self._ssh = SshDialer(self.endpoint) if self.endpoint.scheme == "ssh" else None
        self._version: str | None = None
        self._kind: EngineKind | None = None
        #: whether this process has cleaned up after dead owners on this engine (``sessions.startup_gc``)
        self.startup_gc_done = False

    def close(self) -> None:
        """Release what outlives a request: for an ssh:// engine, the ssh master (connections made later
        start a new one). Nothing to do for the other engines, whose connections end with each request."""
        if self._ssh is not None:
            self._ssh.close()

    @property
    def path(self) -> str:
        """The unix socket (local engines only; see :func:`socket_path`)."""
        return socket_path(self.endpoint)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ep = self.endpoint
        try:
            if ep.scheme == "unix":
                return await asyncio.open_unix_connection(ep.address, limit=_HEADER_LIMIT)
            if self._ssh is not None:
                return await self._ssh.connect(_HEADER_LIMIT)
            return await asyncio.wait_for(
                asyncio.open_connection(ep.host, ep.port, limit=_HEADER_LIMIT, ssl=self._ssl,
                                        server_hostname=ep.host if self._ssl else None),
                CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as e:
            raise DockerUnavailable(
                f"the Docker engine at {ep.describe()} is not the one its certificate should prove: "
                f"{e.verify_message or e}. Check the CA (ca.pem) and that the host name matches the "
                "server certificate") from e
        except ssl.SSLError as e:
            raise DockerUnavailable(f"TLS with the Docker engine at {ep.describe()} failed: {e}") from e
        except (asyncio.TimeoutError, OSError) as e:
            why = "no answer" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e))
            raise DockerUnavailable(
                f"cannot reach the Docker engine at {ep.describe()} ({why}). Start it "
                "(`dockerd &` or `systemctl start docker`), check DOCKER_HOST or the Docker context, "
                "and run `kernelexec doctor`"
            ) from e

    async def _send(self, method: str, path: str, params: dict[str, Any] | None, body: Body,
                    content_type: str, upgrade: bool = False) -> tuple[int, dict[str, str], asyncio.StreamReader,
                                                                        asyncio.StreamWriter]:
        if self._version is None and path != "/version":
            await self.version()
        prefix = f"/v{self._version}" if self._version and path != "/version" else ""
        url = prefix + path + (("?" + urlencode(params, doseq=True)) if params else "")
        host = self.endpoint.address if self.endpoint.scheme == "tcp" else "docker"
        head = [f"{method} {url} HTTP/1.1", f"Host: {host}"]
        if upgrade:
            head += ["Upgrade: tcp", "Connection: Upgrade"]
        else:
            head.append("Connection: close")
        if isinstance(body, bytes):
            head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        elif body is not None:
            head += [f"Content-Type: {content_type}", "Transfer-Encoding: chunked"]
        else:
            head.append("Content-Length: 0")
        reader, writer = await self._open()
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            if isinstance(body, bytes):
                writer.write(body)
            elif body is not None:
                async for chunk in body:
                    if chunk:
                        writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                        await writer.drain()  # one chunk in flight: a large upload is never held in memory
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.split(None, 2)
            if not status_line and isinstance(writer, SshStream) and (failed := await writer.failure()):
                raise failed
            if len(parts) < 2 or not parts[1].isdigit():
                raise SandboxError(f"the Docker engine sent a malformed response: {status_line[:100]!r}")
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            return int(parts[1]), headers, reader, writer
        except (ssl.SSLError, ConnectionError) as e:
            if isinstance(writer, SshStream) and (failed := await writer.failure()):
                await close_stream(writer)
                raise failed from e
            await close_stream(writer)
            hint = (" A TLS engine that wants a client certificate closes the connection like this: check "
                    "cert.pem and key.pem") if self._ssl else ""
            raise DockerUnavailable(f"the Docker engine at {self.endpoint.describe()} broke off the request "
                                    f"{method} {path} ({e}).{hint}") from e
        except BaseException:
            await close_stream(writer)
            raise

    async def _read_body(self, headers: dict[str, str], reader: asyncio.StreamReader, limit: int) -> bytes:
        out = bytearray()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    return bytes(out)
                if len(out) + size > limit:
                    raise ResponseTooLarge(f"the Docker engine's response is larger than {limit} bytes")
                out += await reader.readexactly(size)
                await reader.readline()
        if "content-length" in headers:
            n = int(headers["content-length"])
            if n > limit:
                raise ResponseTooLarge(f"the Docker engine's response is larger than {limit} bytes")
            return await reader.readexactly(n)
        while chunk := await reader.read(65536):
            out += chunk
            if len(out) > limit:
                raise ResponseTooLarge(f"the Docker engine's response is larger than {limit} bytes")
        return bytes(out)

    async def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                      body: Any = None, raw: bytes | None = None, content_type: str = "application/json",
                      what: str = "Docker call", limit: int = MAX_BODY) -> tuple[int, bytes, dict[str, str]]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        status, headers, reader, writer = await self._send(method, path, params, data, content_type)
        try:
            payload = await self._read_body(headers, reader, limit)
        finally:
            await close_stream(writer)
        self._check(status, payload, what)
        return status, payload, headers

    def _check(self, status: int, payload: bytes, what: str) -> None:
        """Every engine error becomes a :class:`DockerAPIError` here (404 NotFound, 409 Conflict)."""
        if status == 400 and not self._ssl and b"HTTP request to an HTTPS server" in payload:
            raise DockerUnavailable(f"the Docker engine at {self.endpoint.describe()} speaks TLS only: set "
                                    "DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH (or use a Docker context with "
                                    "its certificates)")
        if status >= 400:
            try:
                message = json.loads(payload).get("message", "")
            except (ValueError, AttributeError):
                message = payload.decode(errors="replace")[:500]
            raise DockerAPIError.of(status, message, what)

    async def stream(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Body = None,
                     content_type: str = "application/json", what: str = "Docker call",
                     silence: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """The JSON messages of a streamed response (build and import progress), each as soon as it arrives.

        ``silence`` bounds the wait for each piece of the response (:class:`Stalled`). Leaving the
        iteration early closes the connection: the engine then cancels the work (a build stops).
        """
        status, headers, reader, writer = await self._send(method, path, params, body, content_type)
        try:
            if status >= 400:
                self._check(status, await self._read_body(headers, reader, MAX_BODY), what)
            decoder = json.JSONDecoder()
            pending = ""
            raw = bytearray()
            async for piece in self._pieces(headers, reader, silence, what):
                raw += piece
                try:  # a piece may end inside a UTF-8 sequence
                    pending += raw.decode()
                    raw.clear()
                except UnicodeDecodeError as e:
                    if len(raw) - e.start > 4:
                        raise SandboxError(f"{what}: the Docker engine sent a response that is not UTF-8") from e
                    pending += raw[:e.start].decode()
                    del raw[:e.start]
                while True:
                    pending = pending.lstrip()
                    if not pending:
                        break
                    try:
                        message, end = decoder.raw_decode(pending)
                    except ValueError:
                        if len(pending) > MAX_BODY:
                            raise SandboxError(f"{what}: a message of the Docker engine is larger than "
                                               f"{MAX_BODY} bytes") from None
                        break  # incomplete: wait for the rest
                    pending = pending[end:]
                    if isinstance(message, dict):
                        yield message
            if pending.strip():
                raise SandboxError(f"{what}: the Docker engine's response ended inside a message: {pending[:200]!r}")
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as e:
            raise DockerUnavailable(f"the Docker engine at {self.endpoint.describe()} broke off {what} "
                                    f"({type(e).__name__}: {e})") from e
        finally:
            await close_stream(writer)

    @staticmethod
    async def _pieces(headers: dict[str, str], reader: asyncio.StreamReader, silence: float | None,
                      what: str) -> AsyncIterator[bytes]:
        """The response body as it arrives, each wait bounded by ``silence``."""
        async def within(step: Any) -> Any:
            try:
                return await asyncio.wait_for(step, silence)
            except asyncio.TimeoutError:
                raise Stalled(f"{what}: the Docker engine sent nothing for {silence:.0f} s") from None

        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await within(reader.readline())).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                while size > 0:
                    piece = await within(reader.read(min(size, 65536)))
                    if not piece:
                        raise asyncio.IncompleteReadError(b"", size)
                    size -= len(piece)
                    yield piece
                await within(reader.readline())
        left = int(headers["content-length"]) if "content-length" in headers else None
        while left is None or left > 0:
            piece = await within(reader.read(65536 if left is None else min(left, 65536)))
            if not piece:
                if left:
                    raise asyncio.IncompleteReadError(b"", left)
                return
            if left is not None:
                left -= len(piece)
            yield piece

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        _, payload, _ = await self.request(method, path, **kw)
        return json.loads(payload) if payload.strip() else None

    # -- the calls ---------------------------------------------------------------

    async def version(self) -> dict[str, Any]:
        _, payload, _ = await self.request("GET", "/version", what="version")
        info = json.loads(payload)
        api = tuple(int(x) for x in str(info.get("ApiVersion", "0.0")).split("."))
        if api < MIN_API:
            raise DockerUnavailable(f"the Docker engine speaks API {info.get('ApiVersion')}; kernelexec needs "
                                    f"{MIN_API[0]}.{MIN_API[1]} (Docker 20.10) or newer")
        self._version = str(info["ApiVersion"])
        return dict(info)

    @property
    def known_kind(self) -> EngineKind | None:
        """:meth:`engine_kind`'s answer if it was asked already (no engine call)."""
        return self._kind

    async def engine_kind(self) -> EngineKind:
        """Docker or Podman, rootless or not (see :mod:`kernelexec.backend.docker.kind`); asked once per client."""
        if self._kind is None:
            version = await self.version()
            info = await self.call("GET", "/info", what="engine info")
            libpod = None
            if classify(version, info).is_podman:  # rootless is only in Podman's own API
                libpod = await self.call("GET", "/libpod/info", what="Podman engine info")
            self._kind = classify(version, info, libpod)
        return self._kind

    async def create_volume(self, name: str, driver_opts: dict[str, str], labels: dict[str, str]) -> str:
        v = await self.call("POST", "/volumes/create", body={"Name": name, "Driver": "local",
                                                             "DriverOpts": driver_opts, "Labels": labels},
                            what=f"create volume {name}")
        return str(v["Name"])

    async def remove_volume(self, name: str) -> None:
        await self.call("DELETE", f"/volumes/{quote(name)}", params={"force": "true"}, what=f"remove volume {name}")

    async def create_container(self, name: str, config: dict[str, Any]) -> str:
        c = await self.call("POST", "/containers/create", params={"name": name}, body=config,
                            what="create container")
        return str(c["Id"])

    async def start(self, cid: str) -> None:
        await self.call("POST", f"/containers/{cid}/start", what="start container")

    async def remove_container(self, cid: str) -> None:
        for attempt in range(3):
            try:
                await self.call("DELETE", f"/containers/{cid}", params={"force": "true", "v": "false"},
                                what="remove container")
                return
            except DockerAPIError as e:
                # Podman refuses a forced remove that races the container's own exit ("container state
                # improper: stopped"); a moment later the container has stopped and the remove goes through
                if attempt == 2 or e.status != 500 or "state improper" not in e.explanation:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def inspect(self, cid: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/containers/{cid}/json", what="inspect container"))

    async def wait(self, cid: str) -> dict[str, Any]:
        """Block until the container stops; the caller bounds it with a deadline."""
        return dict(await self.call("POST", f"/containers/{cid}/wait", params={"condition": "not-running"},
                                    what="wait for container"))

    async def containers(self, label: str) -> list[dict[str, Any]]:
        return list(await self.call("GET", "/containers/json",
                                    params={"all": "true", "filters": json.dumps({"label": [label]})},
                                    what="list containers"))

    async def volumes(self, label: str) -> list[dict[str, Any]]:
        v = await self.call("GET", "/volumes", params={"filters": json.dumps({"label": [label]})},
                            what="list volumes")
        return list(v.get("Volumes") or [])

    async def image_exists(self, name: str) -> bool:
        try:
            await self.image_inspect(name)
        except NotFound:
            return False
        return True

    async def image_inspect(self, name: str) -> dict[str, Any]:
        """An image by tag or id (``Id``, ``RepoTags``, ``Config.Labels``, ``Size``...); NotFound if absent."""
        return dict(await self.call("GET", f"/images/{quote(name, safe='')}/json", what=f"inspect image {name}"))

    async def images(self, *, label: str | None = None, all: bool = False) -> list[dict[str, Any]]:
        """Image summaries (``Id``, ``RepoTags``, ``Labels``, ``Size``, ``Created``), optionally by label."""
        params: dict[str, Any] = {"all": "true" if all else "false"}
        if label is not None:
            params["filters"] = json.dumps({"label": [label]})
        return list(await self.call("GET", "/images/json", params=params, what="list images"))

    async def remove_image(self, name: str, *, force: bool = False, noprune: bool = False) -> None:
        """Remove an image (untag it, and delete it when no other tag names it); Conflict while in use."""
        await self.call("DELETE", f"/images/{quote(name, safe='')}",
                        params={"force": str(force).lower(), "noprune": str(noprune).lower()},
                        what=f"remove image {name}")

    async def tag_image(self, image: str, repo: str, tag: str) -> None:
        await self.call("POST", f"/images/{quote(image, safe='')}/tag", params={"repo": repo, "tag": tag},
                        what=f"tag {image} as {repo}:{tag}")

    async def image_containers(self, image_id: str, label: str) -> list[dict[str, Any]]:
        """Containers (running or not) made from ``image_id`` that carry ``label``."""
        return list(await self.call("GET", "/containers/json",
                                    params={"all": "true",
                                            "filters": json.dumps({"ancestor": [image_id], "label": [label]})},
                                    what="list containers"))

    async def distribution(self, image: str) -> dict[str, Any]:
        """The registry's manifest of ``image`` (asked by the engine): cheaper than a pull."""
        return dict(await self.call("GET", f"/distribution/{image}/json", what=f"look up {image} in its registry"))

    def build(self, context: Body, *, tag: str, buildargs: dict[str, str], labels: dict[str, str],
              nocache: bool = False, network_mode: str | None = None,
              silence: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """``POST /build`` with the classic builder: ``context`` is the tar, streamed; the messages are the
        build's progress (``stream``, ``status``, ``aux``, ``error``) as they come. Intermediate containers
        are always removed; the base is never pulled if it is here."""
        params: dict[str, Any] = {"t": tag, "buildargs": json.dumps(buildargs), "labels": json.dumps(labels),
                                  "rm": "1", "forcerm": "1", "pull": "0", "nocache": "1" if nocache else "0",
                                  "version": "1"}
        if network_mode:
            params["networkmode"] = network_mode
        return self.stream("POST", "/build", params=params, body=context, content_type="application/x-tar",
                           what=f"docker build of {tag}", silence=silence)

    def import_image(self, rootfs: Body, *, repo: str, tag: str, changes: list[str],
                     silence: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """``POST /images/create?fromSrc=-`` (``docker import``): a root filesystem tar, streamed, becomes
        the image ``repo:tag`` with the Dockerfile ``changes``; the messages say how it went."""
        return self.stream("POST", "/images/create",
                           params={"fromSrc": "-", "repo": repo, "tag": tag, "changes": changes},
                           body=rootfs, content_type="application/x-tar", what=f"docker import as {repo}:{tag}",
                           silence=silence)

    async def logs(self, cid: str, limit: int = MAX_BODY) -> tuple[bytes, bytes]:
        """stdout and stderr of a container (not started with a TTY)."""
        _, payload, _ = await self.request("GET", f"/containers/{cid}/logs", params={"stdout": "1", "stderr": "1"},
                                           what="container logs", limit=limit)
        return demux(payload)

    async def run(self, config: dict[str, Any], *, timeout: float, name_prefix: str = "kernelexec-run-"
                  ) -> tuple[int, bytes, bytes]:
        """Run a container to its end, within ``timeout``: (exit status, stdout, stderr). It is removed,
        whatever happens (a timeout or a cancellation included)."""
        cid = await self.create_container(f"{name_prefix}{uuid.uuid4().hex[:12]}", config)
        try:
            await self.start(cid)
            status = await asyncio.wait_for(self.wait(cid), timeout)
            out, err = await self.logs(cid)
            return int(status.get("StatusCode", -1)), out, err
        finally:
            await self.remove_container(cid)

    async def stats(self, cid: str) -> dict[str, Any]:
        """One sample of the container's cgroup figures (``memory_stats``, ``cpu_stats``), as ``docker stats``
        reads them: one-shot, no stream (and no wait for a second CPU sample)."""
        stats = await self.call("GET", f"/containers/{cid}/stats", params={"stream": "false", "one-shot": "true"},
                                what="container stats")
        return dict(stats or {})

    async def memory_peak(self, cid: str) -> int | None:
        """The container's peak memory (cgroup v1 max_usage; current usage on cgroup v2)."""
        mem = (await self.stats(cid)).get("memory_stats") or {}
        value = mem.get("max_usage") or mem.get("usage")
        return int(value) if isinstance(value, int) else None

    async def put_archive(self, cid: str, path: str, tar: bytes) -> None:
        await self.request("PUT", f"/containers/{cid}/archive", params={"path": path}, raw=tar,
                           content_type="application/x-tar", what=f"upload to {path}")

    async def get_archive(self, cid: str, path: str, limit: int) -> bytes:
        _, payload, _ = await self.request("GET", f"/containers/{cid}/archive", params={"path": path},
                                           what=f"download {path}", limit=limit)
        return payload

    async def attach(self, cid: str, *, stdin: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """stdout/stderr of a container as a raw multiplexed stream; with ``stdin``, what is written goes to
        the container's stdin (it must have been created with ``OpenStdin``)."""
        params = {"stream": "1", "stdout": "1", "stderr": "1"}
        if stdin:
            params["stdin"] = "1"
        status, _, reader, writer = await self._send(
            "POST", f"/containers/{cid}/attach", params, None, "", upgrade=True)
        if status not in (101, 200):
            await close_stream(writer)
            raise SandboxError(f"Docker refused to attach to the sandbox (HTTP {status})")
        return reader, writer


def demux(data: bytes) -> tuple[bytes, bytes]:
    """stdout and stderr of Docker's multiplexed stream (8-byte headers: stream, 0, 0, 0, length)."""
    out, err = bytearray(), bytearray()
    while len(data) >= 8:
        kind, size = struct.unpack(">BxxxL", data[:8])
        (out if kind == 1 else err).extend(data[8:8 + size])
        data = data[8 + size:]
    return bytes(out), bytes(err)


async def file_chunks(f: IO[bytes], size: int = _UPLOAD_CHUNK) -> AsyncIterator[bytes]:
    """A blocking file or pipe as an upload body: each read on a worker thread, so the loop never waits
    on the disk or on the process that writes the pipe."""
    while chunk := await asyncio.to_thread(f.read, size):
        yield chunk


#: how long a TLS connection may take to close cleanly before it is dropped (asyncio would wait 30 s)
CLOSE_TIMEOUT = 5.0


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close and wait, so the fd is gone even if the loop stops right after."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (ConnectionError, ssl.SSLError):
        pass  # the engine reset (or ended TLS on) a connection we were done with: nothing was lost
    except (asyncio.TimeoutError, TimeoutError):
        # TLS close_notify unanswered (the engine dropped the far end, e.g. the container was killed): the
        # connection is ours to drop, with nothing left to read on it
        writer.transport.abort()


_api: DockerAPI | None = None


def api() -> DockerAPI:
    """The process-wide client (it holds no connection, only the endpoint and API version)."""
    global _api
    if _api is None:
        _api = DockerAPI()
    return _api
