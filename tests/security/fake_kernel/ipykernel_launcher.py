"""A hostile Jupyter kernel, for kernelexec's security tests. Runs INSIDE the sandbox.

Started exactly as kernelexec starts ipykernel (``python -m ipykernel_launcher
-f /run/kernelexec/connection.json ...``); ``PYTHONPATH=/fake`` makes this file
win over the real module. It speaks the protocol as ipykernel does (ipc
sockets named ``{ip}-{port}``, shell/control/stdin ROUTER, IOPub XPUB that
greets each subscriber with ``iopub_welcome``, heartbeat REP, the ``owner``
socket of kernelexec's orphan watchdog), evaluates plain expressions, and
misbehaves, as ``FAKE_MODE`` says, on any execute_request whose code contains
the word ``attack``. Only pyzmq and the standard library are used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import zmq

DELIM = b"<IDS|MSG>"
MODE = os.environ.get("FAKE_MODE", "good")


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Fake:
    def __init__(self, info: dict) -> None:
        self.key = info["key"].encode()
        self.session = uuid.uuid4().hex
        self.count = 0
        self.ns: dict = {}
        self.iopub_lock = threading.Lock()  # IOPub is shared with the late-output thread
        self.ctx = zmq.Context()
        prefix = info["ip"]

        def bind(kind: int, port: str) -> zmq.Socket:
            s = self.ctx.socket(kind)
            s.linger = 0
            s.bind(f"ipc://{prefix}-{info[port]}")
            return s

        self.shell = bind(zmq.ROUTER, "shell_port")
        self.stdin = bind(zmq.ROUTER, "stdin_port")
        self.control = bind(zmq.ROUTER, "control_port")
        self.iopub = bind(zmq.XPUB, "iopub_port")
        self.iopub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.iopub.setsockopt(zmq.SNDHWM, 1000)
        self.hb = bind(zmq.REP, "hb_port")

    # -- the wire ----------------------------------------------------------------

    def sign(self, parts, key: bytes | None = None) -> bytes:
        h = hmac.new(key or self.key, digestmod=hashlib.sha256)
        for p in parts:
            h.update(p)
        return h.hexdigest().encode()

    def header(self, msg_type: str) -> dict:
        return {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": self.session, "username": "fake",
                "date": datetime.now(timezone.utc).isoformat(), "version": "5.4"}

    def frames(self, msg_type: str, content, parent: dict, *, header: dict | None = None,
               raw_content: bytes | None = None, signature: bytes | None = None) -> list[bytes]:
        parts = [dumps(header if header is not None else self.header(msg_type)), dumps(parent), b"{}",
                 raw_content if raw_content is not None else dumps(content)]
        return [DELIM, signature if signature is not None else self.sign(parts), *parts]

    def pub(self, msg_type: str, content, parent: dict, **kw) -> None:
        with self.iopub_lock:
            self.iopub.send_multipart([f"kernel.fake.{msg_type}".encode()] + self.frames(msg_type, content, parent, **kw))

    def pub_raw(self, frames: list[bytes]) -> None:
        with self.iopub_lock:
            self.iopub.send_multipart(frames)

    def status(self, state: str, parent: dict) -> None:
        self.pub("status", {"execution_state": state}, parent)

    # -- the main loop -------------------------------------------------------------

    def serve(self) -> None:
        poller = zmq.Poller()
        for s in (self.shell, self.control, self.iopub, self.hb, self.stdin):
            poller.register(s, zmq.POLLIN)
        while True:
            for sock, _ in poller.poll():
                if sock is self.iopub:
                    sub = self.iopub.recv()
                    if sub[:1] == b"\x01":
                        self.pub("iopub_welcome", {"subscription": sub[1:].decode(errors="replace")}, {})
                    continue
                if sock is self.hb:
                    self.hb.send(self.hb.recv())
                    continue
                frames = sock.recv_multipart()
                i = frames.index(DELIM)
                ids, msg = frames[:i], frames[i + 1:]
                header, content = json.loads(msg[1]), json.loads(msg[4])
                self.handle(sock, ids, header, content)

    def reply(self, sock: zmq.Socket, ids: list[bytes], msg_type: str, content, parent: dict, **kw) -> None:
        sock.send_multipart(ids + self.frames(msg_type, content, parent, **kw))

    def handle(self, sock: zmq.Socket, ids: list[bytes], req: dict, content: dict) -> None:
        t = req["msg_type"]
        if t == "kernel_info_request":
            self.status("busy", req)
            self.reply(sock, ids, "kernel_info_reply", {
                "status": "ok", "protocol_version": "5.4", "implementation": "fake", "implementation_version": "0",
                "language_info": {"name": "python", "version": sys.version.split()[0], "mimetype": "text/x-python",
                                  "file_extension": ".py"},
                "banner": "a hostile kernel", "help_links": []}, req)
            self.status("idle", req)
        elif t == "interrupt_request":
            if MODE == "never_reply":
                return  # ignores interrupts too: the host must give up and replace it
            self.reply(sock, ids, "interrupt_reply", {"status": "ok"}, req)
        elif t == "shutdown_request":
            self.reply(sock, ids, "shutdown_reply", {"status": "ok", "restart": False}, req)
            os._exit(0)
        elif t == "execute_request":
            if "attack" in content.get("code", ""):
                getattr(self, "attack_" + MODE)(sock, ids, req)
            else:
                self.execute(sock, ids, req, content["code"])
        else:
            self.reply(sock, ids, t.replace("_request", "_reply"), {"status": "ok"}, req)

    def execute(self, sock, ids, req, code: str) -> None:
        self.count += 1
        self.status("busy", req)
        self.pub("execute_input", {"code": code, "execution_count": self.count}, req)
        try:
            try:
                value = eval(compile(code, "<cell>", "eval"), self.ns)
            except SyntaxError:
                exec(compile(code, "<cell>", "exec"), self.ns)
                value = None
            if value is not None:
                self.pub("execute_result", {"execution_count": self.count, "data": {"text/plain": repr(value)},
                                            "metadata": {}}, req)
            reply = {"status": "ok", "execution_count": self.count, "user_expressions": {}, "payload": []}
        except Exception as e:
            err = {"ename": type(e).__name__, "evalue": str(e), "traceback": [f"{type(e).__name__}: {e}"]}
            self.pub("error", err, req)
            reply = {"status": "error", "execution_count": self.count, **err}
        self.reply(sock, ids, "execute_reply", reply, req)
        self.status("idle", req)

    def ok_reply(self, sock, ids, req, **kw) -> None:
        self.reply(sock, ids, "execute_reply", {"status": "ok", "execution_count": self.count,
                                                "user_expressions": {}, "payload": []}, req, **kw)

    def stream(self, text: str, req: dict) -> None:
        self.pub("stream", {"name": "stdout", "text": text}, req)

    # -- misbehaviours: each on an execute_request whose code says "attack" --------

    def attack_no_delimiter(self, sock, ids, req):
        sock.send_multipart(ids + [b"garbage", b"frames", b"without", b"a", b"delimiter"])

    def attack_short(self, sock, ids, req):
        sock.send_multipart(ids + [DELIM, b"0" * 64, dumps(self.header("execute_reply"))])

    def attack_many_buffers(self, sock, ids, req):
        sock.send_multipart(ids + self.frames("execute_reply", {"status": "ok"}, req) + [b"buffer"] * 50)

    def attack_not_json(self, sock, ids, req):
        self.reply(sock, ids, "execute_reply", None, req, raw_content=b"{this is not json")

    def attack_not_object(self, sock, ids, req):
        self.reply(sock, ids, "execute_reply", None, req, raw_content=b"[1, 2, 3]")

    def attack_no_msg_type(self, sock, ids, req):
        h = self.header("execute_reply")
        del h["msg_type"]
        self.reply(sock, ids, "execute_reply", {"status": "ok"}, req, header=h)

    def attack_deep(self, sock, ids, req):
        # depth 10000: more than any recursive parser's stack allows; on the shell reply
        raw = b'{"status":"ok","payload":' + b"[" * 10000 + b"]" * 10000 + b"}"
        self.reply(sock, ids, "execute_reply", None, req, raw_content=raw)

    def attack_deep_iopub(self, sock, ids, req):
        # depth 100 parses, but is past the host's nesting bound; on IOPub, and no reply ever follows
        raw = b'{"name":"stdout","text":"x","deep":' + b"[" * 100 + b"]" * 100 + b"}"
        self.pub("stream", None, req, raw_content=raw)

    def attack_unsigned(self, sock, ids, req):
        self.reply(sock, ids, "execute_reply", {"status": "ok", "execution_count": 1}, req, signature=b"")

    def attack_badsig(self, sock, ids, req):
        parts = self.frames("execute_reply", {"status": "ok", "execution_count": 1}, req)[2:]
        self.reply(sock, ids, "execute_reply", {"status": "ok", "execution_count": 1}, req,
                   signature=self.sign(parts, key=b"not-the-session-key"))

    def attack_badsig_iopub(self, sock, ids, req):
        self.status("busy", req)
        self.pub("stream", {"name": "stdout", "text": "forged output\n"}, req, signature=b"f" * 64)

    def attack_forged_idle(self, sock, ids, req):
        self.count += 1
        self.status("idle", req)  # forged: nothing has run yet
        time.sleep(1.0)
        self.status("busy", req)
        self.stream("real output\n", req)
        time.sleep(0.3)
        self.ok_reply(sock, ids, req)
        self.status("idle", req)

    def attack_forged_reply(self, sock, ids, req):
        self.count += 1
        self.status("busy", req)
        forged_parent = dict(req, msg_id=uuid.uuid4().hex)
        self.reply(sock, ids, "execute_reply", {"status": "error", "execution_count": 999, "ename": "Forged",
                                                "evalue": "a reply to nobody", "traceback": []}, forged_parent)
        self.pub("error", {"ename": "Forged", "evalue": "to nobody", "traceback": []}, forged_parent)
        time.sleep(0.5)
        self.stream("real output\n", req)
        time.sleep(0.3)
        self.ok_reply(sock, ids, req)
        self.status("idle", req)

    def attack_huge(self, sock, ids, req):
        self.status("busy", req)
        self.stream("h" * (100 << 20), req)  # 100 MB in one message; no reply ever follows

    def attack_flood(self, sock, ids, req):
        self.count += 1
        self.status("busy", req)
        one = [b"kernel.fake.stream"] + self.frames("stream", {"name": "stdout", "text": "f" * 1000 + "\n"}, req)
        sent = 0
        for _ in range(1_000_000):
            self.pub_raw(one)
            sent += 1
        self.ns["flood_sent"] = sent  # for the test to read back
        self.ok_reply(sock, ids, req)
        self.status("idle", req)

    def attack_late_output(self, sock, ids, req):
        self.count += 1
        self.status("busy", req)
        self.stream("on time\n", req)
        # The idle and the first late messages are signed in advance and sent right behind a 4 MB
        # reply: while the host is still reading the reply, the idle and the late output are all
        # queued on IOPub, so they are read in one go.
        burst = [[b"kernel.fake.status"] + self.frames("status", {"execution_state": "idle"}, req)]
        burst += [[b"kernel.fake.stream"] + self.frames("stream", {"name": "stdout", "text": "late output\n"}, req)
                  for _ in range(50)]
        self.reply(sock, ids, "execute_reply", {"status": "ok", "execution_count": self.count, "user_expressions": {},
                                                "payload": [], "padding": "p" * (4 << 20)}, req)
        for frames in burst:
            self.pub_raw(frames)

        def late() -> None:
            for _ in range(400):
                self.stream("late output\n", req)
                self.pub("display_data", {"data": {"text/plain": "late display"}, "metadata": {}}, req)
                time.sleep(0.005)

        threading.Thread(target=late, daemon=True).start()

    def attack_never_reply(self, sock, ids, req):
        self.status("busy", req)  # and then nothing, ever


def watch_owner() -> None:
    """kernelexec's orphan watchdog, reduced: exit once the host's connection closes."""
    path = os.environ.get("KERNELEXEC_OWNER_SOCKET")
    if not path:
        return
    tmp = path + ".new"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(tmp)
    listener.listen(1)
    os.rename(tmp, path)  # appears only once it accepts connections

    def run() -> None:
        conn, _ = listener.accept()
        while conn.recv(4096):
            pass
        os._exit(0)

    threading.Thread(target=run, daemon=True).start()


def main() -> None:
    argv = sys.argv[1:]
    with open(argv[argv.index("-f") + 1]) as f:
        info = json.load(f)
    fake = Fake(info)
    watch_owner()
    fake.serve()


if __name__ == "__main__":
    main()
