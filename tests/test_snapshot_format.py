"""The snapshot file, the paused-session store and the kernel's report: pure logic, no engine."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from kernelexec.errors import RestoreError, SessionBusy, SnapshotCorrupt, SnapshotError, SnapshotTooLarge
from kernelexec.results import ErrorInfo, Execution, Stream
from kernelexec.snapshot import ops, store
from kernelexec.snapshot.format import FORMAT, MAGIC, Snapshot, encode, split_work, work_for_restore, write_atomic

MANIFEST = {"session_id": "0123456789ab", "created": 1.5, "image": "kernelexec-kernel:x", "kernelexec_version": "0",
            "variables": ["a", "df"], "modules": {"pd": "pandas"},
            "lost": [{"name": "g", "type": "generator", "reason": "a generator"}], "sizes": {}}


def blob(**sections: bytes) -> bytes:
    return encode(MANIFEST, sections or {"namespace": b"pickle-bytes", "work": b""})


def test_a_snapshot_reads_back_what_was_written():
    snap = Snapshot.from_bytes(blob(namespace=b"NS", work=b"WORK", home=b"HOME"))
    assert snap.variables == ("a", "df") and snap.modules == {"pd": "pandas"}
    assert [(x.name, x.type) for x in snap.lost] == [("g", "generator")]
    assert (snap.section("namespace"), snap.section("work"), snap.section("home"), snap.section("tmp")) == \
        (b"NS", b"WORK", b"HOME", b"")
    assert snap.session_id == "0123456789ab" and snap.image == "kernelexec-kernel:x"


@pytest.mark.parametrize("position", [0, len(MAGIC) + 2, len(MAGIC) + 20, -40, -1])
def test_any_changed_byte_is_refused_before_use(position):
    data = bytearray(blob())
    data[position] ^= 0x01
    with pytest.raises(SnapshotCorrupt):
        Snapshot.from_bytes(bytes(data))


@pytest.mark.parametrize("keep", [0, 5, len(MAGIC) + 4, 60, -1])
def test_a_truncated_snapshot_is_refused(keep):
    data = blob()
    with pytest.raises(SnapshotCorrupt, match="truncated|checksum|not a kernelexec"):
        Snapshot.from_bytes(data[:keep] if keep >= 0 else data[:keep])


def test_a_newer_format_is_refused_with_what_to_do():
    data = bytearray(blob())
    data[len(MAGIC):len(MAGIC) + 4] = (FORMAT + 1).to_bytes(4, "big")
    with pytest.raises(SnapshotCorrupt, match="newer than this kernelexec reads"):
        Snapshot.from_bytes(bytes(data))


def test_a_well_checksummed_but_malformed_manifest_is_refused():
    """A crafted file carries a valid checksum: the manifest's types are still checked."""
    bad = {**MANIFEST, "variables": "not a list"}
    with pytest.raises(SnapshotCorrupt, match="manifest"):
        Snapshot.from_bytes(encode(bad, {"namespace": b"x"}))
    with pytest.raises(SnapshotCorrupt, match="manifest"):
        Snapshot.from_bytes(encode({k: v for k, v in MANIFEST.items() if k != "image"}, {"namespace": b"x"}))


def test_the_size_bound_is_checked_before_reading(tmp_path):
    data = blob(namespace=b"x" * 10_000, work=b"")
    with pytest.raises(SnapshotTooLarge, match="snapshot_size"):
        Snapshot.from_bytes(data, max_bytes=1000)
    path = tmp_path / "s"
    path.write_bytes(data)
    with pytest.raises(SnapshotTooLarge):
        Snapshot.load(path, max_bytes=1000)
    assert Snapshot.load(path).section("namespace") == b"x" * 10_000


def test_not_a_snapshot_says_so(tmp_path):
    with pytest.raises(SnapshotCorrupt, match="not a kernelexec snapshot"):
        Snapshot.from_bytes(b"\x80\x05K\x01.")  # a pickle
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        Snapshot.load(tmp_path / "missing")


def _work_archive(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, mode: int = 0o644, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, size, mode
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_work_is_split_from_the_staged_parts_and_cleaned_of_special_files():
    archive = _work_archive([
        (_info("work", tarfile.DIRTYPE, mode=0o700), None),
        (_info("work/a.txt", size=2, mode=0o4755), b"hi"),
        (_info("work/sub", tarfile.DIRTYPE), None),
        (_info("work/sub/link", tarfile.SYMTYPE, linkname="/etc/passwd"), None),
        (_info("work/fifo", tarfile.FIFOTYPE), None),
        (_info("work/dev", tarfile.CHRTYPE), None),
        (_info("work/.kernelexec-snapshot-1", size=2), b"NS"),
        (_info("work/.kernelexec-snapshot-1.home", size=1), b"H"),
    ])
    work, staged = split_work(archive, ".kernelexec-snapshot-1")
    assert staged == {"namespace": b"NS", "home": b"H"}
    with tarfile.open(fileobj=io.BytesIO(work)) as tar:
        members = {m.name: m for m in tar}
        assert sorted(members) == ["a.txt", "sub", "sub/link"]
        assert members["a.txt"].mode == 0o755  # no setuid
        assert tar.extractfile("a.txt").read() == b"hi"


def test_a_restored_work_is_owned_by_the_sandbox_and_stays_inside_it():
    crafted = _work_archive([
        (_info("ok.txt", size=1, uid=0, gid=0, mode=0o6777), b"x"),
        (_info("../escape", size=1), b"x"),
        (_info("/etc/cron.d/x", size=1), b"x"),
        (_info("a/../../b", size=1), b"x"),
        (_info("hard", tarfile.LNKTYPE, linkname="ok.txt"), None),
    ])
    tar_bytes = work_for_restore(crafted, 10001, 10001, {".kernelexec-restore-1": b"NS"})
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = {m.name: m for m in tar}
    assert sorted(members) == [".kernelexec-restore-1", "ok.txt"]
    assert (members["ok.txt"].uid, members["ok.txt"].gid, members["ok.txt"].mode) == (10001, 10001, 0o777)
    with pytest.raises(SnapshotCorrupt, match="not a valid tar"):
        work_for_restore(b"garbage" * 100, 1, 1, {})


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kernelexec.snapshot.format import write_atomic
    def chunks():
        yield b"NEW" * 1000
        print("writing", flush=True)
        time.sleep(60)  # killed here, mid-write
        yield b"END"
    write_atomic(Path(sys.argv[1]), chunks())
""")


def test_a_writer_killed_mid_write_leaves_the_previous_snapshot_whole(tmp_path):
    target = tmp_path / "snapshot"
    previous = blob(namespace=b"OLD")
    write_atomic(target, previous)
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        partial = list(tmp_path.glob(".snapshot.*.partial"))
        assert len(partial) == 1  # the new snapshot is being written beside the old one
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert target.read_bytes() == previous
    assert Snapshot.load(target).section("namespace") == b"OLD"


# ------------------------------------------------------------------------------ the store


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KERNELEXEC_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def _pause(session_id: str, paused_at: float) -> None:
    claim = store.Claim(session_id)
    claim.save(Snapshot.from_bytes(blob()), store.PausedSession(
        id=session_id, paused_at=paused_at, policy="{}", image=None, profile=None, size=1, variables=2, lost=1))
    claim.release()


HOLDER = textwrap.dedent("""
    import sys
    from kernelexec.snapshot.store import Claim
    claim = Claim(sys.argv[1])
    print("held", flush=True)
    sys.stdin.read()
""")


def test_a_session_is_held_by_one_process_at_a_time_and_freed_when_it_dies(state):
    _pause("aaaaaaaaaaaa", time.time())
    child = subprocess.Popen([sys.executable, "-c", HOLDER, "aaaaaaaaaaaa"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(SessionBusy, match=f"pid {child.pid}"):
            store.Claim("aaaaaaaaaaaa")
        [listed] = store.paused()
        assert listed.holder == child.pid
        assert store.expire(0) == []  # held: its owner is alive
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
    [listed] = store.paused()
    assert listed.holder is None and listed.variables == 2
    store.Claim("aaaaaaaaaaaa").release()


def test_gc_expires_unheld_sessions_past_the_ttl_and_partial_files(state, monkeypatch):
    _pause("aaaaaaaaaaaa", time.time() - 10 * 86400)
    _pause("bbbbbbbbbbbb", time.time() - 3600)
    (store.session_dir("bbbbbbbbbbbb") / ".snapshot.123.partial").write_bytes(b"half")
    removed = store.expire()
    assert any("aaaaaaaaaaaa" in r for r in removed) and any("partial" in r for r in removed)
    assert [p.id for p in store.paused()] == ["bbbbbbbbbbbb"]
    assert not list(store.session_dir("bbbbbbbbbbbb").glob("*.partial"))
    monkeypatch.setenv("KERNELEXEC_PAUSED_TTL", "60")
    assert any("bbbbbbbbbbbb" in r for r in store.expire())
    assert list(store.paused()) == []
    monkeypatch.setenv("KERNELEXEC_PAUSED_TTL", "a week")
    with pytest.raises(ValueError, match="KERNELEXEC_PAUSED_TTL"):
        store.expire()


def test_session_ids_are_checked_and_the_state_dir_is_private(state):
    with pytest.raises(SnapshotError, match="not a session id"):
        store.session_dir("../../etc")
    _pause("cccccccccccc", time.time())
    assert (state.stat().st_mode & 0o777) == 0o700
    assert (store.session_dir("cccccccccccc").stat().st_mode & 0o777) == 0o700
    with pytest.raises(SnapshotError, match="no paused state"):
        store.Claim("dddddddddddd").load()
    assert not store.session_dir("dddddddddddd").exists()  # an unknown id leaves nothing behind


# ------------------------------------------------------------------------------ the kernel's report


def _ran(stdout: str, status: str = "ok", error: ErrorInfo | None = None) -> Execution:
    outputs: list = [Stream("stdout", stdout)]
    if error is not None:
        outputs.append(error)
    return Execution(code="", status=status, outputs=outputs)


def test_the_kernels_report_is_bounded_and_checked():
    good = {"variables": ["a"], "modules": {"np": "numpy"}, "lost": [{"name": "g", "type": "generator",
                                                                    "reason": "x" * 1000}]}
    variables, modules, lost = ops.snapshot_parts(ops.report(_ran("noise\n" + ops.MARK + json.dumps(good)), "s"))
    assert variables == ("a",) and modules == {"np": "numpy"} and len(lost[0].reason) == 300
    with pytest.raises(SnapshotError, match="did not report"):
        ops.report(_ran("no marker here"), "snapshot")
    with pytest.raises(SnapshotError, match="not JSON"):
        ops.report(_ran(ops.MARK + "{nope"), "snapshot")
    with pytest.raises(SnapshotError, match="malformed"):
        ops.snapshot_parts({"variables": [1, 2], "modules": {}})
    with pytest.raises(SnapshotTooLarge, match="snapshot_size"):
        ops.snapshot_parts({"error": "too_large", "limit": 10})
    with pytest.raises(SnapshotError, match="needs dill"):
        ops.report(_ran("", "error", ErrorInfo("ModuleNotFoundError", "No module named 'dill'", "")), "snapshot")
    with pytest.raises(RestoreError, match="lacks module") as e:
        ops.restore_outcome({"missing": ["polars"], "errors": []}, "img")
    assert e.value.missing == ("polars",)


def test_the_code_sent_to_the_kernel_compiles_and_leaves_no_name():
    code = ops.call("snapshot", "/work/.x", 10, ["tmp"])
    compile(code, "<test>", "exec")
    assert code.startswith("(lambda ns:")
    with pytest.raises(TypeError):
        ops.call("snapshot", object())
