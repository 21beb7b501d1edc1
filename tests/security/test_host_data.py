"""Hostile code looking for the host's data: files, home, secrets, mounts."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from kernelexec import Policy, Session

from .conftest import assert_healthy, inside


def test_etc_shadow_is_unreadable_and_etc_is_the_images_not_the_hosts(module_session):
    out = inside(module_session, """
import json, os, socket
try:
    open('/etc/shadow', 'rb').read(); shadow = 'read'
except OSError as e:
    shadow = [type(e).__name__, e.errno]
print(json.dumps({'shadow': shadow, 'passwd': open('/etc/passwd').read(), 'hostname': socket.gethostname(),
                  'etc_hostname': open('/etc/hostname').read().strip()}))
""")
    assert out["shadow"] == ["PermissionError", 13]
    # what /etc holds is the image's: its sandbox user, not the host's accounts
    assert "sandbox:x:10001:10001" in out["passwd"]
    assert out["passwd"] != Path("/etc/passwd").read_text()
    assert out["hostname"] == out["etc_hostname"] == "sandbox"
    assert out["hostname"] != os.uname().nodename
    assert_healthy(module_session)


def test_host_home_and_ssh_keys_are_absent(module_session):
    host_home = Path(os.path.expanduser("~"))
    # names the kernel or the image legitimately create in a home of their own
    generic = {".cache", ".config", ".local", ".ipython", ".bashrc", ".profile", ".jupyter", ".matplotlib"}
    host_names = sorted({p.name for p in host_home.iterdir()} - generic) + [".ssh"]
    out = inside(module_session, f"""
import json, os
host_names = set({host_names!r})
found = []
for top, dirs, files in os.walk('/', onerror=lambda e: None):
    if top in ('/proc', '/sys', '/dev'):
        dirs[:] = []
        continue
    found += [os.path.join(top, n) for n in dirs + files if n in host_names]
def err(fn, *a):
    try:
        fn(*a); return 'ok'
    except OSError as e:
        return [type(e).__name__, e.errno]
print(json.dumps({{'home': os.path.expanduser('~'), 'home_entries': sorted(os.listdir(os.path.expanduser('~'))),
                  'root_list': err(os.listdir, '/root'), 'root_ssh': err(os.stat, '/root/.ssh/id_rsa'),
                  'found': found, 'ssh_agent': 'SSH_AUTH_SOCK' in os.environ}}))
""")
    assert out["home"] == "/home/sandbox"
    assert set(out["home_entries"]) <= generic, out["home_entries"]
    assert out["root_list"] == ["PermissionError", 13]  # the image's /root, locked to its root
    assert out["root_ssh"] == ["PermissionError", 13]
    assert out["found"] == [], f"host home entries visible in the sandbox: {out['found']}"
    assert out["ssh_agent"] is False
    assert_healthy(module_session)


def test_fake_api_key_in_host_environment_appears_nowhere(kernel_image, docker, monkeypatch):
    secret = "sk-kxsec-" + secrets.token_hex(20)
    monkeypatch.setenv("KX_SECURITY_TEST_OPENAI_API_KEY", secret)
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/kx-security-fake-agent.sock")
    with Session(Policy(image=kernel_image)) as s:
        # the secret is built at run time so that not even the cell's source holds it verbatim
        out = inside(s, f"""
import json, os, subprocess
secret = {secret[::-1]!r}[::-1].encode()
name = b'KX_SECURITY_TEST_OPENAI_API_KEY'
hits, read_environ, read_cmdline = [], 0, 0
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
    for what in ('environ', 'cmdline'):
        try:
            data = open(f'/proc/{{pid}}/{{what}}', 'rb').read()
        except OSError:
            continue
        if what == 'environ':
            read_environ += 1
        else:
            read_cmdline += 1
        if secret in data or name in data or b'kx-security-fake-agent' in data:
            hits.append(f'/proc/{{pid}}/{{what}}')
# every readable file of the filesystem (the pseudo-filesystems aside)
# (a canary planted in /tmp proves the search does find what is there)
open('/tmp/kx-canary', 'w').write('canary-' + secret.decode()[::-1])
grep = subprocess.run(['grep', '-rlsF', '-e', secret.decode(), '-e', 'canary-' + secret.decode()[::-1], '/',
                       '--exclude-dir=proc', '--exclude-dir=sys', '--exclude-dir=dev'],
                      capture_output=True, text=True, timeout=100)
print(json.dumps({{'hits': hits, 'environ': read_environ, 'cmdline': read_cmdline,
                  'grep_rc': grep.returncode, 'grep_out': grep.stdout[-2000:],
                  'env_names': sorted(os.environ)}}))
""", timeout=110)
        # init and the kernel at least were read; on attach pid 1 is the relay, non-dumpable: its environ
        # cannot even be opened (its cmdline can)
        assert out["environ"] >= (2 if s.transport == "ipc" else 1) and out["cmdline"] >= 2
        assert out["hits"] == []
        # 0 or 2: a match (the canary), with or without unreadable files along the way
        assert out["grep_rc"] in (0, 2) and out["grep_out"].split() == ["/tmp/kx-canary"], out
        assert "KX_SECURITY_TEST_OPENAI_API_KEY" not in out["env_names"] and "SSH_AUTH_SOCK" not in out["env_names"]
        env = docker.api.inspect_container(s.container_id)["Config"]["Env"]
        assert not any(secret in e for e in env)
        assert_healthy(s)


def test_mountinfo_shows_no_host_path_but_the_socket_dir_and_dockers_own_files(module_session, docker):
    cid = module_session.container_id
    out = inside(module_session, """
import json
mounts = []
for line in open('/proc/self/mountinfo'):
    left, right = line.rstrip('\\n').split(' - ')
    f, r = left.split(), right.split()
    mounts.append({'root': f[3], 'at': f[4], 'opts': f[5], 'fstype': r[0], 'source': r[1]})
print(json.dumps(mounts))
""")
    virtual = {"overlay", "proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2", "shm"}
    host_backed = {m["at"]: m for m in out if m["fstype"] not in virtual}
    docker_files = {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"}
    if module_session.policy.runtime == "runsc":
        # gVisor serves every file system its gofer backs as 9p with root "/": the image's root, the /work
        # volume and Docker's files. Which host paths those are is the engine's Mounts, checked here instead.
        assert set(host_backed) <= docker_files | {"/", "/work"}, sorted(host_backed)
        assert {m["fstype"] for m in host_backed.values()} == {"9p"}
        mounts = docker.api.inspect_container(cid)["Mounts"]
        assert [(m["Type"], m["Destination"]) for m in mounts] == [("volume", "/work")], mounts
        return
    if module_session.transport == "ipc":
        assert set(host_backed) <= {"/run/kernelexec", "/usr/sbin/docker-init"} | docker_files, sorted(host_backed)
        assert host_backed["/run/kernelexec"]["root"].endswith(str(module_session.socket_dir))
    else:  # attach: no host directory at all, and no init binary (the relay is pid 1)
        assert set(host_backed) <= docker_files, sorted(host_backed)
    for at in docker_files & set(host_backed):
        # Docker's per-container copies, named by this container's id, read-only
        root = host_backed[at]["root"]
        assert root.endswith(f"/containers/{cid}/{at.rsplit('/', 1)[1]}"), root
        assert host_backed[at]["opts"].split(",")[0] == "ro"
    if "/usr/sbin/docker-init" in host_backed:
        assert host_backed["/usr/sbin/docker-init"]["opts"].split(",")[0] == "ro"
    # no mount exposes a host directory tree: every host-backed root is a single file or the socket dir
    assert not any(m["root"] == "/" for m in host_backed.values())
    assert_healthy(module_session)


def test_no_host_process_is_visible(module_session):
    out = inside(module_session, """
import json, os
cmds = {}
for p in os.listdir('/proc'):
    if p.isdigit():
        try:
            cmds[p] = open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\\0', b' ').decode(errors='replace')
        except OSError:
            pass
print(json.dumps({'cmds': cmds, 'me': os.getpid()}))
""")
    cmds = out["cmds"]
    if module_session.transport == "ipc":
        assert "docker-init" in cmds["1"] or "tini" in cmds["1"]
    else:  # attach: the relay is pid 1
        assert "<kernelexec relay>" in cmds["1"], cmds["1"]
    assert not any("pytest" in c or "dockerd" in c or "containerd" in c for c in cmds.values()), cmds
    assert len(cmds) <= 4, cmds  # init, the kernel, and the transient children of this cell
    assert_healthy(module_session)
