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
from kernelexec.sockdir import PREFIX, socket_root

CLIENT_MAJOR = int(metadata.version("mcp").split(".")[0])
TOOLS = {"create_session", "execute", "upload_file", "download_file", "list_sessions", "save_notebook",
         "close_session"}
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
    assert {"session_id": sid, "alive": True, "executions": 5} in [json.loads(c.text) for c in listed.content]
    saved = await client.call_tool("save_notebook", {"session_id": sid, "name": "trail"})
    assert text(saved) == str(notebook_dir / "trail.ipynb")
    bad = await client.call_tool("save_notebook", {"session_id": sid, "name": "../escape"})
    assert is_error(bad) and "plain file name" in text(bad)
    await client.call_tool("create_session", {})  # left open: the server closes it on exit
    closed = await client.call_tool("close_session", {"session_id": sid})
    assert text(closed) == f"closed {sid}"
    r = await client.call_tool("execute", {"session_id": sid, "code": "1"})
    assert is_error(r) and "no session" in text(r)


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
