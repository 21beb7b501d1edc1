"""Existing test modules run again, in a pytest subprocess, on another engine, runtime or transport.

The subprocess gets the engine through the environment (``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``,
``DOCKER_CERT_PATH``) and the Policy defaults through ``KERNELEXEC_TEST_RUNTIME`` /
``KERNELEXEC_TEST_TRANSPORT`` (see tests/conftest.py). Tests about the ipc socket directory are
deselected by their marker, so what does not apply is named, not skipped. The run counts only
when it is whole: every collected test passed (none skipped, none errored), at least the tests
the caller names among them, and the known failures (each one reported, with its diagnosis) failed
as known: one that passes again fails the run until it is taken off the list.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Variables of the caller that must not leak into a run that names its own engine and defaults.
_OWN = ("DOCKER_", "KERNELEXEC_TEST_")


@dataclass
class Suite:
    name: str
    #: Test files or node ids, relative to the repository.
    targets: Sequence[str]
    #: Engine and Policy defaults of the run (merged over this process's environment, minus DOCKER_*).
    env: Mapping[str, str]
    #: Node ids that must be among the passed (the acceptance items this run proves).
    must_pass: Sequence[str] = ()
    #: Node ids left out on purpose, each with why (not a marker's business: e.g. a test of the local engine).
    deselect: Mapping[str, str] = field(default_factory=dict)
    #: Node ids that fail here for a reason reported and not yet fixed: node id -> diagnosis.
    known_failures: Mapping[str, str] = field(default_factory=dict)
    #: Bound on the whole run (pytest-timeout bounds each test inside it).
    timeout: float = 1800.0


@dataclass
class Outcome:
    suite: str
    passed: list[str]
    failed: dict[str, str]  # node id -> first line of the failure or error
    skipped: dict[str, str]
    returncode: int
    seconds: float
    output: str

    def summary(self) -> str:
        return (f"suite {self.suite}: {len(self.passed)} passed, {len(self.failed)} failed, "
                f"{len(self.skipped)} skipped in {self.seconds:.0f} s")


def _node_id(case: ET.Element) -> str:
    classname, name = case.get("classname", ""), case.get("name", "")
    parts = classname.split(".")
    # tests.security.test_x (a module) or tests.test_x.Class: the module is the last part starting with test_
    for i in range(len(parts), 0, -1):
        if parts[i - 1].startswith("test_"):
            path = "/".join(parts[:i]) + ".py"
            return "::".join([path, *parts[i:], name])
    return f"{classname}::{name}"


def parse_junit(path: Path) -> tuple[list[str], dict[str, str], dict[str, str]]:
    passed: list[str] = []
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        node = _node_id(case)
        bad = [c for c in case if c.tag in ("failure", "error")]
        skip = [c for c in case if c.tag == "skipped"]
        if bad:
            failed[node] = "; ".join((c.get("message") or c.tag).splitlines()[0][:300] for c in bad)
        elif skip:
            skipped[node] = (skip[0].get("message") or "skipped")[:300]
        else:
            passed.append(node)
    return passed, failed, skipped


def run(suite: Suite, workdir: Path) -> Outcome:
    """Run the suite in a subprocess; the caller asserts on the outcome with :func:`check`."""
    junit = workdir / f"{suite.name}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN)}
    env.update(suite.env)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "-m", "not ipc",
           f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    for node in suite.deselect:
        cmd += ["--deselect", node]
    cmd += list(suite.targets)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=suite.timeout, check=False)
    seconds = time.monotonic() - start
    if not junit.exists():
        raise AssertionError(f"suite {suite.name}: pytest wrote no report (exit {proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}")
    passed, failed, skipped = parse_junit(junit)
    return Outcome(suite.name, passed, failed, skipped, proc.returncode, seconds, proc.stdout)


def check(suite: Suite, out: Outcome) -> None:
    """The run is whole: see the module docstring."""
    tail = out.output[-8000:]
    print(out.summary())
    assert out.passed or out.failed, f"{out.summary()}: nothing ran\n{tail}"
    assert not out.skipped, f"{out.summary()}: skipped tests prove nothing here: {out.skipped}\n{tail}"
    unexpected = {k: v for k, v in out.failed.items() if k not in suite.known_failures}
    assert not unexpected, f"{out.summary()}: failed: {unexpected}\n{tail}"
    fixed = [k for k in suite.known_failures if k in out.passed]
    assert not fixed, f"{out.summary()}: known failures that now pass (take them off the list): {fixed}"
    missing = [k for k in (*suite.must_pass, *suite.known_failures) if k not in out.passed and k not in out.failed]
    assert not missing, f"{out.summary()}: these did not run: {missing}\n{tail}"
    assert out.returncode == (1 if out.failed else 0), f"{out.summary()}: pytest exited {out.returncode}\n{tail}"


__all__ = ["Outcome", "Suite", "check", "parse_junit", "run"]
