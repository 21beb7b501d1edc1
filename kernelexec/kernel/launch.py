"""The kernel's main program: ipykernel, minus the waits between threads.

Run inside the container as ``python /run/kernelexec/launch.py -f <connection file>``
(sent as source, like :mod:`kernelexec.kernel.startup`; never imported on the host).
It speaks the unchanged Jupyter protocol; only where ipykernel spends its time
differs. Measured for ``1+1`` with ipykernel 7.4 on a 2-core host, a stock kernel
takes about 3.6 ms from ``execute_request`` to ``idle``, and little of it executes
code:

* Every IOPub message (``busy``, ``execute_input``, each output, ``idle``) is
  handed to the IOPub thread, which needs the GIL that the main thread holds
  while it runs the cell: ``busy`` leaves the kernel about 1 ms after it was
  published.
* ``sys.stdout.flush()`` is a round trip to that thread (schedule, then wait
  for an event). ipykernel and IPython flush six times per ``execute_request``.
* Shell messages cross a "shell channel" thread both ways (for subshells).
* ``Kernel._execute_sleep`` sleeps 0.5 ms before each reply, a workaround for
  flushed output arriving after the reply.

Here a thread that publishes sends on the IOPub socket itself, under one lock
that also guards the IOPub thread's own use of the socket (ZeroMQ sockets may
move between threads behind a lock), so messages leave in the order they were
published and flushes are synchronous; the main thread owns the shell socket;
and the sleep is gone, because the flush it waited for has completed before the
reply is built. The IOPub thread stays for what needs a loop: subscription
greetings and the timed flush of output written by background threads.

What is given up: kernel subshells (JEP 91), which need the shell channel
thread; a client that asks for them sees the feature missing from
``kernel_info``. ``Policy(fast_kernel=False)`` runs the stock launcher.

A send can be split by a Python signal handler (``KeyboardInterrupt`` from an
interrupt) between the frames of one message, which would leave half a message
on the socket. Sends run with the kernel's SIGINT handler deferred: an
interrupt that arrives mid-send is raised right after it.

Anything this module does not recognise (another ipykernel) makes it run the
stock kernel and say so on stderr.
"""

import os
import sys

# `python launch.py` puts this script's directory first on sys.path; a kernel started with
# `python -m ipykernel_launcher` has its working directory there instead (/work, the user's files).
sys.path[0] = os.getcwd()


#: How long a send waits for a subscriber with no room before that message is dropped.
SEND_WAIT = 10.0


def _fast_app():  # type: ignore[no-untyped-def]
    import signal
    import threading

    import zmq
    from ipykernel import iostream, kernelapp
    from ipykernel.ipkernel import IPythonKernel
    from ipykernel.kernelapp import IPKernelApp
    from zmq.eventloop.zmqstream import ZMQStream

    for cls, names in ((iostream.IOPubThread, ("schedule", "_really_send", "_setup_xpub_listener", "_handle_event")),
                       (iostream.OutStream, ("_flush", "_schedule_flush", "flush")),
                       (IPythonKernel, ("execute_request", "pre_handler_hook", "_execute_sleep")),
                       (ZMQStream, ("_handle_events", "_update_handler", "flush")),
                       (kernelapp, ("IOPubThread",)),
                       (IPKernelApp, ("init_sockets", "init_iopub", "init_io", "shell_channel_thread"))):
        missing = [n for n in names if not hasattr(cls, n)]
        if missing:
            raise RuntimeError(f"{getattr(cls, '__qualname__', cls.__name__)} has no {', '.join(missing)}")

    main_thread = threading.main_thread()
    # Python runs signal handlers in the main thread: only its own sends defer an interrupt
    sigint = {"sending": 0, "pending": False}

    def deferring_int_handler(signum, frame):  # type: ignore[no-untyped-def]
        if sigint["sending"]:
            sigint["pending"] = True
            return
        raise KeyboardInterrupt

    class LockedStream(ZMQStream):
        """The IOPub thread's reader of subscriptions; every socket call under the send lock."""

        lock = threading.RLock()

        def _handle_events(self, fd, events):  # type: ignore[no-untyped-def]
            with self.lock:
                return super()._handle_events(fd, events)

        def _update_handler(self, state):  # type: ignore[no-untyped-def]
            with self.lock:
                return super()._update_handler(state)

    class DirectIOPub(iostream.IOPubThread):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.lock = threading.RLock()
            self._locked_stream: LockedStream | None = None  # the subscription reader, once there is one
            self._sender: int | None = None  # the thread inside _really_send, set under the lock
            super().__init__(*args, **kwargs)
            # a lock held by another thread at fork() stays held forever in the child
            os.register_at_fork(after_in_child=self._new_lock)
            self.dropped = 0
            if hasattr(self.socket, "getsockopt") and self.socket.getsockopt(zmq.TYPE) == zmq.XPUB:
                # A PUB socket drops what a subscriber has no room for. Sending from the publishing thread
                # makes a print loop faster than a busy host reads, and output vanished. Now a full
                # subscriber slows the printer down (backpressure) and only one that takes no message
                # for SEND_WAIT seconds loses some, counted in `dropped`.
                self.socket.setsockopt(zmq.XPUB_NODROP, 1)
                self.socket.setsockopt(zmq.SNDTIMEO, int(SEND_WAIT * 1000))

        def _new_lock(self) -> None:
            self.lock = threading.RLock()
            if self._locked_stream is not None:
                self._locked_stream.lock = self.lock

        def _setup_xpub_listener(self) -> None:
            if not hasattr(self.socket, "getsockopt") or self.socket.getsockopt(zmq.TYPE) != zmq.XPUB:
                return
            stream = LockedStream.__new__(LockedStream)
            stream.lock = self.lock
            ZMQStream.__init__(stream, self.socket, self.io_loop)
            stream.on_recv(self._handle_subscription)
            self._xpub_stream = self._locked_stream = stream

        def schedule(self, f):  # type: ignore[no-untyped-def]
            if not self.thread.is_alive():
                f()
                return
            if self._sender == threading.get_ident():
                # published from inside a send (a signal handler of the code that prints or displays):
                # nesting would put its frames inside the current message; the IOPub thread sends it after
                super().schedule(f)
                return
            with self.lock:
                f()
            if self._locked_stream is not None:
                # A send processes the socket's pending commands, a new subscription among them,
                # and so may consume the edge of ZMQ_FD that the IOPub thread waits on.
                with self.lock:
                    readable = not self.closed and self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN
                if readable:
                    self.io_loop.add_callback(self._locked_stream._handle_events, self._locked_stream.socket, 0)

        def _handle_event(self, msg):  # type: ignore[no-untyped-def]
            with self.lock:  # what was queued for this thread sends on the same socket
                return super()._handle_event(msg)

        def _really_send(self, msg, *args, **kwargs):  # type: ignore[no-untyped-def]
            outer, self._sender = self._sender, threading.get_ident()
            try:
                if threading.current_thread() is not main_thread:
                    super()._really_send(msg, *args, **kwargs)
                    return
                sigint["sending"] += 1
                try:
                    super()._really_send(msg, *args, **kwargs)
                finally:
                    sigint["sending"] -= 1
            except zmq.Again:
                self.dropped += 1  # no subscriber took a message for SEND_WAIT seconds (see __init__)
            finally:
                self._sender = outer
            if sigint["pending"] and not sigint["sending"]:
                sigint["pending"] = False
                raise KeyboardInterrupt

    # Per thread: the streams it is inside write() or _flush() of. A signal handler that flushes can
    # run in the middle of either; flushing there would send and close the buffer being appended to or
    # rotated, so that flush goes to the IOPub thread instead (nested writes are fine: they append).
    busy = threading.local()

    class DirectOutStream(iostream.OutStream):
        def _enter(self) -> bool:
            inside = busy.__dict__.setdefault("streams", set())
            if id(self) in inside:
                return False
            inside.add(id(self))
            return True

        def _is_busy(self) -> bool:
            return id(self) in busy.__dict__.get("streams", ())

        def write(self, string):  # type: ignore[no-untyped-def]
            entered = self._enter()
            try:
                return super().write(string)
            finally:
                if entered:
                    busy.streams.discard(id(self))

        def _flush(self) -> None:
            lock = getattr(self.pub_thread, "lock", None)
            if lock is None:
                return super()._flush()
            with lock:  # chunks taken from the buffer leave in the order they were taken
                entered = self._enter()
                try:
                    return super()._flush()
                finally:
                    if entered:
                        busy.streams.discard(id(self))

        def _schedule_flush(self) -> None:
            if self._flush_pending:
                return
            self._flush_pending = True
            # call_later is not thread-safe; add_callback is
            self._io_loop.add_callback(self._io_loop.call_later, self.flush_interval, self._flush)

        def flush(self) -> None:
            if self.pub_thread is None or not hasattr(self.pub_thread, "lock"):
                return super().flush()
            if self._is_busy():
                self._io_loop.add_callback(self._flush)
                return
            self._flush()

    class FastKernel(IPythonKernel):
        _execute_sleep = 0.0

        def pre_handler_hook(self):  # type: ignore[no-untyped-def]
            self.saved_sigint_handler = signal.signal(signal.SIGINT, deferring_int_handler)

        async def execute_request(self, stream, ident, parent):  # type: ignore[no-untyped-def]
            await super().execute_request(stream, ident, parent)
            if isinstance(stream, ZMQStream):
                stream.flush(zmq.POLLOUT)  # the reply leaves now, not after idle

    class FastApp(IPKernelApp):
        kernel_class = FastKernel

        def init_sockets(self):  # type: ignore[no-untyped-def]
            super().init_sockets()
            thread, self.shell_channel_thread = self.shell_channel_thread, None
            if thread is not None:
                thread.io_loop.close()

        def init_iopub(self, context):  # type: ignore[no-untyped-def]
            real = kernelapp.IOPubThread
            setattr(kernelapp, "IOPubThread", DirectIOPub)  # noqa: B010 (a class replaced for one call)
            try:
                super().init_iopub(context)
            finally:
                setattr(kernelapp, "IOPubThread", real)  # noqa: B010

        def initialize(self, argv=None):  # type: ignore[no-untyped-def]
            super().initialize(argv)
            # traitlets leaves the logger at DEBUG and filters in the handler: four log records were
            # built per request only to be dropped
            self.log.setLevel(self.log_level)

        def init_io(self):  # type: ignore[no-untyped-def]
            super().init_io()
            for name in ("stdout", "stderr"):
                stream = getattr(sys, name)
                if type(stream) is iostream.OutStream:
                    stream.__class__ = DirectOutStream

    return FastApp


def main() -> None:
    try:
        app = _fast_app()
    except Exception as e:  # an ipykernel this module was not written for: stock kernel, said aloud
        print(f"kernelexec: running the stock ipykernel ({type(e).__name__}: {e})", file=sys.stderr)
        from ipykernel.kernelapp import IPKernelApp as app
    app.launch_instance()


if __name__ == "__main__":
    main()
