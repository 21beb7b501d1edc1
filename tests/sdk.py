"""The docker SDK (docker-py) for the tests' own look at the engine (containers, volumes, image history).

kernelexec itself talks to the engine only through :mod:`kernelexec.backend.docker.api`; the tests inspect what it
did with an independent client, configured from the same :class:`~kernelexec.backend.docker.endpoint.Endpoint` (the docker
CLI's rules, contexts included), not from docker-py's own reading of the environment.
"""

from __future__ import annotations

import threading
from typing import Any

from kernelexec._loop import run_blocking
from kernelexec.backend.docker.api import DockerAPI
from kernelexec.backend.docker.endpoint import Endpoint, default_endpoint
from kernelexec.errors import DockerUnavailable

_lock = threading.Lock()
_shared: Any = None


def docker_client(endpoint: Endpoint | None = None) -> Any:
    """The SDK client of this process's environment (shared), or a new one for ``endpoint`` (close it)."""
    global _shared
    if endpoint is not None:
        return _sdk_client(endpoint)
    with _lock:
        if _shared is None:
            _shared = _sdk_client(default_endpoint())
        return _shared


def _sdk_client(ep: Endpoint) -> Any:
    import docker
    from docker.tls import TLSConfig

    # the API version comes from kernelexec's client (same endpoint, same errors): docker-py would ask in its
    # constructor, before trust_env can be turned off below
    version = run_blocking(DockerAPI(ep).version())["ApiVersion"]
    tls: Any = False
    if ep.tls:
        tls = TLSConfig(client_cert=(ep.cert, ep.key) if ep.cert and ep.key else None,
                        ca_cert=ep.ca if ep.verify else None, verify=ep.verify)
    # ssh://: docker-py runs `ssh ... docker system dial-stdio` from PATH, as the CLI does (no paramiko)
    c = docker.DockerClient(base_url=ep.url, tls=tls, timeout=120, version=str(version),
                            use_ssh_client=ep.scheme == "ssh")
    # requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE replace the engine's CA on every request, and would
    # send engine calls through HTTP(S)_PROXY: neither is the engine's
    c.api.trust_env = False
    try:
        c.ping()
    except Exception as e:  # the SDK raises several unrelated types for "no engine"
        c.close()
        raise DockerUnavailable(f"cannot reach the Docker engine at {ep.describe()} ({e})") from e
    return c
