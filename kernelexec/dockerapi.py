"""A small asyncio client for the Docker Engine API over its unix socket.

Why not the docker SDK on the session path: it blocks, so every call needs a
worker thread, and used that way it leaves a unix connection open per
create/remove call (measured: five fds per session). This client opens one
connection per request (``Connection: close``), bounds every response, can be
cancelled at any await, and needs no thread. kernelexec only supports a local
engine anyway: the kernel's sockets are bind-mounted from this host.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any
from urllib.parse import quote, urlencode, urlparse

from .errors import DockerUnavailable, SandboxError

__all__ = ["DockerAPI", "DockerAPIError", "api", "close_stream", "socket_path"]

MIN_API = (1, 41)  # Docker 20.10: CgroupnsMode, Init, Mounts, tmpfs volumes
MAX_BODY = 16 << 20
_HEADER_LIMIT = 64 << 10


class DockerAPIError(SandboxError):
    """The engine answered with an HTTP error."""

    def __init__(self, status: int, message: str, what: str) -> None:
        self.status = status
        self.explanation = message
        super().__init__(f"{what}: Docker answered {status}: {message}")


def socket_path() -> str:
    """The engine's unix socket, from DOCKER_HOST or the default."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    url = urlparse(host)
    if url.scheme != "unix":
        raise DockerUnavailable(
            f"DOCKER_HOST={host!r} is not a local unix socket; kernelexec bind-mounts unix sockets into "
            "the container, which only works with an engine on this host"
        )
    return url.path


class DockerAPI:
    """Engine API calls used by sessions, pools and gc. Safe to share across event loops."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or socket_path()
        self._version: str | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self.path, limit=_HEADER_LIMIT)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
            raise DockerUnavailable(
                f"cannot reach the Docker engine at {self.path} ({e.strerror or e}). Start it "
                "(`dockerd &` or `systemctl start docker`), check DOCKER_HOST, and run `kernelexec doctor`"
            ) from e

    async def _send(self, method: str, path: str, params: dict[str, Any] | None, body: bytes | None,
                    content_type: str, upgrade: bool = False) -> tuple[int, dict[str, str], asyncio.StreamReader,
                                                                        asyncio.StreamWriter]:
        if self._version is None and path != "/version":
            await self.version()
        prefix = f"/v{self._version}" if self._version and path != "/version" else ""
        url = prefix + path + (("?" + urlencode(params)) if params else "")
        head = [f"{method} {url} HTTP/1.1", "Host: docker"]
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
        if status >= 400:
            try:
                message = json.loads(payload).get("message", "")
            except (ValueError, AttributeError):
                message = payload.decode(errors="replace")[:500]
            raise DockerAPIError(status, message, what)
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
        except DockerAPIError as e:
            if e.status == 404:
                return False
            raise
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

    async def attach(self, cid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """stdout/stderr of a container as a raw multiplexed stream."""
        status, _, reader, writer = await self._send(
            "POST", f"/containers/{cid}/attach", {"stream": "1", "stdout": "1", "stderr": "1"}, None, "",
            upgrade=True)
        if status not in (101, 200):
            await close_stream(writer)
            raise SandboxError(f"Docker refused to attach to the sandbox (HTTP {status})")
        return reader, writer


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close and wait, so the fd is gone even if the loop stops right after."""
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass  # the engine reset a connection we were done with: nothing was lost


_api: DockerAPI | None = None


def api() -> DockerAPI:
    """The process-wide client (it holds no connection, only the socket path and API version)."""
    global _api
    if _api is None:
        _api = DockerAPI()
    return _api
