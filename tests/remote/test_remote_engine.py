"""The remote test engine is what it claims (no shared filesystem, TLS required), and kernelexec's clients
reach it: the Engine API client (calls, archives, the attach stream over TLS), the SDK client, contexts."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from kernelexec._loop import run_blocking
from kernelexec.backend.docker.api import DockerAPI, DockerAPIError, api, close_stream, demux
from kernelexec.backend.docker.endpoint import Endpoint, context_id, resolve_endpoint
from kernelexec.errors import DockerUnavailable, SandboxError

from ..sdk import docker_client
from . import engine as remote
from .certs import cert_dir, make_authority

pytestmark = pytest.mark.slow


def config(image: str, cmd: list[str], **host: Any) -> dict[str, Any]:
    return {"Image": image, "Entrypoint": [], "Cmd": cmd, "User": "10001:10001",
            "HostConfig": {"NetworkMode": "none", **host}}


async def run(docker: DockerAPI, body: dict[str, Any]) -> tuple[int, bytes, bytes]:
    """Run a container to its end: exit code, stdout, stderr. The container is removed."""
    cid = await docker.create_container(f"kx-test-{uuid.uuid4().hex[:8]}", body)
    try:
        await docker.start(cid)
        status = await asyncio.wait_for(docker.wait(cid), 60)
        _, logs, _ = await docker.request("GET", f"/containers/{cid}/logs", params={"stdout": "1", "stderr": "1"},
                                          what="logs")
        return int(status["StatusCode"]), *demux(logs)
    finally:
        await docker.remove_container(cid)


async def read_stdout(reader: asyncio.StreamReader, into: bytearray, n: int) -> None:
    """Read an attach stream's frames into ``into`` until it holds ``n`` bytes; all must be stdout."""
    while len(into) < n:
        kind, size = struct.unpack(">BxxxL", await reader.readexactly(8))
        chunk = await reader.readexactly(size)
        assert kind == 1, chunk
        into.extend(chunk)


# -- the engine shares no filesystem with us ------------------------------------------------------

def test_engine_runs_in_a_mount_namespace_of_its_own(remote_engine):
    assert remote.mount_namespace(remote_engine.pid) != remote.mount_namespace(os.getpid())
    # and a network namespace of its own: whatever it does to interfaces stays there
    assert remote.network_namespace(remote_engine.pid) != remote.network_namespace(os.getpid())
    marker = f"kx-marker-{uuid.uuid4().hex}"
    made = []
    try:
        for d in ("/tmp", "/var/tmp", "/dev/shm", str(remote.REPO)):
            p = Path(d) / marker
            p.write_text("host")
            made.append(p)
            # /proc/PID/root shows paths as the engine sees them, through its mount namespace
            assert not Path(f"/proc/{remote_engine.pid}/root{p}").exists(), d
        # the repo is hidden by an empty tmpfs, or, when it lives under /tmp (a clone there), absent
        view = Path(f"/proc/{remote_engine.pid}/root{remote.REPO}")
        assert not view.exists() or not any(view.iterdir())
    finally:
        for p in made:
            p.unlink()


def test_containers_there_see_none_of_our_files(remote_engine, kernel_image, tmp_path):
    marker = tmp_path / "from-the-tests"  # tmp_path is under /tmp
    marker.write_text("host")
    script = ("ls -A /host-tmp /host-repo; test -e /host-tmp/" + str(marker.relative_to("/tmp")) +
              " && echo SEEN; echo remote > /host-tmp/written-by-remote-container")
    code, out, err = run_blocking(run(remote_engine.api(), config(
        kernel_image, ["sh", "-c", script], Binds=["/tmp:/host-tmp", f"{remote.REPO}:/host-repo:ro"])))
    assert code == 0, err
    assert b"SEEN" not in out and b"pyproject.toml" not in out and marker.parent.name.encode() not in out
    assert not Path("/tmp/written-by-remote-container").exists()


# -- TLS is required -------------------------------------------------------------------------------

def test_plain_http_is_refused(remote_engine):
    plain = Endpoint("tcp", f"127.0.0.1:{remote_engine.port}", source="test")
    with pytest.raises(DockerUnavailable, match="speaks TLS only"):
        run_blocking(DockerAPI(plain).version())


def test_clients_without_the_right_certificates_are_refused(remote_engine, tmp_path):
    good = remote_engine.endpoint
    assert good.tls and good.verify and good.cert
    no_cert = Endpoint("tcp", good.address, tls=True, ca=good.ca, source="test")
    with pytest.raises(DockerUnavailable, match="broke off|TLS"):
        run_blocking(DockerAPI(no_cert).version())

    stranger = make_authority(tmp_path / "other-ca", "stranger-ca")
    foreign = stranger.issue(tmp_path / "other-ca", "foreign-client")
    foreign_dir = cert_dir(tmp_path / "foreign", remote_engine.ca.cert_path, foreign)
    env = {**remote_engine.env, "DOCKER_CERT_PATH": str(foreign_dir)}
    with pytest.raises(DockerUnavailable):
        run_blocking(DockerAPI(resolve_endpoint(env, docker_config_dir=tmp_path)).version())

    # the client checks the server too: a CA that did not sign it, or a name its certificate lacks
    untrusting = cert_dir(tmp_path / "untrusting", stranger.cert_path, remote_engine.client)
    env = {**remote_engine.env, "DOCKER_CERT_PATH": str(untrusting)}
    with pytest.raises(DockerUnavailable, match="certificate"):
        run_blocking(DockerAPI(resolve_endpoint(env, docker_config_dir=tmp_path)).version())
    env = {**remote_engine.env, "DOCKER_HOST": f"tcp://localhost:{remote_engine.port}"}
    with pytest.raises(DockerUnavailable, match="certificate"):
        run_blocking(DockerAPI(resolve_endpoint(env, docker_config_dir=tmp_path)).version())

    # what the CLI calls DOCKER_TLS (TLS, server not verified) with the client certificate gets in
    env = {"DOCKER_HOST": f"tcp://localhost:{remote_engine.port}", "DOCKER_TLS": "1",
           "DOCKER_CERT_PATH": str(remote_engine.cert_path)}
    assert run_blocking(DockerAPI(resolve_endpoint(env, docker_config_dir=tmp_path)).version())["ApiVersion"]


# -- kernelexec's clients on the remote engine -------------------------------------------------------

def test_engine_api_client_drives_the_remote_engine(remote_engine, kernel_image):
    docker = remote_engine.api()
    assert not docker.endpoint.is_local
    remote_id = run_blocking(docker.call("GET", "/info", what="info"))["ID"]
    assert remote_id != run_blocking(api().call("GET", "/info", what="info"))["ID"]
    assert run_blocking(docker.image_exists(kernel_image))

    async def scenario() -> None:
        cid = await docker.create_container(f"kx-test-{uuid.uuid4().hex[:8]}",
                                            config(kernel_image, ["sleep", "300"]))
        try:
            await docker.start(cid)
            assert (await docker.inspect(cid))["State"]["Running"]
            payload = os.urandom(300_000)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                info = tarfile.TarInfo("upload.bin")
                info.size, info.uid, info.gid = len(payload), 10001, 10001
                tar.addfile(info, io.BytesIO(payload))
            await docker.put_archive(cid, "/tmp", buf.getvalue())
            back = await docker.get_archive(cid, "/tmp/upload.bin", limit=1 << 20)
            with tarfile.open(fileobj=io.BytesIO(back)) as tar:
                member = tar.extractfile("upload.bin")
                assert member is not None and member.read() == payload
            with pytest.raises(SandboxError, match="larger than 1000 bytes"):  # bounded over TLS too
                await docker.get_archive(cid, "/tmp/upload.bin", limit=1000)
        finally:
            await docker.remove_container(cid)
        with pytest.raises(DockerAPIError) as gone:
            await docker.inspect(cid)
        assert gone.value.status == 404

    run_blocking(scenario())


def test_attach_stream_round_trip_over_tls(remote_engine, kernel_image):
    docker = remote_engine.api()
    sent = b"".join(b"line %d %s\n" % (i, os.urandom(40).hex().encode()) for i in range(3000))  # ~260 KB

    async def scenario() -> bytes:
        body = config(kernel_image, ["cat"])
        body.update(OpenStdin=True, StdinOnce=False, Tty=False, AttachStdin=True, AttachStdout=True)
        cid = await docker.create_container(f"kx-test-{uuid.uuid4().hex[:8]}", body)
        try:
            reader, writer = await docker.attach(cid, stdin=True)
            try:
                await docker.start(cid)
                received = bytearray()
                reading = asyncio.ensure_future(read_stdout(reader, received, len(sent)))
                for i in range(0, len(sent), 16384):
                    writer.write(sent[i:i + 16384])
                    await writer.drain()
                await asyncio.wait_for(reading, 60)
                return bytes(received)
            finally:
                await close_stream(writer)
        finally:
            await docker.remove_container(cid)

    assert run_blocking(scenario()) == sent


def test_sdk_client_is_configured_from_the_endpoint(remote_engine, kernel_image):
    client = docker_client(remote_engine.endpoint)
    try:
        assert client.info()["ID"] == remote.info(remote_engine)["ID"]
        assert any(kernel_image in image.tags for image in client.images.list())
    finally:
        client.close()


def test_a_derived_image_is_built_on_the_remote_engine(remote_engine, kernel_image, tmp_path, monkeypatch):
    """Image builds go through the same Engine API client as sessions: the probe container, the build context
    streamed over TLS and its progress streamed back, the image calls (ls, lock, rm), all on that engine."""
    from kernelexec.tools.packages import build_packages, image_lock, list_images, remove_image

    from ..test_images_packages import make_wheel

    links = tmp_path / "links"
    links.mkdir()
    make_wheel(links, "kx-tiny-c", "3.0")
    monkeypatch.setenv("KERNELEXEC_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    docker = DockerAPI(remote_engine.endpoint)
    lines: list[str] = []
    tag = build_packages(["kx-tiny-c"], base=kernel_image, find_links=[links], no_index=True, progress=lines.append,
                         client=docker)
    try:
        assert any(line.endswith("] kernelexec: installing from the wheelhouse in the build context (no index)")
                   for line in lines), lines
        assert tag in {i.tag for i in list_images(docker)}
        assert image_lock(tag, docker).startswith("kx-tiny-c==3.0 --hash=sha256:")
        probe = "import importlib.metadata as m; print(m.version('kx-tiny-c'))"
        code, out, _ = run_blocking(run(docker, config(tag, ["/opt/kernel/bin/python", "-c", probe])))
        assert (code, out.strip()) == (0, b"3.0")
    finally:
        remove_image(tag, docker)
    assert not run_blocking(docker.image_exists(tag))


def test_a_docker_context_made_by_the_cli_is_honoured(remote_engine, tmp_path):
    """The docker CLI writes the context store; kernelexec reads it and reaches the same engine."""
    cfg = tmp_path / "docker-config"
    certs = remote_engine.cert_path

    def docker_cli(*args: str) -> str:
        p = subprocess.run(["docker", "--config", str(cfg), *args], capture_output=True, text=True, timeout=60, check=False,
                           env={k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")})
        assert p.returncode == 0, p.stderr
        return p.stdout

    docker_cli("context", "create", "kx-remote", "--docker",
               f"host={remote_engine.host},ca={certs}/ca.pem,cert={certs}/cert.pem,key={certs}/key.pem")
    docker_cli("context", "create", "kx-local", "--docker", "host=unix:///var/run/docker.sock")
    docker_cli("context", "use", "kx-remote")
    remote_id = remote.info(remote_engine)["ID"]
    local_id = run_blocking(api().call("GET", "/info", what="info"))["ID"]
    # the CLI itself agrees that this context reaches the remote engine
    assert docker_cli("info", "--format", "{{.ID}}").strip() == remote_id

    ep = resolve_endpoint({}, docker_config_dir=cfg)
    assert ep.source == "context kx-remote" and ep.tls and ep.verify
    assert ep.address == f"127.0.0.1:{remote_engine.port}"
    assert ep.cert == str(cfg / "contexts" / "tls" / context_id("kx-remote") / "docker" / "cert.pem")
    assert run_blocking(DockerAPI(ep).call("GET", "/info", what="info"))["ID"] == remote_id

    # precedence as the CLI's: DOCKER_CONTEXT over currentContext, DOCKER_HOST over both
    ep = resolve_endpoint({"DOCKER_CONTEXT": "kx-local"}, docker_config_dir=cfg)
    assert ep.source == "context kx-local" and ep.is_local
    assert run_blocking(DockerAPI(ep).call("GET", "/info", what="info"))["ID"] == local_id
    ep = resolve_endpoint({**remote_engine.env, "DOCKER_CONTEXT": "kx-local"}, docker_config_dir=cfg)
    assert ep.source == "DOCKER_HOST"
    assert run_blocking(DockerAPI(ep).call("GET", "/info", what="info"))["ID"] == remote_id


def test_an_ipc_sandbox_on_a_remote_engine_is_refused_clearly(remote_engine, kernel_image):
    """The bind-mounting transport, asked for by name, says why it cannot run there (auto picks attach)."""
    code = ("from kernelexec import Policy, Session\n"
            f"Session(Policy(image={kernel_image!r}, transport='ipc')).execute('1')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, **remote_engine.env})
    assert p.returncode != 0
    assert "not on this host" in p.stderr and f"127.0.0.1:{remote_engine.port}" in p.stderr, p.stderr
    containers = run_blocking(remote_engine.api().call("GET", "/containers/json", params={"all": "true"},
                                                       what="list"))
    assert containers == []
