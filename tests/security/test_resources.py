"""Hostile code exhausting resources: each is held to a Policy limit, fails in a
precise way, and leaves the host (and, where the kernel survives, the session) fine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kernelexec import ExecutionTimeout, KernelDied
from kernelexec.policy import parse_size

from .conftest import MB, assert_healthy, inside

EAGAIN, EMFILE, ENOSPC, EFBIG, EACCES = 11, 24, 28, 27, 13


def _dir_bytes(path: Path) -> int:
    total = 0
    for top, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(top, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def test_flooding_the_containers_stdout_fills_no_host_disk(module_session, docker):
    """1 GB to PID 1's stdout (and 256 MB to its stderr): with log driver "none", Docker stores none of it.

    On attach PID 1 is the relay, whose stdout is the stream to the host: it is non-dumpable, so its fds
    cannot even be opened (the kernel's own stdout and stderr are ipykernel's, whose output is bounded by
    max_output_bytes: test_output_abuse.py)."""
    cid = module_session.container_id
    info = docker.api.inspect_container(cid)
    assert info["HostConfig"]["LogConfig"]["Type"] == "none"
    assert info["LogPath"] == ""
    cdir = Path(docker.info()["DockerRootDir"]) / "containers" / cid
    before = _dir_bytes(cdir)
    if module_session.transport != "ipc":
        refused = inside(module_session, """
import json, os
res = []
for target in ('/proc/1/fd/0', '/proc/1/fd/1', '/proc/1/fd/2'):
    try:
        os.close(os.open(target, os.O_WRONLY)); res.append('opened')
    except OSError as e:
        res.append(e.errno)
print(json.dumps(res))
""")
        assert refused == [EACCES] * 3
        assert _dir_bytes(cdir) - before < MB
        assert docker.api.inspect_container(cid)["LogPath"] == ""
        assert_healthy(module_session)
        return
    out = inside(module_session, """
import json, os
buf = b'x' * (1 << 20)
sent = {}
for target, mb in (('/proc/1/fd/1', 1024), ('/proc/1/fd/2', 256)):
    fd = os.open(target, os.O_WRONLY)
    n = 0
    for _ in range(mb):
        n += os.write(fd, buf)
    os.close(fd)
    sent[target] = n
print(json.dumps(sent))
""")
    assert out == {"/proc/1/fd/1": 1024 * MB, "/proc/1/fd/2": 256 * MB}  # all of it was accepted...
    after = _dir_bytes(cdir)
    assert after - before < MB, f"{cdir} grew by {after - before} bytes"  # ...and none of it kept
    assert not any(p.name.endswith("-json.log") for p in cdir.iterdir())
    assert docker.api.inspect_container(cid)["LogPath"] == ""
    assert_healthy(module_session)


@pytest.mark.parametrize("where,field", [("/tmp", "tmp_size"), ("/dev/shm", "shm_size"),
                                         ("/home/sandbox", "home_size"), ("/work", "workdir_size")])
def test_filling_a_writable_directory_stops_at_its_size(module_session, policy, where, field):
    size = parse_size(getattr(policy, field))
    out = inside(module_session, f"""
import json, os
st = os.statvfs({where!r})
total, used_before = st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize
path = {where!r} + '/fill'
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
written, err = 0, None
buf = b'\\xab' * (1 << 20)
try:
    while written < 4 * total:
        written += os.write(fd, buf)
except OSError as e:
    err = [type(e).__name__, e.errno]
finally:
    os.close(fd)
    os.unlink(path)
print(json.dumps({{'err': err, 'written': written, 'total': total, 'used_before': used_before}}))
""")
    assert out["err"] == ["OSError", ENOSPC]
    assert out["total"] == size  # the mount is exactly the Policy's size
    assert size - out["used_before"] - MB <= out["written"] <= size - out["used_before"]
    assert_healthy(module_session)


def test_file_size_limit_gives_efbig(fresh):
    s = fresh(max_file_size="1m")
    out = inside(s, """
import json, os
fd = os.open('/work/big', os.O_WRONLY | os.O_CREAT, 0o600)
n, err = 0, None
try:
    while True:
        n += os.write(fd, b'x' * 65536)
except OSError as e:
    err = [type(e).__name__, e.errno]
os.close(fd); os.unlink('/work/big')
print(json.dumps({'err': err, 'n': n}))
""")
    # Python ignores SIGXFSZ, so RLIMIT_FSIZE shows as EFBIG rather than a kill
    assert out == {"err": ["OSError", EFBIG], "n": MB}
    assert_healthy(s)


def test_fork_bomb_is_bounded_and_the_session_recovers_without_restart(fresh):
    s = fresh()
    cid = s.container_id
    out = inside(s, """
import json, os, time
children, err = [], None
while len(children) < 10000:
    try:
        pid = os.fork()
    except OSError as e:
        err = [type(e).__name__, e.errno]
        break
    if pid == 0:
        time.sleep(1)
        os._exit(0)
    children.append(pid)
def cg(name):
    for p in (f'/sys/fs/cgroup/pids/{name}', f'/sys/fs/cgroup/{name}'):
        if os.path.exists(p):
            return open(p).read().strip()
print(json.dumps({'err': err, 'forked': len(children), 'max': cg('pids.max'), 'current': cg('pids.current')}))
""")
    assert out["err"] == ["BlockingIOError", EAGAIN]
    limit = int(out["max"])
    assert limit == s.policy.pids
    assert 0 < out["forked"] < limit
    # the children exit after ~1 s and are left as zombies: the kernel reaps them around cells,
    # so the pids come back with no restart. Wait (from the host) until none is still sleeping.
    time.sleep(1.0)
    for _ in range(30):
        alive = inside(s, """
import json, os
me = str(os.getpid())
n = 0
for p in os.listdir('/proc'):
    try:
        f = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        continue
    n += f[1] == me and f[0] != 'Z'
print(json.dumps(n))
""")
        if alive == 0:
            break
        time.sleep(0.5)
    assert alive == 0
    out = inside(s, """
import json, subprocess
r = subprocess.run(['echo', 'child ok'], capture_output=True, text=True)
zombies = sum(1 for p in os.listdir('/proc') if p.isdigit() and os.path.exists(f'/proc/{p}/stat')
              and open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z')
print(json.dumps({'child': r.stdout.strip(), 'zombies': zombies, 'current': cg('pids.current')}))
""")
    assert out["child"] == "child ok"
    assert out["zombies"] == 0
    assert int(out["current"]) < 20
    assert s.container_id == cid  # same kernel, no restart
    assert_healthy(s)


CGROUP_PIDS = """
import json, os
def cg(name):
    for p in (f'/sys/fs/cgroup/pids/{name}', f'/sys/fs/cgroup/{name}'):
        if os.path.exists(p):
            return int(open(p).read().strip().replace('max', '0'))
"""


def test_recursive_fork_bomb_is_held_at_the_pids_limit_and_restart_clears_it(fresh):
    s = fresh()
    s.execute("import subprocess; bomb = subprocess.Popen(['bash', '-c', 'b() { b | b & }; b'], "
              "start_new_session=True, stderr=subprocess.DEVNULL)")
    time.sleep(3)
    out = inside(s, CGROUP_PIDS + """
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    forked = 'forked'
except OSError as e:
    forked = [type(e).__name__, e.errno]
print(json.dumps({'current': cg('pids.current'), 'max': cg('pids.max'), 'fork': forked}))
""")
    assert out["max"] == s.policy.pids
    assert out["current"] >= out["max"] - 5  # the bomb fills the limit and cannot go past it
    assert out["fork"] in (["BlockingIOError", EAGAIN], "forked")  # a race with the bomb for a freed pid
    assert_healthy(s)  # the kernel itself still answers
    first = s.container_id
    s.restart()
    assert s.container_id != first
    assert inside(s, CGROUP_PIDS + "print(json.dumps(cg('pids.current')))") < 20
    assert_healthy(s)


def test_memory_bomb_is_oom_killed_and_restart_works(fresh):
    s = fresh(memory="256m")
    s.execute("x = 1")
    with pytest.raises(KernelDied) as info:
        s.execute("hog = []\nwhile True:\n    hog.append(bytearray(16 << 20))", timeout=50)
    assert info.value.oom_killed is True
    assert "oom" in str(info.value).lower() and "Policy.memory" in str(info.value)
    assert info.value.state_lost is True
    with pytest.raises(KernelDied):
        s.execute("1")  # the death is remembered, not a hang
    s.restart()
    assert s.execute("'x' in dir()").text == "False"
    assert_healthy(s)


def test_cpu_spin_is_throttled_to_the_limit_and_stopped_by_the_timeout(fresh, docker):
    s = fresh(cpus=0.5)
    assert docker.api.inspect_container(s.container_id)["HostConfig"]["NanoCpus"] == 500_000_000
    out = inside(s, """
import json, os, time, multiprocessing
def cpu():
    if os.path.exists('/sys/fs/cgroup/cpu/cpu.cfs_quota_us'):
        q = int(open('/sys/fs/cgroup/cpu/cpu.cfs_quota_us').read()); p = int(open('/sys/fs/cgroup/cpu/cpu.cfs_period_us').read())
        stat = open('/sys/fs/cgroup/cpu/cpu.stat').read()
    else:
        q, p = open('/sys/fs/cgroup/cpu.max').read().split(); q, p = int(q), int(p)
        stat = open('/sys/fs/cgroup/cpu.stat').read()
    return q, p, dict((l.split()[0], int(l.split()[1])) for l in stat.splitlines())
q, p, before = cpu()
# spin until the scheduler stops this cgroup for having used its quota, or until 3 s of CPU are
# used: the bound counts CPU time, not wall time, so a busy machine only makes the spin longer
c0 = time.process_time()
while cpu()[2]['nr_throttled'] == before['nr_throttled'] and time.process_time() - c0 < 3.0:
    pass
_, _, after = cpu()
print(json.dumps({'quota': q, 'period': p, 'throttled': after['nr_throttled'] - before['nr_throttled']}))
""")
    # the quota is half a core, and the kernel enforces it: the spinning thread was stopped in a
    # period once it had used its half (without a quota it would spin its 3 s unthrottled)
    assert out["quota"] / out["period"] == pytest.approx(0.5)
    assert out["throttled"] > 0, out
    s.execute("kept = 'yes'")
    first = s.container_id
    with pytest.raises(ExecutionTimeout) as info:
        s.execute("while True:\n    pass", timeout=2)
    assert info.value.state_lost is False and s.container_id == first  # interrupted, not replaced
    assert s.execute("kept").text == "'yes'"
    assert_healthy(s)


def test_fd_exhaustion_stops_at_the_nofile_limit(module_session):
    out = inside(module_session, """
import json, os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 2, hard * 2)); raised = 'raised'
except (ValueError, OSError) as e:
    raised = type(e).__name__
base = len(os.listdir('/proc/self/fd')) - 1
fds, err = [], None
try:
    while len(fds) < 100000:
        fds.append(os.open('/dev/null', os.O_RDONLY))
except OSError as e:
    err = [type(e).__name__, e.errno]
n = len(fds)
for f in fds:
    os.close(f)
print(json.dumps({'soft': soft, 'hard': hard, 'raised': raised, 'err': err, 'opened': n, 'base': base}))
""")
    assert out["err"] == ["OSError", EMFILE]
    assert out["soft"] == out["hard"] == module_session.policy.nofile
    assert out["raised"] in ("ValueError", "PermissionError")  # the limit cannot be lifted from inside
    assert out["base"] + out["opened"] == out["soft"]
    assert_healthy(module_session)


def test_thread_bomb_is_bounded_by_pids_and_the_session_goes_on(module_session):
    out = inside(module_session, """
import json, threading
stop = threading.Event()
threads, err = [], None
try:
    while len(threads) < 100000:
        t = threading.Thread(target=stop.wait, daemon=True)
        t.start()
        threads.append(t)
except RuntimeError as e:
    err = str(e)
n = len(threads)
stop.set()
for t in threads:
    t.join()
again = threading.Thread(target=lambda: None); again.start(); again.join()
print(json.dumps({'err': err, 'started': n}))
""")
    assert out["err"] == "can't start new thread"
    assert 0 < out["started"] < module_session.policy.pids
    assert_healthy(module_session)


def test_ignoring_sigint_past_the_timeout_replaces_the_kernel(fresh):
    s = fresh(interrupt_grace=1.0)
    s.execute("state = 42")
    first = s.container_id
    with pytest.raises(ExecutionTimeout) as info:
        s.execute("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('stubborn', flush=True)\n"
                  "time.sleep(600)", timeout=2)
    assert info.value.state_lost is True
    assert "restarted in a fresh container" in str(info.value)
    assert info.value.partial is not None and "stubborn" in info.value.partial.stdout
    assert s.container_id != first
    assert s.execute("'state' in dir()").text == "False"
    assert_healthy(s)
