"""The egress tests' own package index, on an address of a network namespace the tests make.

Why a namespace: the proxy under test must reach its upstream through a real interface and a real
route, and refuse loopback and private addresses unless an entry names them; a server on 127.0.0.1
would test a special case. The namespace has one veth pair to the root namespace (a /30 of
10.231.0.0/16, nothing routed beyond it) and ``lo``; the server runs inside it, so it can reach
nothing but the host end of its own link. Without root or iproute2 the index runs on 127.0.0.1
instead, and :attr:`EgressIndex.fallback_reason` says why.

Use :func:`start_index` (a context manager) or the ``egress_index`` fixture of tests/egress/conftest.py;
tests/egress/README.md describes the API. Everything is removed on exit: the server (stopped by pid),
the veth pair, the namespace, the temporary directory with the CA, the wheels and the log.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import hashlib
import http.client
import io
import ipaddress
import itertools
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..remote.certs import make_authority
from . import server as index_server

#: Every namespace this harness makes is named ``kxtest-<pid of the test process>-<n>``.
NETNS_PREFIX = "kxtest-"
_NETNS_NAME = re.compile(rf"^{NETNS_PREFIX}(\d+)-(\d+)$")
#: Host ends of the veth pairs: ``kxt<block>``; the other end is ``kxeth0`` inside the namespace.
LINK_PREFIX = "kxt"
INNER_LINK = "kxeth0"
#: The only addresses the harness ever assigns: one /30 per namespace (.1 host end, .2 namespace end).
NETWORK = ipaddress.ip_network("10.231.0.0/16")
BLOCK_PREFIX = 30
_BLOCKS = NETWORK.num_addresses >> (32 - BLOCK_PREFIX)
_counter = itertools.count()

#: The DNS name in the server's certificate; resolvable only through :meth:`EgressIndex.resolver`.
HOSTNAME = "index.kxtest"
#: The index's ports inside the namespace (its own port space: nothing else listens there).
NETNS_PORTS = {"https_port": 443, "http_port": 80, "control_port": 8999}
#: How long the server may take to say it listens (a bound on a broken start, not a measured time).
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

#: The module the demo package installs, and what it holds when its dependency was installed too.
DEMO_MODULE = "kxdemo"
DEMO_VALUE = 42


def netns_unavailable() -> str | None:
    """Why this process cannot make network namespaces (None: it can)."""
    if os.geteuid() != 0:
        return f"network namespaces need root (the tests run as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "network namespaces need `ip` from iproute2, which is not on PATH"
    return None


# -- network namespaces ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Namespace:
    """A namespace and its link: ``host_address`` on :attr:`link` in the root namespace, ``address`` inside.
    The host reaches ``address`` directly (the host end's /30 is a connected route); nothing else is routed."""

    name: str
    link: str
    host_address: str
    address: str
    prefix: int = BLOCK_PREFIX


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _ip_json(*args: str) -> list[dict[str, Any]]:
    return json.loads(_ip("-j", *args) or "[]")


def namespaces() -> list[str]:
    """The names of the network namespaces `ip netns` knows."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def links() -> dict[str, str]:
    """The links of the root namespace: name -> alias ("" when none)."""
    return {link["ifname"]: link.get("ifalias", "") for link in _ip_json("link", "show")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    """Serialises choosing a free /30 and making the namespace with the other test runs on this machine.

    The lock is flock(2) on the directory /run: no file of the harness's own, released by the kernel if the
    process dies. Not /run/netns: `ip netns add` takes that lock itself."""
    fd = os.open("/run", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale() -> list[str]:
    """Removes what crashed earlier runs left: namespaces ``kxtest-<pid>-<n>`` and host links aliased so,
    whose pid is gone. A server of such a run still inside its namespace (it ends when its test process
    dies, so only a hung one) is killed: only a process whose command line carries the server's marker.
    Returns the names removed."""
    removed: list[str] = []
    for name in namespaces():
        match = _NETNS_NAME.match(name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        for pid in _ip("netns", "pids", name, check=False).split():
            with contextlib.suppress(OSError):
                if index_server.MARKER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    os.kill(int(pid), 9)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    for link, alias in links().items():
        match = _NETNS_NAME.match(alias)
        if link.startswith(LINK_PREFIX) and match and not _pid_alive(int(match.group(1))):
            _ip("link", "del", link, check=False)
            removed.append(link)
    return removed


def _free_block() -> int:
    """A /30 of :data:`NETWORK` that no address of the root namespace overlaps, and whose link name is free."""
    used = [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in _ip_json("-4", "addr", "show") for a in link.get("addr_info", ())]
    names = set(links())
    start = os.getpid() % _BLOCKS
    for offset in range(_BLOCKS):
        block = (start + offset) % _BLOCKS
        network = ipaddress.ip_network((int(NETWORK.network_address) + (block << (32 - BLOCK_PREFIX)), BLOCK_PREFIX))
        if f"{LINK_PREFIX}{block}" not in names and not any(network.overlaps(u) for u in used):
            return block
    raise RuntimeError(f"no free /{BLOCK_PREFIX} left in {NETWORK} for a test namespace")


def _remove(ns: Namespace) -> None:
    """Deleting one end of a veth pair deletes both, at once; the namespace's own removal is asynchronous."""
    if ns.link in links():
        _ip("link", "del", ns.link)
    if ns.name in namespaces():
        _ip("netns", "del", ns.name)


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    """A fresh namespace with its veth pair and ``lo`` up, removed on exit (and stale ones removed first)."""
    with _allocation_lock():
        remove_stale()
        block = _free_block()
        base = int(NETWORK.network_address) + (block << (32 - BLOCK_PREFIX))
        ns = Namespace(name=f"{NETNS_PREFIX}{os.getpid()}-{next(_counter)}", link=f"{LINK_PREFIX}{block}",
                       host_address=str(ipaddress.ip_address(base + 1)), address=str(ipaddress.ip_address(base + 2)))
        try:
            _ip("netns", "add", ns.name)
            # the peer is made inside the namespace: no moment where both ends are in the root namespace
            _ip("link", "add", ns.link, "type", "veth", "peer", "name", INNER_LINK, "netns", ns.name)
            _ip("link", "set", "dev", ns.link, "alias", ns.name)
            _ip("addr", "add", f"{ns.host_address}/{ns.prefix}", "dev", ns.link)
            _ip("link", "set", "dev", ns.link, "up")
            _ip("-n", ns.name, "addr", "add", f"{ns.address}/{ns.prefix}", "dev", INNER_LINK)
            _ip("-n", ns.name, "link", "set", "dev", INNER_LINK, "up")
            _ip("-n", ns.name, "link", "set", "dev", "lo", "up")
        except BaseException:
            _remove(ns)
            raise
    try:
        yield ns
    finally:
        _remove(ns)


# -- wheels and the simple index ------------------------------------------------------------------------


def normalize(project: str) -> str:
    """PEP 503's name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", project).lower()


@dataclass(frozen=True)
class Wheel:
    project: str  # PEP 503 name, e.g. "kxdemo-dep"
    version: str
    filename: str
    sha256: str
    path: Path
    requires: tuple[str, ...] = ()

    @property
    def url_path(self) -> str:
        return f"/files/{self.filename}"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, project: str, version: str, modules: Mapping[str, str],
                requires: Sequence[str] = ()) -> Wheel:
    """A pure-python wheel (py3-none-any) holding ``modules`` (path in the wheel -> source), made with
    zipfile (no build backend needed), byte for byte the same in every run."""
    dist = re.sub(r"[-_.]+", "_", project)
    info = f"{dist}-{version}.dist-info"
    metadata = "".join([f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n",
                        "Summary: a package of kernelexec's egress tests\n",
                        *(f"Requires-Dist: {r}\n" for r in requires)])
    wheel_meta = "Wheel-Version: 1.0\nGenerator: kernelexec-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files = {**modules, f"{info}/METADATA": metadata, f"{info}/WHEEL": wheel_meta}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, text in files.items():
        writer.writerow([name, _record_hash(text.encode()), len(text.encode())])
    writer.writerow([f"{info}/RECORD", "", ""])
    files[f"{info}/RECORD"] = record.getvalue()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), text)
    return Wheel(normalize(project), version, path.name, hashlib.sha256(path.read_bytes()).hexdigest(), path,
                 tuple(requires))


def demo_wheels(directory: Path) -> tuple[Wheel, ...]:
    """``kxdemo`` 1.0 needs ``kxdemo-dep``: its ``VALUE`` is 42 only when pip resolved and installed both.
    ``kxdemo`` 0.9 (``VALUE = 9``, no dependency) is there so that a test sees pip chose the newest."""
    return (
        build_wheel(directory, "kxdemo", "1.0", {"kxdemo/__init__.py": "from kxdemo_dep import BASE\n\n"
                                                 "VALUE = BASE + 2\n"}, requires=["kxdemo-dep>=1.0"]),
        build_wheel(directory, "kxdemo", "0.9", {"kxdemo/__init__.py": "VALUE = 9\n"}),
        build_wheel(directory, "kxdemo-dep", "1.0", {"kxdemo_dep/__init__.py": "BASE = 40\n"}),
    )


def write_index(root: Path, wheels: Sequence[Wheel]) -> None:
    """``root/simple/`` (PEP 503 pages, each link with its ``#sha256=``) and ``root/files/`` (the wheels)."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    projects: dict[str, list[Wheel]] = {}
    for wheel in wheels:
        shutil.copyfile(wheel.path, files / wheel.filename)
        projects.setdefault(wheel.project, []).append(wheel)

    def page(title: str, anchors: list[str]) -> str:
        links = "".join(f"{a}<br>\n" for a in anchors)
        return ('<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" content="1.0">'
                f"<title>{title}</title></head><body>\n{links}</body></html>\n")

    (root / "simple").mkdir(parents=True, exist_ok=True)
    (root / "simple" / "index.html").write_text(
        page("Simple index", [f'<a href="/simple/{p}/">{p}</a>' for p in sorted(projects)]))
    for project, builds in projects.items():
        (root / "simple" / project).mkdir(exist_ok=True)
        (root / "simple" / project / "index.html").write_text(page(f"Links for {project}", [
            f'<a href="{w.url_path}#sha256={w.sha256}">{w.filename}</a>' for w in builds]))


# -- the blob endpoint -----------------------------------------------------------------------------------


def blob_bytes(n: int) -> bytes:
    """What ``/blob/<n>`` serves."""
    return b"".join(index_server.blob_chunks(n))


def blob_sha256(n: int) -> str:
    """The sha256 (hex) of ``/blob/<n>``, without holding it whole."""
    digest = hashlib.sha256()
    for chunk in index_server.blob_chunks(n):
        digest.update(chunk)
    return digest.hexdigest()


# -- the running index ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeenConnection:
    """A connection one of the index's listeners accepted (``sni``: the name the TLS client asked for)."""

    seq: int
    scheme: str
    port: int
    peer: str
    sni: str | None
    tls_error: str | None


@dataclass(frozen=True)
class SeenRequest:
    """A request the index parsed. ``target`` is the request line's as sent (absolute-form for a request a
    proxy forwarded unchanged), ``path`` the path it was served as; ``complete``: the whole body was sent."""

    seq: int
    connection: int
    scheme: str
    port: int
    peer: str
    sni: str | None
    method: str
    target: str
    path: str
    host: str | None
    headers: dict[str, str]
    status: int | None
    bytes_sent: int
    complete: bool
    #: the handler is done with it (``complete`` and ``bytes_sent`` are final)
    finished: bool


#: A resolver as the egress proxy takes it: (host, port) -> addresses.
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class EgressIndex:
    """A running index. ``mode`` is "netns" (``address`` inside a namespace of the tests) or "loopback"
    (``address`` 127.0.0.1; ``fallback_reason`` says why)."""

    mode: str
    fallback_reason: str | None
    namespace: Namespace | None
    address: str
    hostname: str
    https_port: int
    http_port: int
    control_port: int
    ca_path: Path
    ca_pem: bytes
    wheels: tuple[Wheel, ...]
    pid: int
    directory: Path = field(repr=False)

    def url(self, path: str, *, scheme: str = "https", by_name: bool = False) -> str:
        """``scheme://address[:port]path`` (the port left out when it is the scheme's default)."""
        port = self.https_port if scheme == "https" else self.http_port
        host = self.hostname if by_name else self.address
        default = {"https": 443, "http": 80}[scheme]
        return f"{scheme}://{host}{'' if port == default else f':{port}'}{path}"

    @property
    def index_url(self) -> str:
        """The simple index by address, e.g. ``https://10.231.7.2/simple/``."""
        return self.url("/simple/")

    @property
    def named_index_url(self) -> str:
        """The simple index by :attr:`hostname` (reachable only through a proxy given :meth:`resolver`)."""
        return self.url("/simple/", by_name=True)

    def blob_url(self, n: int, *, scheme: str = "https", by_name: bool = False) -> str:
        """The URL of n bytes of :func:`blob_bytes` (``scheme`` "http" for the plain listener)."""
        return self.url(f"/blob/{n}", scheme=scheme, by_name=by_name)

    def wheel(self, project: str, version: str | None = None) -> Wheel:
        """The wheel of ``project`` (its newest version unless one is given)."""
        builds = [w for w in self.wheels if w.project == normalize(project) and version in (None, w.version)]
        if not builds:
            raise KeyError(f"the index has no wheel of {project} {version or ''}".strip())
        return max(builds, key=lambda w: tuple(int(p) for p in w.version.split(".")))

    def _seen(self, settled: bool = False) -> dict[str, Any]:
        """The server's record, from its control listener (plain HTTP, never through a proxy); ``settled``:
        once every request's handler has finished (the server waits up to 20 s)."""
        conn = http.client.HTTPConnection(self.address, self.control_port, timeout=30)
        try:
            conn.request("GET", "/seen?settled" if settled else "/seen")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"the index's control listener answered {response.status}: {body[:200]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def mark(self) -> int:
        """The sequence number of the last connection or request seen: pass it as ``since`` later."""
        return int(self._seen()["seq"])

    def requests_seen(self, since: int = 0, *, settled: bool = False) -> list[SeenRequest]:
        """The requests the HTTPS and HTTP listeners parsed after ``since`` (a :meth:`mark`), in order;
        ``settled``: once their handlers have finished, for a test that reads ``complete`` or ``bytes_sent``."""
        return [SeenRequest(**r) for r in self._seen(settled)["requests"] if r["seq"] > since]

    def connections_seen(self, since: int = 0) -> list[SeenConnection]:
        """The connections the HTTPS and HTTP listeners accepted after ``since``, in order."""
        return [SeenConnection(**c) for c in self._seen()["connections"] if c["seq"] > since]

    def resolver(self, extra: Mapping[str, Sequence[str]] | None = None) -> Resolver:
        """A resolver for the egress proxy that knows :attr:`hostname` and the names in ``extra`` (e.g.
        ``{"rebind.kxtest": ["127.0.0.1"]}``) and nothing else: a test never asks a real DNS server."""
        table = {self.hostname: [self.address], **{k.lower(): list(v) for k, v in (extra or {}).items()}}

        async def resolve(host: str, port: int) -> list[str]:
            try:
                return list(table[host.lower().rstrip(".")])
            except KeyError:
                raise socket.gaierror(socket.EAI_NONAME, f"{host}: not a name of the egress test index") from None

        return resolve

    def server_log(self) -> str:
        """What the server wrote to stderr (tracebacks of connections that failed)."""
        return (self.directory / "server.log").read_text(errors="replace")


def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> dict[str, int]:
    """The server's ready line, waited for on its stdout (no polling)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise RuntimeError(f"the index server did not say it listens within {READY_TIMEOUT:.0f} s; "
                                   f"its log: {log.read_text(errors='replace')[-2000:]}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait()
                raise RuntimeError(f"the index server exited ({proc.returncode}) before listening; "
                                   f"its log: {log.read_text(errors='replace')[-2000:]}")
            buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode()
    if not line.startswith(index_server.READY + " "):
        raise RuntimeError(f"the index server said {line!r} instead of {index_server.READY}")
    return {k: int(v) for k, v in json.loads(line.split(" ", 1)[1]).items()}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Closing its stdin ends the server; SIGTERM, then SIGKILL, only if it does not (all by its pid)."""
    if proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def start_index(*, hostname: str = HOSTNAME, use_netns: bool = True) -> Iterator[EgressIndex]:
    """Makes the namespace (unless ``use_netns`` is False or it cannot be made: then loopback), the CA and
    server certificate, the wheels and the index, starts the server inside the namespace and yields the
    running :class:`EgressIndex`. On exit everything is stopped and removed; a server that died while in
    use fails the exit with its log."""
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kxtest-index-")))
        reason = netns_unavailable() if use_netns else "the caller asked for loopback (use_netns=False)"
        ns: Namespace | None = None
        if reason is None:
            try:
                ns = stack.enter_context(namespace())
            except (RuntimeError, OSError) as exc:
                reason = f"a network namespace could not be made: {exc}"
        address = ns.address if ns is not None else "127.0.0.1"
        ports = NETNS_PORTS if ns is not None else dict.fromkeys(NETNS_PORTS, 0)

        authority = make_authority(directory / "ca")
        pair = authority.issue(directory / "ca", "index", server_ips=(address,), server_names=(hostname,))
        wheels = demo_wheels(directory / "built")
        write_index(directory / "root", wheels)

        log = directory / "server.log"
        command = [sys.executable, "-I", str(Path(index_server.__file__).resolve()), index_server.MARKER,
                   "--address", address, "--root", str(directory / "root"), "--cert", str(pair.cert),
                   "--key", str(pair.key), *(a for k, v in ports.items() for a in (f"--{k.replace('_', '-')}", str(v)))]
        if ns is not None:
            command = ["ip", "netns", "exec", ns.name, *command]  # ip execs the server: same pid, no fork
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)
        try:
            listening = _wait_ready(proc, log)
            index = EgressIndex(
                mode="netns" if ns is not None else "loopback", fallback_reason=reason, namespace=ns,
                address=address, hostname=hostname, ca_path=authority.cert_path,
                ca_pem=authority.cert_path.read_bytes(), wheels=wheels, pid=proc.pid, directory=directory,
                **listening)
            yield index
            died = proc.poll()
            if died is not None:
                raise RuntimeError(f"the index server died while in use ({died}); "
                                   f"its log: {index.server_log()[-2000:]}")
        finally:
            _stop(proc)
