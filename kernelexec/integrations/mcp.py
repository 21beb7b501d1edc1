"""An MCP server (``kernelexec mcp``) that gives MCP clients sandboxed, stateful Python.

Tools: ``create_session``, ``execute`` (text plus the images as MCP image
content), ``upload_file``/``download_file`` (base64, working directory only),
``list_sessions``, ``save_notebook`` (the session as a notebook, written into
the server's ``--notebook-dir`` only), ``close_session``, and ``pause_session``,
``resume_session`` and ``fork_session``. Every session uses the server's policy
or profile; a client cannot loosen it, and a paused session whose policy is
looser than the server's is not resumed here. All sessions close when the
server stops, except paused ones: pausing hands a session to the host's state
directory, where any process may resume it by id (a later server too) until
``kernelexec gc`` expires it.

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
from ..errors import ExecutionTimeout, KernelDied, KernelExecError, SessionBusy
from ..kernel.image import default_image
from ..policy import Policy
from ..profiles import PolicyViolation, profile_policy, within
from ..session import AsyncSession
from ..snapshot import store

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

    def room(self) -> None:
        """Refuse a new session past ``max_sessions`` (paused ones count: their next call makes a sandbox)."""
        if len(self.sessions) >= self.max_sessions:
            raise ValueError(f"at most {self.max_sessions} sessions at once; close one first")

    def ceiling(self) -> Policy:
        """The policy this server's sessions get (as :class:`AsyncSession` makes it from policy and profile):
        what a session resumed from elsewhere may not exceed."""
        if self.profile is None:
            return self.policy or Policy()
        profile = profile_policy(self.profile)
        return within(self.policy, profile, role=self.profile) if self.policy is not None else profile

    def admit(self, record: store.PausedSession) -> None:
        """Refuse to resume a session that another process paused with a looser policy, or on another image
        than the one this server pins: a client of this server must not get what its policy withholds."""
        ceiling = self.ceiling()
        try:
            theirs = Policy.from_json(record.policy)
        except ValueError as e:
            raise PolicyViolation(f"session {record.id}'s record holds no usable policy ({e}); it is not "
                                  "resumed here") from None
        wider = theirs.relaxations(base=ceiling)
        if ceiling.image is not None:
            # the image it would run on here, as AsyncSession picks it: named, else $KERNELEXEC_IMAGE or the recipe's
            image = record.image or theirs.image or default_image()
            if image != ceiling.image:
                wider.append(f"image {image!r} instead of this server's {ceiling.image!r}")
        if wider:
            raise PolicyViolation(f"session {record.id} was paused with more than this server allows: "
                                  + "; ".join(wider) + ". Resume it where its policy is allowed")

    async def close_all(self) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for s in sessions:
            await s.close()


INSTRUCTIONS = (
    "Run Python in sandboxed Jupyter kernels: create_session, then execute code; variables persist between "
    "executions of one session. There is no network and no access to the host's files: move files in and out "
    "with upload_file/download_file (working directory /work). Close sessions you no longer need; pause_session "
    "frees a session's memory and keeps its state (execute in it, or resume_session, to go on), and fork_session "
    "copies a session to try something without changing it.")


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
            registry.room()
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
        """The open sessions, whether each is paused (its next execute resumes it), and how many cells each
        has run."""
        return [{"session_id": sid, "alive": s.alive, "paused": s.paused, "executions": len(s.history)}
                for sid, s in registry.sessions.items()]

    @server.tool()
    async def pause_session(session_id: str) -> dict[str, Any]:
        """Pause a session: its variables and its files in /work, /tmp and home are saved on the server's host
        and its sandbox is removed, freeing its memory. The next execute in it resumes it, as does
        resume_session (by another server too, after this one stopped). Returns the snapshot's size in bytes,
        how many variables were saved, and what could not be (open files, generators, threads, ...) in
        "lost", each with its type and the reason."""
        with _as_tool_error():
            s = registry.get(session_id)
            if s.paused:
                raise ValueError(f"session {session_id} is already paused; execute in it or call resume_session "
                                 "to run it again")
            snap = await s.pause()
            return {"session_id": s.id, "bytes": snap.size, "variables": len(snap.variables),
                    "lost": [{"name": x.name, "type": x.type, "reason": x.reason} for x in snap.lost]}

    @server.tool()
    async def resume_session(session_id: str) -> dict[str, Any]:
        """Run a paused session again now, in a new sandbox with the state it was paused with: one of this
        server's, or one paused elsewhere (another server, a kernelexec program) whose id you were given.
        Returns its session_id and how many variables its snapshot holds."""
        with _as_tool_error():
            record = await anyio.to_thread.run_sync(store.read_record, store.session_dir(session_id))
            mine = registry.sessions.get(session_id)
            if mine is not None:
                if not mine.paused:
                    raise ValueError(f"session {session_id} is not paused: it runs already")
                await mine.unpause()
            else:
                if record is None:
                    raise ValueError(f"no paused session {session_id!r} on this host; pause_session pauses one")
                registry.room()
                registry.admit(record)
                s = await AsyncSession.resume(session_id)
                registry.sessions[s.id] = s
            return {"session_id": session_id, "variables": record.variables if record is not None else None}

    @server.tool()
    async def fork_session(session_id: str) -> dict[str, str]:
        """Copy a session into a new one (its variables and files, in a sandbox of its own): what either does
        later does not reach the other. Returns the new session_id."""
        with _as_tool_error():
            s = registry.get(session_id)
            registry.room()
            child = await s.fork()
            registry.sessions[child.id] = child
            return {"session_id": child.id}

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
        """Close a session: its container and files are removed, and so is its saved state if it is paused."""
        with _as_tool_error():
            s = registry.get(session_id)
            del registry.sessions[session_id]
            paused = s.paused
            await s.close()  # a paused session's close leaves its state for whoever resumes it: not asked for here
            if paused and await anyio.to_thread.run_sync(store.read_record, store.session_dir(session_id)) is not None:
                try:
                    claim = await anyio.to_thread.run_sync(store.Claim, session_id)
                except SessionBusy as e:
                    return f"closed {session_id} here; its paused state stays: {e}"
                await anyio.to_thread.run_sync(claim.remove)
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
