"""What every MCP test does, with whichever major of the real MCP SDK client this venv has (2.x in .venv,
1.x in .venv-previous), against `kernelexec mcp` run by a given Python (either major's server).

Field names differ between the client majors (2.x: ``is_error``, ``server_info``, ``mime_type``; 1.x
camelCase); ``_get`` reads either.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import kernelexec
from kernelexec.backend.sockdir import PREFIX, socket_root

CLIENT_MAJOR = int(metadata.version("mcp").split(".")[0])
TOOLS = {"create_session", "execute", "upload_file", "download_file", "list_sessions", "save_notebook",
         "close_session", "pause_session", "resume_session", "fork_session"}
PLOT = ("import pandas as pd, matplotlib.pyplot as plt\ndf = pd.read_csv('data.csv')\n"
        "print(df.b.sum())\nplt.plot(df.a, df.b); plt.show()")


def _get(obj: Any, snake: str, camel: str) -> Any:
    return getattr(obj, snake) if CLIENT_MAJOR >= 2 else getattr(obj, camel)


def is_error(result: Any) -> bool:
    return bool(_get(result, "is_error", "isError"))


def text(result: Any) -> str:
    return result.content[0].text


def server_args(image: str, *, notebook_dir: Path | None = None, verbose: bool = False, http_port: int | None = None
                ) -> list[str]:
    """`kernelexec mcp` through the CLI, as an MCP client configuration runs it."""
    args = ["-m", "kernelexec", *(["-v"] if verbose else []), "--image", image, "mcp"]
    if notebook_dir is not None:
        args += ["--notebook-dir", str(notebook_dir)]
    if http_port is not None:
        args += ["--http", "--port", str(http_port)]
    return args


def server_mcp_major(python: str) -> int:
    out = subprocess.run([python, "-c", "from importlib.metadata import version; print(version('mcp'))"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split(".")[0])


def owned(docker, pid: int) -> tuple[list[str], list[str], list[str]]:
    """Containers, volumes and socket directories of the server process ``pid`` (as conftest.leftovers)."""
    label = {"label": f"kernelexec.owner_pid={pid}"}
    containers = [c["Id"] for c in docker.api.containers(all=True, filters=label)]
    volumes = [v["Name"] for v in docker.api.volumes(filters=label).get("Volumes") or []]
    dirs = [p.name for p in Path(socket_root()).glob(f"{PREFIX}{pid}-*")]
    return containers, volumes, dirs


#: runs the server with the pid written first (exec keeps it), so a test can find what the server owns
_PIDFILE = "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); os.execv(sys.argv[2], sys.argv[2:])"


@contextlib.asynccontextmanager
async def stdio_session(python: str, args: list[str], errlog: Any) -> AsyncIterator[tuple[Any, Callable[[], int]]]:
    """A client of the server started by ``python args``, and what tells the server's pid (once it answered)."""
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    pidfile = Path(errlog.name).with_suffix(".pid")
    params = StdioServerParameters(command=python, args=["-c", _PIDFILE, str(pidfile), python, *args],
                                   env=dict(os.environ))
    async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as client:
        yield client, lambda: int(pidfile.read_text())


@contextlib.asynccontextmanager
async def http_session(url: str) -> AsyncIterator[Any]:
    from mcp import ClientSession

    transport = importlib.import_module("mcp.client.streamable_http")
    if CLIENT_MAJOR >= 2:
        async with transport.streamable_http_client(url) as (read, write), ClientSession(read, write) as client:
            yield client
    else:  # 1.20's name for it (later 1.x releases keep it)
        async with transport.streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as client:
            yield client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def http_server(python: str, image: str, notebook_dir: Path) -> Iterator[tuple[str, int, list[str]]]:
    """`kernelexec -v mcp --http` on a free port; yields its URL once uvicorn says it listens, its pid and
    its log lines (complete after the block). Stopped with SIGINT, as Ctrl-C would."""
    port = _free_port()
    proc = subprocess.Popen([python, *server_args(image, notebook_dir=notebook_dir, verbose=True, http_port=port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "Uvicorn running on" in line:
                listening.set()
        listening.set()  # the server ended before listening: the wait below returns and the check fails

    reader = threading.Thread(target=read, name="mcp-http-server-log")
    reader.start()
    try:
        assert listening.wait(120) and proc.poll() is None, "the HTTP server did not start:\n" + "".join(lines)
        yield f"http://127.0.0.1:{port}/mcp", proc.pid, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join()
            assert proc.stderr is not None
            proc.stderr.close()
    assert proc.returncode in (0, 130), "".join(lines)  # 130: the CLI's status after Ctrl-C


async def exercise(client: Any, notebook_dir: Path) -> None:
    """The whole tool surface, errors included: what a model does in one conversation."""
    init = await client.initialize()
    info = _get(init, "server_info", "serverInfo")
    assert (info.name, info.version) == ("kernelexec", kernelexec.__version__)
    assert {t.name for t in (await client.list_tools()).tools} == TOOLS

    sid = json.loads(text(await client.call_tool("create_session", {})))["session_id"]
    csv = base64.b64encode(b"a,b\n1,2\n3,4\n").decode()
    up = await client.call_tool("upload_file", {"session_id": sid, "path": "data.csv", "content_base64": csv})
    assert text(up) == "/work/data.csv"
    r = await client.call_tool("execute", {"session_id": sid, "code": PLOT})
    assert not is_error(r) and r.content[0].type == "text" and r.content[0].text.strip() == "6"
    assert r.content[1].type == "image" and _get(r.content[1], "mime_type", "mimeType") == "image/png"
    assert base64.b64decode(r.content[1].data)[:8] == b"\x89PNG\r\n\x1a\n"
    r = await client.call_tool("execute", {"session_id": sid, "code": "df.a.tolist()"})
    assert "Out[2]: [1, 3]" in text(r)
    r = await client.call_tool("execute", {"session_id": sid, "code": "1/0"})
    assert "ZeroDivisionError" in text(r)  # the code's own error is output, not a failed call

    r = await client.call_tool("execute", {"session_id": sid, "code": "print('begun', flush=True)\n"
                                           "import time; time.sleep(60)", "timeout": 2})
    assert is_error(r) and "begun" in text(r) and "timeout" in text(r) and "intact" in text(r)
    assert "Out[5]: [1, 3]" in text(await client.call_tool("execute", {"session_id": sid, "code": "df.a.tolist()"}))

    await client.call_tool("execute", {"session_id": sid, "code": "df.to_csv('out.csv', index=False)"})
    down = await client.call_tool("download_file", {"session_id": sid, "path": "out.csv"})
    assert base64.b64decode(json.loads(text(down))["content_base64"]) == b"a,b\n1,2\n3,4\n"

    # kernelexec's message reaches the client as a tool error, whichever SDK major serves it
    r = await client.call_tool("download_file", {"session_id": sid, "path": "missing.csv"})
    assert is_error(r) and "/work/missing.csv does not exist in the sandbox" in text(r)
    r = await client.call_tool("download_file", {"session_id": sid, "path": "../etc/passwd"})
    assert is_error(r) and "leaves the working directory" in text(r)
    r = await client.call_tool("upload_file", {"session_id": sid, "path": "x.bin", "content_base64": "not base64!"})
    assert is_error(r) and "not valid base64" in text(r)
    r = await client.call_tool("execute", {"session_id": "nope", "code": "1"})
    assert is_error(r) and "no session 'nope'; create one with create_session" in text(r)

    listed = await client.call_tool("list_sessions", {})
    assert {"session_id": sid, "alive": True, "paused": False, "executions": 5} in [json.loads(c.text)
                                                                                    for c in listed.content]
    saved = await client.call_tool("save_notebook", {"session_id": sid, "name": "trail"})
    assert text(saved) == str(notebook_dir / "trail.ipynb")
    bad = await client.call_tool("save_notebook", {"session_id": sid, "name": "../escape"})
    assert is_error(bad) and "plain file name" in text(bad)
    await client.call_tool("create_session", {})  # left open: the server closes it on exit
    closed = await client.call_tool("close_session", {"session_id": sid})
    assert text(closed) == f"closed {sid}"
    r = await client.call_tool("execute", {"session_id": sid, "code": "1"})
    assert is_error(r) and "no session" in text(r)


def pause_elsewhere(policy: kernelexec.Policy, code: str) -> str:
    """A session paused by another kernelexec program (this test process) in the state directory; its id."""
    with kernelexec.Session(policy) as s:
        s.execute(code)
        s.pause()
    return s.id


def listing(result: Any) -> dict[str, dict[str, Any]]:
    return {row["session_id"]: row for row in (json.loads(c.text) for c in result.content)}


async def pause_resume_fork(client: Any, server_pid: Callable[[], int], docker: Any, state: Path, foreign: str,
                            looser: str) -> str:
    """Pause, resume (the server's own and one paused elsewhere), fork, with the server's limit of three
    sessions and its policy. Leaves ``foreign`` paused when it returns it (the server hands it on at exit)."""
    from kernelexec.snapshot import store

    await client.initialize()
    assert {"pause_session", "resume_session", "fork_session"} <= {t.name for t in (await client.list_tools()).tools}

    async def call(tool: str, **args: Any) -> Any:
        r = await client.call_tool(tool, args)
        assert not is_error(r), f"{tool}: {text(r)}"
        return json.loads(text(r)) if tool not in ("execute", "close_session") else text(r)

    async def refused(tool: str, **args: Any) -> str:
        r = await client.call_tool(tool, args)
        assert is_error(r), f"{tool} {args} did not fail: {text(r)}"
        return text(r)

    a = (await call("create_session"))["session_id"]
    await call("execute", session_id=a, code="x = 41\ng = (i for i in range(2))\n"
                                            "_ = open('/work/notes.txt', 'w').write('kept')")
    paused = await call("pause_session", session_id=a)
    assert paused["session_id"] == a and paused["bytes"] > 0 and paused["variables"] == 1
    assert [(x["name"], x["type"]) for x in paused["lost"]] == [("g", "generator")] and paused["lost"][0]["reason"]
    assert owned(docker, server_pid())[0] == []  # its sandbox is gone
    assert listing(await client.call_tool("list_sessions", {}))[a] == {
        "session_id": a, "alive": False, "paused": True, "executions": 1}
    assert "already paused" in await refused("pause_session", session_id=a)
    assert [(p.id, p.holder) for p in store.paused(state) if p.id == a] == [(a, None)]  # any process may resume it

    # the next use resumes it: a file read, then resume_session, then an execute
    down = await call("download_file", session_id=a, path="notes.txt")
    assert base64.b64decode(down["content_base64"]) == b"kept"
    assert listing(await client.call_tool("list_sessions", {}))[a]["paused"] is False
    assert "it runs already" in await refused("resume_session", session_id=a)
    await call("pause_session", session_id=a)
    assert await call("resume_session", session_id=a) == {"session_id": a, "variables": 1}
    assert "]: 42" in await call("execute", session_id=a, code="x + 1")
    await call("pause_session", session_id=a)
    assert "]: 43" in await call("execute", session_id=a, code="x + 2")

    # a fork is independent of its parent, both ways
    b = (await call("fork_session", session_id=a))["session_id"]
    assert b != a
    await call("execute", session_id=b, code="x = 0")
    await call("execute", session_id=a, code="y = 1")
    assert "]: 41" in await call("execute", session_id=a, code="x")
    assert "0 False" in await call("execute", session_id=b, code="print(x, 'y' in dir())")
    assert "kept" in await call("execute", session_id=b, code="print(open('/work/notes.txt').read())")

    # sessions paused elsewhere: resumed here within the server's policy, and counted against its limit
    assert "more than this server allows: memory='2g' is above '1g'" in await refused("resume_session",
                                                                                      session_id=looser)
    assert [p.holder for p in store.paused(state) if p.id == looser] == [None]  # refused before it was touched
    assert await call("resume_session", session_id=foreign) == {"session_id": foreign, "variables": 1}
    assert [p.holder for p in store.paused(state) if p.id == foreign] == [server_pid()]  # the server holds it now
    assert "'from elsewhere'" in await call("execute", session_id=foreign, code="z")
    assert "it runs already" in await refused("resume_session", session_id=foreign)
    assert "at most 3 sessions" in await refused("fork_session", session_id=a)
    assert "at most 3 sessions" in await refused("resume_session", session_id=looser)
    assert "no paused session '0123456789ab'" in await refused("resume_session", session_id="0123456789ab")
    assert "'nope' is not a session id" in await refused("resume_session", session_id="nope")
    assert not (state / "sessions" / "0123456789ab").exists()

    # closing a paused session discards its state; one paused at the server's exit stays for a later server
    await call("close_session", session_id=b)
    await call("pause_session", session_id=a)
    assert (state / "sessions" / a).is_dir()
    assert await call("close_session", session_id=a) == f"closed {a}"
    assert not (state / "sessions" / a).exists()
    await call("pause_session", session_id=foreign)
    assert len(owned(docker, server_pid())[0]) == 0
    return foreign


def check_notebook(notebook_dir: Path) -> None:
    nb = json.loads((notebook_dir / "trail.ipynb").read_text())
    codes = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert codes[0] == PLOT and len(codes) == 5  # the interrupted cell raised: no history entry
    assert any(o.get("data", {}).get("image/png") for o in nb["cells"][0]["outputs"])


async def quiet_server_refuses_notebooks(client: Any) -> None:
    """A server without --notebook-dir: save_notebook says how to get one, and never returns the notebook."""
    await client.initialize()
    sid = json.loads(text(await client.call_tool("create_session", {})))["session_id"]
    r = await client.call_tool("execute", {"session_id": sid, "code": "import matplotlib.pyplot as plt\n"
                                           "for i in range(3): plt.plot([i, 1]); plt.show()"})
    assert len(r.content) == 4
    r = await client.call_tool("save_notebook", {"session_id": sid})
    assert is_error(r) and "--notebook-dir" in text(r) and len(text(r)) < 500


def assert_quiet(log: str) -> None:
    """Warnings and errors only: no INFO block per request (`kernelexec -v mcp` shows them)."""
    assert "INFO" not in log and "Processing request" not in log and "CallToolRequest" not in log, log
