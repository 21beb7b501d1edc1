"""The egress tests' index works, seen from the host: pip gets its wheels with their hashes checked, the
blob endpoint serves the bytes it promises, the record says what reached the server, and nothing of the
harness (namespace, veth, server, files) outlives it. No Docker here."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import (
    DEMO_VALUE,
    NETWORK,
    EgressIndex,
    blob_bytes,
    blob_sha256,
    links,
    namespaces,
    remove_stale,
    start_index,
)
from .server import MARKER

#: Variables that would send pip elsewhere or make it trust other CAs: REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE
#: even win over ``--cert`` (requests prefers them to the session's ``verify``).
IGNORED_ENV = ("PIP_", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
               "NO_PROXY")


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    """The host's pip, told nothing by this machine's pip configuration, CA or proxy variables."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(IGNORED_ENV)}
    return subprocess.run([sys.executable, "-m", "pip", "--isolated", "--no-cache-dir", "--disable-pip-version-check",
                           "--no-input", *args], capture_output=True, text=True, env=env, timeout=300)


def download(index: EgressIndex, directory: Path, *requirements: str) -> subprocess.CompletedProcess[str]:
    return pip("download", "--index-url", index.index_url, "--cert", str(index.ca_path), "-d", str(directory),
               *requirements)


def strict_context(index: EgressIndex) -> ssl.SSLContext:
    """Trusts only the test CA, and checks as strictly as Python 3.13's default context."""
    context = ssl.create_default_context(cafile=str(index.ca_path))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def get(index: EgressIndex, path: str, *, server_hostname: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(index.address, index.https_port, timeout=60)
    conn.sock = strict_context(index).wrap_socket(socket.create_connection((index.address, index.https_port), 60),
                                                  server_hostname=server_hostname)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_pip_downloads_the_package_and_its_dependency_with_their_hashes(egress_index: EgressIndex, tmp_path: Path):
    mark = egress_index.mark()
    done = download(egress_index, tmp_path, "kxdemo")
    assert done.returncode == 0, done.stderr
    demo, dep = egress_index.wheel("kxdemo"), egress_index.wheel("kxdemo-dep")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([demo.filename, dep.filename])  # 1.0, not 0.9
    for wheel in (demo, dep):
        assert hashlib.sha256((tmp_path / wheel.filename).read_bytes()).hexdigest() == wheel.sha256
    served = [(r.method, r.path, r.status) for r in egress_index.requests_seen(mark)]
    assert ("GET", "/simple/kxdemo/", 200) in served and ("GET", "/simple/kxdemo-dep/", 200) in served
    assert ("GET", demo.url_path, 200) in served and ("GET", dep.url_path, 200) in served


def test_the_wheels_install_and_import_with_the_value(egress_index: EgressIndex, tmp_path: Path):
    target = tmp_path / "site"
    done = pip("install", "--index-url", egress_index.index_url, "--cert", str(egress_index.ca_path),
               "--target", str(target), "kxdemo")
    assert done.returncode == 0, done.stderr
    value = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import kxdemo; print(kxdemo.VALUE)", str(target)], capture_output=True, text=True)
    assert value.stdout.strip() == str(DEMO_VALUE), value.stderr


def test_on_loopback_pip_rejects_a_wheel_that_differs_from_its_hash(tmp_path: Path):
    """The ``#sha256=`` fragments are checked: a wheel changed after the page was written is refused.
    (Its own index, on loopback: the fallback works, and the shared index stays intact.)"""
    with start_index(use_netns=False) as index:
        assert (index.mode, index.address) == ("loopback", "127.0.0.1") and index.fallback_reason
        assert download(index, tmp_path / "good", "--no-deps", "kxdemo-dep").returncode == 0
        served = index.directory / "root" / "files" / index.wheel("kxdemo-dep").filename
        served.write_bytes(served.read_bytes() + b"\0")
        done = download(index, tmp_path / "bad", "--no-deps", "kxdemo-dep")
        assert done.returncode != 0 and "HASHES" in done.stderr, done.stderr
        assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())


@pytest.mark.parametrize("by_name", [False, True], ids=["ip-san", "dns-san"])
def test_the_blob_endpoint_serves_its_bytes_over_verified_tls(egress_index: EgressIndex, by_name: bool):
    n = 3 * (1 << 16) + 17  # across chunk boundaries
    status, body = get(egress_index, f"/blob/{n}", server_hostname=egress_index.hostname if by_name
                       else egress_index.address)
    assert status == 200 and len(body) == n
    assert body == blob_bytes(n) and hashlib.sha256(body).hexdigest() == blob_sha256(n)
    assert blob_bytes(n)[:1000] == blob_bytes(1000) and len(set(body)) == 256


def test_a_certificate_for_another_name_is_refused(egress_index: EgressIndex):
    with pytest.raises(ssl.SSLCertVerificationError):
        get(egress_index, "/blob/1", server_hostname="other.kxtest")


def test_plain_http_takes_absolute_form_and_the_record_says_what_arrived(egress_index: EgressIndex):
    mark = egress_index.mark()
    assert egress_index.requests_seen(mark) == [] and egress_index.connections_seen(mark) == []
    conn = http.client.HTTPConnection(egress_index.address, egress_index.http_port, timeout=60)
    try:
        conn.request("GET", egress_index.blob_url(10, scheme="http", by_name=True), headers={"X-Kxtest": "1"})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, blob_bytes(10))
    finally:
        conn.close()
    (request,) = egress_index.requests_seen(mark, settled=True)
    (connection,) = egress_index.connections_seen(mark)
    assert request.finished and request.connection == connection.seq and connection.scheme == request.scheme == "http"
    assert request.target == egress_index.blob_url(10, scheme="http", by_name=True) and request.path == "/blob/10"
    assert (request.host, request.headers["x-kxtest"], request.status, request.complete) == (
        egress_index.hostname, "1", 200, True)


def test_the_record_has_the_name_a_tls_client_asked_for(egress_index: EgressIndex):
    mark = egress_index.mark()
    get(egress_index, "/simple/", server_hostname=egress_index.hostname)
    (request,) = egress_index.requests_seen(mark)
    assert (request.scheme, request.sni, request.path, request.status) == (
        "https", egress_index.hostname, "/simple/", 200)


def test_the_resolver_knows_the_index_and_the_given_names_only(egress_index: EgressIndex):
    resolve = egress_index.resolver({"rebind.kxtest": ["127.0.0.1"], "metadata.kxtest": ["169.254.169.254"]})
    assert asyncio.run(resolve("INDEX.kxtest.", 443)) == [egress_index.address]
    assert asyncio.run(resolve("rebind.kxtest", 443)) == ["127.0.0.1"]
    assert asyncio.run(resolve("metadata.kxtest", 80)) == ["169.254.169.254"]
    with pytest.raises(socket.gaierror):
        asyncio.run(resolve("pypi.org", 443))


@pytest.mark.netns
def test_the_index_runs_in_its_own_namespace_with_one_link_and_no_route_beyond(egress_index: EgressIndex):
    ns = egress_index.namespace
    assert egress_index.mode == "netns" and ns is not None, egress_index.fallback_reason
    assert ns.name in namespaces() and links()[ns.link] == ns.name
    network = ipaddress.ip_interface(f"{ns.host_address}/{ns.prefix}").network
    assert network.subnet_of(NETWORK) and ipaddress.ip_address(egress_index.address) in network
    routes = subprocess.run(["ip", "-n", ns.name, "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True, check=True).stdout
    assert [r.split()[0] for r in routes.splitlines() if not r.startswith(("local ", "broadcast "))] == [str(network)]
    # the server is the process the harness stops by pid (ip exec'd it), and it lives in the namespace
    assert MARKER.encode() in Path(f"/proc/{egress_index.pid}/cmdline").read_bytes().split(b"\0")
    assert os.stat(f"/proc/{egress_index.pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns.name}").st_ino
    assert os.stat(f"/proc/{egress_index.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino


@pytest.mark.netns
def test_nothing_is_left_behind():
    with start_index() as index:
        assert index.namespace is not None, index.fallback_reason
        ns, pid, directory = index.namespace, index.pid, index.directory
        assert ns.name in namespaces() and ns.link in links() and directory.is_dir()
    assert ns.name not in namespaces() and ns.link not in links() and not directory.exists()
    cmdline = Path(f"/proc/{pid}/cmdline")
    assert not cmdline.exists() or MARKER.encode() not in cmdline.read_bytes().split(b"\0")


@pytest.mark.netns
def test_a_namespace_of_a_dead_run_is_removed_and_a_live_runs_kept():
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, live = f"kxtest-{gone.pid}-0", f"kxtest-{os.getpid()}-9999"
    try:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        removed = remove_stale()
        assert stale in removed and live not in removed
        assert stale not in namespaces() and live in namespaces()
    finally:
        for name in (stale, live):
            if name in namespaces():
                subprocess.run(["ip", "netns", "del", name], check=True, capture_output=True)
