"""A small asyncio client for the Docker Engine API, over a unix socket or TCP (with TLS).

Why not the docker SDK on the session path: it blocks, so every call needs a
worker thread, and used that way it leaves a connection open per
create/remove call (measured: five fds per session). This client opens one
connection per request (``Connection: close``), bounds every response, can be
cancelled at any await, and needs no thread. Which engine, and how to reach it,
is :mod:`kernelexec.engine`'s concern (the docker CLI's rules); what needs the
engine on this host (bind-mounted sockets) asks ``Endpoint.is_local``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import quote, urlencode

from .engine import Endpoint, default_endpoint
from .errors import DockerUnavailable, SandboxError

__all__ = ["Conflict", "DockerAPI", "DockerAPIError", "NotFound", "api", "close_stream", "socket_path"]

MIN_API = (1, 41)  # Docker 20.10: CgroupnsMode, Init, Mounts, tmpfs volumes
MAX_BODY = 16 << 20
_HEADER_LIMIT = 64 << 10
CONNECT_TIMEOUT = 20.0  # TCP connect and TLS handshake; an unreachable host must not hang a call for minutes


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
        self._version: str | None = None

    @property
    def path(self) -> str:
        """The unix socket (local engines only; see :func:`socket_path`)."""
        return socket_path(self.endpoint)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ep = self.endpoint
        try:
            if ep.scheme == "unix":
                return await asyncio.open_unix_connection(ep.address, limit=_HEADER_LIMIT)
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

    async def _send(self, method: str, path: str, params: dict[str, Any] | None, body: bytes | None,
                    content_type: str, upgrade: bool = False) -> tuple[int, dict[str, str], asyncio.StreamReader,
                                                                        asyncio.StreamWriter]:
        if self._version is None and path != "/version":
            await self.version()
        prefix = f"/v{self._version}" if self._version and path != "/version" else ""
        url = prefix + path + (("?" + urlencode(params)) if params else "")
        host = self.endpoint.address if self.endpoint.scheme == "tcp" else "docker"
        head = [f"{method} {url} HTTP/1.1", f"Host: {host}"]
        if upgrade:
            head += ["Upgrade: tcp", "Connection: Upgrade"]
        else:
            head.append("Connection: close")
        if body is not None:
            head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        else:
            head.append("Content-Length: 0")
        reader, writer = await self._open()
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            if body:
                writer.write(body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.split(None, 2)
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
                    raise SandboxError(f"the Docker engine's response is larger than {limit} bytes")
                out += await reader.readexactly(size)
                await reader.readline()
        if "content-length" in headers:
            n = int(headers["content-length"])
            if n > limit:
                raise SandboxError(f"the Docker engine's response is larger than {limit} bytes")
            return await reader.readexactly(n)
        while chunk := await reader.read(65536):
            out += chunk
            if len(out) > limit:
                raise SandboxError(f"the Docker engine's response is larger than {limit} bytes")
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
        return status, payload, headers

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
        await self.call("DELETE", f"/containers/{cid}", params={"force": "true", "v": "false"},
                        what="remove container")

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
            await self.call("GET", f"/images/{quote(name, safe='')}/json", what=f"inspect image {name}")
        except NotFound:
            return False
        return True

    async def memory_peak(self, cid: str) -> int | None:
        """The container's peak memory (cgroup v1 max_usage; current usage on cgroup v2)."""
        stats = await self.call("GET", f"/containers/{cid}/stats", params={"stream": "false", "one-shot": "true"},
                                what="container stats")
        mem = (stats or {}).get("memory_stats") or {}
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


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close and wait, so the fd is gone even if the loop stops right after."""
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass  # the engine reset (or ended TLS on) a connection we were done with: nothing was lost


_api: DockerAPI | None = None


def api() -> DockerAPI:
    """The process-wide client (it holds no connection, only the endpoint and API version)."""
    global _api
    if _api is None:
        _api = DockerAPI()
    return _api
