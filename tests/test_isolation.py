"""Isolation, each property checked from inside the container."""

from __future__ import annotations

import json
import os
import secrets

import pytest

from kernelexec import Policy, Session


def gvisor(session: Session) -> bool:
    """The session runs under gVisor, whose emulated kernel answers some refusals in its own words."""
    return session.policy.runtime == "runsc"


def inside(session: Session, code: str):
    """Run code that prints one JSON value; return it decoded."""
    r = session.execute(code)
    assert r.ok, r.error and r.error.traceback
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_only_loopback_and_connect_fails_at_once(shared_session):
    # A non-blocking connect returns at once either way: EINPROGRESS (the SYN is on its way, as it
    # is for loopback) or the refusal of the route lookup inside the syscall itself. ENETUNREACH
    # from the syscall means the failure came at once, with nothing sent and nothing to wait for.
    out = inside(shared_session, """
import json, os, socket
def connect(addr):
    s = socket.socket(); s.setblocking(False)
    err = s.connect_ex(addr); s.close()
    return [err, os.strerror(err)]
print(json.dumps({'ifaces': sorted(os.listdir('/sys/class/net')), 'res': connect(('192.0.2.1', 80)),
                  'lo': connect(('127.0.0.1', 9))}))
""")
    assert out["ifaces"] == ["lo"]
    # gVisor's own network stack refuses the route lookup as EHOSTUNREACH, also inside the syscall
    refused = [113, "No route to host"] if gvisor(shared_session) else [101, "Network is unreachable"]
    assert out["res"] == refused
    assert out["lo"][0] in (115, 111), out["lo"]  # EINPROGRESS (or a refusal): a routed address looks different


def test_not_root_and_no_capabilities(shared_session):
    out = inside(shared_session, """
import ctypes, json, os
caps = {l.split(':')[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')}
print(json.dumps({'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid(), 'caps': caps,
                  'nnp': [l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')],
                  'nnp_prctl': ctypes.CDLL(None).prctl(39, 0, 0, 0, 0)}))  # PR_GET_NO_NEW_PRIVS
""")
    assert out["uid"] != 0 and out["euid"] != 0 and out["gid"] != 0
    assert int(out["caps"]["CapEff"], 16) == 0
    assert int(out["caps"]["CapPrm"], 16) == 0
    assert int(out["caps"]["CapBnd"], 16) == 0
    assert out["nnp_prctl"] == 1
    # gVisor's /proc/self/status has no NoNewPrivs line (prctl, above, is what it answers)
    assert out["nnp"] == ([] if gvisor(shared_session) else ["1"])


def test_root_filesystem_is_read_only(shared_session):
    out = inside(shared_session, """
import json
try:
    open('/usr/evil', 'w'); res = 'written'
except OSError as e:
    res = [e.errno, e.strerror]
print(json.dumps(res))
""")
    # gVisor refuses creating a file on its read-only root with EACCES, Linux with EROFS
    assert out == ([13, "Permission denied"] if gvisor(shared_session) else [30, "Read-only file system"])


def test_host_environment_is_not_passed(kernel_image, monkeypatch):
    secret = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv("KERNELEXEC_FAKE_API_KEY", secret)
    with Session(Policy(image=kernel_image, env={"NAMED": "yes"})) as s:
        out = inside(s, f"""
import json, os
found = any('{secret}' in v for v in os.environ.values())
try:
    proc1 = b'{secret}' in open('/proc/1/environ', 'rb').read()
except PermissionError:
    proc1 = 'unreadable'
print(json.dumps({{'found': found, 'proc1': proc1, 'named': os.environ.get('NAMED'),
                  'key_var': 'KERNELEXEC_FAKE_API_KEY' in os.environ}}))
""")
        # pid 1 is docker-init on ipc; on attach it is the relay, which is non-dumpable: not even readable
        # (except under gVisor, which lets the same uid read it: tests/security/test_resources.py)
        pid1 = False if s.transport == "ipc" or gvisor(s) else "unreadable"
    assert out == {"found": False, "proc1": pid1, "named": "yes", "key_var": False}


def test_nothing_of_the_host_is_visible_but_the_socket_dir(shared_session, tmp_path):
    """ipc: the socket directory is the one host directory mounted; attach: none is."""
    marker = tmp_path / f"host-marker-{secrets.token_hex(4)}"
    marker.write_text("host data")
    out = inside(shared_session, f"""
import json, os
mounts = []
for line in open('/proc/self/mountinfo'):
    left, right = line.split(' - ')
    f = left.split()
    mounts.append([f[4], right.split()[0], f[3], f[5]])
print(json.dumps({{'mounts': mounts, 'marker': os.path.exists('{marker}'),
                  'tmp_path': os.path.exists('{tmp_path}'), 'sock': os.path.exists('/var/run/docker.sock'),
                  'sock2': os.path.exists('/run/docker.sock')}}))
""")
    assert out["marker"] is False and out["tmp_path"] is False
    assert out["sock"] is False and out["sock2"] is False
    virtual = {"overlay", "proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2"}
    host_backed = {m[0] for m in out["mounts"] if m[1] not in virtual}
    docker_files = {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"}
    if shared_session.transport == "ipc":
        # Docker's own per-container files (hostname, hosts, resolv.conf), its init binary, and our socket directory
        assert host_backed <= {"/run/kernelexec", "/usr/sbin/docker-init"} | docker_files, host_backed
        assert "/run/kernelexec" in host_backed
        init = [m for m in out["mounts"] if m[0] == "/usr/sbin/docker-init"]
        assert all(m[3].split(",")[0] == "ro" for m in init)
        sockdir_root = next(m[2] for m in out["mounts"] if m[0] == "/run/kernelexec")
        assert sockdir_root.endswith(str(shared_session.socket_dir))
    elif gvisor(shared_session):
        # gVisor serves every file system its gofer backs as 9p: the image's root, the /work volume and
        # Docker's files; which host paths those are is the engine's Mounts (test_container_configuration_is_hardened)
        assert host_backed <= docker_files | {"/", "/work"}, host_backed
        assert {m[1] for m in out["mounts"] if m[0] in host_backed} == {"9p"}
        assert shared_session.socket_dir is None
    else:  # attach: Docker's own per-container files only (no init binary: the relay is pid 1)
        assert host_backed <= docker_files, host_backed
        assert shared_session.socket_dir is None


def test_two_sessions_cannot_see_each_other(kernel_image):
    with Session(Policy(image=kernel_image)) as a, Session(Policy(image=kernel_image)) as b:
        a.execute("open('/work/secret_a', 'w').write('a'); open('/tmp/secret_a', 'w').write('a')\n"
                  "import subprocess; p = subprocess.Popen(['sleep', '300'])")
        out = inside(b, """
import json, os
cmds = []
for p in os.listdir('/proc'):
    if p.isdigit():
        try:
            cmds.append(open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\\0', b' ').decode())
        except OSError:
            pass
print(json.dumps({'files': [os.path.exists('/work/secret_a'), os.path.exists('/tmp/secret_a')],
                  'sleep': any(c.startswith('sleep') for c in cmds), 'nproc': len(cmds),
                  'sockdir': os.listdir('/run/kernelexec')}))
""")
        assert out["files"] == [False, False]
        assert out["sleep"] is False
        assert out["nproc"] <= 3  # init, the kernel, and at most one transient child
        assert a.execute("import os; os.path.exists('/work/secret_a')").text == "True"


def test_container_configuration_is_hardened(docker, shared_session):
    info = docker.api.inspect_container(shared_session.container_id)
    hc = info["HostConfig"]
    assert hc["ReadonlyRootfs"] is True
    assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
    assert "no-new-privileges:true" in hc["SecurityOpt"]
    assert hc["NetworkMode"] == "none"
    assert hc["Privileged"] is False
    # ipc: docker-init is pid 1; attach: the relay is (it reaps and forwards signals, non-dumpable)
    assert hc["Init"] is (shared_session.transport == "ipc")
    assert hc["Memory"] > 0 and hc["MemorySwap"] == hc["Memory"]
    assert hc["NanoCpus"] > 0
    assert 0 < hc["PidsLimit"] <= 1024
    assert hc["LogConfig"]["Type"] == "none"
    assert hc["RestartPolicy"]["Name"] in ("", "no")
    assert hc["IpcMode"] == "private" and hc["PidMode"] == "" and hc["UTSMode"] == ""
    assert {u["Name"] for u in hc["Ulimits"]} >= {"nofile", "nproc", "fsize", "core"}
    user = info["Config"]["User"]
    assert user and not user.startswith("0:") and user != "0"
    assert info["Config"].get("Healthcheck") is None
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    if shared_session.transport == "ipc":
        assert set(mounts) == {"/run/kernelexec", "/work"}
        assert mounts["/run/kernelexec"]["Source"] == str(shared_session.socket_dir)
    else:  # attach: no host path at all; the relay's directory is a tmpfs
        assert set(mounts) == {"/work"}
        assert "/run/kernelexec" in hc["Tmpfs"]
    assert mounts["/work"]["Type"] == "volume"
    assert not any("docker.sock" in (m.get("Source") or "") for m in info["Mounts"])
    labels = info["Config"]["Labels"]
    assert labels["kernelexec.session"] == shared_session.id
    assert labels["kernelexec.owner_pid"] == str(os.getpid())
    assert {"kernelexec.host", "kernelexec.created", "kernelexec.policy"} <= set(labels)
    env = dict(e.split("=", 1) for e in info["Config"]["Env"])
    assert "KERNELEXEC_FAKE_API_KEY" not in env


@pytest.mark.ipc
def test_socket_directory_is_private_and_locked(shared_session):
    st = os.stat(shared_session.socket_dir)
    assert st.st_mode & 0o077 in (0, 0o055)  # 0700 while starting, root-owned 0755 once locked
    if os.geteuid() == 0:
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o755
        out = inside(shared_session, """
import json, os
try:
    open('/run/kernelexec/new', 'w'); res = 'created'
except OSError as e:
    res = e.errno
try:
    os.unlink('/run/kernelexec/k-1'); res2 = 'unlinked'
except OSError as e:
    res2 = e.errno
print(json.dumps([res, res2]))
""")
        assert out == [13, 13]
