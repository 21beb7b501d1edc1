"""Pure logic: wire format, policy validation, result views, socket-dir hygiene."""

from __future__ import annotations

import argparse
import json
import os
import socket

import pytest

from kernelexec import Policy
from kernelexec.backend.docker.config import container_config
from kernelexec.backend.sockdir import SocketDir, owner_pid_of
from kernelexec.errors import ProtocolError, SandboxError
from kernelexec.kernel.protocol import DELIM, MAX_IDENTITIES, Signer, build, parse, shape_error
from kernelexec.policy import parse_size, resolve_user
from kernelexec.results import Execution, MimeBundle, Stream, strip_ansi
from kernelexec.snapshot import PausedSession


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


# -- paused sessions: the duration `kernelexec gc` expires them by, and how `ps` shows them --------------

@pytest.mark.parametrize(("text", "seconds"), [("0", 0), ("3600", 3600), ("1.5", 1.5), ("90s", 90), ("30m", 1800),
                                               ("12h", 43200), ("1.5h", 5400), ("7d", 604800)])
def test_durations_read_as_seconds(text, seconds):
    from kernelexec.snapshot.store import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7w", "-1d", "7 d", " 7d", "7d ", "7D", "1h30m", "1e3", "inf", "nan", ".5h",
                                  "5.", "d", "\u0663d"])
def test_anything_else_is_not_a_duration(text):
    from kernelexec.snapshot.store import parse_duration

    with pytest.raises(ValueError, match=r"is not a duration: give seconds \(3600\) or a number with s, m, h or d"):
        parse_duration(text)


def test_paused_ttl_is_seven_days_unless_the_environment_says_otherwise(monkeypatch):
    from kernelexec.snapshot.store import DEFAULT_TTL, paused_ttl

    monkeypatch.delenv("KERNELEXEC_PAUSED_TTL", raising=False)
    assert paused_ttl() == DEFAULT_TTL == 7 * 86400
    monkeypatch.setenv("KERNELEXEC_PAUSED_TTL", "12h")
    assert paused_ttl() == 43200
    monkeypatch.setenv("KERNELEXEC_PAUSED_TTL", "600")
    assert paused_ttl() == 600
    monkeypatch.setenv("KERNELEXEC_PAUSED_TTL", "-1")
    with pytest.raises(ValueError, match="KERNELEXEC_PAUSED_TTL: '-1' is not a duration"):
        paused_ttl()


def test_gc_refuses_a_bad_duration(monkeypatch, capsys):
    """A typo in either is an error that says what to write, never some other rule that expires sessions."""
    from kernelexec.tools.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["gc", "--paused-older-than", "7w"])
    assert stop.value.code == 2
    assert "argument --paused-older-than: '7w' is not a duration" in capsys.readouterr().err
    monkeypatch.setenv("KERNELEXEC_PAUSED_TTL", "7 days")
    assert main(["gc"]) == 2
    assert capsys.readouterr().err == (
        "kernelexec: KERNELEXEC_PAUSED_TTL: '7 days' is not a duration: give seconds (3600) or a number with s, m, "
        "h or d (90s, 30m, 12h, 7d); fix or unset it, or pass --paused-older-than\n")


def test_gc_help_states_the_rule():
    from kernelexec.tools.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["gc"].format_help().split())
    assert ("paused sessions that no process holds and that were paused more than KERNELEXEC_PAUSED_TTL "
            "(default 7 days) ago") in text
    assert "--paused-older-than DURATION" in text


def _paused(sid: str, paused_at: float, size: int, holder: int | None) -> PausedSession:
    return PausedSession(id=sid, paused_at=paused_at, policy=Policy().to_json(), image=None, profile=None, size=size,
                         variables=3, lost=1, holder=holder)


def test_ps_lists_paused_sessions_after_the_running_ones_or_alone(monkeypatch, tmp_path):
    from kernelexec.backend.docker.sessions import SessionInfo
    from kernelexec.tools.cli import ps_json, ps_text

    monkeypatch.setenv("KERNELEXEC_STATE_DIR", str(tmp_path))
    now = 1_800_000_000.0
    paused = [_paused("0123456789ab", now - 180, 72_298, None), _paused("ba9876543210", now - 5400, 1_500_000, 4242),
              _paused("aaaaaaaaaaaa", now - 8 * 86400, 10, -1)]

    def no_engine() -> str:
        raise AssertionError("the engine is named only when a session runs")

    lines = ps_text([], paused, no_engine, now).splitlines()
    assert lines[:3] == ["no running kernelexec sessions", "",
                         f"paused sessions in {tmp_path} (`kernelexec gc` removes those that expired):"]
    assert lines[3].split() == ["SESSION", "PAUSED", "SIZE", "VARIABLES", "LOST", "STATE", "IMAGE"]
    assert lines[4].split() == ["0123456789ab", "2027-01-15T07:57:00+00:00", "(3", "min", "ago)", "72", "kB", "3",
                                "1", "paused", "default"]
    assert lines[5].split()[1:] == ["2027-01-15T06:30:00+00:00", "(1.5", "h", "ago)", "1.5", "MB", "3", "1", "held",
                                    "by", "pid", "4242", "default"]
    assert "(8 d ago)" in lines[6] and "held (pid unknown)" in lines[6]
    assert ps_text([], [], no_engine, now) == "no kernelexec sessions"

    running = SessionInfo(session_id="cccccccccccc", container_id="f" * 64, status="running", owner_pid=7,
                          owner_alive=False, host="h", created="2027-01-15T08:00:00+00:00", image="img")
    lines = ps_text([running], paused[:1], lambda: "engine: here", now).splitlines()
    assert lines[0] == "engine: here" and lines[1].startswith("SESSION") and lines[2].split()[:6] == [
        "cccccccccccc", "f" * 12, "running", "ipc", "default", "7"]
    assert lines[3:5] == ["", f"paused sessions in {tmp_path} (`kernelexec gc` removes those that expired):"]

    rows = ps_json([running], paused[1:2])
    assert [r["state"] for r in rows] == ["running", "paused"]
    assert rows[0]["session_id"] == "cccccccccccc" and rows[0]["status"] == "running"
    assert rows[1] == {"state": "paused", "session_id": "ba9876543210", "paused_at": "2027-01-15T06:30:00+00:00",
                       "size": 1_500_000, "variables": 3, "lost": 1, "holder": 4242, "image": None, "profile": None,
                       "path": str(tmp_path / "sessions" / "ba9876543210")}
