"""The Kubernetes manifests (kernelexec.tools.kubernetes): no cluster and no engine, only what can be checked offline.

* every generated object validates against the official Kubernetes JSON schemas (``kubernetes-validate``,
  strict: an unknown or misspelled field fails), for the oldest release we document and the newest bundled;
* every Pod passes the Pod Security Standards' restricted profile, checked by
  :func:`kernelexec.tools.kubernetes.restricted_violations`, which is itself shown to refuse each rule;
* the Pod's limits equal the Docker translation's (``create_body`` of the attach transport), field by
  field, so the two cannot drift apart;
* the Pod's command (the rlimit prelude, then the relay's bootstrap) runs: it sets the limits and then
  waits for the host's hello.
"""

from __future__ import annotations

import copy
import json
import re
import resource
import subprocess
import sys
from typing import Any

import kubernetes_validate as kv
import pytest
import yaml

from kernelexec.backend.attach.boot import RELAY_DIR, bootstrap_command
from kernelexec.backend.docker.attach import create_body
from kernelexec.backend.docker.config import work_volume_options
from kernelexec.policy import Policy, parse_size
from kernelexec.profiles import BUILTIN
from kernelexec.tools.cli import main
from kernelexec.tools.kubernetes import (
    CONTAINER,
    LOG_STORAGE,
    SECCOMP_PROFILE,
    ManifestError,
    cpu_quantity,
    memory_quantity,
    network_policy,
    pod_manifest,
    rbac_manifests,
    restricted_violations,
    rlimit_prelude,
    runtime_class,
    session_manifests,
    setup_manifests,
)

IMAGE = "registry.example.org/kernelexec-kernel:0123456789ab"
SESSION = "0a1b2c3d4e5f"
#: The oldest release docs/kubernetes.md assumes (WebSocket attach, v5.channel.k8s.io), and the newest bundled.
VERSIONS = ("1.30.0", kv.latest_version())

CASES: dict[str, Policy] = {
    **{f"profile-{name}": p for name, p in BUILTIN.items()},
    "egress": Policy(egress=("pypi", "github"), site_size="256m"),
    "runsc": Policy(runtime="runsc"),
    "kata": Policy(runtime="kata-qemu", cap_add=("NET_BIND_SERVICE",), env={"MY_VAR": "1"}, labels={"team": "ml"}),
    "odd-sizes": Policy(memory=300_000_001, tmp_size=12_345_678, cpus=1.25),
}


def pod_for(p: Policy, **kw: Any) -> dict[str, Any]:
    return pod_manifest(p, image=IMAGE, session=SESSION, namespace="sandboxes", **kw)


def all_objects(p: Policy) -> list[dict[str, Any]]:
    docs = session_manifests(p, image=IMAGE, session=SESSION, namespace="sandboxes") + setup_manifests(p, "sandboxes")
    docs.append(pod_for(p, seccomp="runtime-default", active_deadline=3600, user_namespace=True,
                        owner={"apiVersion": "v1", "kind": "Pod", "name": "host-0",
                               "uid": "6f1f5b8e-0000-4000-8000-000000000000", "controller": False}))
    return docs


def quantity(q: str) -> float:
    """A Kubernetes quantity as a number (the suffixes this module writes, and m for CPU)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|m)?", q)
    assert m, f"unexpected quantity {q!r}"
    scale = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "m": 1e-3}[m.group(2)]
    return int(m.group(1)) * scale


# -- the schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_object_validates_against_the_kubernetes_schemas(case: str, version: str) -> None:
    docs = all_objects(CASES[case])
    kinds = {d["kind"] for d in docs}
    assert {"Pod", "NetworkPolicy", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    assert ("RuntimeClass" in kinds) == (CASES[case].runtime is not None)
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises kubernetes_validate.ValidationError


def test_the_schema_check_is_strict() -> None:
    """What makes the test above able to fail: a misspelled field, or a wrong type, is refused."""
    pod = pod_for(Policy())
    kv.validate(pod, VERSIONS[-1], strict=True)
    typo = copy.deepcopy(pod)
    typo["spec"]["containers"][0]["stdinOnse"] = False
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, VERSIONS[-1], strict=True)
    wrong = copy.deepcopy(pod)
    wrong["spec"]["securityContext"]["runAsUser"] = "10001"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, VERSIONS[-1], strict=True)


# -- the restricted profile -------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_every_pod_meets_the_restricted_profile(case: str) -> None:
    for doc in all_objects(CASES[case]):
        if doc["kind"] == "Pod":
            assert restricted_violations(doc) == []


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def _sc(pod: dict[str, Any]) -> dict[str, Any]:
    return _container(pod)["securityContext"]


def _set(path: str, value: Any) -> Any:
    def apply(pod: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = pod
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value
    return apply


def _add_init_container(pod: dict[str, Any]) -> None:
    init = copy.deepcopy(_container(pod))
    init["name"] = "init"
    init["securityContext"]["allowPrivilegeEscalation"] = True
    pod["spec"]["initContainers"] = [init]


BREAKS: dict[str, tuple[Any, str]] = {
    "hostNetwork": (_set("spec.hostNetwork", True), "host namespaces"),
    "hostPID": (_set("spec.hostPID", True), "host namespaces"),
    "hostIPC": (_set("spec.hostIPC", True), "host namespaces"),
    "privileged": (_set("spec.containers.0.securityContext.privileged", True), "is privileged"),
    "escalation": (_set("spec.containers.0.securityContext.allowPrivilegeEscalation", True),
                   "allowPrivilegeEscalation"),
    "escalation-unset": (lambda p: _sc(p).pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    "root-allowed": (lambda p: (_sc(p).pop("runAsNonRoot"), p["spec"]["securityContext"].pop("runAsNonRoot")),
                     "runAsNonRoot"),
    "container-root-allowed": (_set("spec.containers.0.securityContext.runAsNonRoot", False), "runAsNonRoot"),
    "uid-0-pod": (_set("spec.securityContext.runAsUser", 0), "runAsUser is 0"),
    "uid-0-container": (_set("spec.containers.0.securityContext.runAsUser", 0), "runAsUser is 0"),
    "seccomp-unconfined": (_set("spec.securityContext.seccompProfile", {"type": "Unconfined"}), "seccompProfile"),
    "seccomp-unset": (lambda p: p["spec"]["securityContext"].pop("seccompProfile"), "seccompProfile"),
    "seccomp-container-unconfined": (_set("spec.containers.0.securityContext.seccompProfile",
                                          {"type": "Unconfined"}), "seccompProfile"),
    "caps-not-dropped": (_set("spec.containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}),
                         "does not include ALL"),
    "caps-added": (_set("spec.containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
                   "only NET_BIND_SERVICE"),
    "hostPath": (lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    "volume-type": (lambda p: p["spec"]["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
                    "not allowed"),
    "hostPort": (_set("spec.containers.0.ports", [{"containerPort": 80, "hostPort": 80}]), "hostPort"),
    "procMount": (_set("spec.containers.0.securityContext.procMount", "Unmasked"), "procMount"),
    "sysctl": (_set("spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]), "safe set"),
    "apparmor": (_set("spec.containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}), "Unconfined"),
    "apparmor-annotation": (_set("metadata.annotations", {
        f"container.apparmor.security.beta.kubernetes.io/{CONTAINER}": "unconfined"}), "unconfined"),
    "selinux-type": (_set("spec.securityContext.seLinuxOptions", {"type": "spc_t"}), "seLinuxOptions.type"),
    "selinux-user": (_set("spec.containers.0.securityContext.seLinuxOptions", {"user": "system_u"}),
                     "seLinuxOptions.user"),
    "hostProcess": (_set("spec.securityContext.windowsOptions", {"hostProcess": True}), "hostProcess"),
    "init-container": (_add_init_container, "initContainers['init'].securityContext.allowPrivilegeEscalation"),
}


@pytest.mark.parametrize("rule", sorted(BREAKS))
def test_the_restricted_check_refuses_each_rule(rule: str) -> None:
    pod = pod_for(Policy())
    assert restricted_violations(pod) == []
    breaker, expected = BREAKS[rule]
    breaker(pod)
    found = restricted_violations(pod)
    assert len(found) >= 1 and any(expected in f for f in found), found


def test_the_restricted_check_allows_what_the_standard_allows() -> None:
    """Not a blanket refusal: NET_BIND_SERVICE, a safe sysctl, RuntimeDefault, container_t, csi volumes pass."""
    pod = pod_for(Policy(cap_add=("NET_BIND_SERVICE",)), seccomp="runtime-default")
    pod["spec"]["securityContext"]["sysctls"] = [{"name": "net.ipv4.ping_group_range", "value": "0 0"}]
    pod["spec"]["securityContext"]["seLinuxOptions"] = {"type": "container_t", "level": "s0:c1,c2"}
    pod["spec"]["volumes"].append({"name": "c", "csi": {"driver": "x"}})
    assert _sc(pod)["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert restricted_violations(pod) == []


# -- the same translation as the Docker backend ----------------------------------------------------

def _tmpfs_size(options: str) -> int:
    return int(re.search(r"(?:^|,)size=(\d+)", options).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_pod_says_what_the_docker_container_says(case: str) -> None:
    p = CASES[case]
    body = create_body(p, image=IMAGE, uid=10001, gid=10001, work_volume="v", labels={})
    host = body["HostConfig"]
    pod = pod_for(p)
    spec, c = pod["spec"], _container(pod)
    # resources: the Docker limits, requests = limits (Guaranteed QoS: no swap, as MemorySwap = Memory)
    assert c["resources"]["requests"] == c["resources"]["limits"]
    limits = c["resources"]["limits"]
    assert quantity(limits["memory"]) == host["Memory"] == host["MemorySwap"]
    assert round(quantity(limits["cpu"]) * 1e9) == host["NanoCpus"]
    assert quantity(limits["ephemeral-storage"]) == LOG_STORAGE
    # every tmpfs of the container is a memory emptyDir of the same size at the same path, and nothing more
    sizes = {path: _tmpfs_size(opts) for path, opts in host["Tmpfs"].items()}
    sizes["/work"] = _tmpfs_size(work_volume_options(p, 10001, 10001)["o"])
    sizes["/dev/shm"] = host["ShmSize"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    assert all(v["emptyDir"]["medium"] == "Memory" for v in volumes.values())
    assert {path: quantity(v["emptyDir"]["sizeLimit"]) for path, v in mounted.items()} == sizes
    assert RELAY_DIR in mounted
    # identity, environment, command, hardening
    assert body["User"] == f"{_sc(pod)['runAsUser']}:{_sc(pod)['runAsGroup']}"
    assert spec["securityContext"]["runAsUser"] == _sc(pod)["runAsUser"]
    assert [f"{e['name']}={e['value']}" for e in c["env"]] == body["Env"]
    assert c["workingDir"] == body["WorkingDir"]
    assert c["command"][:3] == body["Cmd"][:3] and c["command"][3] == rlimit_prelude(p) + body["Cmd"][3]
    assert (c["stdin"], c["stdinOnce"], c["tty"]) == (body["OpenStdin"], body["StdinOnce"], body["Tty"])
    assert _sc(pod)["readOnlyRootFilesystem"] == host["ReadonlyRootfs"]
    assert _sc(pod)["allowPrivilegeEscalation"] is ("no-new-privileges:true" not in host["SecurityOpt"])
    assert _sc(pod)["capabilities"]["drop"] == host["CapDrop"] == ["ALL"]
    assert _sc(pod)["capabilities"].get("add") == host["CapAdd"]
    assert _sc(pod)["privileged"] is host["Privileged"] is False
    assert spec.get("runtimeClassName") == (runtime_class(p) or {}).get("metadata", {}).get("name")
    assert (spec.get("runtimeClassName") is None) == (host.get("Runtime") is None)
    # rlimits: the values the prelude sets are Docker's Ulimits
    prelude = dict(re.findall(r"\(_r\.RLIMIT_(\w+),(\d+)\)", rlimit_prelude(p)))
    assert {name.lower(): int(v) for name, v in prelude.items()} == {
        u["Name"]: u["Hard"] for u in host["Ulimits"]} == {u["Name"]: u["Soft"] for u in host["Ulimits"]}
    # no network, no token, nothing of the node
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert not (spec["hostNetwork"] or spec["hostPID"] or spec["hostIPC"])
    assert spec["restartPolicy"] == "Never"
    assert json.loads(pod["metadata"]["annotations"]["kernelexec.policy"]) == json.loads(p.to_json())


def test_egress_adds_the_site_directory_and_the_proxy_environment_but_no_network() -> None:
    pod = pod_for(CASES["egress"])
    mounts = {m["mountPath"]: m["name"] for m in _container(pod)["volumeMounts"]}
    site = next(v for v in pod["spec"]["volumes"] if v["name"] == mounts["/opt/kernelexec/site"])
    assert quantity(site["emptyDir"]["sizeLimit"]) == parse_size("256m")
    env = {e["name"]: e["value"] for e in _container(pod)["env"]}
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    assert "/opt/kernelexec/site" not in {m["mountPath"] for m in _container(pod_for(Policy()))["volumeMounts"]}
    # the proxy is on the host, reached through the attach stream: the pod's policy still denies all egress
    np = session_manifests(CASES["egress"], image=IMAGE, session=SESSION)[0]
    assert np["spec"]["egress"] == [] and "Egress" in np["spec"]["policyTypes"]


# -- the command runs --------------------------------------------------------------------------------

def _host_command(p: Policy) -> list[str]:
    """The pod's command with this interpreter in place of the image's."""
    cmd = pod_for(p)["spec"]["containers"][0]["command"]
    assert cmd[0] == bootstrap_command()[0]
    return [sys.executable, *cmd[1:]]


def test_the_prelude_sets_the_policys_rlimits() -> None:
    p = Policy(nofile=321, max_file_size="8m")
    probe = rlimit_prelude(p) + ("import resource as r;print([r.getrlimit(getattr(r, 'RLIMIT_' + n)) "
                                 "for n in ('NOFILE','NPROC','FSIZE','CORE')])")
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("(", "[").replace(")", "]")) == [[321, 321], [4096, 4096], [8 << 20, 8 << 20],
                                                                    [0, 0]]


def test_the_prelude_keeps_a_lower_hard_limit_of_the_node() -> None:
    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

    probe = rlimit_prelude(Policy()) + "import resource as r;print(r.getrlimit(r.RLIMIT_NOFILE))"
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True,
                         preexec_fn=lower).stdout
    assert out.strip() == "(100, 100)"


def test_the_command_waits_for_the_hosts_hello() -> None:
    """The relay's bootstrap, after the prelude, reads the hello from stdin: with stdin closed it says so.
    (A pod's stdin stays open until a host attaches and sends it.)"""
    done = subprocess.run(_host_command(Policy()), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert done.returncode == 1 and "the stream closed before the hello" in done.stderr
    bad = subprocess.run(_host_command(Policy()), input="not a hello", capture_output=True, text=True)
    assert bad.returncode == 1 and "the hello does not start with KXB1" in bad.stderr


# -- what cannot be translated is refused ------------------------------------------------------------

@pytest.mark.parametrize(("changes", "words"), [
    ({"workspace": "/srv/data"}, "bind-mounts a host directory"),
    ({"transport": "ipc"}, "pods/attach"),
    ({"network": "bridge"}, "Policy.egress"),
    ({"seccomp": "unconfined"}, "restricted"),
    ({"apparmor": "unconfined"}, "Pod Security Standards"),
    ({"cpus": 0.0005}, "millicores"),
    ({"cpus": 1.00001}, "millicores"),
    ({"runtime": "io.containerd.kata.v2"}, "RuntimeClass handler"),
    ({"labels": {"team": "a b"}}, "label value"),
])
def test_what_a_pod_cannot_express_is_refused(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(words)):
        pod_for(Policy(**changes))


def test_names_and_labels_are_checked() -> None:
    with pytest.raises(ManifestError, match="DNS label"):
        pod_for(Policy(), name="Kernel_1")
    with pytest.raises(ManifestError, match="kernelexec"):
        pod_for(Policy(), labels={"app.kubernetes.io/managed-by": "me"})
    with pytest.raises(ManifestError, match="positive"):
        pod_for(Policy(), active_deadline=0)


def test_seccomp_choices() -> None:
    def profile(p: Policy, **kw: Any) -> dict[str, str]:
        return pod_for(p, **kw)["spec"]["securityContext"]["seccompProfile"]

    assert profile(Policy()) == {"type": "Localhost", "localhostProfile": SECCOMP_PROFILE}
    assert profile(Policy(), seccomp="runtime-default") == {"type": "RuntimeDefault"}
    assert profile(Policy(seccomp="docker-default")) == {"type": "RuntimeDefault"}
    assert profile(Policy(seccomp="docker-default"), seccomp="localhost")["localhostProfile"] == SECCOMP_PROFILE
    assert profile(Policy(seccomp="/etc/kx/tight.json")) == {"type": "Localhost",
                                                             "localhostProfile": "profiles/tight.json"}
    # "unconfined" is refused, but an explicit choice replaces it
    assert profile(Policy(seccomp="unconfined"), seccomp="runtime-default") == {"type": "RuntimeDefault"}


def test_quantities_are_exact() -> None:
    assert memory_quantity(1 << 30) == "1Gi" and memory_quantity(3 << 20) == "3Mi"
    assert memory_quantity(300_000_001) == "300000001" and memory_quantity(1536) == "1536"
    assert memory_quantity(3 << 9) == "1536" and memory_quantity(5 << 10) == "5Ki"
    assert cpu_quantity(1.0) == "1000m" and cpu_quantity(0.5) == "500m" and cpu_quantity(1.25) == "1250m"


# -- the NetworkPolicy, the RuntimeClass, the RBAC ---------------------------------------------------

def _selects(np: dict[str, Any], pod: dict[str, Any]) -> bool:
    wanted = np["spec"]["podSelector"]["matchLabels"]
    return all(pod["metadata"]["labels"].get(k) == v for k, v in wanted.items())


def test_the_network_policies_deny_everything_to_the_sandbox_pods() -> None:
    pod = pod_for(Policy())
    other = pod_manifest(Policy(), image=IMAGE, session="ffffffffffff")
    mine, everyone = network_policy("sandboxes", session=SESSION), network_policy("sandboxes")
    for np in (mine, everyone):
        assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert np["spec"]["ingress"] == [] and np["spec"]["egress"] == []
        assert _selects(np, pod)
    assert not _selects(mine, other) and _selects(everyone, other)
    assert not _selects(everyone, {"metadata": {"labels": {"app": "web"}}})


def test_runtime_classes() -> None:
    assert runtime_class(Policy()) is None
    rc = runtime_class(Policy(runtime="runsc"))
    assert rc is not None and (rc["metadata"]["name"], rc["handler"]) == ("gvisor", "runsc")
    assert pod_for(Policy(runtime="runsc"))["spec"]["runtimeClassName"] == "gvisor"
    assert pod_for(Policy(runtime="kata-qemu"))["spec"]["runtimeClassName"] == "kata-qemu"
    assert "runtimeClassName" not in pod_for(Policy())["spec"]


def test_the_host_may_manage_and_attach_to_pods_and_nothing_else() -> None:
    role = next(d for d in rbac_manifests("sandboxes") if d["kind"] == "Role")
    grants = {(group, res, verb) for rule in role["rules"] for group in rule["apiGroups"]
              for res in rule["resources"] for verb in rule["verbs"]}
    assert grants == {("", "pods", v) for v in ("create", "delete", "get", "list", "watch")} | {
        ("", "pods/attach", "create"), ("", "pods/attach", "get")}
    binding = next(d for d in rbac_manifests("sandboxes") if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert all(d["metadata"]["namespace"] == "sandboxes" for d in rbac_manifests("sandboxes"))


def test_the_docs_show_the_rbac_that_is_printed() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "kubernetes.md").read_text()
    section = page.split("## RBAC", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "docs/kubernetes.md: no yaml block in the RBAC section"
    assert _stream(block.group(1)) == rbac_manifests("sandboxes") + [network_policy("sandboxes")]


# -- the command line --------------------------------------------------------------------------------

def _stream(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_cli_prints_a_stream_kubectl_applies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kubernetes", "manifest", "--profile", "coder", "--image", IMAGE, "--namespace", "sandboxes",
                 "--session", SESSION, "--deadline", "600"]) == 0
    out = capsys.readouterr()
    docs = _stream(out.out)
    assert [d["kind"] for d in docs] == ["NetworkPolicy", "Pod"]
    for d in docs:
        kv.validate(d, VERSIONS[-1], strict=True)
    pod = docs[1]
    assert pod == pod_manifest(BUILTIN["coder"], image=IMAGE, session=SESSION, namespace="sandboxes",
                               active_deadline=600)
    assert "podPidsLimit" in out.out and SECCOMP_PROFILE in out.out and out.err == ""


def test_cli_runtime_class_and_rbac(capsys: pytest.CaptureFixture[str], tmp_path: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.gv]\nextends = "strict"\nruntime = "runsc"\n')
    monkeypatch.setenv("KERNELEXEC_PROFILES", str(profiles))
    assert main(["kubernetes", "manifest", "--profile", "gv", "--seccomp", "runtime-default"]) == 0
    out = capsys.readouterr().out
    docs = _stream(out)
    assert [d["kind"] for d in docs] == ["NetworkPolicy", "Pod"]  # the RuntimeClass is a comment: admins create it
    assert docs[1]["spec"]["runtimeClassName"] == "gvisor" and '"handler": "runsc"' in out
    assert docs[1]["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main(["kubernetes", "manifest", "--profile", "gv", "--rbac"]) == 0
    setup = _stream(capsys.readouterr().out)
    assert [d["kind"] for d in setup] == ["ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "RuntimeClass"]
    for d in setup:
        kv.validate(d, VERSIONS[-1], strict=True)


def test_cli_refuses_an_untranslatable_profile(capsys: pytest.CaptureFixture[str], tmp_path: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.ws]\nworkspace = "/srv/data"\n')
    monkeypatch.setenv("KERNELEXEC_PROFILES", str(profiles))
    assert main(["kubernetes", "manifest", "--profile", "ws"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "bind-mounts a host directory" in captured.err


def test_cli_prints_the_seccomp_profile_nodes_need(capsys: pytest.CaptureFixture[str]) -> None:
    from kernelexec.seccomp import profile

    assert main(["kubernetes", "seccomp-profile"]) == 0
    assert json.loads(capsys.readouterr().out) == profile()
