"""The MCP server end to end with the real MCP Python SDK client over stdio."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from ..conftest import leftovers

ROOT = Path(__file__).resolve().parents[2]

SERVER = """
import sys
from kernelexec import Policy
from kernelexec.integrations.mcp import run
run(policy=Policy(image=sys.argv[1]), notebook_dir=sys.argv[2])
"""


def test_mcp_server_end_to_end(docker, kernel_image, tmp_path):
    before = leftovers(docker)
    params = StdioServerParameters(command=sys.executable, args=["-c", SERVER, kernel_image, str(tmp_path)],
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})

    async def main() -> None:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            names = {t.name for t in (await client.list_tools()).tools}
            assert names == {"create_session", "execute", "upload_file", "download_file", "list_sessions",
                             "save_notebook", "close_session"}
            created = await client.call_tool("create_session", {})
            sid = json.loads(created.content[0].text)["session_id"]
            csv = base64.b64encode(b"a,b\n1,2\n3,4\n").decode()
            up = await client.call_tool("upload_file", {"session_id": sid, "path": "data.csv", "content_base64": csv})
            assert up.content[0].text == "/work/data.csv"
            r = await client.call_tool("execute", {"session_id": sid, "code":
                                       "import pandas as pd, matplotlib.pyplot as plt\ndf = pd.read_csv('data.csv')\n"
                                       "print(df.b.sum())\nplt.plot(df.a, df.b); plt.show()"})
            assert r.content[0].type == "text" and r.content[0].text.strip() == "6"
            assert r.content[1].type == "image" and base64.b64decode(r.content[1].data)[:4] == b"\x89PNG"
            r = await client.call_tool("execute", {"session_id": sid, "code": "df.a.tolist()"})
            assert "Out[2]: [1, 3]" in r.content[0].text
            await client.call_tool("execute", {"session_id": sid, "code": "df.to_csv('out.csv', index=False)"})
            down = await client.call_tool("download_file", {"session_id": sid, "path": "out.csv"})
            assert base64.b64decode(json.loads(down.content[0].text)["content_base64"]) == b"a,b\n1,2\n3,4\n"
            listed = await client.call_tool("list_sessions", {})
            assert json.loads(listed.content[0].text)["session_id"] == sid
            saved = await client.call_tool("save_notebook", {"session_id": sid, "name": "trail"})
            assert saved.content[0].text == str(tmp_path / "trail.ipynb")
            bad = await client.call_tool("save_notebook", {"session_id": sid, "name": "../escape"})
            assert bad.isError
            r = await client.call_tool("execute", {"session_id": "nope", "code": "1"})
            assert r.isError and "no session" in r.content[0].text
            await client.call_tool("create_session", {})  # left open: the server closes it on exit
            closed = await client.call_tool("close_session", {"session_id": sid})
            assert "closed" in closed.content[0].text

    asyncio.run(main())
    nb = json.loads((tmp_path / "trail.ipynb").read_text())
    assert len(nb["cells"]) == 3
    assert leftovers(docker) == before
