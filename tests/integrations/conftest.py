"""The venv of the previous majors (mcp 1.x, ag2 0.x classic), which cannot share a venv with the current ones.

Created on first use from PyPI with the ``test-previous`` extra and kernelexec itself (editable, this
checkout), cached in ``.venv-previous/`` (ignored by git) until pyproject.toml or the Python version
changes. A file lock lets concurrent test runs share it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = ROOT / ".venv-previous"


def _key() -> str:
    what = [list(sys.version_info[:2]), (ROOT / "pyproject.toml").read_text()]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def previous_python() -> Path:
    python, stamp = PREVIOUS / "bin" / "python", PREVIOUS / ".kernelexec-key"
    key = _key()
    with open(ROOT / ".venv-previous.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == key:
            return python
        if PREVIOUS.exists():
            shutil.rmtree(PREVIOUS)
        steps = [[sys.executable, "-m", "venv", str(PREVIOUS)],
                 [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e",
                  f"{ROOT}[test-previous]"]]
        for step in steps:
            r = subprocess.run(step, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(step)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
        stamp.write_text(key)
    return python


@pytest.fixture(scope="session")
def other_major_python() -> str:
    """The Python of the venv with the other major: .venv-previous from .venv, and .venv from .venv-previous
    (``$KERNELEXEC_TEST_CURRENT_PYTHON``, set by test_previous_majors.py, else this checkout's .venv)."""
    if int(metadata.version("mcp").split(".")[0]) >= 2:
        return str(previous_python())
    return os.environ.get("KERNELEXEC_TEST_CURRENT_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
