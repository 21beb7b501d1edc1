"""Throughput of the egress proxy alone: a download through a ``CONNECT`` tunnel on loopback, and the same
bytes without the proxy, interleaved round by round so that noise lands on both.

What this measures is the host-side proxy (its head parsing, checks and the splice over
:class:`~kernelexec.backend.base.StreamPair`), not the transport that carries the sandbox's connection to
it: the end-to-end figure (the code in the container downloading through the proxy port) belongs to the
session's benchmark. ``python -m benchmarks.egress`` writes ``benchmarks/results/egress.json``;
``python -m benchmarks --only egress`` includes it in the main results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernelexec.backend.base import StreamPair
from kernelexec.egress.proxy import EgressEvent, EgressLimits, EgressProxy, UpstreamProxies
from kernelexec.egress.rules import parse_egress

from .stats import summary

CHUNK = 1 << 20
Log = Callable[[str], None]


async def _download(port: int, size: int, *, via_proxy: int | None) -> float:
    """Seconds to read ``size`` bytes from the server on ``port``, directly or through the proxy."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", via_proxy or port)
    try:
        if via_proxy:
            writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            await writer.drain()
            answer = await reader.readuntil(b"\r\n\r\n")
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the proxy refused the benchmark's CONNECT: {answer!r}")
        got = 0
        while data := await reader.read(CHUNK):
            got += len(data)
    finally:
        writer.close()
        await writer.wait_closed()
    if got != size:
        raise RuntimeError(f"read {got} bytes, expected {size}")
    return time.perf_counter() - started


async def run(size_mb: int = 50, rounds: int = 5, log: Log = print) -> dict[str, Any]:
    size = size_mb << 20
    block = b"x" * CHUNK

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(size // CHUNK):
                writer.write(block)
                await writer.drain()
            writer.write(block[: size % CHUNK])
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()

    events: list[EgressEvent] = []
    target = await asyncio.start_server(send, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    proxy = EgressProxy(parse_egress([f"127.0.0.1:{port}"]), EgressLimits(max_bytes=4 * size * rounds),
                        events.append, upstream=UpstreamProxies())
    front = await asyncio.start_server(lambda r, w: proxy.handle(StreamPair(r, w)), "127.0.0.1", 0)
    direct: list[float] = []
    proxied: list[float] = []
    try:
        async with target, front:
            await _download(port, size, via_proxy=front.sockets[0].getsockname()[1])  # warm-up
            for i in range(rounds):
                direct.append(await _download(port, size, via_proxy=None))
                proxied.append(await _download(port, size, via_proxy=front.sockets[0].getsockname()[1]))
                log(f"egress round {i + 1}/{rounds}: direct {size_mb / direct[-1]:.0f} MB/s, "
                    f"proxy {size_mb / proxied[-1]:.0f} MB/s")
    finally:
        await proxy.aclose()
    if any(e.verdict != "allowed" or e.cut for e in events):
        raise RuntimeError(f"a benchmark connection was refused or cut: {events}")
    return {
        "size_mb": size_mb, "rounds": rounds,
        "proxy_s": summary(proxied), "direct_s": summary(direct),
        "proxy_mb_s": summary([size_mb / s for s in proxied], 1),
        "direct_mb_s": summary([size_mb / s for s in direct], 1),
        "note": "MB = MiB; loopback, the proxy alone (no container, no transport); one connection at a time",
    }


_IN_KERNEL = r'''
import ssl, time, urllib.request
def _kx_download(url, ca):
    ctx = ssl.create_default_context(cafile=ca)
    started = time.perf_counter()
    got = 0
    with urllib.request.urlopen(url, context=ctx, timeout=300) as r:
        while data := r.read(1 << 20):
            got += len(data)
    return got, time.perf_counter() - started
'''


def sessions(size_mb: int = 50, rounds: int = 3, log: Log = print) -> dict[str, Any]:
    """End to end: the code in a sandbox downloads ``size_mb`` over HTTPS from the tests' index (in a
    network namespace of this run) through the session's proxy, on each transport, interleaved; and the
    host itself without a proxy, for reference. The time is taken inside the kernel."""
    import ssl
    import urllib.request

    from kernelexec import Policy, Session
    from tests.egress.harness import start_index

    size = size_mb << 20
    ca = "/work/bench-ca.pem"
    with start_index() as index, contextlib.ExitStack() as stack:
        url = index.blob_url(size)
        policy = {t: Policy(transport=t, egress=(f"{index.address}:{index.https_port}",),
                            egress_max_bytes=4 * size * (rounds + 1)) for t in ("ipc", "attach")}
        ss = {t: stack.enter_context(Session(p)) for t, p in policy.items()}
        for s in ss.values():
            s.upload(index.ca_pem, ca)
            s.execute(_IN_KERNEL)
            s.execute(f"_kx_download({url!r}, {ca!r})")  # warm-up
        ctx = ssl.create_default_context(cafile=str(index.ca_path))
        times: dict[str, list[float]] = {"host_direct": [], **{t: [] for t in ss}}
        for i in range(rounds):
            started = time.perf_counter()
            with urllib.request.urlopen(url, context=ctx, timeout=300) as r:
                got = len(r.read())
            if got != size:
                raise RuntimeError(f"the host read {got} bytes, expected {size}")
            times["host_direct"].append(time.perf_counter() - started)
            for t, s in ss.items():
                got, seconds = eval(s.execute(f"_kx_download({url!r}, {ca!r})").text or "(0, 0)")
                if got != size:
                    raise RuntimeError(f"{t}: the sandbox read {got} bytes, expected {size}")
                times[t].append(seconds)
            log("egress end to end, round " + f"{i + 1}/{rounds}: " + ", ".join(
                f"{k} {size_mb / v[-1]:.0f} MiB/s" for k, v in times.items()))
    return {"size_mb": size_mb, "rounds": rounds, "index": index.mode,
            **{f"{k}_mb_s": summary([size_mb / x for x in v], 1) for k, v in times.items()},
            "note": "MiB/s, p50 over rounds; HTTPS from an index in a network namespace of this host; "
                    "the sandbox's time is taken inside the kernel (urllib through HTTPS_PROXY)"}


def markdown(e: dict[str, Any]) -> list[str]:
    """Lines for the benchmark report."""
    lines = ["", f"Egress proxy alone: {e['size_mb']} MiB through a CONNECT tunnel on loopback in "
                 f"{e['proxy_s']['p50']:.3f} s p50 ({e['proxy_mb_s']['p50']:.0f} MiB/s; without the proxy "
                 f"{e['direct_mb_s']['p50']:.0f} MiB/s), {e['rounds']} rounds."]
    end = e.get("sessions")
    if end:
        lines.append(f"Egress end to end: {end['size_mb']} MiB over HTTPS into a sandbox through its proxy: "
                     f"ipc {end['ipc_mb_s']['p50']:.0f} MiB/s, attach {end['attach_mb_s']['p50']:.0f} MiB/s "
                     f"(the host itself, no proxy: {end['host_direct_mb_s']['p50']:.0f} MiB/s), "
                     f"{end['rounds']} rounds.")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.egress", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=50, help="MiB per download (default 50)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "egress.json")
    args = p.parse_args()
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = asyncio.run(run(args.size, args.rounds, say))
    results["sessions"] = sessions(args.size, 3, say)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(markdown(results)).strip())


if __name__ == "__main__":
    main()
