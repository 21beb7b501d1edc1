"""An MCP server (``kernelexec mcp``) that gives MCP clients sandboxed, stateful Python.

Tools: ``create_session``, ``execute`` (text plus the images as MCP image
content), ``upload_file``/``download_file`` (base64, working directory only),
``list_sessions``, ``save_notebook`` (the session as a notebook: returned as
JSON, or written into the server's ``--notebook-dir`` only) and
``close_session``. Every session uses the server's policy or profile; a client
cannot loosen it. All sessions close when the server stops.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from pathlib import Path
from typing import Any, AsyncIterator

from mcp.server.fastmcp import FastMCP, Image

from ..errors import ExecutionTimeout, KernelDied, KernelExecError
from ..policy import Policy
from ..session import AsyncSession

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class SessionRegistry:
    """The server's sessions, bounded in number."""

    def __init__(self, policy: Policy | None, profile: str | None, max_sessions: int,
                 notebook_dir: Path | None) -> None:
        self.policy, self.profile, self.max_sessions = policy, profile, max_sessions
        self.notebook_dir = notebook_dir
        self.sessions: dict[str, AsyncSession] = {}

    def get(self, session_id: str) -> AsyncSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise ValueError(f"no session {session_id!r}; create one with create_session") from None

    async def close_all(self) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for s in sessions:
            await s.close()


def build_server(policy: Policy | None = None, *, profile: str | None = None, max_sessions: int = 8,
                 notebook_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000) -> FastMCP:
    registry = SessionRegistry(policy, profile, max_sessions, Path(notebook_dir) if notebook_dir else None)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastMCP) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await registry.close_all()

    server = FastMCP("kernelexec", lifespan=lifespan, host=host, port=port, instructions=(
        "Run Python in sandboxed Jupyter kernels: create_session, then execute code; variables persist between "
        "executions of one session. There is no network and no access to the host's files: move files in and out "
        "with upload_file/download_file (working directory /work). Close sessions you no longer need."))

    @server.tool()
    async def create_session() -> dict[str, str]:
        """Start a new sandboxed Python kernel and return its session_id."""
        if len(registry.sessions) >= registry.max_sessions:
            raise ValueError(f"at most {registry.max_sessions} sessions at once; close one first")
        s = AsyncSession(registry.policy, profile=registry.profile)
        await s.start()
        registry.sessions[s.id] = s
        return {"session_id": s.id}

    @server.tool(structured_output=False)  # text and image content blocks, not a JSON value
    async def execute(session_id: str, code: str, timeout: float | None = None) -> list[Any]:
        """Run Python code in a session. Returns the output text, then any images the code displayed."""
        s = registry.get(session_id)
        try:
            ex = await s.execute(code, timeout=timeout)
        except (ExecutionTimeout, KernelDied) as e:
            return [str(e)]
        parts = [ex.stdout, ex.stderr]
        if ex.text is not None:
            parts.append(f"Out[{ex.execution_count}]: {ex.text}")
        if ex.error is not None:
            parts.append(ex.error.traceback or str(ex.error))
        text = "\n".join(p.rstrip("\n") for p in parts if p) or "(no output)"
        return [text, *(Image(data=png, format="png") for png in ex.images)]

    @server.tool()
    async def upload_file(session_id: str, path: str, content_base64: str) -> str:
        """Put a file (base64) into the session's working directory; returns its path in the sandbox."""
        return await registry.get(session_id).upload(base64.b64decode(content_base64, validate=True), path)

    @server.tool()
    async def download_file(session_id: str, path: str) -> dict[str, Any]:
        """Read a file from the session's working directory, as base64."""
        data = await registry.get(session_id).download(path)
        return {"path": path, "size": len(data), "content_base64": base64.b64encode(data).decode()}

    @server.tool()
    async def list_sessions() -> list[dict[str, Any]]:
        """The open sessions and how many cells each has run."""
        return [{"session_id": sid, "alive": s.alive, "executions": len(s.history)}
                for sid, s in registry.sessions.items()]

    @server.tool()
    async def save_notebook(session_id: str, name: str | None = None) -> str:
        """The session as a Jupyter notebook: written to the server's notebook directory when it has one
        (``name`` is a plain file name), else returned as JSON text."""
        nb = registry.get(session_id).to_notebook()
        text = json.dumps(nb, indent=1)
        if registry.notebook_dir is None or name is None:
            return text
        if not _NAME.match(name) or name in (".", ".."):
            raise ValueError("name must be a plain file name (letters, digits, '_', '-', '.')")
        target = registry.notebook_dir / (name if name.endswith(".ipynb") else f"{name}.ipynb")
        target.write_text(text)
        return str(target)

    @server.tool()
    async def close_session(session_id: str) -> str:
        """Close a session: its container and files are removed."""
        s = registry.get(session_id)
        del registry.sessions[session_id]
        await s.close()
        return f"closed {session_id}"

    server._kernelexec_registry = registry  # type: ignore[attr-defined]  # for tests and the CLI
    return server


def run(transport: str = "stdio", **kwargs: Any) -> None:
    """Serve until the client disconnects (stdio) or the process is stopped (HTTP)."""
    server = build_server(**kwargs)
    try:
        server.run(transport=transport)  # type: ignore[arg-type]
    except KernelExecError as e:
        raise SystemExit(f"kernelexec mcp: {e}") from e
