"""The egress tests' package index: a PEP 503 simple index over HTTPS, plain HTTP, large blobs, and a record.

Run by tests/egress/harness.py as a script (standard library only), inside the network namespace the
tests made, so the proxy under test reaches it through a real interface and a real route, as it would
reach pypi.org, while nothing else on the machine (or beyond it) is ever involved. Three listeners:

- HTTPS (the test CA's server certificate): ``/simple/...`` and ``/files/...`` from ``--root``, and
  ``/blob/<n>``: n bytes of :func:`blob_chunks`, the same for every run (a prefix of any longer blob).
- plain HTTP: the same routes, for absolute-form ``GET http://...`` requests a proxy forwards.
- control (plain HTTP, not recorded): ``GET /seen`` returns every connection and request the two
  others saw, so a test asserts what reached the server (and what did not: a refused connection).

Readiness: one line ``KXTEST-READY {"https_port": ..., "http_port": ..., "control_port": ...}`` on
stdout once all three listen. The server ends when its stdin reaches EOF (the harness closes it, or
the harness's process died: no server outlives the run that started it) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import socketserver
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler
from typing import Any

READY = "KXTEST-READY"
#: A marker in the command line: how a later run recognises a server a crashed run left in its namespace.
MARKER = "--kxtest-index-server"

BLOB_SEED = 14
BLOB_CHUNK = 1 << 16
#: The largest blob served (a bound on what a wrong test can make the server send).
BLOB_MAX = 4 << 30


def blob_chunks(n: int) -> Iterator[bytes]:
    """The bytes of ``/blob/<n>``, in chunks: pseudo-random (a dropped or repeated chunk changes the hash),
    the same in every run and for every n (``/blob/10`` is the start of ``/blob/1000``)."""
    rng = random.Random(BLOB_SEED)
    left = n
    while left > 0:
        chunk = rng.randbytes(BLOB_CHUNK)[:left]
        left -= len(chunk)
        yield chunk


class Record:
    """What the listeners saw, in order: connections when accepted, requests when parsed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._seq = 0
        self._connections: list[dict[str, Any]] = []
        self._requests: list[dict[str, Any]] = []

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            entry = {"seq": self._seq, **fields}
            (self._connections if kind == "connection" else self._requests).append(entry)
            return entry

    def update(self, entry: dict[str, Any], **fields: Any) -> None:
        with self._lock:
            entry.update(fields)
            self._changed.notify_all()

    def snapshot(self, settle: float = 0.0) -> dict[str, Any]:
        """The record; with ``settle``, once every request's handler has finished (or after ``settle``
        seconds): a client can read a whole response before the handler records that it sent it."""
        with self._lock:
            if settle:
                self._changed.wait_for(lambda: all(r["finished"] for r in self._requests), settle)
            return {"seq": self._seq, "connections": [dict(c) for c in self._connections],
                    "requests": [dict(r) for r in self._requests]}


class IndexHandler(SimpleHTTPRequestHandler):
    """Static files of the index, ``/blob/<n>``, each request recorded; absolute-form targets accepted
    (RFC 9112 3.2.2: a server must accept them, and a proxy may forward them so)."""

    protocol_version = "HTTP/1.1"
    server: ListeningServer

    def __init__(self, request: Any, client_address: Any, server: ListeningServer, *,
                 connection: dict[str, Any], sni: str | None) -> None:
        self.kx_connection = connection
        self.kx_sni = sni
        self.kx_entry: dict[str, Any] | None = None
        super().__init__(request, client_address, server, directory=server.root)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        target = self.path
        if target.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(target)
            self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.kx_entry = self.server.record.add(
            "request", connection=self.kx_connection["seq"], scheme=self.server.scheme, port=self.server.port,
            peer=self.client_address[0], sni=self.kx_sni, method=self.command, target=target,
            path=self.path, host=self.headers.get("Host"),
            headers={k.lower(): v for k, v in self.headers.items()}, status=None, bytes_sent=0, complete=False,
            finished=False)
        return True

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            entry, self.kx_entry = self.kx_entry, None
            if entry is not None:
                self.server.record.update(entry, finished=True)

    def send_response(self, code: int, message: str | None = None) -> None:
        if self.kx_entry is not None:
            self.server.record.update(self.kx_entry, status=code)
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def _dispatch(self, *, body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/blob/"):
            self._blob(path.removeprefix("/blob/"), body=body)
        elif body:
            super().do_GET()
        else:
            super().do_HEAD()

    def _blob(self, size: str, *, body: bool) -> None:
        if not size.isdigit() or int(size) > BLOB_MAX:
            self.send_error(404, f"/blob/<n>: n is a byte count up to {BLOB_MAX}")
            return
        n = int(size)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if not body:
            return
        sent = 0
        try:
            for chunk in blob_chunks(n):
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:  # the client (or the proxy's byte budget) cut the transfer: recorded as incomplete
            self.close_connection = True
        finally:
            assert self.kx_entry is not None
            self.server.record.update(self.kx_entry, bytes_sent=sent, complete=sent == n)

    def copyfile(self, source: Any, outputfile: Any) -> None:
        super().copyfile(source, outputfile)
        if self.kx_entry is not None:
            self.server.record.update(self.kx_entry, bytes_sent=source.tell(), complete=True)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the record says what happened; errors still go to stderr (the harness's log file)."""


class ListeningServer(socketserver.TCPServer):
    """One listener; a thread per connection, recorded when accepted. TLS, when given a context, is set
    up in the connection's thread, so a client that stalls its handshake blocks nobody else."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: str, port: int, *, scheme: str, root: str, record: Record,
                 context: ssl.SSLContext | None = None) -> None:
        self.scheme, self.root, self.record, self.context = scheme, root, record, context
        super().__init__((address, port), IndexHandler)
        self.port = self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        connection = self.record.add("connection", scheme=self.scheme, port=self.port, peer=client_address[0],
                                     sni=None, tls_error=None)
        threading.Thread(target=self._serve, args=(request, client_address, connection), daemon=True).start()

    def _serve(self, request: socket.socket, client_address: Any, connection: dict[str, Any]) -> None:
        sock: socket.socket = request
        sni: str | None = None
        try:
            if self.context is not None:
                try:
                    tls = self.context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.record.update(connection, tls_error=str(exc))
                    return
                sock, sni = tls, getattr(tls, "kx_sni", None)
                self.record.update(connection, sni=sni)
            IndexHandler(sock, client_address, self, connection=connection, sni=sni)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            sock.close()
            request.close()


class ControlHandler(BaseHTTPRequestHandler):
    """``GET /seen``: the record as JSON. Not itself recorded."""

    server: ControlServer

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path != "/seen" or query not in ("", "settled"):
            self.send_error(404, "the control listener serves GET /seen and GET /seen?settled")
            return
        body = json.dumps(self.server.record.snapshot(settle=20.0 if query else 0.0)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet, as the index's listeners."""


class ControlServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: str, port: int, record: Record) -> None:
        self.record = record
        super().__init__((address, port), ControlHandler)


def _remember_sni(sock: Any, name: str | None, context: ssl.SSLContext) -> None:
    sock.kx_sni = name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(MARKER, action="store_true", help="marks the command line as this server's")
    parser.add_argument("--address", required=True)
    parser.add_argument("--https-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--root", required=True, help="the directory holding simple/ and files/")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.sni_callback = _remember_sni
    record = Record()
    servers: list[socketserver.TCPServer] = [
        ListeningServer(args.address, args.https_port, scheme="https", root=args.root, record=record, context=context),
        ListeningServer(args.address, args.http_port, scheme="http", root=args.root, record=record),
        ControlServer(args.address, args.control_port, record),
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        ports = dict(zip(("https_port", "http_port", "control_port"), (s.server_address[1] for s in servers),
                         strict=True))
        print(READY, json.dumps(ports), flush=True)
        sys.stdin.buffer.read()  # until EOF: the harness closed it, or its process is gone
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
