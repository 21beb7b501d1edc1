"""Code run inside the kernel at startup (sent as source; never imported on the host).

It makes ordinary output friendlier and cheaper to carry, nothing more: the
code in the sandbox can undo all of it, so none of it is a security boundary.
The host enforces its own bounds on everything the kernel sends.

* numpy 2 shows ``np.int64(6)``; agents and people read ``6``. Formatters are
  registered by type name, so numpy is only imported if the code imports it.
* IPython 9 keeps a copy of every byte written to stdout/stderr in
  ``history_manager.outputs`` for the life of the kernel: a long agent session
  grows without bound and one large print is an out-of-memory kill. It is not
  kept here (the host has the output).
* matplotlib builds its font list on first import (half a second); the image
  carries one built at image build time, copied into the tmpfs home here.
* Children the code forked and left to die stay zombies of the kernel and
  keep their pids: after a fork bomb the pids limit would stay exhausted. They
  are reaped around every cell, except those a ``subprocess.Popen`` or a
  ``multiprocessing`` process still owns (their exit status is theirs to read).
* A kernel whose host process died (SIGKILL, power loss of the agent) would
  run until someone calls ``kernelexec gc``. The kernel listens on an
  ``owner`` socket that the host keeps one idle connection to; a watchdog
  thread blocks on it, and once the host has been gone for
  ``KERNELEXEC_ORPHAN_TIMEOUT`` seconds the kernel exits, the container stops
  by itself, and ``gc`` (or the next start on the host) removes it.
* Every message leaves as valid UTF-8 JSON that fits the host's frame limit
  (``KERNELEXEC_MAX_MESSAGE``). A lone surrogate (a file name decoded with
  ``surrogateescape``, ``"\\ud800"``) in any string of any message becomes U+FFFD, as a
  terminal shows it; jupyter_client would send invalid UTF-8, or fail to send
  at all. A message that would exceed the limit (the echo of a huge cell, an
  exception whose message is 20 MB) has its longest strings cut, with a marker,
  instead of making the host drop the connection and the session with it.
* Output beyond ``KERNELEXEC_MAX_OUTPUT`` bytes per cell is dropped here, with
  a marker, so that a 1 GB print or a 200 MB figure is cut before it crosses
  the socket instead of being refused by the host.
* ``%pip install`` either works (a session with ``Policy.egress``: pip reaches the index through
  the egress port, installs into the session's site directory, and the package imports at once)
  or says in one line why it cannot, instead of a minute of pip retrying a network that is not
  there. On the ipc transport a small forwarder process carries the egress port's connections to
  the host's socket; on attach the relay (pid 1) carries them itself.
"""

# This file is executed with exec() in the kernel's namespace; keep its names private.

# The ipc transport's egress forwarder: its own process (the code cannot stall it by holding the
# GIL), handed the listening socket already bound so no connection can come before it listens.
_KERNELEXEC_FORWARDER = """
import asyncio, os, socket, sys
listener = socket.socket(fileno=int(sys.argv[1]))
path = sys.argv[2]
async def pump(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except (ConnectionError, OSError):
        w.close()
held = set()
async def serve(r, w):
    me = asyncio.current_task()
    held.add(me)  # Python 3.11.2's server keeps only a weak reference to a connection's task
    try:
        try:
            ur, uw = await asyncio.open_unix_connection(path)
        except OSError:
            w.close()
            return
        try:
            await asyncio.gather(pump(r, uw), pump(ur, w))
        finally:
            uw.close()
            w.close()
    finally:
        held.discard(me)
async def main():
    server = await asyncio.start_server(serve, sock=listener, limit=1 << 16)
    await server.serve_forever()
asyncio.run(main())
"""


def _kernelexec_egress(ip) -> None:  # type: ignore[no-untyped-def]
    import os

    port = os.environ.get("KERNELEXEC_EGRESS_PORT", "")
    if not port:
        def no_pip(line: str = "", cell: object = None) -> None:
            import sys

            print("kernelexec: %pip cannot reach a package index: this sandbox has no network egress. Ask for "
                  "the package in the image (`kernelexec image build --with PKG`, or packages= in the policy or "
                  "profile), or allow an index: Policy(egress=('pypi',))", file=sys.stderr)

        ip.register_magic_function(no_pip, "line", "pip")
        return

    # pip's --prefix makes the site-packages directory on the first install; made now, so that the path
    # entry (PYTHONPATH) is a directory the import system looks into, not one it noted as missing
    import sys

    site = os.environ.get("PYTHONPATH", "")
    if site.startswith(os.environ.get("PIP_PREFIX", "") or "-"):
        os.makedirs(site, exist_ok=True)
        sys.path_importer_cache.pop(site, None)

    sock = os.environ.get("KERNELEXEC_EGRESS_SOCKET", "")
    if sock:
        import socket
        import subprocess

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", int(port)))
        listener.listen(64)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _KERNELEXEC_FORWARDER, str(listener.fileno()), sock],  # noqa: F821
            pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        listener.close()
        ip.user_ns_hidden["_kernelexec_forwarder"] = proc  # held: its exit status is ours to read

    pip = ip.find_line_magic("pip")
    if pip is not None:
        def pip_then_import(line: str = "") -> None:
            import importlib

            pip(line)
            importlib.invalidate_caches()  # what pip just wrote is importable in the next line

        ip.register_magic_function(pip_then_import, "line", "pip")


def _kernelexec_safe_messages(ip) -> None:  # type: ignore[no-untyped-def]
    import json
    import os
    import re

    from jupyter_client.jsonutil import json_clean, json_default

    session = ip.kernel.session
    lone = re.compile("[\ud800-\udfff]")
    limit = int(os.environ.get("KERNELEXEC_MAX_MESSAGE", "0") or 0)

    def repair(obj):  # type: ignore[no-untyped-def]
        if isinstance(obj, str):
            return lone.sub("\ufffd", obj)
        if isinstance(obj, dict):
            return {repair(k): repair(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [repair(v) for v in obj]
        return obj

    def pack(obj, cleaned=False):  # type: ignore[no-untyped-def]
        try:
            return json.dumps(obj, default=json_default, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except UnicodeEncodeError:
            return pack(repair(obj), cleaned)
        except (TypeError, ValueError):
            if cleaned:
                raise
            # NaN, or a value JSON cannot hold: cleaned as jupyter_client's own fallback does
            return pack(json_clean(obj), True)

    session.pack = pack
    if limit <= 0:
        return
    marker = f"\n[kernelexec: cut to fit a {limit}-byte message]\n"
    serialize = session.serialize

    def cut(obj, cap):  # type: ignore[no-untyped-def]
        if isinstance(obj, str):
            return obj if len(obj) <= cap else obj[:cap] + marker
        if isinstance(obj, dict):
            return {k: cut(v, cap) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = list(obj)
            if len(items) > cap:  # a list of many short strings: keep both ends
                items = items[: cap // 2] + [marker] + items[-(cap // 2):]
            return [cut(v, cap) for v in items]
        return obj

    def bounded_serialize(msg, ident=None):  # type: ignore[no-untyped-def]
        frames = serialize(msg, ident)
        if max(len(f) for f in frames) <= limit:
            return frames
        msg = dict(msg)
        cap = limit // 4
        while cap >= 16:
            # JSON escaping can make a character six bytes: shrink until it fits
            msg["content"] = cut(msg.get("content", {}), cap)
            msg["metadata"] = cut(msg.get("metadata", {}), cap)
            frames = serialize(msg, ident)
            if max(len(f) for f in frames) <= limit:
                return frames
            cap //= 4
        msg["content"], msg["metadata"] = {}, {}
        return serialize(msg, ident)

    session.serialize = bounded_serialize


def _kernelexec_setup() -> None:
    import os
    import sys
    import types

    ip = get_ipython()  # type: ignore[name-defined]  # noqa: F821

    _kernelexec_safe_messages(ip)  # noqa: F821  (defined above; deleted from the namespace after setup)

    # Tracebacks show the user's code only: an interrupt raised by the launcher's signal handler, or
    # inside the output wrappers below, would otherwise end in frames of /run/kernelexec/*.py.
    ours = "/run/kernelexec/"  # policy.SOCKET_MOUNT: launch.py and this file, as the kernel sees them
    itb = ip.InteractiveTB
    structured_traceback = itb.structured_traceback

    def theirs(tb):  # type: ignore[no-untyped-def]
        kept = []
        while tb is not None:
            if not tb.tb_frame.f_code.co_filename.startswith(ours):
                kept.append(tb)
            tb = tb.tb_next
        out = None
        for t in reversed(kept):
            out = types.TracebackType(out, t.tb_frame, t.tb_lasti, t.tb_lineno)
        return out

    def user_traceback(etype, evalue, etb=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        filtered = theirs(etb)
        return structured_traceback(etype, evalue, filtered if filtered is not None else etb, *args, **kwargs)

    itb.structured_traceback = user_traceback

    prebuilt = "/opt/kernel/share/matplotlib"
    if os.path.isdir(prebuilt):
        import shutil

        cache = os.path.join(os.path.expanduser("~"), ".cache", "matplotlib")
        if not os.path.exists(cache):
            shutil.copytree(prebuilt, cache)

    class _Forget(dict):
        """Accepts writes, keeps nothing."""

        def __contains__(self, key: object) -> bool:
            return False

        def __getitem__(self, key: object) -> list:
            return []

    if hasattr(ip.history_manager, "outputs"):
        ip.history_manager.outputs = _Forget()
    fmt = ip.display_formatter.formatters["text/plain"]
    for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                 "float32", "float64", "longdouble", "complex64", "complex128", "bool", "bool_", "str_",
                 "bytes_"):
        fmt.for_type_by_name("numpy", name, lambda o, p, cycle: p.text(str(o)))

    import subprocess
    import weakref

    popens: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()
    execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def tracked_execute_child(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = execute_child(self, *args, **kwargs)
        popens.add(self)
        return result

    subprocess.Popen._execute_child = tracked_execute_child  # type: ignore[attr-defined]
    me = str(os.getpid())

    def reap(*_: object) -> None:
        # one system call in the usual case, no exited child at all (it reaps nothing: WNOWAIT)
        try:
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return
        except ChildProcessError:
            return
        owned = {p.pid for p in list(popens) if p.returncode is None}
        mp = sys.modules.get("multiprocessing.process")
        if mp is not None:
            owned |= {c.pid for c in list(getattr(mp, "_children", ())) if c.pid}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] == b"Z" and fields[1].decode() == me and int(entry) not in owned:
                try:
                    os.waitpid(int(entry), os.WNOHANG)
                except ChildProcessError:
                    pass  # reaped meanwhile by whoever owns it

    ip.events.register("pre_execute", reap)
    ip.events.register("post_execute", reap)

    # The container's peak memory, for the host's audit log: read here in microseconds from the
    # container's own cgroup (the engine's stats endpoint takes about a second). The code could
    # forge it; the host records it as the kernel's report, and Docker's OOM verdict stays authoritative.
    peak_fd = -1
    for path in ("/sys/fs/cgroup/memory.peak", "/sys/fs/cgroup/memory/memory.max_usage_in_bytes",
                 "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            peak_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            break
        except OSError:
            continue
    if peak_fd >= 0:
        kernel = ip.kernel
        finish_metadata = kernel.finish_metadata

        def with_memory_peak(parent, metadata, reply_content):  # type: ignore[no-untyped-def]
            metadata = finish_metadata(parent, metadata, reply_content)
            try:
                metadata["kernelexec"] = {"memory_peak": int(os.pread(peak_fd, 32, 0))}
            except (OSError, ValueError):
                pass  # the figure is optional; the reply is not
            return metadata

        kernel.finish_metadata = with_memory_peak

    orphan_after = float(os.environ.get("KERNELEXEC_ORPHAN_TIMEOUT", "0") or 0)
    owner_path = os.environ.get("KERNELEXEC_OWNER_SOCKET", "")
    if orphan_after > 0 and owner_path:
        import socket
        import threading

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bound under another name and renamed once listening: the host connects as soon as the name exists
        listener.bind(owner_path + ".tmp")
        listener.listen(1)
        os.rename(owner_path + ".tmp", owner_path)
        listener.settimeout(orphan_after)

        def watchdog() -> None:
            while True:
                try:
                    conn, _ = listener.accept()  # no owner within the timeout: orphaned
                except TimeoutError:
                    os._exit(0)
                with conn:
                    while conn.recv(4096):  # returns b"" once the owner's process is gone
                        pass

        threading.Thread(target=watchdog, name="kernelexec-orphan-watchdog", daemon=True).start()

    # exit() and quit() end the code as they end a Python script: SystemExit, whose status the host reads
    # (``kernelexec run`` exits with it). ipykernel's own ask for a kernel shutdown that a sandbox, owned
    # by its session, never does: the call returned and the code after it went on running.
    from IPython.core.autocall import IPyAutocall

    class _Exit(IPyAutocall):
        rewrite = False  # bare `exit` calls it too, as in IPython

        def __init__(self, name: str) -> None:
            super().__init__(ip)
            self._name = name

        def __repr__(self) -> str:
            return f"Use {self._name}() or {self._name}(status) to end the code"

        def __call__(self, code: object = None) -> None:
            raise SystemExit(code)

    for name in ("exit", "quit"):
        ip.user_ns[name] = ip.user_ns_hidden[name] = _Exit(name)

    _kernelexec_egress(ip)  # noqa: F821  (defined above; deleted from the namespace after setup)

    # A kernel's first cell pays for lazy imports and first-use set-up (about 5 ms); a pooled session's
    # first user gets that cell. Run one silent cell now, while the host is still waiting for the kernel.
    ip.run_cell("1", store_history=False, silent=True)
    ip.display_formatter.format(1)

    limit = int(os.environ.get("KERNELEXEC_MAX_OUTPUT", "0") or 0)
    if limit <= 0:
        return
    SMALL_RESULT = 64 * 1024
    marker = f"\n[kernelexec: output truncated at {limit} bytes; raise Policy.max_output_bytes to keep more]\n"
    state = {"used": 0, "cut": False}

    def reset(*_: object) -> None:
        state["used"] = 0
        state["cut"] = False

    ip.events.register("pre_execute", reset)

    def take(n: int) -> int:
        room = max(limit - state["used"], 0)
        state["used"] += min(n, room)
        return room

    # IPython 9 re-assigns each stream's ``write`` around every cell (to tee it
    # into history). A subclass whose ``write`` is a data descriptor keeps ours
    # in place and ignores those assignments.
    base = type(sys.stdout)
    original = base.write

    def write(self, text):  # type: ignore[no-untyped-def]
        if state["cut"]:
            return len(text)
        room = take(len(text))
        if len(text) <= room:
            return original(self, text)
        state["cut"] = True
        original(self, text[:room] + marker)
        return len(text)

    capped = type("CappedOutStream", (base,), {
        "write": property(lambda self: types.MethodType(write, self), lambda self, value: None),
    })
    for stream in (sys.stdout, sys.stderr):
        if type(stream) is base:
            vars(stream).pop("write", None)
            stream.__class__ = capped

    def too_big(data: dict) -> bool:
        # 512: what a message costs on the wire besides its data (headers, signature)
        size = 512 + sum(len(v) if isinstance(v, (str, bytes)) else 64 for v in data.values())
        if state["cut"] or size > limit - state["used"]:
            return True
        take(size)
        return False

    pub = ip.display_pub
    original_publish = pub.publish

    def publish(data, metadata=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(data, dict) and too_big(data):
            if not state["cut"]:
                state["cut"] = True
                data, metadata = {"text/plain": marker.strip()}, {}
            else:
                return None
        return original_publish(data, metadata, *args, **kwargs)

    pub.publish = publish

    hook = ip.displayhook
    original_write = hook.write_format_data

    def write_format_data(format_dict, md_dict=None):  # type: ignore[no-untyped-def]
        # the cell's value is what an agent reads first: a small one always passes
        small = isinstance(format_dict, dict) and sum(len(str(v)) for v in format_dict.values()) <= SMALL_RESULT
        if not small and isinstance(format_dict, dict) and too_big(format_dict):
            state["cut"] = True
            format_dict, md_dict = {"text/plain": marker.strip()}, {}
        return original_write(format_dict, md_dict)

    hook.write_format_data = write_format_data


_kernelexec_setup()
del _kernelexec_setup, _kernelexec_safe_messages, _kernelexec_egress, _KERNELEXEC_FORWARDER
