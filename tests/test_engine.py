"""Which engine, as the docker CLI decides: DOCKER_HOST, TLS variables, contexts, config.json (no engine needed)."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from kernelexec.backend.docker.api import DockerAPI, socket_path
from kernelexec.backend.docker.endpoint import Endpoint, EndpointError, context_id, resolve_endpoint
from kernelexec.errors import DockerUnavailable

from .remote.certs import cert_dir, make_authority


def certs(directory: Path, *, client: bool = True) -> Path:
    ca = make_authority(directory / "ca")
    pair = ca.issue(directory / "ca", "client") if client else None
    return cert_dir(directory / "certs", ca.cert_path, pair)


def add_context(cfg: Path, name: str, host: str, *, skip_verify: bool = False, tls_from: Path | None = None,
                files: tuple[str, ...] = ("ca.pem", "cert.pem", "key.pem")) -> None:
    """A context as `docker context create` lays it out."""
    meta = cfg / "contexts" / "meta" / context_id(name)
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(json.dumps({
        "Name": name, "Metadata": {"Description": ""},
        "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": skip_verify}}}))
    if tls_from is not None:
        tls = cfg / "contexts" / "tls" / context_id(name) / "docker"
        tls.mkdir(parents=True)
        for f in files:
            (tls / f).write_bytes((tls_from / f).read_bytes())


def use(cfg: Path, name: str) -> None:
    (cfg / "config.json").write_text(json.dumps({"auths": {}, "currentContext": name}))


def test_context_ids_are_the_sha256_of_the_name():
    # the directory `docker context create local` makes, as seen in the CLI's store
    assert context_id("local") == "25bf8e1a2393f1108d37029b3df5593236c755742ec93465bbafa9b290bddcf6"


def test_default_is_the_local_unix_socket(tmp_path):
    ep = resolve_endpoint({}, docker_config_dir=tmp_path)
    assert ep == Endpoint("unix", "/var/run/docker.sock", source="default")
    assert ep.is_local and ep.ssl_context() is None and socket_path(ep) == "/var/run/docker.sock"


@pytest.mark.parametrize("host, scheme, address", [
    ("unix:///run/user/1000/docker.sock", "unix", "/run/user/1000/docker.sock"),
    ("unix://", "unix", "/var/run/docker.sock"),
    ("tcp://10.0.0.5:2376", "tcp", "10.0.0.5:2376"),
    ("tcp://engine.example", "tcp", "engine.example:2375"),  # the CLI's default port, TLS or not
    ("10.0.0.5:4243", "tcp", "10.0.0.5:4243"),  # no scheme: tcp, as the CLI
    ("tcp://[::1]:2376", "tcp", "[::1]:2376"),
    ("ssh://me@build-host:2222", "ssh", "me@build-host:2222"),
])
def test_docker_host_forms(tmp_path, host, scheme, address):
    ep = resolve_endpoint({"DOCKER_HOST": host}, docker_config_dir=tmp_path)
    assert (ep.scheme, ep.address, ep.source, ep.tls) == (scheme, address, "DOCKER_HOST", False)
    assert ep.is_local == (scheme == "unix")


def test_ipv6_host_is_unbracketed_for_the_certificate_check(tmp_path):
    ep = resolve_endpoint({"DOCKER_HOST": "tcp://[::1]:2376"}, docker_config_dir=tmp_path)
    assert (ep.host, ep.port) == ("::1", 2376)


@pytest.mark.parametrize("host", ["npipe:////./pipe/docker_engine", "fd://", "tcp://h:2376/some/path",
                                  "tcp://h:notaport"])
def test_unsupported_hosts_are_refused_with_the_reason(tmp_path, host):
    with pytest.raises(EndpointError, match="DOCKER_HOST"):
        resolve_endpoint({"DOCKER_HOST": host}, docker_config_dir=tmp_path)


def test_ssh_is_parsed_as_the_docker_cli_does_and_never_local(tmp_path):
    """ssh:// engines are reached through `ssh ... docker system dial-stdio` (tests/remote/test_ssh_engine.py
    runs them); here only what the URL says, and that making a client connects to nothing."""
    ep = resolve_endpoint({"DOCKER_HOST": "ssh://me@build-host:2222", "KERNELEXEC_SSH_OPTS": "-F /dev/null"},
                          docker_config_dir=tmp_path)
    assert (ep.scheme, ep.user, ep.host, ep.port, ep.is_local) == ("ssh", "me", "build-host", 2222, False)
    assert ep.ssh_options == ("-F", "/dev/null")
    assert resolve_endpoint({"DOCKER_HOST": "ssh://build-host"}, docker_config_dir=tmp_path).port is None
    DockerAPI(ep)  # no connection until the first call
    for bad in ("ssh://me:secret@build-host", "ssh://-oProxyCommand=x", "ssh://build-host/path"):
        with pytest.raises(DockerUnavailable):
            resolve_endpoint({"DOCKER_HOST": bad}, docker_config_dir=tmp_path)


def test_tls_verify_from_the_environment(tmp_path):
    cp = certs(tmp_path)
    env = {"DOCKER_HOST": "tcp://127.0.0.1:2376", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(cp)}
    ep = resolve_endpoint(env, docker_config_dir=tmp_path / "cfg")
    assert ep == Endpoint("tcp", "127.0.0.1:2376", tls=True, ca=str(cp / "ca.pem"), cert=str(cp / "cert.pem"),
                          key=str(cp / "key.pem"), verify=True, source="DOCKER_HOST")
    assert not ep.is_local
    with pytest.raises(DockerUnavailable, match="not a unix socket on this host"):
        socket_path(ep)
    ctx = ep.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    # the CLI's test is "non-empty": even "0" means verify
    assert resolve_endpoint({**env, "DOCKER_TLS_VERIFY": "0"}, docker_config_dir=tmp_path).verify


def test_docker_tls_without_verify(tmp_path):
    cp = certs(tmp_path)
    ep = resolve_endpoint({"DOCKER_HOST": "tcp://h:2376", "DOCKER_TLS": "1", "DOCKER_CERT_PATH": str(cp)},
                          docker_config_dir=tmp_path)
    assert ep.tls and not ep.verify and ep.cert
    ctx = ep.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def test_tls_without_a_host_means_localhost_2376(tmp_path):
    cp = certs(tmp_path)
    ep = resolve_endpoint({"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(cp)}, docker_config_dir=tmp_path)
    assert (ep.scheme, ep.address, ep.source, ep.tls) == ("tcp", "localhost:2376", "default", True)


def test_cert_path_defaults_to_the_config_dir_and_client_cert_is_optional(tmp_path):
    cfg = certs(tmp_path, client=False)  # ca.pem only
    ep = resolve_endpoint({"DOCKER_HOST": "tcp://h:1", "DOCKER_TLS_VERIFY": "1"}, docker_config_dir=cfg)
    assert ep.ca == str(cfg / "ca.pem") and ep.cert is None and ep.key is None
    # DOCKER_CONFIG is the config dir when none is given
    ep = resolve_endpoint({"DOCKER_HOST": "tcp://h:1", "DOCKER_TLS_VERIFY": "1", "DOCKER_CONFIG": str(cfg)})
    assert ep.ca == str(cfg / "ca.pem")


def test_missing_ca_is_an_error_that_says_where(tmp_path):
    with pytest.raises(EndpointError, match=r"ca\.pem does not exist"):
        resolve_endpoint({"DOCKER_HOST": "tcp://h:1", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(tmp_path)},
                         docker_config_dir=tmp_path)


def test_unreadable_ca_or_key_is_an_endpoint_error(tmp_path):
    cp = certs(tmp_path)
    (cp / "ca.pem").write_text("not a certificate")
    ep = resolve_endpoint({"DOCKER_HOST": "tcp://h:1", "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": str(cp)},
                          docker_config_dir=tmp_path)
    with pytest.raises(EndpointError, match="CA certificate"):
        ep.ssl_context()


def test_precedence_host_then_context_env_then_config_then_default(tmp_path):
    cfg = tmp_path / "cfg"
    add_context(cfg, "from-config", "tcp://config-host:2375")
    add_context(cfg, "from-env", "unix:///run/env.sock")
    use(cfg, "from-config")

    ep = resolve_endpoint({}, docker_config_dir=cfg)
    assert (ep.address, ep.source) == ("config-host:2375", "context from-config")
    ep = resolve_endpoint({"DOCKER_CONTEXT": "from-env"}, docker_config_dir=cfg)
    assert (ep.address, ep.source) == ("/run/env.sock", "context from-env")
    ep = resolve_endpoint({"DOCKER_CONTEXT": "from-env", "DOCKER_HOST": "unix:///run/host.sock"},
                          docker_config_dir=cfg)
    assert (ep.address, ep.source) == ("/run/host.sock", "DOCKER_HOST")
    # "default" is the environment's endpoint, whatever config.json says
    ep = resolve_endpoint({"DOCKER_CONTEXT": "default"}, docker_config_dir=cfg)
    assert (ep.address, ep.source) == ("/var/run/docker.sock", "default")
    # an empty DOCKER_HOST or DOCKER_CONTEXT counts as unset
    ep = resolve_endpoint({"DOCKER_HOST": "", "DOCKER_CONTEXT": ""}, docker_config_dir=cfg)
    assert ep.source == "context from-config"


def test_context_tls_files_and_skip_verify(tmp_path):
    cp = certs(tmp_path)
    cfg = tmp_path / "cfg"
    add_context(cfg, "secure", "tcp://10.1.2.3:2376", tls_from=cp)
    add_context(cfg, "lax", "tcp://10.1.2.3:2376", skip_verify=True)
    add_context(cfg, "ca-only", "tcp://10.1.2.3:2376", tls_from=cp, files=("ca.pem",))
    add_context(cfg, "plain", "tcp://10.1.2.3:2375")
    tls = cfg / "contexts" / "tls" / context_id("secure") / "docker"

    ep = resolve_endpoint({"DOCKER_CONTEXT": "secure"}, docker_config_dir=cfg)
    assert ep == Endpoint("tcp", "10.1.2.3:2376", tls=True, ca=str(tls / "ca.pem"), cert=str(tls / "cert.pem"),
                          key=str(tls / "key.pem"), verify=True, source="context secure")
    assert ep.ssl_context() is not None
    ep = resolve_endpoint({"DOCKER_CONTEXT": "lax"}, docker_config_dir=cfg)
    assert ep.tls and not ep.verify and ep.ca is None and ep.cert is None
    ep = resolve_endpoint({"DOCKER_CONTEXT": "ca-only"}, docker_config_dir=cfg)
    assert ep.tls and ep.verify and ep.ca and ep.cert is None
    ep = resolve_endpoint({"DOCKER_CONTEXT": "plain"}, docker_config_dir=cfg)
    assert not ep.tls and ep.ssl_context() is None
    # the environment's TLS variables belong to the default context, not to a named one
    ep = resolve_endpoint({"DOCKER_CONTEXT": "plain", "DOCKER_TLS_VERIFY": "1"}, docker_config_dir=cfg)
    assert not ep.tls


def test_missing_or_broken_context_says_what_to_do(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    use(cfg, "gone")
    with pytest.raises(EndpointError, match="context 'gone' does not exist.*docker context use default"):
        resolve_endpoint({}, docker_config_dir=cfg)
    (cfg / "config.json").write_text("{not json")
    with pytest.raises(EndpointError, match="not valid JSON"):
        resolve_endpoint({}, docker_config_dir=cfg)
    meta = cfg / "contexts" / "meta" / context_id("k8s-only")
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(json.dumps({"Name": "k8s-only", "Endpoints": {"kubernetes": {}}}))
    with pytest.raises(EndpointError, match="no Docker endpoint"):
        resolve_endpoint({"DOCKER_CONTEXT": "k8s-only"}, docker_config_dir=cfg)


def test_describe_says_where_and_how(tmp_path):
    cp = certs(tmp_path)
    ep = resolve_endpoint({"DOCKER_HOST": "tcp://127.0.0.1:2376", "DOCKER_TLS_VERIFY": "1",
                           "DOCKER_CERT_PATH": str(cp)}, docker_config_dir=tmp_path)
    assert ep.describe() == "tcp://127.0.0.1:2376 (DOCKER_HOST, TLS verified with client certificate)"
    assert Endpoint("unix", "/var/run/docker.sock").describe() == "unix:///var/run/docker.sock (default)"
