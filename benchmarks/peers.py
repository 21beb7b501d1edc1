"""AutoGen's Docker executors on this machine, with the same code blocks as kernelexec.

Optional: needs ``pip install -e '.[bench]'`` (autogen-ext with its Docker
extras). Their image is built here by the offline path (the Debian base that
``kernelexec image build --offline`` makes, Python packages from a wheelhouse
the host downloads), since the bundled Dockerfile's base cannot be pulled
without a registry. Every container, temporary directory and network they
create is removed after each run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

from kernelexec.tools.image import BASE_TAG, _pip_download, _run, ensure_base_image

from .roundtrip import BLOCKS
from .stats import summary

RECIPE = Path(__file__).parent / "peer_image"
Log = Callable[[str], None]


def image_tag() -> str:
    h = hashlib.sha256()
    for name in ("Dockerfile", "requirements.txt"):
        h.update(name.encode() + b"\0" + (RECIPE / name).read_bytes())
    return f"kernelexec-peer:{h.hexdigest()[:12]}"


def docker_client() -> Any:
    """The docker SDK (the bench extra's, through autogen-ext[docker]) on the engine AutoGen's executors use:
    they call ``docker.from_env()`` themselves, so the peers' image must be there."""
    return docker.from_env()


def build_image(log: Log) -> tuple[str, float | None]:
    """The peers' image: skipped when the tag exists; else base, wheelhouse, offline build."""
    client = docker_client()
    tag = image_tag()
    if client.images.list(name=tag):
        return tag, None
    t = time.perf_counter()
    ensure_base_image(client, progress=log)
    wheels = RECIPE / "wheelhouse"
    wheels.mkdir(exist_ok=True)
    log(f"peers: downloading the peer image's wheels into {wheels}")
    _run(_pip_download(wheels) + ["-r", str(RECIPE / "requirements.txt")], "downloading the peer wheelhouse",
         log, 600)
    log(f"peers: building {tag} from {BASE_TAG}")
    client.images.build(path=str(RECIPE), tag=tag, rm=True, forcerm=True, pull=False,
                        buildargs={"BASE_IMAGE": BASE_TAG})
    return tag, round(time.perf_counter() - t, 1)


async def _roundtrips(executor: Any, n: int) -> dict[str, Any]:
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock

    out = {}
    for name, code in BLOCKS.items():
        block = [CodeBlock(code=code, language="python")]
        for _ in range(3):
            await executor.execute_code_blocks(block, CancellationToken())
        times = []
        for _ in range(n):
            t = time.perf_counter()
            result = await executor.execute_code_blocks(block, CancellationToken())
            times.append((time.perf_counter() - t) * 1000)
            if result.exit_code != 0:
                raise RuntimeError(f"{code!r} failed in the peer: {result.output[:300]}")
        out[name] = summary(times)
    return out


async def _first_result(executor: Any) -> None:
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock

    result = await executor.execute_code_blocks([CodeBlock(code="print(1+1)", language="python")],
                                                CancellationToken())
    if result.exit_code != 0 or "2" not in result.output:
        raise RuntimeError(f"the peer's first result is wrong: {result.output[:300]}")


async def _use(executor: Any, t0: float, measure: int,
               ready: Callable[[Any], Awaitable[None]]) -> tuple[float, dict[str, Any] | None]:
    """Start, first result (cold start since ``t0``), round trips when ``measure``; always stopped."""
    try:
        await executor.start()
        await ready(executor)
        cold = time.perf_counter() - t0
        return cold, (await _roundtrips(executor, measure) if measure else None)
    finally:
        await executor.stop()


async def _measure(one: Callable[[int], Awaitable[tuple[float, dict[str, Any] | None]]], n: int,
                   cold_runs: int) -> dict[str, Any]:
    """``cold_runs`` fresh executors to their first result; the first also runs ``n`` round trips per block."""
    colds, roundtrip = [], None
    for i in range(cold_runs):
        cold, rt = await one(n if i == 0 else 0)
        colds.append(cold)
        roundtrip = roundtrip or rt
    return {"roundtrip_ms": roundtrip, "cold_start_s": summary(colds), "error": None}


async def _jupyter(tag: str, n: int, cold_runs: int, log: Log) -> dict[str, Any]:
    from autogen_ext.code_executors.docker_jupyter import DockerJupyterCodeExecutor, DockerJupyterServer

    async def one(measure: int) -> tuple[float, dict[str, Any] | None]:
        t = time.perf_counter()
        # its constructor starts the container with blocking Docker calls
        server = await asyncio.to_thread(DockerJupyterServer, custom_image_name=tag)
        try:
            out_dir = Path(tempfile.mkdtemp(prefix="kx-peer-"))
            try:
                return await _use(DockerJupyterCodeExecutor(jupyter_server=server, output_dir=out_dir), t,
                                  measure, _ready)
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
        finally:
            await server.stop()

    async def _ready(executor: Any) -> None:
        # the gateway answers HTTP only once it listens: retry the first block until it does
        deadline = time.monotonic() + 60
        while True:
            try:
                await _first_result(executor)
                return
            except Exception as e:  # connection refused while the gateway starts
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Jupyter gateway did not answer within 60 s: {e}") from e
                await asyncio.sleep(0.05)

    log(f"peers: DockerJupyterCodeExecutor, {cold_runs} cold starts and {n} runs per block")
    return await _measure(one, n, cold_runs)


async def _cmdline(tag: str, n: int, cold_runs: int, log: Log) -> dict[str, Any]:
    from autogen_ext.code_executors.docker import DockerCommandLineCodeExecutor

    async def one(measure: int) -> tuple[float, dict[str, Any] | None]:
        work = Path(tempfile.mkdtemp(prefix="kx-peer-"))
        try:
            t = time.perf_counter()
            return await _use(DockerCommandLineCodeExecutor(image=tag, work_dir=work), t, measure, _first_result)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    log(f"peers: DockerCommandLineCodeExecutor, {cold_runs} cold starts and {n} runs per block")
    return await _measure(one, n, cold_runs)


def run(*, quick: bool, log: Log) -> dict[str, Any]:
    """Both peers; a peer that fails is reported with its error, the other still runs."""
    try:
        import autogen_ext.code_executors.docker
        import autogen_ext.code_executors.docker_jupyter  # noqa: F401
    except ImportError as e:
        return {"skipped": f"autogen-ext with its Docker extras is not installed ({e}); "
                           "pip install -e '.[bench]'"}
    try:
        tag, build_s = build_image(log)
    except Exception as e:  # no image, no peers: said in the results, the rest of the run stands
        return {"skipped": f"the peers' image could not be built: {e}"}
    out: dict[str, Any] = {"skipped": None, "image": {"tag": tag, "build_s": build_s}}
    for key, bench, n, cold in (("autogen_docker_jupyter", _jupyter, 30 if quick else 200, 2 if quick else 5),
                                ("autogen_docker_cmdline", _cmdline, 10 if quick else 50, 2 if quick else 5)):
        try:
            out[key] = asyncio.run(bench(tag, n, cold, log))
        except Exception as e:  # recorded with the results; the other peer still runs
            log(f"peers: {key} failed: {type(e).__name__}: {e}")
            out[key] = {"roundtrip_ms": None, "cold_start_s": None, "error": f"{type(e).__name__}: {e}"}
    # only containers of the peers' own image: other sessions may share this engine
    # (AutoGen stops its containers and Docker removes them, auto_remove, a moment later)
    api = docker_client().api
    left = []
    for c in api.containers(all=True, filters={"ancestor": tag}):
        try:
            api.wait(c["Id"], timeout=30, condition="removed")
        except docker.errors.NotFound:
            continue  # removed before the wait began
        except requests.exceptions.ReadTimeout:
            left.append(c["Id"])
    if left:
        out["left_behind"] = len(left)
        log(f"peers: AutoGen left {len(left)} containers behind; removing them")
        for cid in left:
            api.remove_container(cid, force=True)
    return out


if __name__ == "__main__":
    print(json.dumps(run(quick=True, log=print), indent=2))
