#!/usr/bin/env bash
# Set up everything kernelexec needs on a fresh Debian/Ubuntu machine, idempotently:
#   1. a running Docker engine (installs Debian's docker.io and starts dockerd when none answers),
#   2. a virtualenv in .venv with kernelexec and its test extras,
#   3. the kernel image (offline path when no registry is reachable).
# Each step is skipped when already done. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

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
log "Docker engine: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"

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
