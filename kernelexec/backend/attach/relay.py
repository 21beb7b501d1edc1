"""The relay: pid 1 of a sandbox whose channels travel over the container's attach stream.

It is never imported in the container: the container's command is ``python -I -c BOOTSTRAP``,
which reads the host's hello from stdin (this file's source, :mod:`.framing`'s and the
configuration) and runs it. Nothing of the host is mounted and the image needs no change. The
bootstrap emits nothing before the hello, so an engine that can only attach after start loses
nothing.

What the relay does, in one thread around one ``select.poll``:

* makes itself non-dumpable first, so that code in the container (same uid) cannot open
  ``/proc/1/fd/*`` to write into the stream, nor ptrace it; as pid 1 it receives no signal
  from inside the container that it has no handler for (``kill -9 1`` does nothing);
* writes the kernel's files (connection file, ``launch.py``, ``startup.py``) into its private
  tmpfs directory, and starts the kernel in its own session (ipykernel interrupts its whole
  process group) with stdin on ``/dev/null`` and stdout/stderr on pipes: ipykernel copies
  fd-level output back to its original fd 1, which must not be the stream;
* connects to the kernel's ipc sockets once they exist (inotify, no polling), speaking ZMTP
  itself (:mod:`.zmtp`: no libzmq io thread between the kernel and the stream), and forwards
  messages both ways, framed (:mod:`.framing`); kernel output waits in a bounded queue, beyond
  which the relay stops reading the kernel (backpressure down to the kernel's IOPub);
* reports what the kernel sent over a bound as a ``violation`` link message, and a message it
  cannot frame (no ``<IDS|MSG>`` delimiter, too many parts) with its shape (parts, delimiter), so
  that the host says what the kernel sent in its own parser's words, as on the ipc transport;
* forwards the kernel's own stdout/stderr on the bounded ``log`` channel;
* with egress (``Policy.egress``), listens on the loopback egress port before the kernel starts
  (so no code can take it) and carries each connection on the ``net`` channel, credit-bounded
  per connection; the host's proxy decides what the connection may reach;
* reaps every zombie and forwards SIGTERM/SIGINT to the kernel, as pid 1 must;
* ends the sandbox when the host's bytes stop for ``orphan_timeout`` (the host echoes a
  keepalive well within it), and when the kernel exits, after reporting its status.

Every write handles short writes (gVisor writes 4,096 of 34,464 bytes at times): stdout is
non-blocking and whatever is left waits for POLLOUT.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BOOTSTRAP", "OUT_HWM", "main"]

#: Kernel output the relay holds before it stops reading the kernel.
OUT_HWM = 1 << 20
#: How long kernel output on IOPub may wait to leave with what follows it. Each write to the stream
#: wakes the engine's copy chain (pipe, shim, engine, host): on a small host that costs more than the
#: message. ``busy``, ``execute_input`` and a result wait for the reply and ``idle`` (which leave at
#: once, as everything else does), so a short execution crosses in one or two writes, not five; a
#: long one streams its output at most this late.
IOPUB_HOLD = 0.002
#: Held output past this many bytes leaves at once.
HOLD_BYTES = 64 << 10
#: The kernel's own stdout/stderr forwarded on the log channel: a burst, then a rate.
LOG_BURST = 256 << 10
LOG_RATE = 64 << 10
#: The last bytes the kernel wrote to its stderr, sent with its exit status.
TAIL = 4096
#: After a socket to the kernel disconnects, how long a kernel exit may take to explain it.
DISCONNECT_GRACE = 1.0
#: How long a last report (exit) may wait for the stream to drain.
LAST_WORDS = 10.0

# Runs as `python -I -c BOOTSTRAP`: reads b"KXB1", a 4-byte length and that many bytes of JSON from
# fd 0 (raw reads: nothing after the hello is consumed), then runs the relay's source from it.
BOOTSTRAP = f"""\
import os,sys,json
def rd(n):
    b=b''
    while len(b)<n:
        c=os.read(0,n-len(b))
        if not c:sys.exit('kernelexec relay: the stream closed before the hello')
        b+=c
    return b
h=rd(8)
if h[:4]!=b'KXB1':sys.exit('kernelexec relay: the hello does not start with KXB1')
n=int.from_bytes(h[4:],'big')
if n>{8 << 20}:sys.exit('kernelexec relay: the hello is too large')
m=json.loads(rd(n))
exec(compile(m['relay'],'<kernelexec relay>','exec'),{{'__name__':'kernelexec_relay','BOOT':m}})
"""


def main(boot: dict[str, Any]) -> None:
    import ctypes
    import itertools
    import os
    import signal
    import sys
    import time
    import types
    from collections import deque

    def say(text: str) -> None:
        """To the container's stderr: read by the host only when the stream itself failed."""
        try:
            os.write(2, f"kernelexec relay: {text}\n".encode())
        except OSError:
            pass

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
        say(f"cannot make the relay non-dumpable (errno {ctypes.get_errno()}); refusing to run")
        os._exit(70)

    def load(name: str) -> Any:
        module = types.ModuleType(f"kernelexec_attach_{name}")
        sys.modules[module.__name__] = module
        exec(compile(boot[name], f"<kernelexec {name}>", "exec"), module.__dict__)
        return module

    framing = load("framing")
    zmtp = load("zmtp")
    cfg = boot["config"]
    limits = framing.Limits.from_dict(cfg["limits"])
    # the delimiter must be among a message's first parts (routing identities before it), as the
    # host's parser has it (kernelexec.kernel.protocol.MAX_IDENTITIES + 1)
    window = int(cfg["delimiter_within"])
    orphan_timeout = float(cfg["orphan_timeout"])
    directory = cfg["dir"]

    # -- the kernel's files and the kernel ---------------------------------------------
    os.umask(0o077)
    for name, text in cfg["files"].items():
        fd = os.open(os.path.join(directory, name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
        try:
            left = memoryview(text.encode())
            while left:
                left = left[os.write(fd, left):]
        finally:
            os.close(fd)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    for handled in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(handled, lambda *_: None)  # the byte on wake_w is the work; see the loop
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    import select
    import socket

    egress_port = int(cfg.get("egress_port") or 0)
    listener = None
    if egress_port:  # before the kernel exists: no code can hold the port first
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", egress_port))
        listener.listen(64)
        listener.setblocking(False)

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    argv = list(cfg["argv"])
    kernel = os.posix_spawn(
        argv[0], argv, dict(os.environ),
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                      (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)],
        setsid=True, setsigmask=(),
    )
    os.close(out_w)
    os.close(err_w)
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)

    # -- output to the host: one queue, written without blocking -------------------------
    os.set_blocking(1, False)
    try:
        import fcntl

        fcntl.fcntl(1, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer wake-ups for large messages
    except (OSError, ImportError):
        pass  # not a pipe, or the engine's limit: the default works, in more writes
    out: deque[Any] = deque()
    # urgent: write at the next turn of the loop; else what is queued waits until `hold` (IOPUB_HOLD)
    state: dict[str, Any] = {"seq": 0, "queued": 0, "urgent": False, "hold": 0.0}

    def emit(chunks: list[bytes], urgent: bool = True) -> None:
        out.extend(chunks)
        state["queued"] += sum(map(len, chunks))
        state["seq"] = (state["seq"] + 1) & 0xFFFFFFFF
        if urgent:
            state["urgent"] = True

    def link(message: dict[str, Any]) -> None:
        emit(framing.encode_link(state["seq"], message, limits))

    def violation(reason: str, frames: int | None = None, delimiter: int | None = None) -> None:
        """Tell the host the kernel broke a bound; the host ends the session. ``frames``: the message
        could not be a Jupyter message; it had that many parts, its delimiter at ``delimiter`` (None:
        not among the first ``window``), and the host words what the kernel sent from that."""
        message: dict[str, Any] = {"type": "violation", "reason": reason}
        if frames is not None:
            message["shape"] = {"frames": frames, "delimiter": delimiter}
        link(message)

    def flush() -> bool:
        """Write what fits now; True when nothing is left."""
        while out:
            batch = list(itertools.islice(out, 64))
            try:
                n = os.writev(1, batch)
            except BlockingIOError:
                return False
            except BrokenPipeError:
                end(0, "the engine closed the container's stdout")
            state["queued"] -= n
            while n:
                head = out[0]
                if n >= len(head):
                    out.popleft()
                    n -= len(head)
                else:
                    out[0] = memoryview(head)[n:]
                    n = 0
        return True

    def drain_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        p = select.poll()
        p.register(1, select.POLLOUT)
        while not flush():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            p.poll(left * 1000)

    tail = bytearray()
    log_budget = {"tokens": float(LOG_BURST), "at": time.monotonic(), "dropped": 0}
    piece = limits.max_log_bytes - 64

    def kernel_output(source: bytes, data: bytes) -> None:
        if source == b"stderr":  # a crash's traceback; stdout holds ipykernel's banner
            tail.extend(data)
            del tail[:-TAIL]
        now = time.monotonic()
        b = log_budget
        b["tokens"] = min(float(LOG_BURST), b["tokens"] + (now - b["at"]) * LOG_RATE)
        b["at"] = now
        if b["dropped"] and b["tokens"] >= 128:
            note = f"{b['dropped']} bytes of the kernel's own output were not forwarded (rate limit)".encode()
            emit(framing.encode_log(state["seq"], b"relay", note, limits))
            b["tokens"] -= len(note)
            b["dropped"] = 0
        keep = data[:max(int(b["tokens"]), 0)]
        b["dropped"] += len(data) - len(keep)
        b["tokens"] -= len(keep)
        for i in range(0, len(keep), piece):
            emit(framing.encode_log(state["seq"], source, keep[i:i + piece], limits))

    def kill_kernel() -> None:
        try:
            os.killpg(kernel, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def end(code: int, why: str) -> None:
        say(why)
        kill_kernel()
        os._exit(code)

    # -- the kernel's sockets: ZMTP 3.0 over unix stream sockets, no libzmq in the relay ----------
    names = {framing.SHELL: "shell", framing.CONTROL: "control", framing.STDIN: "stdin", framing.IOPUB: "iopub"}
    endpoints = {channel: f"{cfg['ip']}-{cfg['ports'][name]}" for channel, name in names.items()}
    # one identity on shell and stdin, as Jupyter clients have: the kernel sends an input_request on
    # stdin to the identity its execute_request came from on shell
    hellos = {channel: zmtp.GREETING + (zmtp.ready(b"SUB") if channel == framing.IOPUB else
                                        zmtp.ready(b"DEALER", b"kernelexec-relay"))
              for channel in names}
    # per channel: sock, fd, reader, out (bytes to the kernel), ready (the kernel's READY came),
    # queued (host messages until then), retry (when to dial again), flags (polled for), stalled
    # (decoding stopped at the output bound with bytes left in the reader)
    peers: dict[int, dict[str, Any]] = {
        channel: {"sock": None, "fd": -1, "reader": None, "out": bytearray(), "ready": False,
                  "queued": [], "retry": 0.0, "flags": 0, "stalled": False}
        for channel in names}
    peer_of: dict[int, int] = {}  # fd -> channel
    RETRY = 0.01
    connected = False

    ino = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if ino >= 0 and libc.inotify_add_watch(ino, directory.encode(), 0x100 | 0x80) < 0:  # IN_CREATE, IN_MOVED_TO
        os.close(ino)
        ino = -1

    def dial(channel: int) -> None:
        p = peers[channel]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(endpoints[channel])
        except OSError:  # not listening yet, or its backlog is full: again shortly
            sock.close()
            p["retry"] = time.monotonic() + RETRY
            return
        p["sock"] = sock
        p["fd"] = sock.fileno()
        p["reader"] = zmtp.Reader(limits.max_frame_bytes, limits.max_frames + window,
                                  limits.max_body_bytes + (64 << 10), mark=framing.DELIM)
        p["out"] = bytearray(hellos[channel])
        p["ready"] = False
        p["retry"] = 0.0
        peer_of[p["fd"]] = channel
        to_kernel(channel)

    def hang_up(channel: int, now: float, why: str = "") -> None:
        """The connection to one kernel socket ended: a violation unless the kernel's exit explains it."""
        p = peers[channel]
        if p["sock"] is None:
            return
        if p["flags"]:
            poller.unregister(p["fd"])
        peer_of.pop(p["fd"], None)
        p["sock"].close()
        p.update(sock=None, fd=-1, reader=None, out=bytearray(), ready=False, flags=0, retry=now + RETRY,
                 stalled=False)
        if why:
            violation(f"the kernel's {names[channel]} socket broke ZMTP: {why}")
        else:
            suspect.setdefault(names[channel], now + DISCONNECT_GRACE)

    def to_kernel(channel: int) -> None:
        """Write what the socket takes now; the rest waits for POLLOUT."""
        p = peers[channel]
        out_k = p["out"]
        if not out_k or p["sock"] is None:
            return
        try:
            n = p["sock"].send(out_k)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            hang_up(channel, time.monotonic())
            return
        del out_k[:n]

    def send_kernel(channel: int, parts: list[bytes]) -> None:
        p = peers[channel]
        if not p["ready"]:
            p["queued"].append(parts)
            return
        p["out"] += b"".join(zmtp.encode(parts))
        to_kernel(channel)

    def try_connect() -> bool:
        nonlocal connected, ino
        if ino >= 0 and not all(os.path.exists(p) for p in endpoints.values()):
            return False
        connected = True
        for channel in peers:
            dial(channel)
        if ino >= 0:
            poller.unregister(ino)
            os.close(ino)
            ino = -1
        return True

    # -- egress connections on the net channel ---------------------------------------------
    conns: dict[int, dict[str, Any]] = {}  # id -> sock, credit, pending (to the code), acked, reading, shut, flags
    by_fd: dict[int, int] = {}
    next_conn = [0]

    def net(op: int, cid: int, data: bytes = b"") -> None:
        emit(framing.encode_net(state["seq"], op, cid, limits, data))

    def drop(cid: int, tell_host: bool) -> None:
        c = conns.pop(cid, None)
        if c is None:
            return
        fd = c["sock"].fileno()
        by_fd.pop(fd, None)
        if c["flags"]:
            poller.unregister(fd)
        c["sock"].close()
        if tell_host:
            net(framing.NET_CLOSE, cid)

    def accept() -> None:
        assert listener is not None
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of fds (the code holds them): this connection waits in the backlog
                say(f"cannot accept an egress connection: {e}")
                return
            if len(conns) >= framing.NET_MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            cid = next_conn[0]
            next_conn[0] = (cid + 1) & 0xFFFFFFFF
            conns[cid] = {"sock": sock, "credit": framing.NET_WINDOW, "pending": bytearray(), "acked": 0,
                          "reading": True, "shut": False, "flags": 0}
            by_fd[sock.fileno()] = cid
            net(framing.NET_OPEN, cid)

    def conn_readable(cid: int) -> None:
        c = conns[cid]
        try:
            data = c["sock"].recv(min(c["credit"], framing.NET_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            drop(cid, True)
            return
        if not data:
            c["reading"] = False
            net(framing.NET_EOF, cid)
            return
        c["credit"] -= len(data)
        net(framing.NET_DATA, cid, data)

    def conn_write(cid: int) -> None:
        c = conns[cid]
        pending = c["pending"]
        try:
            while pending:
                n = c["sock"].send(pending)
                del pending[:n]
                c["acked"] += n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            drop(cid, True)
            return
        if c["acked"] and (c["acked"] >= framing.NET_WINDOW // 4 or not pending):
            net(framing.NET_CREDIT, cid, c["acked"].to_bytes(4, "big"))
            c["acked"] = 0
        if c["shut"] and not pending:
            try:
                c["sock"].shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the code closed it already; its reads say so
            c["shut"] = None  # done

    def from_host_net(parts: list[bytes]) -> None:
        op, cid, data = framing.decode_net(parts)
        c = conns.get(cid)
        if c is None:
            return  # closed here already; the host hears it from our close
        if op == framing.NET_DATA:
            if len(c["pending"]) + len(data) > framing.NET_WINDOW:
                say(f"the host sent more than the window on egress connection {cid}; closing it")
                drop(cid, True)
                return
            c["pending"] += data
            conn_write(cid)
        elif op == framing.NET_EOF:
            if c["shut"] is False:
                c["shut"] = True
                conn_write(cid)
        elif op == framing.NET_CLOSE:
            drop(cid, False)
        elif op == framing.NET_CREDIT:
            c["credit"] = min(c["credit"] + int.from_bytes(data, "big"), framing.NET_WINDOW)

    def net_interest() -> None:
        reading = state["queued"] < OUT_HWM
        for c in conns.values():
            flags = (select.POLLIN if c["reading"] and c["credit"] > 0 and reading else 0) | (
                select.POLLOUT if c["pending"] else 0)
            if flags != c["flags"]:
                if flags:
                    poller.register(c["sock"].fileno(), flags)
                else:
                    poller.unregister(c["sock"].fileno())
                c["flags"] = flags

    # -- the loop ---------------------------------------------------------------------------
    poller = select.poll()
    poller.register(0, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    pipes = {out_r: b"stdout", err_r: b"stderr"}
    for fd in pipes:
        poller.register(fd, select.POLLIN)
    if ino >= 0:
        poller.register(ino, select.POLLIN)
    if listener is not None:
        poller.register(listener.fileno(), select.POLLIN)
    listener_fd = listener.fileno() if listener is not None else -1
    decoder = framing.Decoder(limits, framing.TO_RELAY)
    writing = False
    last_rx = time.monotonic()
    suspect: dict[str, float] = {}  # a socket to the kernel disconnected: channel -> when it is a violation

    link({"type": "hello", "version": framing.VERSION, "kernel_pid": kernel})
    try_connect()

    def kernel_exited(status: int) -> None:
        for fd in list(pipes):
            try:
                while data := os.read(fd, 65536):
                    kernel_output(pipes[fd], data)
            except (BlockingIOError, OSError):
                pass
        code = os.waitstatus_to_exitcode(status)
        link({"type": "exit", "code": code if code >= 0 else None, "signal": -code if code < 0 else None,
              "tail": tail.decode(errors="replace")[-2048:]})
        drain_for(LAST_WORDS)
        kill_kernel()  # what the kernel left running dies with pid 1 anyway; say it here
        os._exit(code if code >= 0 else 128 - code)

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if os.WIFSTOPPED(status) or os.WIFCONTINUED(status):
                continue  # a traced child stopping (the code made pid 1 its tracer): not an exit
            if pid == kernel:
                kernel_exited(status)

    def from_host(frame: Any) -> None:
        if frame.channel == framing.LINK:
            msg = framing.decode_link(frame.parts)
            kind = msg["type"]
            if kind == "keepalive":
                link({"type": "keepalive"})
            elif kind == "resync":
                link({"type": "resync", "nonce": str(msg.get("nonce", ""))[:64]})
            elif kind == "bye":
                drain_for(1.0)
                end(0, "the host ended the sandbox")
            elif kind == "signal" and msg.get("signum") in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(kernel, msg["signum"])
                except ProcessLookupError:
                    pass  # exiting: its status follows
            return
        if frame.channel == framing.NET:
            from_host_net(frame.parts)
            return
        send_kernel(frame.channel, frame.parts)

    def kernel_message(channel: int, parts: list[bytes]) -> None:
        try:
            i = parts.index(framing.DELIM, 0, window)
        except ValueError:
            violation(f"the kernel sent a {names[channel]} message without the <IDS|MSG> delimiter", len(parts))
            return
        # an idle status ends an execution (the client waits for it): it leaves at once, with what was held
        urgent = channel != framing.IOPUB or (
            len(parts) > i + 5 and b'"status"' in parts[i + 2] and b'"idle"' in parts[i + 5])
        try:
            emit(framing.encode(channel, state["seq"], parts[i:] if i else parts, limits), urgent)
        except framing.FramingError as e:  # too many parts ("count"): no Jupyter message has that many
            violation(f"the kernel sent a {names[channel]} message that breaks the bounds: {e}",
                      len(parts) if e.kind == "count" else None, i)

    def from_kernel(channel: int, now: float) -> None:
        """Decode what the kernel sent, reading more while the output queue has room."""
        p = peers[channel]
        reader = p["reader"]
        p["stalled"] = False
        while True:
            try:
                item = reader.next()
            except zmtp.ZmtpError as e:
                hang_up(channel, now, str(e))
                return
            if item is None:
                if state["queued"] >= OUT_HWM:
                    p["stalled"] = True  # what the reader holds waits for room
                    return
                try:
                    data = p["sock"].recv(limits.read_chunk)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data = b""
                if not data:
                    hang_up(channel, now)
                    return
                reader.feed(data)
                continue
            kind, value = item
            if kind == "message":
                if p["ready"]:
                    kernel_message(channel, value)
                    if state["queued"] >= OUT_HWM:
                        p["stalled"] = True
                        return
                    continue
                hang_up(channel, now, "a message before its READY")
                return
            if kind == "refused":  # skipped, not held; too many parts is a shape the host can word
                at = value.mark_at if value.mark_at is not None and value.mark_at < window else None
                violation(f"the kernel sent on {names[channel]} {value.why}",
                          value.parts if value.bound == "parts" else None, at)
            elif kind == "command":
                name, data = value
                if name == b"READY" and not p["ready"]:
                    try:
                        zmtp.properties(data)
                    except zmtp.ZmtpError as e:
                        hang_up(channel, now, str(e))
                        return
                    p["ready"] = True
                    if channel == framing.IOPUB:
                        p["out"] += zmtp.SUBSCRIBE_ALL
                    queued, p["queued"] = p["queued"], []
                    for parts in queued:
                        p["out"] += b"".join(zmtp.encode(parts))
                    to_kernel(channel)
                    if p["sock"] is None:
                        return
                elif name == b"PING":
                    p["out"] += zmtp.pong(data)
                    to_kernel(channel)
                    if p["sock"] is None:
                        return
                elif name == b"ERROR":
                    hang_up(channel, now, f"the kernel refused the connection: {data[1:].decode(errors='replace')}")
                    return
                # anything else (PONG, a command of a later ZMTP): nothing to do

    while True:
        now = time.monotonic()
        deadline = last_rx + orphan_timeout
        if suspect:
            deadline = min(deadline, min(suspect.values()))
        want_kernel = state["queued"] < OUT_HWM
        if want_kernel and connected:
            for channel, p in peers.items():
                if p["stalled"] and p["sock"] is not None:
                    from_kernel(channel, now)
            want_kernel = state["queued"] < OUT_HWM
        if connected:
            for channel, p in peers.items():
                if p["sock"] is None:
                    if now >= p["retry"]:
                        dial(channel)
                    if p["sock"] is None:
                        deadline = min(deadline, p["retry"])
                        continue
                flags = (select.POLLIN if want_kernel else 0) | (select.POLLOUT if p["out"] else 0)
                if flags != p["flags"]:
                    if flags:
                        poller.register(p["fd"], flags)
                    else:
                        poller.unregister(p["fd"])
                    p["flags"] = flags
        want_write = bool(out) and state["urgent"]
        if want_write != writing:
            writing = want_write
            if writing:
                poller.register(1, select.POLLOUT)
            else:
                poller.unregister(1)
        if conns:
            net_interest()
        if out and not state["urgent"]:
            deadline = min(deadline, state["hold"])
        events = poller.poll(max(int((deadline - now) * 1000) + 1, 0))
        now = time.monotonic()
        for what, mask in events:
            if what == 0:
                try:
                    data = os.read(0, limits.read_chunk)
                except BlockingIOError:
                    continue
                if not data:
                    end(0, "the host closed the stream (stdin ended)")
                last_rx = now
                while True:
                    try:
                        if data:
                            chunk, data = data, b""
                            decoder.feed(chunk)
                        frame = decoder.next()
                        if frame is None:
                            break
                        from_host(frame)
                    except framing.FramingError as e:
                        link({"type": "desync", "kind": e.kind, "error": str(e)})
                        decoder.hunt()
            elif what == wake_r:
                try:
                    sigs = os.read(wake_r, 256)
                except BlockingIOError:
                    sigs = b""
                for sig in sigs:
                    if sig in (signal.SIGTERM, signal.SIGINT):
                        try:
                            os.kill(kernel, sig)
                        except ProcessLookupError:
                            pass
                if signal.SIGCHLD in sigs:
                    reap()
            elif what in pipes:
                try:
                    data = os.read(what, 65536)
                except BlockingIOError:
                    continue
                if data:
                    kernel_output(pipes[what], data)
                else:
                    poller.unregister(what)
                    os.close(what)
                    del pipes[what]
            elif what in peer_of:
                channel = peer_of[what]
                if mask & select.POLLOUT:
                    to_kernel(channel)
                if mask & (select.POLLIN | select.POLLERR | select.POLLHUP) and peers[channel]["fd"] == what:
                    from_kernel(channel, now)
            elif what == ino:
                try:
                    os.read(ino, 4096)
                except BlockingIOError:
                    pass
                try_connect()
            elif what == listener_fd:
                accept()
            elif what in by_fd:
                if mask & select.POLLOUT and by_fd[what] in conns:
                    conn_write(by_fd[what])
                if mask & (select.POLLIN | select.POLLERR | select.POLLHUP) and what in by_fd:
                    conn_readable(by_fd[what])
            # else: stdout's POLLOUT (the flush below), or a connection dropped earlier in this round
        for name, at in list(suspect.items()):
            if now >= at:
                reap()  # an exit explains it (and does not return)
                violation(f"the kernel's {name} socket closed its connection while the kernel runs")
                del suspect[name]
        if out:
            if state["urgent"] or state["queued"] >= HOLD_BYTES or (state["hold"] and now >= state["hold"]):
                state["urgent"] = not flush()  # what the pipe did not take leaves as soon as it can
                state["hold"] = 0.0
            elif not state["hold"]:
                state["hold"] = now + IOPUB_HOLD
        if now >= last_rx + orphan_timeout:
            end(0, f"no keepalive from the host for {orphan_timeout:g} s: the host is gone, ending the sandbox")


if __name__ == "kernelexec_relay":
    main(BOOT)  # type: ignore[name-defined]  # noqa: F821  (given by BOOTSTRAP)
