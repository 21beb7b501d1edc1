"""Attacks from inside the container on /run/kernelexec, the one host directory it sees.

On a root host the directory is handed to root (0755) once the kernel's
sockets exist, so the kernel can no longer add, remove, rename or replace
entries; the host's connections are pinned to the inodes it verified at start.
Each test also checks that the host client keeps working and that close()
removes the directory without following what is in it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from kernelexec import Policy, Session

from .conftest import LIBC, assert_healthy, assert_nothing_left, inside

EPERM, EACCES, EXDEV = 1, 13, 18

#: The attach transport mounts no host directory: these attacks have no target there.
pytestmark = pytest.mark.ipc



def _require_root() -> None:
    assert os.geteuid() == 0, ("these attacks are specified for a root host, where the socket directory "
                               "is locked to root after start; run the suite as root (as CI does)")


def _snapshot(sockdir: Path) -> dict[str, tuple[int, int, int, str]]:
    """name -> (mode, uid, size, sha256 of regular files) of every entry, following nothing."""
    out = {}
    for entry in os.scandir(sockdir):
        st = entry.stat(follow_symlinks=False)
        digest = ""
        if stat.S_ISREG(st.st_mode):
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        out[entry.name] = (st.st_mode, st.st_uid, st.st_size, digest)
    return out


@pytest.fixture
def victim(kernel_image, docker):
    """A session of its own per attack; checked to be fully gone after close()."""
    _require_root()
    s = Session(Policy(image=kernel_image))
    sid, sockdir = s.id, s.socket_dir
    st = os.stat(sockdir)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)  # locked before any code runs
    yield s
    s.close()
    assert_nothing_left(docker, sid, sockdir)


def test_replacing_a_socket_with_a_symlink_is_refused(victim, tmp_path):
    target = tmp_path / "host-file"
    target.write_text("host data")
    before = _snapshot(victim.socket_dir)
    out = inside(victim, LIBC + f"""
print(json.dumps({{
    'unlink': oserr(os.unlink, '/run/kernelexec/k-1'),
    'rename_away': oserr(os.rename, '/run/kernelexec/k-1', '/run/kernelexec/k-1.old'),
    'symlink_new': oserr(os.symlink, {str(target)!r}, '/run/kernelexec/k-9'),
    'symlink_over': oserr(os.symlink, '/etc/passwd', '/run/kernelexec/k-1'),
    'rename_over': oserr(os.rename, '/run/kernelexec/k-2', '/run/kernelexec/k-1'),
    'rename_from_tmp': oserr(lambda: (os.symlink('/etc/passwd', '/tmp/l'), os.rename('/tmp/l', '/run/kernelexec/k-1'))),
}}))
""")
    assert out == {"unlink": ["PermissionError", EACCES], "rename_away": ["PermissionError", EACCES],
                   "symlink_new": ["PermissionError", EACCES], "symlink_over": ["FileExistsError", 17],
                   "rename_over": ["PermissionError", EACCES], "rename_from_tmp": ["OSError", EXDEV]}
    assert _snapshot(victim.socket_dir) == before
    assert target.read_text() == "host data"
    assert_healthy(victim)


def test_planting_a_fifo_or_a_new_socket_is_refused(victim):
    out = inside(victim, LIBC + """
import socket
def bind(path):
    s = socket.socket(socket.AF_UNIX); s.bind(path)
print(json.dumps({'fifo': oserr(os.mkfifo, '/run/kernelexec/k-6'),
                  'mknod': oserr(os.mknod, '/run/kernelexec/k-7', 0o600 | 0o010000),
                  'bind': oserr(bind, '/run/kernelexec/k-8'),
                  'mkdir': oserr(os.mkdir, '/run/kernelexec/d')}))
""")
    e = ["PermissionError", EACCES]
    assert out == {"fifo": e, "mknod": e, "bind": e, "mkdir": e}
    assert_healthy(victim)


def test_hard_links_into_the_directory_are_refused(victim):
    out = inside(victim, LIBC + """
print(json.dumps({'socket': oserr(os.link, '/run/kernelexec/k-1', '/run/kernelexec/k-1-hard'),
                  'conn': oserr(os.link, '/run/kernelexec/connection.json', '/run/kernelexec/c2'),
                  'from_tmp': oserr(lambda: (open('/tmp/x', 'w').close(), os.link('/tmp/x', '/run/kernelexec/x')))}))
""")
    assert out["socket"] == ["PermissionError", EACCES]
    # EACCES (no write permission on the directory), or EPERM first where the file is not the
    # kernel's own (fs.protected_hardlinks): refused either way
    assert out["conn"] in (["PermissionError", EACCES], ["PermissionError", EPERM])
    assert out["from_tmp"] == ["OSError", EXDEV]
    assert os.stat(victim.socket_dir / "k-1", follow_symlinks=False).st_nlink == 1
    assert_healthy(victim)


def test_filling_the_directory_with_files_is_refused(victim):
    out = inside(victim, LIBC + """
made, err = 0, None
try:
    for i in range(10000):
        open(f'/run/kernelexec/f{i}', 'w').close()
        made += 1
except OSError as e:
    err = [type(e).__name__, e.errno]
print(json.dumps({'made': made, 'err': err, 'entries': sorted(os.listdir('/run/kernelexec'))}))
""")
    assert out["made"] == 0 and out["err"] == ["PermissionError", EACCES]
    assert sorted(os.listdir(victim.socket_dir)) == out["entries"]
    assert_healthy(victim)


def test_chmod_of_the_directory_is_refused(victim):
    out = inside(victim, LIBC + """
print(json.dumps({'chmod': oserr(os.chmod, '/run/kernelexec', 0o777),
                  'chown': oserr(os.chown, '/run/kernelexec', os.getuid(), os.getgid()),
                  'utime': oserr(os.utime, '/run/kernelexec', (0, 0))}))
""")
    assert out == {"chmod": ["PermissionError", EPERM], "chown": ["PermissionError", EPERM],
                   "utime": ["PermissionError", EPERM]}
    st = os.stat(victim.socket_dir)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)
    assert_healthy(victim)


def test_the_files_the_host_wrote_cannot_be_tampered_with(victim):
    """connection.json and startup.py are host files on the host's disk: the kernel must not be able
    to rewrite them, mark them setuid, or make them executable."""
    before = _snapshot(victim.socket_dir)
    out = inside(victim, LIBC + """
res = {}
for name in ('connection.json', 'startup.py'):
    p = '/run/kernelexec/' + name
    res[name] = {'open_w': oserr(lambda: open(p, 'r+b')),
                 'unlink': oserr(os.unlink, p),
                 'rename': oserr(os.rename, p, p + '.x'),
                 'chmod': oserr(os.chmod, p, 0o4777)}
print(json.dumps(res))
""")
    for name in ("connection.json", "startup.py"):
        assert out[name]["open_w"] == ["PermissionError", EACCES], (name, out[name])
        assert out[name]["unlink"] == ["PermissionError", EACCES], (name, out[name])
        assert out[name]["rename"] == ["PermissionError", EACCES], (name, out[name])
        assert out[name]["chmod"] == ["PermissionError", EPERM], (name, out[name])
    assert _snapshot(victim.socket_dir) == before
    assert_healthy(victim)


def test_the_socket_directory_is_not_a_way_to_run_or_store_code(victim):
    """Files in /run/kernelexec must neither run nor grow: it is host disk, outside every tmpfs bound,
    and (unlike /tmp, /work, /dev/shm) not mounted noexec."""
    before = {name: st[2] for name, st in _snapshot(victim.socket_dir).items()}
    out = inside(victim, LIBC + """
import subprocess
p = '/run/kernelexec/startup.py'
steps = {}
steps['chmod'] = oserr(os.chmod, p, 0o700)
steps['write'] = oserr(lambda: open(p, 'wb').write(open('/usr/bin/true', 'rb').read() + b'\\0' * (4 << 20)))
steps['exec'] = oserr(subprocess.run, [p])
print(json.dumps(steps))
""")
    # the first step already fails; nothing was stored or run
    assert out["chmod"] == ["PermissionError", EPERM], out
    assert out["write"] == ["PermissionError", EACCES], out
    assert out["exec"] == ["PermissionError", EACCES], out
    after = {name: st[2] for name, st in _snapshot(victim.socket_dir).items()}
    assert after == before
    assert_healthy(victim)


def test_another_sessions_socket_directory_is_out_of_reach(kernel_image, docker):
    _require_root()
    with Session(Policy(image=kernel_image)) as a, Session(Policy(image=kernel_image)) as b:
        other = str(b.socket_dir)
        out = inside(a, LIBC + f"""
import socket
def connect(path):
    s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path)
print(json.dumps({{'exists': os.path.exists({other!r}), 'connect': oserr(connect, {other!r} + '/k-1'),
                  'via_proc_root': oserr(os.listdir, '/proc/1/root' + {other!r}),
                  'symlink': oserr(os.symlink, {other!r} + '/k-1', '/run/kernelexec/k-1'),
                  'mine': sorted(os.listdir('/run/kernelexec'))}}))
""")
        assert out["exists"] is False
        assert out["connect"] == ["FileNotFoundError", 2]
        assert out["via_proc_root"] == ["FileNotFoundError", 2]
        assert out["symlink"] == ["FileExistsError", 17]
        assert set(out["mine"]) == set(os.listdir(a.socket_dir))
        assert_healthy(a)
        assert_healthy(b)


def test_close_removes_planted_links_without_following_them(kernel_image, docker, tmp_path):
    """Should anything ever be planted (simulated here from the host side, as root can), close()
    deletes the links themselves and never touches what they point at."""
    _require_root()
    target_file = tmp_path / "precious.txt"
    target_file.write_text("keep me")
    target_dir = tmp_path / "precious-dir"
    target_dir.mkdir()
    (target_dir / "inner.txt").write_text("keep me too")
    s = Session(Policy(image=kernel_image))
    sid, sockdir = s.id, s.socket_dir
    try:
        os.symlink(target_file, sockdir / "evil-file-link")
        os.symlink(target_dir, sockdir / "evil-dir-link")
        os.link(target_file, sockdir / "evil-hard-link")
        os.mkfifo(sockdir / "evil-fifo")
        nested = sockdir / "nested"
        nested.mkdir()
        os.symlink(target_dir, nested / "deeper-link")
        os.chown(nested, 10001, 10001)
        os.chmod(nested, 0)
        assert_healthy(s)  # the host client is pinned to the verified sockets; none of this matters
    finally:
        s.close()
    assert_nothing_left(docker, sid, sockdir)
    assert target_file.read_text() == "keep me" and target_file.stat().st_nlink == 1
    assert (target_dir / "inner.txt").read_text() == "keep me too"
    assert sorted(p.name for p in target_dir.iterdir()) == ["inner.txt"]
