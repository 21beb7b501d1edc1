"""Hostile code trying to gain privileges or act on the kernel/host as root would."""

from __future__ import annotations

import pytest

from kernelexec import Policy, Session
from kernelexec.tools.image import image_tag

from .conftest import LIBC, assert_healthy, inside

EPERM, EACCES, ENOENT, EROFS = 1, 13, 2, 30


def test_no_setuid_or_setgid_file_in_the_real_image(docker):
    """Targets the real content-tagged image (the dev image keeps Debian's setuid bits).

    A setuid/setgid bit matters on anything that can be executed; on a directory
    setgid only picks the group of new entries, which matters only where the
    sandbox can create entries, so such directories must not be writable.
    """
    tag = image_tag()
    with Session(Policy(image=tag)) as s:
        out = inside(s, """
import json, os, subprocess
r = subprocess.run(['find', '/', '-xdev', '-perm', '/6000', '-printf', '%y %m %u:%g %p\\n'],
                   capture_output=True, text=True, timeout=100)
rows = [l.split(' ', 3) for l in r.stdout.splitlines()]
print(json.dumps({'files': [r for r in rows if r[0] != 'd'],
                  'dirs': [r + [os.access(r[3], os.W_OK)] for r in rows if r[0] == 'd']}))
""", timeout=110)
        assert out["files"] == [], f"setuid/setgid files in {tag}: {out['files']}"
        assert [d for d in out["dirs"] if d[4]] == [], f"setgid directories the sandbox can write to: {out['dirs']}"
        assert_healthy(s)


def test_ptrace_is_refused(module_session):
    out = inside(module_session, LIBC + """
PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_SEIZE = 0, 16, 0x4206
print(json.dumps({'traceme': call(libc.ptrace, PTRACE_TRACEME, 0, None, None),
                  'attach_init': call(libc.ptrace, PTRACE_ATTACH, 1, None, None),
                  'seize_self_parent': call(libc.ptrace, PTRACE_SEIZE, os.getppid(), None, None),
                  'vm_readv': sc('process_vm_readv', 1, 0, 0, 0, 0, 0),
                  'tracer': [l.split()[1] for l in open('/proc/self/status') if l.startswith('TracerPid')][0]}))
""")
    assert out["traceme"] == [-1, EPERM]
    assert out["attach_init"] == [-1, EPERM]
    assert out["seize_self_parent"] == [-1, EPERM]
    assert out["vm_readv"] == [-1, EPERM]
    assert out["tracer"] == "0"
    assert_healthy(module_session)


def test_setuid_bit_on_own_file_gains_nothing(module_session):
    out = inside(module_session, LIBC + """
import shutil, subprocess, stat
shutil.copy('/usr/bin/id', '/work/suid-id')
os.chmod('/work/suid-id', 0o4755)
mode = os.stat('/work/suid-id').st_mode
run = oserr(subprocess.run, ['/work/suid-id', '-u'])
print(json.dumps({'suid_set': bool(mode & stat.S_ISUID), 'exec': run,
                  'setuid0': oserr(os.setuid, 0), 'setgid0': oserr(os.setgid, 0),
                  'setresuid': call(libc.setresuid, 0, 0, 0), 'setgroups': oserr(os.setgroups, [0]),
                  'uid': [os.getuid(), os.geteuid()], 'nnp': [l.split()[1] for l in open('/proc/self/status')
                                                             if l.startswith('NoNewPrivs')][0]}))
os.unlink('/work/suid-id')
""")
    assert out["suid_set"] is True  # the bit can be set on one's own file...
    assert out["exec"] == ["PermissionError", EACCES]  # ...but nothing writable may be executed (noexec)
    assert out["setuid0"] == ["PermissionError", EPERM]
    assert out["setgid0"] == ["PermissionError", EPERM]
    assert out["setresuid"] == [-1, EPERM]
    assert out["setgroups"] == ["PermissionError", EPERM]
    assert 0 not in out["uid"] and out["nnp"] == "1"
    assert_healthy(module_session)


def test_mount_is_refused(module_session):
    out = inside(module_session, LIBC + """
os.makedirs('/tmp/mnt', exist_ok=True)
print(json.dumps({'tmpfs': call(libc.mount, b'none', b'/tmp/mnt', b'tmpfs', 0, None),
                  'bind_root': call(libc.mount, b'/', b'/tmp/mnt', None, 0x1000, None),  # MS_BIND
                  'remount_rw': call(libc.mount, None, b'/', None, 0x20, None),  # MS_REMOUNT
                  'umount': call(libc.umount2, b'/run/kernelexec', 2)}))  # MNT_DETACH
""")
    assert out == {"tmpfs": [-1, EPERM], "bind_root": [-1, EPERM], "remount_rw": [-1, EPERM], "umount": [-1, EPERM]}
    assert_healthy(module_session)


def test_unshare_user_namespace_is_refused(module_session):
    out = inside(module_session, LIBC + """
import subprocess
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET = 0x10000000, 0x00020000, 0x40000000
r = subprocess.run(['unshare', '-Ur', 'id', '-u'], capture_output=True, text=True) if os.path.exists('/usr/bin/unshare') else None
print(json.dumps({'user': call(libc.unshare, CLONE_NEWUSER), 'mnt': call(libc.unshare, CLONE_NEWNS),
                  'net': call(libc.unshare, CLONE_NEWNET),
                  'cli': [r.returncode, r.stdout.strip()] if r else None}))
""")
    assert out["user"] == [-1, EPERM]
    assert out["mnt"] == [-1, EPERM]
    assert out["net"] == [-1, EPERM]
    if out["cli"] is not None:
        assert out["cli"][0] != 0 and out["cli"][1] != "0"
    assert_healthy(module_session)


@pytest.mark.parametrize("name,args", [
    ("keyctl", (0, 0, 0, 0, 0)),  # KEYCTL_GET_KEYRING_ID
    ("add_key", (0, 0, 0, 0, 0)),
    ("request_key", (0, 0, 0, 0)),
    ("bpf", (0, 0, 0)),  # BPF_MAP_CREATE
    ("perf_event_open", (0, 0, -1, -1, 0)),
    ("init_module", (0, 0, 0)),
    ("finit_module", (0, 0, 0)),
    ("delete_module", (0, 0)),
    ("kexec_load", (0, 0, 0, 0)),
])
def test_kernel_interfaces_are_refused_by_seccomp(module_session, name, args):
    out = inside(module_session, LIBC + f"print(json.dumps(sc({name!r}, *{args!r})))")
    assert out == [-1, EPERM], f"{name}: {out}"
    assert_healthy(module_session)


def test_proc_sys_and_sys_are_read_only(module_session):
    out = inside(module_session, LIBC + """
paths = ['/proc/sys/kernel/hostname', '/proc/sys/vm/drop_caches', '/proc/sys/kernel/modprobe',
         '/proc/sys/net/ipv4/ip_forward', '/sys/kernel/mm/transparent_hugepage/enabled', '/sys/class/net/lo/mtu',
         '/sys/fs/cgroup/pids/pids.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/pids.max',
         '/sys/fs/cgroup/memory.max']
res = {}
for p in paths:
    if os.path.exists(p):
        res[p] = oserr(lambda: os.open(p, os.O_WRONLY))
print(json.dumps(res))
""")
    assert len(out) >= 6, out
    for path, res in out.items():
        assert res in (["OSError", EROFS], ["PermissionError", EACCES]), f"{path}: {res}"
    assert_healthy(module_session)


def test_dev_mem_and_kmsg_do_not_exist(module_session):
    out = inside(module_session, LIBC + """
print(json.dumps({p: oserr(lambda: os.open(p, os.O_RDONLY)) for p in
                  ['/dev/mem', '/dev/kmem', '/dev/port', '/dev/kmsg', '/dev/sda', '/dev/vda', '/dev/fuse']}))
""")
    for path, res in out.items():
        assert res == ["FileNotFoundError", ENOENT], f"{path}: {res}"
    assert_healthy(module_session)


def test_cgroup_release_agent_escape_fails(module_session):
    out = inside(module_session, LIBC + """
res = {}
for d in ['/sys/fs/cgroup/memory', '/sys/fs/cgroup/rdma', '/sys/fs/cgroup']:
    if os.path.isdir(d):
        res[d + '/release_agent'] = oserr(lambda: open(d + '/release_agent', 'w').write('/tmp/evil'))
        res[d + '/mkdir'] = oserr(os.mkdir, d + '/x')
        if os.path.exists(d + '/notify_on_release'):
            res[d + '/notify_on_release'] = oserr(lambda: open(d + '/notify_on_release', 'w').write('1'))
print(json.dumps(res))
""")
    assert out, "no cgroup filesystem visible to test against"
    for what, res in out.items():
        assert res in (["OSError", EROFS], ["PermissionError", EACCES]), f"{what}: {res}"
    assert_healthy(module_session)


def test_reboot_is_refused(module_session):
    # LINUX_REBOOT_CMD_CAD_OFF: the most harmless command, should the call ever get through
    out = inside(module_session, LIBC + "print(json.dumps(sc('reboot', 0xfee1dead, 672274793, 0, 0)))")
    assert out == [-1, EPERM]
    assert_healthy(module_session)


def test_sethostname_is_refused(module_session):
    out = inside(module_session, LIBC + """
import socket
print(json.dumps({'host': call(libc.sethostname, b'evil', 4), 'domain': call(libc.setdomainname, b'evil', 4),
                  'name': socket.gethostname()}))
""")
    assert out == {"host": [-1, EPERM], "domain": [-1, EPERM], "name": "sandbox"}
    assert_healthy(module_session)


def test_clock_cannot_be_set(module_session):
    # each call would set the clock to what it already is, should it ever get through
    out = inside(module_session, LIBC + """
import time
class timespec(ctypes.Structure):
    _fields_ = [('tv_sec', ctypes.c_long), ('tv_nsec', ctypes.c_long)]
class timeval(ctypes.Structure):
    _fields_ = [('tv_sec', ctypes.c_long), ('tv_usec', ctypes.c_long)]
now = time.time()
ts = timespec(int(now), 0)
tv = timeval(int(now), 0)
print(json.dumps({'clock_settime': sc('clock_settime', 0, ctypes.byref(ts)),
                  'settimeofday': sc('settimeofday', ctypes.byref(tv), 0),
                  'py': oserr(time.clock_settime, time.CLOCK_REALTIME, now)}))
""")
    assert out == {"clock_settime": [-1, EPERM], "settimeofday": [-1, EPERM], "py": ["PermissionError", EPERM]}
    assert_healthy(module_session)
