"""A session as Kubernetes objects: the Pod, its default-deny NetworkPolicy, the RuntimeClass it names,
and the RBAC a host needs. Pure: dictionaries in, dictionaries out, no client library and no I/O.

The Pod is the attach transport's container (:func:`kernelexec.backend.docker.attach.create_body`)
said in Kubernetes' words, built from the same pieces of :mod:`kernelexec.policy` (sizes, scratch
directories, environment, rlimits, user) so that the two cannot drift apart; ``tests/test_kubernetes.py``
compares them field by field. What Kubernetes has no field for is said where it is handled:

* rlimits (nofile, nproc, fsize, core): set by a few lines run before the relay's bootstrap
  (:func:`rlimit_prelude`), clamped to the node's hard limits (lowering needs no privilege);
* ``Policy.pids``: only the kubelet's node-wide ``podPidsLimit`` bounds a pod's processes;
* noexec on /tmp, home and /work: an ``emptyDir`` takes no mount options;
* ``Policy.log_driver``: a container runtime under Kubernetes always keeps the container's
  stdout, so the node's log holds the attach stream (``ephemeral-storage`` bounds it, see
  :data:`LOG_STORAGE`).

``docs/kubernetes.md`` explains each field and what a backend module would add.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from ..backend.attach.boot import RELAY_DIR, RELAY_DIR_SIZE, attach_env, bootstrap_command
from ..backend.docker.sandbox import LABEL, LABEL_POLICY, LABEL_TRANSPORT
from ..errors import KernelExecError
from ..policy import HOME, SITE_DIR, WORKDIR, Policy, parse_size, resolve_user, scratch_dirs, ulimits

__all__ = [
    "CONTAINER", "LABEL_MANAGED_BY", "LOG_STORAGE", "MANAGED_BY", "ManifestError", "SECCOMP_PROFILE",
    "SeccompChoice", "cpu_quantity", "memory_quantity", "network_policy", "pod_manifest", "rbac_manifests",
    "render", "restricted_violations", "rlimit_prelude", "runtime_class", "runtime_class_name",
    "session_manifests", "setup_manifests",
]

#: The one container of a sandbox pod.
CONTAINER = "kernel"
#: Every sandbox pod carries this label: the namespace-wide NetworkPolicy and ``gc`` select by it.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kernelexec"
#: kernelexec's seccomp profile (:mod:`kernelexec.seccomp`) as a node keeps it: relative to the
#: kubelet's seccomp root (``/var/lib/kubelet/seccomp`` by default), so the file on each node is
#: ``/var/lib/kubelet/seccomp/profiles/kernelexec.json`` (``kernelexec kubernetes seccomp-profile``).
SECCOMP_PROFILE = "profiles/kernelexec.json"
#: The pod's ``ephemeral-storage`` (requests = limits). With a read-only root and every writable
#: directory in memory, the only disk a sandbox uses is the node's log of its stdout, which the
#: runtime keeps whatever the pod says (the attach stream's frames, from the relay). The kubelet
#: rotates it at ``containerLogMaxSize`` x ``containerLogMaxFiles`` (10 MiB x 5 by default) and
#: checks every 10 s, so a chatty kernel overshoots for a while: past this, the pod is evicted.
LOG_STORAGE = 256 << 20
#: Seconds between SIGTERM and SIGKILL: the relay passes SIGTERM on; nothing in a sandbox is
#: worth waiting for (Docker's ``StopSignal`` is SIGKILL).
GRACE_SECONDS = 2

SeccompChoice = Literal["localhost", "runtime-default"]

_RLIMITS = {"nofile": "RLIMIT_NOFILE", "nproc": "RLIMIT_NPROC", "fsize": "RLIMIT_FSIZE", "core": "RLIMIT_CORE"}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class ManifestError(KernelExecError, ValueError):
    """The policy (or an argument) has no faithful translation into a Pod; the message says which."""


# -- quantities ---------------------------------------------------------------------------------

def memory_quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity, exact: ``1073741824`` -> ``"1Gi"``, an odd size stays in bytes."""
    for suffix, shift in (("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def cpu_quantity(cpus: float) -> str:
    """``Policy.cpus`` in millicores. Kubernetes counts thousandths; a finer value is refused rather
    than rounded, so the pod never gets a different quota than the Docker container would."""
    millis = round(cpus * 1000)
    if millis < 1 or abs(millis - cpus * 1000) > 1e-6:
        raise ManifestError(f"Policy.cpus={cpus!r} is not a whole number of millicores (0.001 CPU), the "
                            "resolution of a Kubernetes CPU limit; use e.g. 0.5 or 1.25")
    return f"{millis}m"


# -- the pod ----------------------------------------------------------------------------------

def rlimit_prelude(policy: Policy) -> str:
    """Python run before the relay's bootstrap that sets ``Policy``'s rlimits (soft = hard).

    Kubernetes has no rlimit field and the runtime's defaults are the node's (often a million
    open files). Lowering a limit needs no privilege, and what the relay starts inherits it. A
    node whose hard limit is already lower keeps its own: tighter is never refused."""
    pairs = ",".join(f"(_r.{_RLIMITS[name]},{value})" for name, value in ulimits(policy).items())
    return ("import resource as _r\n"
            f"for _n,_v in ({pairs},):\n"
            " _h=_r.getrlimit(_n)[1]\n"
            " _v=_v if _h==_r.RLIM_INFINITY else min(_v,_h)\n"
            " _r.setrlimit(_n,(_v,_v))\n"
            "del _r,_n,_v,_h\n")


def runtime_class_name(runtime: str) -> str:
    """The RuntimeClass a ``Policy.runtime`` (a CRI handler name, as Docker's runtime names are) is
    reached by: gVisor's handler ``runsc`` is conventionally class ``gvisor``; others keep their name."""
    name = "gvisor" if runtime == "runsc" else runtime
    if not _DNS_LABEL.match(name) or not _DNS_LABEL.match(runtime):
        raise ManifestError(f"Policy.runtime={runtime!r} is not a valid RuntimeClass handler (lowercase letters, "
                            "digits and '-'); name the handler the nodes' CRI configuration registers, e.g. 'runsc' "
                            "or 'kata-qemu'")
    return name


def runtime_class(policy: Policy) -> dict[str, Any] | None:
    """The cluster-scoped RuntimeClass the pod names, for a cluster administrator to create once
    (each node must register the handler with its CRI runtime); ``None`` without ``Policy.runtime``."""
    if not policy.runtime:
        return None
    return {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
            "metadata": {"name": runtime_class_name(policy.runtime),
                         "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
            "handler": policy.runtime}


def _check_translatable(policy: Policy, seccomp: SeccompChoice | None) -> None:
    """Refuse what a Pod cannot express the way the Docker backend does, rather than loosen it quietly."""
    if policy.workspace:
        raise ManifestError("Policy.workspace bind-mounts a host directory; a sandbox pod mounts nothing of the node "
                            "(upload() files into /work instead)")
    if policy.transport == "ipc":
        raise ManifestError("Policy.transport='ipc' shares unix sockets with the host; on Kubernetes the channels "
                            "ride pods/attach: leave transport at 'auto' or set 'attach'")
    if policy.network != "none":
        raise ManifestError(f"Policy.network={policy.network!r}: a sandbox pod has no network but through the "
                            "attach stream (its NetworkPolicy denies all traffic); use Policy.egress for an allowlist")
    if policy.seccomp == "unconfined" and seccomp is None:
        raise ManifestError("Policy.seccomp='unconfined' is refused by the Pod Security Standards' restricted profile; "
                            "use 'kernelexec', 'docker-default' (RuntimeDefault) or a profile file")
    if policy.apparmor == "unconfined":
        raise ManifestError("Policy.apparmor='unconfined' is refused by the Pod Security Standards; leave it at "
                            "'docker-default' (the runtime's default profile) or name a profile loaded on the nodes")


def _seccomp_profile(policy: Policy, choice: SeccompChoice | None) -> dict[str, str]:
    """kernelexec's profile from the node's seccomp root; RuntimeDefault for ``docker-default`` or when
    asked (a cluster that cannot place files on nodes). A profile file becomes ``profiles/<name>``."""
    if choice == "runtime-default" or (choice is None and policy.seccomp == "docker-default"):
        return {"type": "RuntimeDefault"}
    if choice == "localhost" and policy.seccomp in ("docker-default", "unconfined"):
        return {"type": "Localhost", "localhostProfile": SECCOMP_PROFILE}
    if policy.seccomp.endswith(".json"):
        return {"type": "Localhost", "localhostProfile": f"profiles/{policy.seccomp.rsplit('/', 1)[-1]}"}
    return {"type": "Localhost", "localhostProfile": SECCOMP_PROFILE}


def _check_labels(labels: Mapping[str, str], what: str) -> None:
    for key, value in labels.items():
        if not _LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
            raise ManifestError(f"{what}: {key!r} is not a valid Kubernetes label key")
        if not _LABEL_VALUE.match(value) or len(value) > 63:
            raise ManifestError(f"{what}: the value {value!r} of {key!r} is not a valid Kubernetes label value "
                                "(at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric)")


def _memory_dir(name: str, size: int) -> dict[str, Any]:
    return {"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": memory_quantity(size)}}


def pod_manifest(
    policy: Policy,
    *,
    image: str,
    session: str,
    name: str | None = None,
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    seccomp: SeccompChoice | None = None,
    owner: Mapping[str, Any] | None = None,
    active_deadline: int | None = None,
    user_namespace: bool = False,
) -> dict[str, Any]:
    """The Pod of one session under ``policy``: what a Kubernetes backend would create.

    ``seccomp``: ``None`` follows ``Policy.seccomp``; ``"runtime-default"`` is the fallback for a
    cluster whose nodes do not have kernelexec's profile. ``owner``: an ownerReference (the host's
    own Pod, say), so that deleting the owner deletes its sandboxes. ``active_deadline``: seconds
    after which the kubelet ends the pod whatever the host does. ``user_namespace``: ``hostUsers:
    false`` (needs nodes that support it): uid 10001 in the pod is an unmapped uid on the node.
    """
    _check_translatable(policy, seccomp)
    name = name or f"kernelexec-{session}"
    if not _DNS_LABEL.match(name) or len(name) > 63:
        raise ManifestError(f"pod name {name!r} is not a DNS label (lowercase letters, digits, '-', at most 63)")
    extra = {**policy.labels, **(labels or {})}
    if any(k.startswith("kernelexec.") or k == LABEL_MANAGED_BY for k in extra):
        raise ManifestError(f"labels starting with 'kernelexec.' and {LABEL_MANAGED_BY!r} are kernelexec's own")
    all_labels = {**extra, LABEL_MANAGED_BY: MANAGED_BY, LABEL: session, LABEL_TRANSPORT: "attach"}
    _check_labels(all_labels, "Pod labels")
    if active_deadline is not None and active_deadline < 1:
        raise ManifestError("active_deadline must be a positive number of seconds")
    uid, gid = resolve_user(policy, 0, 0)  # a host that is not on the node: the fixed sandbox uid, as a root host
    volumes = [_memory_dir("work", parse_size(policy.workdir_size)),
               _memory_dir("shm", parse_size(policy.shm_size)),
               _memory_dir("relay", RELAY_DIR_SIZE)]
    mounts = [{"name": "work", "mountPath": WORKDIR}, {"name": "shm", "mountPath": "/dev/shm"},
              {"name": "relay", "mountPath": RELAY_DIR}]
    dir_names = {"/tmp": "tmp", HOME: "home", SITE_DIR: "site"}
    for d in scratch_dirs(policy):
        volumes.append(_memory_dir(dir_names[d.path], d.size))
        mounts.append({"name": dir_names[d.path], "mountPath": d.path})
    memory = memory_quantity(parse_size(policy.memory))
    resources = {"cpu": cpu_quantity(policy.cpus), "memory": memory, "ephemeral-storage": memory_quantity(LOG_STORAGE)}
    capabilities: dict[str, list[str]] = {"drop": ["ALL"]}
    if policy.cap_add:
        capabilities["add"] = [c.upper().removeprefix("CAP_") for c in policy.cap_add]
    container_security: dict[str, Any] = {
        "allowPrivilegeEscalation": not policy.no_new_privileges,
        "privileged": False,
        "readOnlyRootFilesystem": policy.read_only,
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "capabilities": capabilities,
    }
    if policy.apparmor != "docker-default":  # the default: the runtime's own profile where the node has AppArmor
        container_security["appArmorProfile"] = {"type": "Localhost", "localhostProfile": policy.apparmor}
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": bootstrap_command(rlimit_prelude(policy)),
        "workingDir": WORKDIR,
        "env": [{"name": k, "value": v} for k, v in attach_env(policy).items()],
        # pods/attach: stdin stays open across attaches (a lost attach can be resumed); no tty, so the
        # stream is bytes as the relay wrote them, stdout and stderr apart
        "stdin": True,
        "stdinOnce": False,
        "tty": False,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": container_security,
        "volumeMounts": mounts,
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": False,
        "hostname": "sandbox",
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": gid,
            "fsGroup": gid,
            "seccompProfile": _seccomp_profile(policy, seccomp),
        },
        "containers": [container],
        "volumes": volumes,
    }
    if policy.runtime:
        spec["runtimeClassName"] = runtime_class_name(policy.runtime)
    if active_deadline is not None:
        spec["activeDeadlineSeconds"] = int(active_deadline)
    if user_namespace:
        spec["hostUsers"] = False
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": all_labels,
                                "annotations": {LABEL_POLICY: policy.to_json()}}
    if owner is not None:
        metadata["ownerReferences"] = [dict(owner)]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def network_policy(namespace: str = "default", *, session: str | None = None,
                   name: str | None = None) -> dict[str, Any]:
    """Deny all ingress and egress: for one session's pod, or (``session=None``) for every sandbox
    pod in the namespace, which an administrator creates once so that the host needs no rights on
    NetworkPolicies. The channels and egress ride pods/attach, through the API server and the
    kubelet, which no NetworkPolicy governs; the pod itself reaches nothing, DNS included."""
    selector = {LABEL_MANAGED_BY: MANAGED_BY}
    if session is not None:
        selector[LABEL] = session
        _check_labels(selector, "NetworkPolicy selector")
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name or (f"kernelexec-{session}" if session else "kernelexec-default-deny"),
                     "namespace": namespace, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
        "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress", "Egress"],
                 "ingress": [], "egress": []},
    }


def rbac_manifests(namespace: str = "default", *, service_account: str = "kernelexec-host") -> list[dict[str, Any]]:
    """What the host needs and nothing more: make, watch and delete pods, and attach to them, in one
    namespace. The WebSocket upgrade of pods/attach is a GET, which API servers authorise as ``get``
    and newer ones also as ``create``: both are granted, on pods/attach only. No exec, no logs,
    no secrets, nothing cluster-wide."""
    meta = {"namespace": namespace, "labels": {LABEL_MANAGED_BY: MANAGED_BY}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "kernelexec-host", **meta},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "delete", "get", "list", "watch"]},
                   {"apiGroups": [""], "resources": ["pods/attach"], "verbs": ["create", "get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "kernelexec-host", **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kernelexec-host"},
         "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]},
    ]


def setup_manifests(policy: Policy, namespace: str = "default") -> list[dict[str, Any]]:
    """An administrator's one-time setup: the host's RBAC, the namespace-wide default-deny
    NetworkPolicy, and the RuntimeClass the policy names."""
    docs = [*rbac_manifests(namespace), network_policy(namespace)]
    rc = runtime_class(policy)
    return [*docs, rc] if rc is not None else docs


def session_manifests(policy: Policy, *, image: str, session: str, namespace: str = "default",
                      **pod_options: Any) -> list[dict[str, Any]]:
    """One session's objects in the order to apply them: the NetworkPolicy before the Pod it guards."""
    return [network_policy(namespace, session=session),
            pod_manifest(policy, image=image, session=session, namespace=namespace, **pod_options)]


def render(documents: Iterable[Mapping[str, Any]], comments: Sequence[str] = ()) -> str:
    """A YAML stream ``kubectl apply -f -`` reads: each document is JSON (which YAML includes), so no
    YAML library is needed, and ``comments`` lead as ``#`` lines."""
    head = "".join(f"# {line}\n" if line else "#\n" for line in comments)
    return head + "".join(f"---\n{json.dumps(doc, indent=2)}\n" for doc in documents)


# -- the Pod Security Standards' restricted profile -----------------------------------------------

#: Volume types the restricted profile allows.
RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                "persistentVolumeClaim", "projected", "secret"})
#: Sysctls the baseline profile calls safe.
SAFE_SYSCTLS = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                          "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                          "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                          "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                          "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"})
_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})


def restricted_violations(pod: Mapping[str, Any]) -> list[str]:
    """What in ``pod`` the Pod Security Standards' restricted profile (which includes baseline)
    refuses, one line per finding; empty when a namespace enforcing ``restricted`` admits it.

    Written from the standard's tables, for Linux pods: host namespaces, privileged, capabilities,
    hostPath and other volume types, host ports, AppArmor, SELinux, /proc mount, sysctls,
    privilege escalation, non-root, seccomp."""
    spec = pod.get("spec") or {}
    psc = spec.get("securityContext") or {}
    found: list[str] = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"spec.{field} is true (host namespaces)")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if "hostPath" in kinds:
            found.append(f"volume {vol.get('name')!r} is a hostPath")
        elif not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {vol.get('name')!r} has type {sorted(kinds - RESTRICTED_VOLUMES)}, not allowed")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl.get('name')!r} is not in the safe set")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("spec.securityContext.windowsOptions.hostProcess is true")
    if psc.get("runAsUser") == 0:
        found.append("spec.securityContext.runAsUser is 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        found.append(f"spec.securityContext.seccompProfile.type is {pod_seccomp!r}")
    found += _apparmor_selinux("spec.securityContext", psc)
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value == "unconfined":
            found.append(f"annotation {key} is unconfined")
    containers = [(kind, c) for kind in ("containers", "initContainers", "ephemeralContainers")
                  for c in spec.get(kind) or []]
    for kind, c in containers:
        where = f"spec.{kind}[{c.get('name')!r}]"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{where} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}.securityContext.allowPrivilegeEscalation is not false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"{where}: runAsNonRoot is not true (in the container or the pod)")
        if sc.get("runAsUser") == 0:
            found.append(f"{where}.securityContext.runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile is {seccomp!r} (must be RuntimeDefault or Localhost)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{where}.securityContext.capabilities.drop does not include ALL")
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            found.append(f"{where}.securityContext.capabilities.add has {sorted(added)} (only NET_BIND_SERVICE)")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{where}.securityContext.procMount is {sc.get('procMount')!r}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}.securityContext.windowsOptions.hostProcess is true")
        found += _apparmor_selinux(f"{where}.securityContext", sc)
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{where} has hostPort {port['hostPort']}")
    return found


def _apparmor_selinux(where: str, sc: Mapping[str, Any]) -> list[str]:
    found = []
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        found.append(f"{where}.appArmorProfile is Unconfined")
    se = sc.get("seLinuxOptions") or {}
    if se.get("type", "") not in _SELINUX_TYPES:
        found.append(f"{where}.seLinuxOptions.type {se['type']!r} is not allowed")
    for field in ("user", "role"):
        if se.get(field):
            found.append(f"{where}.seLinuxOptions.{field} is set")
    return found
