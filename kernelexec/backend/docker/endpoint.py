"""Where the Docker engine is: the endpoint the docker CLI would use, found the way the CLI finds it.

Users point their tools at an engine with ``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH`` or a
Docker context (``docker context use``). kernelexec must land on the same engine as ``docker ps``, or a
session would start where the user is not looking, so the rules below are the CLI's, not docker-py's:

1. ``DOCKER_HOST`` set (non-empty): that host, TLS from the environment ("DOCKER_HOST"). Contexts are ignored.
2. else ``DOCKER_CONTEXT``, else ``currentContext`` of ``config.json``: that context ("context NAME"); the
   context named ``default`` means "the environment", as in the CLI.
3. else the default unix socket ("default").

TLS from the environment: ``DOCKER_TLS_VERIFY`` non-empty (any value, even "0") turns TLS on with
verification; ``DOCKER_TLS`` non-empty turns it on without. Certificates are ``ca.pem``, ``cert.pem`` and
``key.pem`` in ``DOCKER_CERT_PATH`` (default: the config directory); a missing cert or key means no client
certificate, a missing ``ca.pem`` is an error. With TLS and no host the CLI's default is
``tcp://localhost:2376``. A context keeps its TLS files in ``contexts/tls/<sha256 of name>/docker/`` and its
metadata in ``contexts/meta/<sha256 of name>/meta.json``; ``SkipTLSVerify`` turns verification off. In both
cases a ``ca.pem`` is the only trusted root (the CLI builds a pool of that CA alone); without one the
system's roots are used.

The config directory is ``DOCKER_CONFIG`` or ``~/.docker``.

``ssh://[USER@]HOST[:PORT]`` engines (from ``DOCKER_HOST`` or a context) are reached as the CLI reaches
them: OpenSSH's ``ssh`` runs ``docker system dial-stdio`` on the far side and carries the API's bytes (see
:mod:`kernelexec.backend.docker.ssh`). TLS settings do not apply to them (the CLI ignores them too); ssh's own
configuration, agent and known hosts do, plus ``KERNELEXEC_SSH_OPTS`` (:data:`SSH_OPTS_ENV`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ...errors import DockerUnavailable

__all__ = ["DEFAULT_UNIX_SOCKET", "SSH_OPTS_ENV", "Endpoint", "EndpointError", "default_endpoint",
           "resolve_endpoint"]

DEFAULT_UNIX_SOCKET = "/var/run/docker.sock"
DEFAULT_TLS_HOST = "tcp://localhost:2376"  # the CLI's default when TLS is on and no host is given
DEFAULT_TCP_PORT = 2375  # the CLI fills in this port for tcp://HOST, with or without TLS

Scheme = Literal["unix", "tcp", "ssh"]
#: Extra options for ``ssh`` (shell words, e.g. ``-F ~/kx_ssh_config`` or ``-i KEY -o UserKnownHostsFile=F``),
#: put before kernelexec's own: ssh keeps the first value of each option, so these win.
SSH_OPTS_ENV = "KERNELEXEC_SSH_OPTS"


class EndpointError(DockerUnavailable):
    """The engine's address or TLS material is wrong or unsupported: nothing was sent to any engine."""


@dataclass(frozen=True)
class Endpoint:
    """One Docker engine and how to reach it.

    ``address`` is the socket path (unix), ``host:port`` (tcp, IPv6 hosts in brackets) or
    ``[user@]host[:port]`` (ssh). ``ca``/``cert``/``key`` are files; ``verify`` says whether the server's
    certificate and name are checked. ``source`` says where it came from: ``"DOCKER_HOST"``,
    ``"context NAME"`` or ``"default"``.
    """

    scheme: Scheme
    address: str
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    source: str = "default"
    #: ssh only: extra ``ssh`` arguments (from ``KERNELEXEC_SSH_OPTS`` when resolved from the environment).
    ssh_options: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def is_local(self) -> bool:
        """The engine's API socket is a file on this host.

        What needs it: the ipc transport and anything else that bind-mounts host paths. It says where the
        API is, not that the engine shares this filesystem (Docker Desktop's socket leads into a VM).
        """
        return self.scheme == "unix"

    @property
    def host(self) -> str:
        """The host name or IP (no brackets): what a tcp server's certificate must name, what ssh connects to."""
        if self.scheme == "ssh":
            return urlsplit(self.url).hostname or ""
        host, _, _ = self.address.rpartition(":")
        return host[1:-1] if host.startswith("[") else host

    @property
    def port(self) -> int | None:
        """The TCP port; for ssh, ``None`` when the URL names none (ssh's configuration decides, as for the CLI)."""
        if self.scheme == "ssh":
            return urlsplit(self.url).port
        return int(self.address.rpartition(":")[2])

    @property
    def user(self) -> str | None:
        """ssh only: the login name of the URL; ``None`` lets ssh's configuration decide."""
        return urlsplit(self.url).username if self.scheme == "ssh" else None

    def describe(self) -> str:
        """One line for doctor, errors and logs."""
        if self.scheme == "ssh":
            how = ", ssh to `docker system dial-stdio`" + (
                f", ssh options {shlex.join(self.ssh_options)}" if self.ssh_options else "")
        elif self.scheme != "tcp":
            how = ""
        elif not self.tls:
            how = ", no TLS"
        else:
            how = ", TLS" + (" verified" if self.verify else " NOT verified") + (
                " with client certificate" if self.cert else "")
        return f"{self.url} ({self.source}{how})"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client side of the engine's TLS, as the CLI sets it up; ``None`` for plain connections."""
        if self.scheme != "tcp" or not self.tls:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.verify:
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                if self.ca:
                    ctx.load_verify_locations(cafile=self.ca)
                else:
                    ctx.load_default_certs()
            except (OSError, ssl.SSLError) as e:
                raise EndpointError(f"cannot load the CA certificate {self.ca} for {self.describe()}: {e}. "
                                    "Fix DOCKER_CERT_PATH or the context's TLS files") from e
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert and self.key:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as e:
                raise EndpointError(f"cannot load the client certificate {self.cert} / {self.key} for "
                                    f"{self.describe()}: {e}") from e
        return ctx

    def require_supported(self) -> None:
        """Refuse, before any connection, what cannot work here: an ssh:// engine without an ssh client."""
        if self.scheme == "ssh" and shutil.which("ssh") is None:
            raise EndpointError(
                f"the Docker engine is at {self.describe()}, which needs OpenSSH's `ssh` on PATH: install it "
                "(Debian: apt-get install openssh-client)")


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    """The docker CLI's configuration directory: ``DOCKER_CONFIG`` or ``~/.docker``."""
    env = os.environ if env is None else env
    return Path(env.get("DOCKER_CONFIG") or Path.home() / ".docker")


def context_id(name: str) -> str:
    """The directory name the CLI's context store uses for a context: its name's SHA-256, in hex."""
    return hashlib.sha256(name.encode()).hexdigest()


def resolve_endpoint(env: Mapping[str, str] | None = None, docker_config_dir: str | os.PathLike[str] | None = None
                     ) -> Endpoint:
    """The engine the docker CLI would talk to with this environment and configuration directory."""
    env = os.environ if env is None else env
    cfg = Path(docker_config_dir) if docker_config_dir is not None else config_dir(env)
    if env.get("DOCKER_HOST"):
        found = _from_env(env, cfg, "DOCKER_HOST")
    else:
        name = env.get("DOCKER_CONTEXT") or _current_context(cfg)
        found = _from_context(name, cfg) if name and name != "default" else _from_env(env, cfg, "default")
    if found.scheme != "ssh" or not env.get(SSH_OPTS_ENV, "").strip():
        return found
    try:
        options = tuple(shlex.split(env[SSH_OPTS_ENV]))
    except ValueError as e:
        raise EndpointError(f"{SSH_OPTS_ENV} is not valid shell words ({e}): {env[SSH_OPTS_ENV]!r}") from e
    return replace(found, ssh_options=options)


def default_endpoint() -> Endpoint:
    """The endpoint of this process's environment."""
    return resolve_endpoint()


def _current_context(cfg: Path) -> str | None:
    path = cfg / "config.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise EndpointError(f"cannot read {path} ({e.strerror or e}); fix it or set DOCKER_CONFIG") from e
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise EndpointError(f"{path} is not valid JSON ({e}); fix it or set DOCKER_CONFIG") from e
    value = data.get("currentContext") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def _from_env(env: Mapping[str, str], cfg: Path, source: str) -> Endpoint:
    verify = bool(env.get("DOCKER_TLS_VERIFY"))
    tls = verify or bool(env.get("DOCKER_TLS"))
    host = env.get("DOCKER_HOST", "").strip() or (DEFAULT_TLS_HOST if tls else f"unix://{DEFAULT_UNIX_SOCKET}")
    scheme, address = _parse_host(host, source)
    if scheme != "tcp" or not tls:
        return Endpoint(scheme, address, source=source)
    certs = Path(env.get("DOCKER_CERT_PATH") or cfg)
    ca, cert, key = (certs / "ca.pem", certs / "cert.pem", certs / "key.pem")
    if not ca.is_file():
        raise EndpointError(f"TLS is on (DOCKER_TLS_VERIFY or DOCKER_TLS) but {ca} does not exist: put the "
                            "engine's CA certificate there or point DOCKER_CERT_PATH at the directory that has it")
    return Endpoint(scheme, address, tls=True, ca=str(ca), cert=str(cert) if cert.is_file() else None,
                    key=str(key) if key.is_file() else None, verify=verify, source=source)


def _from_context(name: str, cfg: Path) -> Endpoint:
    ident = context_id(name)
    meta_path = cfg / "contexts" / "meta" / ident / "meta.json"
    source = f"context {name}"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError as e:
        raise EndpointError(f"Docker context {name!r} does not exist (no {meta_path}); it is selected by "
                            "DOCKER_CONTEXT or by currentContext in config.json: `docker context ls` lists the "
                            "contexts, `docker context use default` goes back to the default engine") from e
    except (OSError, ValueError) as e:
        raise EndpointError(f"cannot read Docker context {name!r} from {meta_path}: {e}") from e
    docker = (meta.get("Endpoints") or {}).get("docker") if isinstance(meta, dict) else None
    if not isinstance(docker, dict) or not docker.get("Host"):
        raise EndpointError(f"Docker context {name!r} has no Docker endpoint ({meta_path}); recreate it with "
                            "`docker context create NAME --docker host=...`")
    scheme, address = _parse_host(str(docker["Host"]), source)
    skip_verify = bool(docker.get("SkipTLSVerify"))
    tls_dir = cfg / "contexts" / "tls" / ident / "docker"
    files = {f: tls_dir / f for f in ("ca.pem", "cert.pem", "key.pem") if (tls_dir / f).is_file()}
    if scheme != "tcp" or (not files and not skip_verify):
        return Endpoint(scheme, address, source=source)
    has_pair = "cert.pem" in files and "key.pem" in files
    return Endpoint(scheme, address, tls=True, ca=str(files["ca.pem"]) if "ca.pem" in files else None,
                    cert=str(files["cert.pem"]) if has_pair else None,
                    key=str(files["key.pem"]) if has_pair else None, verify=not skip_verify, source=source)


def _parse_host(host: str, source: str) -> tuple[Scheme, str]:
    """``unix://``, ``tcp://`` and ``ssh://`` hosts, normalised as the CLI does (a bare ``HOST:PORT`` is tcp)."""
    raw = host.strip()
    if "://" not in raw:
        raw = "tcp://" + raw
    scheme, _, rest = raw.partition("://")
    scheme = scheme.lower()
    where = f"{host!r} ({source})"
    if scheme == "unix":
        return "unix", rest or DEFAULT_UNIX_SOCKET
    if scheme == "ssh":
        return "ssh", _ssh_address(raw, where)
    if scheme != "tcp":
        raise EndpointError(f"the Docker host {where} has an unsupported scheme {scheme!r}: use unix://PATH, "
                            "tcp://HOST:PORT or ssh://USER@HOST")
    parts = urlsplit(raw)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EndpointError(f"the Docker host {where} has a path; kernelexec takes tcp://HOST:PORT only")
    try:
        port = parts.port or DEFAULT_TCP_PORT
    except ValueError as e:
        raise EndpointError(f"the Docker host {where} has an invalid port") from e
    name = parts.hostname or "localhost"
    return "tcp", (f"[{name}]" if ":" in name else name) + f":{port}"


def _ssh_address(raw: str, where: str) -> str:
    """``[user@]host[:port]`` of an ssh URL, refused where the CLI refuses it (a password, a path)."""
    parts = urlsplit(raw)
    try:
        port = parts.port
    except ValueError as e:
        raise EndpointError(f"the Docker host {where} has an invalid port") from e
    if not parts.hostname:
        raise EndpointError(f"the Docker host {where} names no host")
    if parts.password is not None:
        raise EndpointError(f"the Docker host {where} has a password: ssh:// takes none (use a key or ssh-agent)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EndpointError(f"the Docker host {where} has a path; kernelexec takes ssh://[USER@]HOST[:PORT] "
                            "(the far side's docker CLI finds its engine)")
    if parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
        raise EndpointError(f"the Docker host {where} starts a name with '-', which ssh would read as an option")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return (f"{parts.username}@" if parts.username else "") + host + (f":{port}" if port is not None else "")
