"""Pure logic: wire format, policy validation, result views, socket-dir hygiene."""

from __future__ import annotations

import json
import os
import socket

import pytest

from kernelexec import Policy
from kernelexec.errors import ProtocolError, SandboxError
from kernelexec.policy import container_config, parse_size, resolve_user
from kernelexec.protocol import DELIM, MAX_IDENTITIES, Signer, build, parse, shape_error
from kernelexec.results import Execution, MimeBundle, Stream, strip_ansi
from kernelexec.sockdir import SocketDir, owner_pid_of


def _reply(signer: Signer, content: dict, parent: str = "p1", header_extra: dict | None = None) -> list[bytes]:
    header = {"msg_id": "m", "msg_type": "execute_reply", **(header_extra or {})}
    parts = [json.dumps(x).encode() for x in (header, {"msg_id": parent}, {}, content)]
    return [b"ident", DELIM, signer.sign(parts), *parts]


def test_build_then_parse_roundtrip():
    s = Signer(b"k" * 64)
    msg_id, frames = build(s, "execute_request", {"code": "1"}, session="abc")
    msg = parse(s, frames)
    assert msg.header["msg_id"] == msg_id and msg.msg_type == "execute_request"
    assert msg.content == {"code": "1"}


def test_parse_rejects_wrong_signature_and_shapes():
    good, bad = Signer(b"a" * 64), Signer(b"b" * 64)
    frames = _reply(good, {"status": "ok"})
    assert parse(good, frames).parent_id == "p1"
    with pytest.raises(ProtocolError, match="signature"):
        parse(bad, frames)
    with pytest.raises(ProtocolError, match="delimiter"):
        parse(good, [b"x", b"y"])
    with pytest.raises(ProtocolError, match="frames"):
        parse(good, [DELIM, b"sig", b"{}"])
    with pytest.raises(ProtocolError, match="buffers"):
        parse(good, frames + [b"b"] * 20)


@pytest.mark.parametrize("frames", [
    [b"x", b"y"], [b"i"] * 9 + [DELIM] + [b"p"] * 5, [DELIM, b"sig", b"{}"], [b"id", DELIM] + [b"p"] * 55,
    [DELIM] + [b"p"] * 5, [b"id", DELIM] + [b"p"] * 13, [b"i"] * 8 + [DELIM] + [b"p"] * 14,
])
def test_shape_error_says_what_parse_says_of_the_whole_message(frames):
    """The attach relay reports only the shape of a message it refused; the host words it with
    shape_error, which must say what parse says of the message itself."""
    s = Signer(b"k" * 64)
    head = frames[:MAX_IDENTITIES + 1]
    why = shape_error(len(frames), head.index(DELIM) if DELIM in head else None)
    with pytest.raises(ProtocolError) as e:
        parse(s, frames)
    assert str(e.value) == (why or "the kernel sent a message with a wrong HMAC signature")
    assert shape_error(len(frames), MAX_IDENTITIES + 1) == shape_error(len(frames), None)


def test_parse_rejects_deep_nesting_and_non_objects():
    s = Signer(b"k" * 64)
    deep = {"status": "ok", "x": json.loads("[" * 200 + "]" * 200)}
    with pytest.raises(ProtocolError, match="nested"):
        parse(s, _reply(s, deep))
    parts = [b"{}", b"{}", b"{}", b"[1]"]
    with pytest.raises(ProtocolError, match="not a JSON object"):
        parse(s, [DELIM, s.sign(parts), *parts])
    parts = [b"{}", b"{}", b"{}", b"\xff"]
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse(s, [DELIM, s.sign(parts), *parts])


def test_empty_key_refused():
    with pytest.raises(ValueError):
        Signer(b"")


def test_parse_size():
    assert parse_size("64m") == 64 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("512KiB") == 512 << 10
    assert parse_size(100) == 100
    for bad in ("lots", "-1m", 0, True):
        with pytest.raises((ValueError, TypeError)):
            parse_size(bad)


def test_policy_never_root_and_never_host_network():
    for user in ("0", "0:0", "1000:0"):
        with pytest.raises(ValueError, match="root"):
            Policy(user=user)
    with pytest.raises(ValueError):
        Policy(network="host")
    with pytest.raises(ValueError):
        Policy(cap_add=("ALL",))
    with pytest.raises(ValueError):
        Policy(labels={"kernelexec.session": "x"})


def test_resolve_user():
    assert resolve_user(Policy(), 0, 0) == (10001, 10001)
    assert resolve_user(Policy(), 1000, 1000) == (1000, 1000)
    assert resolve_user(Policy(user="2000:3000"), 0, 0) == (2000, 3000)


def test_relaxations_name_every_loosened_field():
    assert Policy().relaxations() == []
    loose = Policy(network="bridge", read_only=False, memory="4g", timeout=None, workspace="/data")
    text = " ".join(loose.relaxations())
    for word in ("network", "read_only", "memory", "timeout", "workspace"):
        assert word in text


def test_container_config_is_hardened_by_default():
    c = container_config(Policy(), image="img", command=["x"], uid=10001, gid=10001, socket_dir="/tmp/kx-1-aa",
                         work_volume="vol", labels={"kernelexec.session": "s"})
    hc = c["HostConfig"]
    assert hc["NetworkMode"] == "none" and hc["ReadonlyRootfs"] and hc["CapDrop"] == ["ALL"]
    assert hc["Memory"] == hc["MemorySwap"] == 1 << 30
    assert hc["LogConfig"]["Type"] == "none" and hc["Init"] is True
    assert all("noexec" in v for v in hc["Tmpfs"].values())
    assert [m["Target"] for m in hc["Mounts"]] == ["/run/kernelexec", "/work"]
    assert not any(e.startswith(("AWS", "OPENAI")) for e in c["Env"])
    assert c["User"] == "10001:10001"


def test_result_views():
    ex = Execution(code="x", outputs=[Stream("stdout", "a"), Stream("stderr", "b"),
                                      MimeBundle({"text/plain": "1", "image/png": "iVBORw0KGgo="}, kind="execute_result")])
    assert (ex.stdout, ex.stderr, ex.text) == ("a", "b", "1")
    assert ex.images == [b"\x89PNG\r\n\x1a\n"]
    assert strip_ansi("\x1b[0;31mError\x1b[0m") == "Error"


def test_socket_dir_refuses_non_sockets_and_removes_without_following_links(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELEXEC_SOCKET_ROOT", str(tmp_path))
    uid, gid = os.geteuid(), os.getegid()
    d = SocketDir(uid, gid)
    assert owner_pid_of(d.path.name) == os.getpid()
    assert oct(os.stat(d.path).st_mode & 0o777) == "0o700"
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, d.path / "k-1")
    os.mkfifo(d.path / "k-2")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(d.path / "k-3"))
    os.link(d.path / "k-3", d.path / "k-4")
    with pytest.raises(SandboxError, match="not a socket"):
        d.open_socket("k-1")  # O_PATH|O_NOFOLLOW opens the link itself, never its target
    with pytest.raises(SandboxError, match="not a socket"):
        d.open_socket("k-2")
    with pytest.raises(SandboxError, match="links"):
        d.open_socket("k-3")
    os.makedirs(d.path / "deep" / "er")
    os.chmod(d.path / "deep", 0)
    srv.close()
    d.remove()
    assert not d.path.exists()
    assert victim.read_text() == "keep me"
