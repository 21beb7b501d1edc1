"""An MCP server (``kernelexec mcp``) that gives MCP clients sandboxed, stateful Python.

Tools: ``create_session``, ``execute`` (text plus the images as MCP image
content), ``upload_file``/``download_file`` (base64, working directory only),
``list_sessions``, ``save_notebook`` (the session as a notebook, written into
the server's ``--notebook-dir`` only) and ``close_session``. Every session uses
the server's policy or profile; a client cannot loosen it. All sessions close
when the server stops.

Works with both majors of the MCP Python SDK: 2.x (``MCPServer``; host and
port are given to ``run``) and 1.x from 1.20 (``FastMCP``; host and port are
given to the constructor). Failures reach the client as tool errors carrying
kernelexec's message: 2.x passes on only the message of the SDK's
``ToolError`` (any other exception becomes "Error executing tool ..."), so
every tool turns the errors it expects into one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio

from .. import __version__
from ..errors import ExecutionTimeout, KernelDied, KernelExecError
from ..policy import Policy
from ..session import AsyncSession

try:  # MCP SDK 2.x
    from mcp.server.mcpserver import Image  # type: ignore[import-not-found,unused-ignore]
    from mcp.server.mcpserver import MCPServer as Server  # type: ignore[import-not-found,unused-ignore]
    from mcp.server.mcpserver.exceptions import ToolError  # type: ignore[import-not-found,unused-ignore]

    SDK_MAJOR = 2
except ModuleNotFoundError as e:
    if e.name == "mcp":
        raise ImportError("the MCP server needs the MCP Python SDK: pip install 'kernelexec[mcp]'",
                          name="mcp") from e
    if not (e.name or "").startswith("mcp.server.mcpserver"):
        raise
    # MCP SDK 1.x (>= 1.20)
    from mcp.server.fastmcp import FastMCP as Server  # type: ignore[attr-defined,no-redef,unused-ignore]
    from mcp.server.fastmcp import Image  # type: ignore[attr-defined,no-redef,unused-ignore]
    from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[import-not-found,no-redef,unused-ignore]

    SDK_MAJOR = 1

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")

#: errors a tool call can meet that the client should read: kernelexec's own, bad arguments
#: (ValueError, including binascii.Error for bad base64), and files that are missing or unwritable
_CLIENT_ERRORS = (KernelExecError, ValueError, OSError)


@contextlib.contextmanager
def _as_tool_error() -> Iterator[None]:
    """The SDK's ToolError is the one exception whose message reaches a 2.x client."""
    try:
        yield
    except ToolError:
        raise
    except _CLIENT_ERRORS as e:
        raise ToolError(str(e) or type(e).__name__) from e


class SessionRegistry:
    """The server's sessions, bounded in number, closed when the last client goes."""

    def __init__(self, policy: Policy | None, profile: str | None, max_sessions: int,
                 notebook_dir: Path | None) -> None:
        self.policy, self.profile, self.max_sessions = policy, profile, max_sessions
        self.notebook_dir = notebook_dir
        self.sessions: dict[str, AsyncSession] = {}
        #: lifespans entered and not yet left (SDK 1.x enters one per HTTP client, 2.x one per server)
        self.clients = 0

    def get(self, session_id: str) -> AsyncSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise ValueError(f"no session {session_id!r}; create one with create_session") from None

    async def close_all(self) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for s in sessions:
            await s.close()


INSTRUCTIONS = (
    "Run Python in sandboxed Jupyter kernels: create_session, then execute code; variables persist between "
    "executions of one session. There is no network and no access to the host's files: move files in and out "
    "with upload_file/download_file (working directory /work). Close sessions you no longer need.")


def build_server(policy: Policy | None = None, *, profile: str | None = None, max_sessions: int = 8,
                 notebook_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
                 verbose: bool = False) -> Any:
    """The server (an SDK 2.x ``MCPServer`` or 1.x ``FastMCP``), its tools registered.

    ``verbose`` keeps the SDK's INFO log (a block per request); otherwise only warnings and errors.
    ``host``/``port`` matter for HTTP only (1.x takes them here, 2.x in ``run``: see :func:`run`).
    """
    registry = SessionRegistry(policy, profile, max_sessions, Path(notebook_dir) if notebook_dir else None)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        # SDK 1.x runs this per client session over HTTP: one client leaving must not close
        # the sessions of the others, so the sandboxes go with the last one
        registry.clients += 1
        try:
            yield
        finally:
            registry.clients -= 1
            if registry.clients == 0:
                # 1.x leaves a client's lifespan from a cancelled task when the server stops (Ctrl-C):
                # removing the sandboxes must not be cut short
                with anyio.CancelScope(shield=True):
                    await registry.close_all()

    options: dict[str, Any] = {"instructions": INSTRUCTIONS, "lifespan": lifespan,
                               "log_level": "INFO" if verbose else "WARNING"}
    sdk_server: Any = Server  # the two majors' constructors differ: each branch calls its own
    if SDK_MAJOR == 2:
        server = sdk_server("kernelexec", version=__version__, **options)
    else:
        server = sdk_server("kernelexec", host=host, port=port, **options)
        # 1.x reports the mcp package's version unless the low-level server has one
        server._mcp_server.version = __version__

    @server.tool()
    async def create_session() -> dict[str, str]:
        """Start a new sandboxed Python kernel and return its session_id."""
        with _as_tool_error():
            if len(registry.sessions) >= registry.max_sessions:
                raise ValueError(f"at most {registry.max_sessions} sessions at once; close one first")
            s = AsyncSession(registry.policy, profile=registry.profile)
            await s.start()
            registry.sessions[s.id] = s
            return {"session_id": s.id}

    @server.tool(structured_output=False)  # text and image content blocks, not a JSON value
    # `timeout` is the tool's argument, in its schema for the model: the session applies it to the execution
    async def execute(session_id: str, code: str, timeout: float | None = None) -> list[Any]:  # noqa: ASYNC109
        """Run Python code in a session. Returns the output text, then any images the code displayed."""
        with _as_tool_error():
            s = registry.get(session_id)
            try:
                ex = await s.execute(code, timeout=timeout)
            except ExecutionTimeout as e:
                partial = (e.partial.stdout + e.partial.stderr).rstrip("\n") if e.partial is not None else ""
                raise ToolError("\n".join(p for p in (partial, str(e)) if p)) from e
            except KernelDied as e:
                raise ToolError(str(e)) from e
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
        with _as_tool_error():
            try:
                data = base64.b64decode(content_base64, validate=True)
            except binascii.Error as e:
                raise ValueError(f"content_base64 is not valid base64: {e}") from e
            return await registry.get(session_id).upload(data, path)

    @server.tool()
    async def download_file(session_id: str, path: str) -> dict[str, Any]:
        """Read a file from the session's working directory, as base64."""
        with _as_tool_error():
            data = await registry.get(session_id).download(path)
            return {"path": path, "size": len(data), "content_base64": base64.b64encode(data).decode()}

    @server.tool()
    async def list_sessions() -> list[dict[str, Any]]:
        """The open sessions and how many cells each has run."""
        return [{"session_id": sid, "alive": s.alive, "executions": len(s.history)}
                for sid, s in registry.sessions.items()]

    @server.tool()
    async def save_notebook(session_id: str, name: str | None = None) -> str:
        """Save the session as a Jupyter notebook in the server's notebook directory (``name`` is a plain
        file name; default: the session id). Returns the notebook's path on the server."""
        with _as_tool_error():
            s = registry.get(session_id)
            if registry.notebook_dir is None:
                # the notebook holds every output, images as base64: never the model's context
                raise ValueError("this server saves no notebooks: it was started without a notebook directory. "
                                 "Start it with `kernelexec mcp --notebook-dir DIR` to save sessions as notebooks")
            name = name or s.id
            if not _NAME.match(name) or name in (".", ".."):
                raise ValueError("name must be a plain file name (letters, digits, '_', '-', '.')")
            target = registry.notebook_dir / (name if name.endswith(".ipynb") else f"{name}.ipynb")
            target.write_text(json.dumps(s.to_notebook(), indent=1))
            return str(target)

    @server.tool()
    async def close_session(session_id: str) -> str:
        """Close a session: its container and files are removed."""
        with _as_tool_error():
            s = registry.get(session_id)
            del registry.sessions[session_id]
            await s.close()
            return f"closed {session_id}"

    server._kernelexec_registry = registry  # for tests and the CLI
    return server


def run(transport: str = "stdio", *, host: str = "127.0.0.1", port: int = 8000, verbose: bool | None = None,
        **kwargs: Any) -> None:
    """Serve until the client disconnects (stdio) or the process is stopped (HTTP).

    ``verbose`` defaults to whether the ``kernelexec`` logger shows INFO (``kernelexec -v`` sets it): the SDK
    logs a block per request at INFO, which only a user who asked for it should see.
    """
    if verbose is None:
        verbose = logging.getLogger("kernelexec").getEffectiveLevel() <= logging.INFO
    server = build_server(host=host, port=port, verbose=verbose, **kwargs)
    try:
        if SDK_MAJOR == 2 and transport != "stdio":
            server.run(transport, host=host, port=port)
        else:
            server.run(transport)
    except KernelExecError as e:
        raise SystemExit(f"kernelexec mcp: {e}") from e
