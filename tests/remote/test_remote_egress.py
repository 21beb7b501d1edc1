"""Egress on a remote engine (issue 14: "identically on every engine the seam supports, remote ones
included"): the sandbox runs on the remote TLS engine, which shares no filesystem with this host; the
proxy runs here, reached over the attach stream; the index is the tests' own, in a network namespace
of this host. The session runs in a child process whose environment names the remote engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kernelexec._loop import run_blocking

from ..egress.harness import DEMO_MODULE, DEMO_VALUE, start_index

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, sys
from kernelexec import Policy, Session
image, entry, index_url, ca = sys.argv[1:5]
with Session(Policy(image=image, egress=(entry,))) as s:
    s.upload(open(ca, "rb").read(), "/work/ca.pem")
    pip = s.execute(f"%pip install --index-url {index_url} --cert /work/ca.pem kxdemo")
    got = s.execute("import kxdemo; print(kxdemo.VALUE)")
    raw = s.execute("import socket\nsocket.create_connection(('127.0.0.1', 8080), timeout=5)")
    print(json.dumps({"transport": s.transport, "pip": pip.stdout + pip.stderr, "value": got.stdout.strip(),
                      "error": str(got.error), "raw": raw.error.ename if raw.error else None,
                      "egress_bytes": s.egress_bytes}))
'''


def test_pip_through_egress_on_the_remote_engine(remote_engine, kernel_image) -> None:
    with start_index() as index:
        mark = index.mark()
        p = subprocess.run([sys.executable, "-c", SCRIPT, kernel_image, f"{index.address}:{index.https_port}",
                            index.index_url, str(index.ca_path)], capture_output=True, text=True, timeout=300,
                           check=False, env={**os.environ, **remote_engine.env})
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["transport"] == "attach"
        assert out["value"] == str(DEMO_VALUE), out
        assert out["raw"] == "ConnectionRefusedError" and out["egress_bytes"] > 0, out
        assert {r.path for r in index.requests_seen(mark)} >= {f"/simple/{DEMO_MODULE}/"}
    containers = run_blocking(remote_engine.api().call("GET", "/containers/json", params={"all": "true"},
                                                       what="list"))
    assert containers == []
