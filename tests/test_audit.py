"""kernelexec audit against the real engine, real sessions and a tampered container."""

from __future__ import annotations

import os

from kernelexec import Policy
from kernelexec.backend.docker.sandbox import LABEL, LABEL_HOST, LABEL_PID, LABEL_POLICY
from kernelexec.tools.audit import audit_policy, audit_profiles, container_deviations, format_table, run_audit, to_json


def test_default_policy_has_no_policy_findings():
    assert audit_policy(Policy()) == []


def test_loosened_policy_is_high():
    findings = audit_policy(Policy(network="bridge", seccomp="unconfined", workspace="/data",
                                   workspace_read_only=False))
    assert {f.check.split(": ")[1] for f in findings if f.severity == "high"} >= {"network", "seccomp", "workspace"}


def test_writable_profile_file_is_high(tmp_path):
    f = tmp_path / "kernelexec.toml"
    f.write_text("[profiles.analyst]\nnetwork = 'bridge'\n")
    os.chmod(f, 0o666)
    findings = audit_profiles(f)
    assert any(x.severity == "high" and x.check == "profile file permissions" for x in findings)
    assert any(x.severity == "high" and "analyst" in x.check for x in findings)


def test_live_session_matches_its_policy(docker, shared_session):
    info = docker.api.inspect_container(shared_session.container_id)
    assert container_deviations(info, shared_session.policy) == []
    findings = run_audit(Policy())
    mine = [f for f in findings if f.area == "container" and shared_session.id in f.check]
    assert mine == []
    assert any(f.area == "daemon" and f.check == "user namespaces" for f in findings)
    assert '"severity"' in to_json(findings) and "SEVERITY" in format_table(findings)


def test_tampered_container_is_reported(docker, kernel_image):
    labels = {LABEL: "tampered0000", LABEL_PID: str(os.getpid()), LABEL_HOST: "elsewhere",
              LABEL_POLICY: Policy(image=kernel_image).to_json()}
    c = docker.containers.run(kernel_image, ["sleep", "60"], labels=labels, detach=True, privileged=False,
                              read_only=False, cap_add=["NET_ADMIN"], name="kernelexec-tampered0000",
                              log_config={"type": "none"}, user="0")
    try:
        findings = [f for f in run_audit(Policy(), daemon=False) if f.check == "kernelexec-tampered0000"]
        text = " | ".join(f.detail for f in findings)
        assert all(f.severity == "high" for f in findings)
        for expected in ("ReadonlyRootfs=False", "CapDrop", "CapAdd", "seccomp", "NetworkMode", "runs as root",
                         "PidsLimit"):
            assert expected in text, expected
    finally:
        c.remove(force=True)
