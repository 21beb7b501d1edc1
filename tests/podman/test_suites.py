"""The core, isolation, file, timeout, restart, pool and leak tests, run against rootful Podman.

One pytest subprocess with the Podman service's ``DOCKER_HOST``: the same tests as on Docker, the sessions
on the attach transport (auto picks it for Podman). Rootless Podman is not in this matrix on a cgroup v1
host: kernelexec refuses it there (it would drop the memory, CPU and pids limits), which test_podman.py
proves; on a cgroup v2 host with delegated controllers, add ``podman_rootless`` to the parameters.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from kernelexec._loop import run_blocking
from kernelexec.tools.image import BASE_TAG

from .. import suites
from ..remote.test_suites import _SUITE
from . import engine as podman

#: With the remote engine's matrix: one documented command, its last results in docs/engines.md
#: (`KERNELEXEC_ENGINE_MATRIX=1 .venv/bin/python -m pytest tests/test_suites.py tests/remote/test_suites.py
#: tests/podman/test_suites.py`).
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("KERNELEXEC_ENGINE_MATRIX"),
                                                   reason="the engine matrix runs with KERNELEXEC_ENGINE_MATRIX=1")]

SUITE: dict = {
    **_SUITE,
    "name": "podman-rootful",
    "deselect": {
        **_SUITE["deselect"],
        "tests/test_faults.py::test_docker_daemon_restart_while_sessions_exist":
            "restarts the local dockerd (by its pidfile), not the engine the run uses",
    },
    "known_failures": {},
}


@pytest.mark.timeout(1800)
def test_core_suites_pass_on_rootful_podman(podman_rootful, kernel_image, tmp_path):
    # test_image_without_kernel_fails_to_start_clearly starts the base image, which has no kernel
    podman.copy_image(BASE_TAG, podman_rootful)
    try:
        suite = suites.Suite(env={**podman_rootful.env, "KERNELEXEC_TEST_IMAGE": kernel_image}, **SUITE)
        out = suites.run(suite, tmp_path)
        suites.check(suite, out)
    finally:  # the base image is only for that test: not left in the host's rootful store
        subprocess.run(podman_rootful.podman("rmi", "-f", BASE_TAG), capture_output=True, check=False)
    api = podman_rootful.api()
    assert run_blocking(api.containers("kernelexec.session")) == []
    assert run_blocking(api.volumes("kernelexec.session")) == []
