"""Forwards a port on this host's loopback to a port on the loopback of another network namespace.

The test engine lives in a network namespace of its own (so nothing it does to network interfaces reaches
this host: dockerd with --bridge=none deletes any interface named docker0 it sees). This relay is the wire
to it: a dumb byte pipe, TLS stays end to end between client and dockerd.

Usage: python relay.py LISTEN_PORT /proc/PID/ns/net TARGET_PORT   (prints "ready" once listening)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    with contextlib.suppress(OSError):
        dst.write_eof()


async def serve(listener: socket.socket, target_port: int) -> None:
    # asyncio (3.11) keeps a connection's handler task only through its protocol: a connection whose
    # far end vanished can be collected with its task still waiting ("Task was destroyed but it is
    # pending"). Strong references until each ends.
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        task.add_done_callback(handlers.discard)
        # asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and an accepted socket of a
        # listener made with socket.socket() says 0: without this, Nagle's algorithm meets delayed
        # ACKs and most round trips through the relay pay 40 ms (measured)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    server = await asyncio.start_server(handle, sock=listener)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen_port, netns, target_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))  # in this host's namespace: created before the switch
    listener.listen(64)
    fd = os.open(netns, os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:  # single-threaded here: the whole process moves
        raise OSError(ctypes.get_errno(), f"setns({netns})")
    os.close(fd)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listener, target_port))


if __name__ == "__main__":
    main()
