"""Egress end to end (issue 14, section 2): real containers on both transports, the real proxy, and the
tests' own HTTPS index in a network namespace (tests/egress/harness.py). Nothing leaves this machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelexec import Policy, RestoreError, Session
from kernelexec.backend import DockerBackend, Sandbox
from kernelexec.backend.base import EgressHandler
from kernelexec.egress.proxy import EgressEvent, EgressProxy

from .harness import DEMO_MODULE, DEMO_VALUE, EgressIndex

TRANSPORTS = ["ipc", "attach"]
CA = "/work/kxtest-ca.pem"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def audit_events(path: Path, event: str = "egress") -> list[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == event]


def pip_install(s: Session, index: EgressIndex, *names: str) -> str:
    r = s.execute(f"%pip install --index-url {index.index_url} --cert {CA} {' '.join(names)}")
    assert r.error is None, r.error
    return r.stdout + r.stderr


def test_pip_install_through_an_allowlisted_index(egress_index: EgressIndex, kernel_image: str, transport: str,
                                                  tmp_path: Path) -> None:
    index = egress_index
    log = tmp_path / "audit.jsonl"
    mark = index.mark()
    policy = Policy(image=kernel_image, transport=transport, egress=(f"{index.address}:{index.https_port}",))
    with Session(policy, audit_log=log) as s:
        assert s.transport == transport
        s.upload(index.ca_pem, CA)
        said = pip_install(s, index, DEMO_MODULE)
        assert "Successfully installed" in said, said
        # importable at once, in the same kernel, with its dependency (VALUE comes from kxdemo-dep)
        r = s.execute(f"import {DEMO_MODULE}; print({DEMO_MODULE}.VALUE, {DEMO_MODULE}.__file__)")
        assert r.error is None, (r.error, said)
        value, where = r.stdout.split()
        assert int(value) == DEMO_VALUE and where.startswith("/opt/kernelexec/site/"), r.stdout
        # the root filesystem is untouched: the package is only in the session's site directory
        r = s.execute("import os; os.access('/opt/kernel/lib/python3.11/site-packages', os.W_OK)")
        assert r.text == "False"
        used = s.egress_bytes
    # what reached the index: pip's requests, through the proxy (the server sees the host's veth end)
    seen = index.requests_seen(mark)
    assert {r.path for r in seen} >= {f"/simple/{DEMO_MODULE}/", f"/simple/{DEMO_MODULE}-dep/"}, seen
    assert all(r.peer.split(":")[0] == index.namespace.host_address for r in seen if index.namespace)
    events = audit_events(log)
    allowed = [e for e in events if e["verdict"] == "allowed"]
    assert allowed and all(e["host"] == index.address and e["port"] == index.https_port for e in allowed)
    assert all(e["kind"] == "connect" for e in allowed)  # TLS end to end: tunnels, never intercepted
    assert sum(e["bytes_down"] for e in allowed) > 0 and used >= sum(e["bytes_down"] + e["bytes_up"]
                                                                      for e in allowed)


def test_without_egress_pip_says_why_and_nothing_reaches_the_index(egress_index: EgressIndex, kernel_image: str,
                                                                  transport: str) -> None:
    index = egress_index
    mark = index.mark()
    with Session(Policy(image=kernel_image, transport=transport)) as s:
        s.upload(index.ca_pem, CA)
        r = s.execute(f"%pip install --index-url {index.index_url} --cert {CA} {DEMO_MODULE}")
        lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and "no network egress" in lines[0] and "egress=" in lines[0], lines
        r = s.execute(f"import {DEMO_MODULE}")
        assert r.error is not None and r.error.ename == "ModuleNotFoundError"
        # pip run directly has no proxy and no route: it cannot reach the index either
        r = s.execute(f"import subprocess, sys\n"
                      f"p = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '-d', '/tmp/d', "
                      f"'--retries', '0', '--timeout', '5', '--index-url', {index.index_url!r}, '--cert', {CA!r}, "
                      f"{DEMO_MODULE!r}], capture_output=True, text=True)\nprint(p.returncode)")
        assert r.stdout.strip() != "0", r
    assert index.requests_seen(mark) == [] and index.connections_seen(mark) == []


class ResolvingBackend(DockerBackend):
    """The Docker backend with a proxy whose name lookups go to the index's resolver (a fake DNS that
    maps test names onto internal addresses): the real proxy, the real container, no real DNS."""

    def __init__(self, resolver_names: dict[str, list[str]], index: EgressIndex) -> None:
        self.resolver = index.resolver(resolver_names)
        self.events: list[EgressEvent] = []
        self.proxies: list[EgressProxy] = []

    def new_sandbox(self, policy: Policy, image: str, key: bytes, session_id: str, *,
                    egress: EgressHandler | None = None) -> Sandbox:
        proxy = EgressProxy.for_policy(policy, self.events.append, resolver=self.resolver)
        self.proxies.append(proxy)
        return super().new_sandbox(policy, image, key, session_id, egress=proxy.handle)


@pytest.fixture
def resolving(egress_index: EgressIndex) -> Iterator[ResolvingBackend]:
    import asyncio

    backend = ResolvingBackend({"rebind.kxtest": ["127.0.0.1"], "metadata.kxtest": ["169.254.169.254"],
                                "internal.kxtest": [egress_index.address], "localhost": ["127.0.0.1", "::1"]},
                               egress_index)
    yield backend
    for proxy in backend.proxies:
        asyncio.run(proxy.aclose())  # idle by now: each session's close ended its connections


FETCH = rf'''
import urllib.request, urllib.error, ssl, http.client
ctx = ssl.create_default_context(cafile={CA!r})
def fetch(url, timeout=20):
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
            return ("ok", len(r.read()))
    except urllib.error.HTTPError as e:
        return ("refused", e.code, str(e.reason))
    except http.client.IncompleteRead as e:
        return ("cut", len(e.partial))
    except (urllib.error.URLError, OSError) as e:
        return ("failed", str(getattr(e, "reason", e)))
'''


def test_names_resolving_inside_and_names_not_listed_are_refused_and_logged(
        egress_index: EgressIndex, kernel_image: str, transport: str, resolving: ResolvingBackend) -> None:
    index = egress_index
    mark = index.mark()
    port = index.https_port
    policy = Policy(image=kernel_image, transport=transport,
                    egress=(f"rebind.kxtest:{port}", f"metadata.kxtest:{port}", f"internal.kxtest:{port}", "localhost"))
    with Session(policy, backend=resolving) as s:
        s.upload(index.ca_pem, CA)
        assert s.execute(FETCH).ok
        got = {}
        for name in ("rebind.kxtest", "metadata.kxtest", "internal.kxtest", "localhost", index.hostname):
            r = s.execute(f"fetch('https://{name}:{port}/simple/')")
            got[name] = r.text
        # allowlisted names that resolve to loopback, metadata or private addresses: refused at the proxy
        for name in ("rebind.kxtest", "metadata.kxtest", "internal.kxtest", "localhost"):
            assert "failed" in got[name] and "403" in got[name] and "kernelexec egress" in got[name], (name, got)
        # a name that is not on the list: refused, without even a lookup
        assert "403" in got[index.hostname] and "allowlist" in got[index.hostname], got
        # the literal address is on no list either
        r = s.execute(f"fetch('https://{index.address}:{port}/simple/')")
        assert "403" in r.text, r.text
        # and a raw connection, past the proxy, has no route at all
        r = s.execute(f"import socket\nsocket.create_connection(({index.address!r}, {port}), timeout=5)")
        assert r.error is not None and "Network is unreachable" in r.error.evalue, r.error
        assert s.execute("1+1").text == "2"
    assert index.requests_seen(mark) == [] and index.connections_seen(mark) == []
    refused = [e for e in resolving.events if e.verdict == "refused"]
    assert {e.host for e in refused} >= {"rebind.kxtest", "metadata.kxtest", "internal.kxtest", "localhost",
                                          index.hostname, index.address}
    by_host = {e.host: e for e in refused}
    assert "169.254.169.254" in by_host["metadata.kxtest"].reason
    assert not [e for e in resolving.events if e.verdict == "allowed"]


def test_byte_budget_and_connection_cap_leave_the_session_healthy(egress_index: EgressIndex, kernel_image: str,
                                                                   transport: str, tmp_path: Path) -> None:
    index = egress_index
    log = tmp_path / "audit.jsonl"
    policy = Policy(image=kernel_image, transport=transport, egress=(f"{index.address}:{index.https_port}",),
                    egress_max_bytes="2m", egress_max_connections=3)
    with Session(policy, audit_log=log) as s:
        s.upload(index.ca_pem, CA)
        assert s.execute(FETCH).ok
        # a download past the budget is cut
        r = s.execute(f"fetch({index.blob_url(8 << 20)!r}, timeout=60)")
        assert r.error is None and r.text.startswith("('cut'"), (r.text, r.error)
        assert s.egress_bytes <= (2 << 20) + (256 << 10)  # the budget, give or take a chunk in flight
        # many connections at once: beyond the cap each is refused at once (here all, the budget is spent)
        r = s.execute("import socket, os\n"
                      "held = [socket.create_connection(('127.0.0.1', int(os.environ['KERNELEXEC_EGRESS_PORT'])))"
                      " for _ in range(12)]\n"
                      f"for c in held: c.sendall(b'CONNECT {index.address}:{index.https_port} HTTP/1.1\\r\\n\\r\\n')\n"
                      "answers = [c.recv(200).split(b' ')[1].decode() for c in held]\n"
                      "for c in held: c.close()\n"
                      "sorted(set(answers))")
        assert r.error is None, r.error
        codes = eval(r.text)
        assert "200" not in codes and set(codes) <= {"403", "503"}, codes
        assert s.execute("1+1").text == "2"
    events = audit_events(log)
    assert any(e["cut"] for e in events), events
    assert sum(1 for e in events if e["verdict"] == "refused") >= 12


def test_connection_cap_with_budget_left(egress_index: EgressIndex, kernel_image: str, transport: str) -> None:
    index = egress_index
    policy = Policy(image=kernel_image, transport=transport, egress=(f"{index.address}:{index.https_port}",),
                    egress_max_connections=3)
    with Session(policy) as s:
        r = s.execute("import socket, os\n"
                      "held = [socket.create_connection(('127.0.0.1', int(os.environ['KERNELEXEC_EGRESS_PORT'])))"
                      " for _ in range(8)]\n"
                      f"for c in held: c.sendall(b'CONNECT {index.address}:{index.https_port} HTTP/1.1\\r\\n\\r\\n')\n"
                      "answers = [c.recv(200).split(b' ')[1].decode() for c in held]\n"
                      "print(answers.count('200'), answers.count('503'))\n"
                      "for c in held: c.close()")
        assert r.error is None, r.error
        assert r.stdout.split() == ["3", "5"], r.stdout
        assert s.execute("1+1").text == "2"


def test_packages_installed_at_run_time_survive_pause_and_fork_but_not_a_restore_without_egress(
        egress_index: EgressIndex, kernel_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: the site directory travels with pause and fork; a policy without it names the module."""
    monkeypatch.setenv("KERNELEXEC_STATE_DIR", str(tmp_path / "state"))
    index = egress_index
    policy = Policy(image=kernel_image, egress=(f"{index.address}:{index.https_port}",))
    with Session(policy) as s:
        s.upload(index.ca_pem, CA)
        pip_install(s, index, DEMO_MODULE)
        s.execute(f"import {DEMO_MODULE} as demo; v = demo.VALUE")
        snap = s.snapshot(include=("site",))
        assert snap.sizes.get("site", 0) > 0
        with s.fork() as child:
            assert child.execute("print(v, demo.VALUE)").stdout.split() == [str(DEMO_VALUE)] * 2
        s.pause()
        sid = s.id
    with Session.resume(sid) as again:
        assert again.execute(f"import {DEMO_MODULE}; print({DEMO_MODULE}.VALUE)").stdout.strip() == str(DEMO_VALUE)
    with pytest.raises(RestoreError, match=DEMO_MODULE):
        Session.restore(snap, Policy(image=kernel_image))
    with pytest.raises(ValueError, match="only with Policy.egress"):
        with Session(Policy(image=kernel_image)) as plain:
            plain.snapshot(include=("site",))
