#!/usr/bin/env bash
# Set up everything kernelexec needs on a fresh Debian/Ubuntu machine, idempotently:
#   1. a running Docker engine (installs Debian's docker.io and starts dockerd when none answers),
#   2. gVisor (Debian's runsc) registered with the engine as runtime "runsc",
#   3. a virtualenv in .venv with kernelexec and its test extras,
#   4. the kernel image (offline path when no registry is reachable),
#   5. OpenSSH (client and server binaries) for the ssh:// engine tests; the system sshd is NOT enabled or
#      started: the tests run their own `sshd -D -f CONFIG` on a loopback port.
#   6. Podman (Debian's) for the engine tests; its services are started by the tests themselves.
# Each step is skipped when already done. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

# gVisor: Debian's runsc, registered with the engine as runtime "runsc". It needs --network=none here
# (runsc refuses to run with network enabled in the root network namespace), which also suits kernelexec:
# its sandboxes have no network. Merged into an existing daemon.json; prints "changed" when it wrote.
DAEMON_JSON=/etc/docker/daemon.json
register_runsc() {
  $SUDO python3 - "$DAEMON_JSON" "$(command -v runsc)" <<'PY'
import json, os, sys
path, runsc = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
want = {"path": runsc, "runtimeArgs": ["--network=none"]}
if config.get("runtimes", {}).get("runsc") != want:
    config.setdefault("runtimes", {})["runsc"] = want
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print("changed")
PY
}
runsc_registered() { timeout 10 docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; }

if ! command -v runsc >/dev/null 2>&1; then
  log "installing gVisor (Debian's runsc)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q runsc >/dev/null
fi
runsc_changed="$(register_runsc)"

if ! engine_up; then
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    log "installing Docker engine and debootstrap from Debian packages"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null
  fi
  if ! engine_up; then
    log "starting dockerd in the background (log: /var/log/kernelexec-dockerd.log)"
    $SUDO sh -c 'setsid nohup dockerd >/var/log/kernelexec-dockerd.log 2>&1 < /dev/null &'
    for _ in $(seq 1 60); do engine_up && break; sleep 1; done
    engine_up || { log "dockerd did not answer within 60 s; see /var/log/kernelexec-dockerd.log"; exit 1; }
  fi
fi
command -v debootstrap >/dev/null 2>&1 || $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
if [ -n "$runsc_changed" ] || ! runsc_registered; then
  # A running engine rereads daemon.json on SIGHUP (runtimes are reloadable): never restart it, sessions
  # may be running on it. The pid is the engine's own pidfile.
  [ -r /var/run/docker.pid ] || { log "runsc is in $DAEMON_JSON but the engine has no pidfile to signal: reload it"; exit 1; }
  log "registering runsc with the running engine (SIGHUP to dockerd, pid $(cat /var/run/docker.pid))"
  $SUDO kill -HUP "$(cat /var/run/docker.pid)"
  for _ in $(seq 1 20); do runsc_registered && break; sleep 0.5; done
  runsc_registered || { log "the engine did not pick up runtime runsc from $DAEMON_JSON; see its log"; exit 1; }
fi
# Podman (its Docker-compatible API, rootful and rootless) for the engine tests (tests/podman): Debian's podman,
# newuidmap/newgidmap for rootless user namespaces, slirp4netns and fuse-overlayfs for rootless containers.
if ! command -v podman >/dev/null 2>&1 || ! command -v newuidmap >/dev/null 2>&1 \
   || ! command -v slirp4netns >/dev/null 2>&1 || ! command -v fuse-overlayfs >/dev/null 2>&1; then
  log "installing Podman (Debian's podman, uidmap, slirp4netns, fuse-overlayfs)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman uidmap slirp4netns fuse-overlayfs >/dev/null
fi
log "Podman: $(podman --version 2>/dev/null)"

log "gVisor: runtime runsc registered ($(runsc --version | head -1))"
log "Docker engine: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"

# OpenSSH for ssh:// engines: the client kernelexec runs, the server the tests start on loopback. A policy-rc.d
# (only while installing, only if none exists) keeps the package from starting the system sshd; on systemd
# hosts the unit the package enabled is disabled again: nothing listens on port 22 because of this script.
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1; then
  log "installing OpenSSH (client and server binaries; the system sshd stays off)"
  policy_made=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    policy_made=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-client openssh-server >/dev/null || {
    [ -z "$policy_made" ] || $SUDO rm -f /usr/sbin/policy-rc.d; exit 1; }
  [ -z "$policy_made" ] || $SUDO rm -f /usr/sbin/policy-rc.d
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
  fi
fi
log "OpenSSH: $(ssh -V 2>&1)"

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import kernelexec, pytest, PIL, nbclient" >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.installed ]; then
  log "installing kernelexec[test] into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch .venv/.installed
fi

log "kernel image"
.venv/bin/kernelexec image build
