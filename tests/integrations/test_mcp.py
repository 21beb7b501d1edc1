"""`kernelexec mcp` end to end with the real MCP Python SDK client, over stdio and streamable HTTP.

This file runs twice: in .venv with the SDK 2.x client, and in .venv-previous with the 1.x client
(tests/integrations/test_previous_majors.py). Each time the server is this venv's (stdio, HTTP) and
the other major's (stdio): every pairing of client and server majors a user can meet.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from .mcp_scenario import (
    CLIENT_MAJOR,
    assert_quiet,
    check_notebook,
    exercise,
    http_server,
    http_session,
    owned,
    pause_elsewhere,
    pause_resume_fork,
    quiet_server_refuses_notebooks,
    server_args,
    server_mcp_major,
    stdio_session,
    text,
)

THIS = sys.executable
NOTHING = ([], [], [])


def test_this_venv_and_the_other_have_different_majors(other_major_python):
    assert server_mcp_major(THIS) == CLIENT_MAJOR
    assert {CLIENT_MAJOR, server_mcp_major(other_major_python)} == {1, 2}


def stdio_run(docker, python: str, args: list[str], log_path: Path, notebook_dir: Path | None) -> None:
    """The whole scenario over stdio; the server keeps a session open until the client goes, then removes it."""
    with open(log_path, "w+") as log:
        async def main() -> int:
            async with stdio_session(python, args, log) as (client, server_pid):
                if notebook_dir is None:
                    await quiet_server_refuses_notebooks(client)
                else:
                    await exercise(client, notebook_dir)
                assert len(owned(docker, server_pid())[0]) == 1  # one session still open
                return server_pid()

        pid = asyncio.run(main())
        log.seek(0)
        assert_quiet(log.read())
    assert owned(docker, pid) == NOTHING  # closed by the server when its client went


def test_stdio(docker, kernel_image, tmp_path):
    stdio_run(docker, THIS, server_args(kernel_image, notebook_dir=tmp_path), tmp_path / "server.log", tmp_path)
    check_notebook(tmp_path)


def test_stdio_server_of_the_other_major(docker, kernel_image, tmp_path, other_major_python):
    """2.x client, 1.x server: a user whose other packages pin mcp<2. 1.x client, 2.x server: an older client."""
    stdio_run(docker, other_major_python, server_args(kernel_image, notebook_dir=tmp_path),
              tmp_path / "server.log", tmp_path)
    check_notebook(tmp_path)


def test_quiet_server_without_notebook_dir(docker, kernel_image, tmp_path):
    stdio_run(docker, THIS, server_args(kernel_image), tmp_path / "server.log", None)


def test_http_two_clients(docker, kernel_image, tmp_path):
    with http_server(THIS, kernel_image, tmp_path) as (url, pid, log):
        async def main() -> None:
            async with http_session(url) as other:
                await other.initialize()
                await other.call_tool("create_session", {})
                async with http_session(url) as client:
                    await exercise(client, tmp_path)
                # the first client went: the other one's session stays (and the one the first left open)
                assert len(owned(docker, pid)[0]) == 2
                r = await other.call_tool("list_sessions", {})
                assert len(r.content) == 2 and '"alive": true' in text(r)

        asyncio.run(main())
    check_notebook(tmp_path)
    assert owned(docker, pid) == NOTHING  # SIGINT: the server closed every session on its way out
    assert any("Uvicorn running on" in line for line in log)  # -v: the server's INFO log shows


def test_pause_resume_fork(docker, kernel_image, tmp_path, monkeypatch):
    """Over stdio with this venv's server; the state directory is the test's (the server inherits it)."""
    from kernelexec import Policy
    from kernelexec.snapshot import store

    state = tmp_path / "state"
    monkeypatch.setenv("KERNELEXEC_STATE_DIR", str(state))
    foreign = pause_elsewhere(Policy(image=kernel_image), "z = 'from elsewhere'")
    looser = pause_elsewhere(Policy(image=kernel_image, memory="2g"), "w = 1")
    with open(tmp_path / "server.log", "w+") as log:
        async def main() -> tuple[int, str]:
            args = [*server_args(kernel_image), "--max-sessions", "3"]
            async with stdio_session(THIS, args, log) as (client, server_pid):
                kept = await pause_resume_fork(client, server_pid, docker, state, foreign, looser)
                return server_pid(), kept

        pid, kept = asyncio.run(main())
        log.seek(0)
        assert_quiet(log.read())
    assert owned(docker, pid) == NOTHING
    # the sessions paused when the server stopped are still paused, held by nobody: a later server resumes them
    assert sorted((p.id, p.holder) for p in store.paused(state)) == sorted([(kept, None), (looser, None)])
