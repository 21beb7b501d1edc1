"""Hostile code probing the rest of the Linux kernel's surface, noexec mounts and
processes that try to outlive their cell or their session."""

from __future__ import annotations

import docker as docker_sdk
import pytest

from .conftest import LIBC, assert_healthy, container_gone, inside

EPERM, EACCES, ENOENT, EROFS = 1, 13, 2, 30
REFUSED_WRITE = (["OSError", EROFS], ["PermissionError", EACCES], ["FileNotFoundError", ENOENT])


def test_af_alg_and_af_vsock_sockets_are_refused(module_session):
    out = inside(module_session, LIBC + """
import socket
print(json.dumps({'alg': oserr(socket.socket, 38, socket.SOCK_SEQPACKET, 0),
                  'vsock': oserr(socket.socket, 40, socket.SOCK_STREAM, 0),
                  'bluetooth': oserr(socket.socket, 31, socket.SOCK_STREAM, 0),
                  'tipc': oserr(socket.socket, 30, socket.SOCK_RDM, 0),
                  'xdp': oserr(socket.socket, 44, socket.SOCK_RAW, 0)}))
""")
    eperm = ["PermissionError", EPERM]
    assert out == {"alg": eperm, "vsock": eperm, "bluetooth": eperm, "tipc": eperm, "xdp": eperm}
    assert_healthy(module_session)


@pytest.mark.parametrize("name,args", [
    ("io_uring_setup", (8, 0)),
    ("userfaultfd", (0,)),
    ("open_by_handle_at", (-100, 0, 0)),  # AT_FDCWD; the shocker escape
    ("pidfd_getfd", (0, 0, 0)),
])
def test_risky_syscalls_are_refused(module_session, name, args):
    out = inside(module_session, LIBC + f"print(json.dumps(sc({name!r}, *{args!r})))")
    assert out == [-1, EPERM], f"{name}: {out}"
    assert_healthy(module_session)


def test_setns_into_init_namespaces_is_refused(module_session):
    out = inside(module_session, LIBC + """
res = {}
for ns in ('net', 'mnt', 'pid', 'user', 'uts', 'ipc'):
    try:
        fd = os.open(f'/proc/1/ns/{ns}', os.O_RDONLY)
    except OSError as e:
        res[ns] = ['open', e.errno]
        continue
    res[ns] = sc('setns', fd, 0)
    os.close(fd)
print(json.dumps(res))
""")
    # attach: pid 1 is the relay, non-dumpable, so its namespace files cannot even be opened
    refused = [-1, EPERM] if module_session.transport == "ipc" else ["open", EACCES]
    for ns, res in out.items():
        assert res == refused, f"{ns}: {res}"
    assert set(out) == {"net", "mnt", "pid", "user", "uts", "ipc"}
    assert_healthy(module_session)


def test_core_pattern_cannot_be_written(module_session):
    out = inside(module_session, LIBC + """
print(json.dumps(oserr(lambda: open('/proc/sys/kernel/core_pattern', 'w').write('|/tmp/evil'))))
""")
    assert out in (["OSError", EROFS], ["PermissionError", EACCES])
    assert_healthy(module_session)


def test_sysrq_uevent_helper_and_binfmt_misc_cannot_be_written(module_session):
    out = inside(module_session, LIBC + """
print(json.dumps({
    'sysrq': oserr(lambda: open('/proc/sysrq-trigger', 'w').write('b')),
    'uevent_helper': oserr(lambda: open('/sys/kernel/uevent_helper', 'w').write('/tmp/evil')),
    'binfmt_register': oserr(lambda: open('/proc/sys/fs/binfmt_misc/register', 'w').write(
        ':evil:M::\\\\x7fELF::/tmp/evil:')),
    'binfmt_status': oserr(lambda: open('/proc/sys/fs/binfmt_misc/status', 'w').write('1')),
}))
""")
    for what, res in out.items():
        assert res in REFUSED_WRITE, f"{what}: {res}"
    assert_healthy(module_session)


def test_kernel_memory_keys_and_firmware_are_not_readable(module_session):
    out = inside(module_session, LIBC + """
def read(p):
    try:
        return ['read', len(open(p, 'rb').read(4096))]
    except OSError as e:
        return [type(e).__name__, e.errno]
print(json.dumps({'kcore': read('/proc/kcore'), 'keys': read('/proc/keys'), 'kallsyms_addrs':
                  sorted({l.split()[0] for l in open('/proc/kallsyms')})[:3] if os.path.exists('/proc/kallsyms') else [],
                  'firmware': sorted(os.listdir('/sys/firmware')), 'timer_list': read('/proc/timer_list'),
                  'sched_debug': read('/proc/sched_debug')}))
""")
    assert out["kcore"] in (["PermissionError", EACCES], ["FileNotFoundError", ENOENT], ["read", 0])
    assert out["keys"] in (["read", 0], ["FileNotFoundError", ENOENT])  # masked with /dev/null
    assert out["firmware"] == []  # masked with an empty tmpfs
    assert out["timer_list"] in (["read", 0], ["FileNotFoundError", ENOENT])
    assert out["sched_debug"] in (["read", 0], ["FileNotFoundError", ENOENT], ["PermissionError", EACCES])
    # kernel symbol addresses are hidden from an unprivileged reader (kptr_restrict)
    assert set(out["kallsyms_addrs"]) <= {"0000000000000000"}
    assert_healthy(module_session)


@pytest.mark.parametrize("where", ["/tmp", "/work", "/home/sandbox", "/dev/shm"])
def test_binaries_written_by_the_code_cannot_be_executed(module_session, where):
    out = inside(module_session, LIBC + f"""
import shutil, subprocess
dest = {where!r} + '/evil-true'
shutil.copy('/usr/bin/true', dest)
os.chmod(dest, 0o755)
res = {{'subprocess': oserr(subprocess.run, [dest]), 'execv_fork': None,
       'mode': oct(os.stat(dest).st_mode & 0o777)}}
pid = os.fork()
if pid == 0:
    try:
        os.execv(dest, [dest])
    except OSError as e:
        os._exit(100 + e.errno)
    os._exit(1)
res['execv_fork'] = os.waitpid(pid, 0)[1] >> 8
os.unlink(dest)
print(json.dumps(res))
""")
    assert out["mode"] == "0o755"
    assert out["subprocess"] == ["PermissionError", EACCES]
    assert out["execv_fork"] == 100 + EACCES
    assert_healthy(module_session)


def test_setsid_daemon_dies_with_restart_and_close(kernel_image, docker):
    from kernelexec import Policy, Session

    s = Session(Policy(image=kernel_image))
    try:
        s.execute("import subprocess; d = subprocess.Popen(['sleep', '1000'], start_new_session=True); d.pid")
        scan = """
import json, os
found = []
for p in os.listdir('/proc'):
    if p.isdigit():
        try:
            if open(f'/proc/{p}/cmdline', 'rb').read().startswith(b'sleep\\0' + b'1000'):
                found.append([int(p), os.getsid(int(p))])
        except OSError:
            pass
print(json.dumps({'found': found, 'mysid': os.getsid(0)}))
"""
        out = inside(s, scan)
        # it outlived its cell, in a session of its own (detached from the kernel's)
        assert len(out["found"]) == 1 and out["found"][0][1] != out["mysid"]
        first = s.container_id
        s.restart()
        assert s.container_id != first
        with pytest.raises(docker_sdk.errors.NotFound):
            docker.api.inspect_container(first)
        assert inside(s, scan)["found"] == []  # the fresh kernel sees no daemon
        s.execute("import subprocess; d = subprocess.Popen(['sleep', '1000'], start_new_session=True)")
        assert len(inside(s, scan)["found"]) == 1
        second, sid = s.container_id, s.id
    finally:
        s.close()
    with pytest.raises(docker_sdk.errors.NotFound):
        docker.api.inspect_container(second)
    assert container_gone(docker, sid)


def test_memfd_and_proc_self_exe_tricks_do_not_gain_privilege(module_session):
    """Running code from anonymous memory is not a privilege: the process is still the sandbox user."""
    out = inside(module_session, LIBC + """
import subprocess
fd = os.memfd_create('x')
os.write(fd, open('/usr/bin/id', 'rb').read())
try:
    r = subprocess.run([f'/proc/self/fd/{fd}', '-u'], capture_output=True, text=True, pass_fds=(fd,))
    res = [r.returncode, r.stdout.strip()]
except OSError as e:
    res = [type(e).__name__, e.errno]
print(json.dumps({'res': res, 'me': str(os.getuid())}))
""")
    # where vm.memfd_noexec forbids it the exec fails; elsewhere it runs as the same unprivileged user
    assert out["res"] in ([0, out["me"]], ["PermissionError", EACCES]), out
    assert out["me"] != "0"
    assert_healthy(module_session)
