"""The egress port's connections carried to the host, on both transports (issue 14, section 2).

The proxy is replaced here by an echo handler: these tests are about the carrying (the loopback
port in the container, the forwarder on ipc, the relay's net channel on attach, flow control,
cleanup); tests/test_egress.py runs the real proxy end to end.
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from kernelexec import AsyncSession, Policy, Session
from kernelexec.backend import ByteStream, DockerBackend, Sandbox
from kernelexec.backend.base import EgressHandler
from kernelexec.policy import EGRESS_PORT, SITE_PACKAGES

TRANSPORTS = ["ipc", "attach"]


class EchoBackend(DockerBackend):
    """The Docker backend with an echo in place of the session's proxy."""

    def __init__(self, handler: EgressHandler | None = None) -> None:
        self.handler = handler or echo
        self.sandboxes: list[Sandbox] = []

    def new_sandbox(self, policy: Policy, image: str, key: bytes, session_id: str, *,
                    egress: EgressHandler | None = None) -> Sandbox:
        sb = super().new_sandbox(policy, image, key, session_id, egress=self.handler if policy.egress else None)
        self.sandboxes.append(sb)
        return sb


async def echo(stream: ByteStream) -> None:
    total = 0
    while data := await stream.read(65536):
        total += len(data)
        await stream.write(data.upper())
    await stream.write(f"[{total}]".encode())
    await stream.write_eof()


CLIENT = rf'''
import socket, threading
def exchange(n, port={EGRESS_PORT}):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    def send():
        s.sendall(b"x" * n)
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send)
    t.start()
    got = bytearray()
    while d := s.recv(1 << 20):
        got += d
    t.join()
    s.close()
    return len(got), bytes(got[:3]), bytes(got[-12:])
'''


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_connections_to_the_egress_port_reach_the_host_both_ways(kernel_image: str, transport: str) -> None:
    with Session(Policy(image=kernel_image, egress=("example.org",), transport=transport),
                 backend=EchoBackend()) as s:
        assert s.transport == transport
        assert s.execute(CLIENT).ok
        # 5 bytes, and 3 MB: far past the attach window (flow control) and the ipc socket buffers
        r = s.execute("print(exchange(5)); print(exchange(3_000_000))")
        assert r.error is None, r.error
        assert r.stdout.splitlines() == ["(8, b'XXX', b'XXXXX[5]')", "(3000009, b'XXX', b'XXX[3000000]')"]
        # twenty at once, each its own stream
        r = s.execute("from concurrent.futures import ThreadPoolExecutor as P\n"
                      "with P(20) as p: got = list(p.map(exchange, range(1000, 21000, 1000)))\n"
                      "print([(n, g) for g, n in zip(got, range(1000, 21000, 1000)) if g[0] != n + 2 + len(str(n))])")
        assert r.error is None and r.stdout.strip() == "[]", (r.stdout, r.stderr, r.error)
        assert s.execute("1+1").text == "2"


def test_without_egress_there_is_no_port_and_pip_says_why(kernel_image: str, transport: str) -> None:
    with Session(Policy(image=kernel_image, transport=transport)) as s:
        r = s.execute(f"import socket\nsocket.create_connection(('127.0.0.1', {EGRESS_PORT}), timeout=5)")
        assert r.error is not None and r.error.ename == "ConnectionRefusedError", r.error
        r = s.execute("import os; print(sorted(k for k in os.environ if 'proxy' in k.lower() or k.startswith('PIP')))")
        assert r.stdout.strip() == "[]"
        r = s.execute("%pip install kxdemo")
        assert r.error is None
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "no network egress" in lines[0] and "egress=" in lines[0], r.stderr
        r = s.execute(f"import os; os.path.exists({SITE_PACKAGES!r})")
        assert r.text == "False"


def test_with_egress_the_code_still_has_only_loopback(kernel_image: str, transport: str) -> None:
    with Session(Policy(image=kernel_image, egress=("example.org",), transport=transport),
                 backend=EchoBackend()) as s:
        assert s.execute("import os; sorted(os.listdir('/sys/class/net'))").text == "['lo']"
        for target in ("10.231.0.1", "169.254.169.254", "1.1.1.1"):
            r = s.execute(f"import socket\nsocket.create_connection(({target!r}, 443), timeout=5)")
            assert r.error is not None and "Network is unreachable" in r.error.evalue, (target, r.error)
        # the one listener on loopback is the egress port; any other port is refused
        r = s.execute("import socket\nsocket.create_connection(('127.0.0.1', 8080), timeout=5)")
        assert r.error is not None and r.error.ename == "ConnectionRefusedError"


def test_pip_installs_into_the_session_site_directory_importable_at_once(kernel_image: str, transport: str) -> None:
    """The site directory is writable, on the import path, and executable (compiled extensions)."""
    with Session(Policy(image=kernel_image, egress=("example.org",), transport=transport),
                 backend=EchoBackend()) as s:
        r = s.execute(f"import os, sys\n"
                      f"os.makedirs({SITE_PACKAGES!r}, exist_ok=True)\n"
                      f"open({SITE_PACKAGES!r} + '/kxfresh.py', 'w').write('VALUE = 7')\n"
                      "import kxfresh; print(kxfresh.VALUE, os.environ['PIP_PREFIX'])")
        assert r.error is None, r.error
        assert r.stdout.split() == ["7", "/opt/kernelexec/site"]
        # executable: a shared object there can be mapped (tmp and /work stay noexec)
        r = s.execute("import shutil, ctypes, os\n"
                      "import _ctypes; lib = _ctypes.__file__\n"
                      f"for d in ({SITE_PACKAGES!r}, '/tmp'):\n"
                      "    shutil.copy(lib, d + '/copy.so')\n"
                      "    try:\n"
                      "        ctypes.CDLL(d + '/copy.so'); print(d, 'loads')\n"
                      "    except OSError as e:\n"
                      "        print(d, 'refused')")
        assert r.error is None, r.error
        assert r.stdout.split("\n")[:2] == [f"{SITE_PACKAGES} loads", "/tmp refused"], r.stdout


def test_a_connection_in_flight_at_close_leaves_no_task(kernel_image: str, transport: str) -> None:
    started = asyncio.Event()

    async def hold(stream: ByteStream) -> None:
        started.set()
        await stream.read(10)
        await asyncio.sleep(3600)  # until the session's close cancels it

    async def main() -> None:
        backend = EchoBackend(hold)
        async with AsyncSession(Policy(image=kernel_image, egress=("example.org",), transport=transport),
                                backend=backend) as s:
            await s.execute(f"import socket\nc = socket.create_connection(('127.0.0.1', {EGRESS_PORT}))\n"
                            "c.sendall(b'hi')")
            await asyncio.wait_for(started.wait(), 30)
            sandbox = backend.sandboxes[0]
            assert sandbox.egress is not None and len(sandbox.egress) == 1  # type: ignore[attr-defined]
        assert len(sandbox.egress) == 0  # type: ignore[attr-defined]
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, left

    asyncio.run(main())
    gc.collect()


def test_a_flood_of_connections_leaves_the_session_working(kernel_image: str, transport: str) -> None:
    with Session(Policy(image=kernel_image, egress=("example.org",), transport=transport, nofile=4096),
                 backend=EchoBackend()) as s:
        r = s.execute(f"import socket\nheld = []\n"
                      "for _ in range(300):\n"
                      "    try:\n"
                      f"        held.append(socket.create_connection(('127.0.0.1', {EGRESS_PORT}), timeout=5))\n"
                      "    except OSError as e:\n"
                      "        break\n"
                      "for c in held: c.close()\n"
                      "len(held)")
        assert r.error is None, r.error
        assert s.execute(CLIENT).ok
        assert s.execute("exchange(100)[0]").text == "105"
        assert s.execute("1+1").text == "2"
