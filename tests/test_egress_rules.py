"""The egress allowlist (pure): entries, matching, address classification, and Policy/profile narrowing."""

from __future__ import annotations

import ipaddress
import json

import pytest

from kernelexec import Policy, PolicyViolation
from kernelexec.egress.rules import (
    NAMED_SETS,
    WEB_PORTS,
    EgressRuleError,
    address_problem,
    parse_egress,
    parse_entry,
    review,
)
from kernelexec.profiles import load_profiles, profile_policy, within
from kernelexec.tools.audit import audit_policy


def test_entry_forms():
    (host,) = parse_entry("PyPI.org.")
    assert (host.host, host.ports, host.wildcard, host.address) == ("pypi.org", WEB_PORTS, False, None)
    (port,) = parse_entry("example.org:8443")
    assert port.ports == {8443}
    (wild,) = parse_entry("*.Example.org:443")
    assert (wild.host, wild.wildcard, wild.ports) == ("example.org", True, {443})
    (v4,) = parse_entry("203.0.113.7:443")
    assert (v4.address, v4.ports) == (ipaddress.ip_address("203.0.113.7"), {443})
    (v6,) = parse_entry("[2001:db8::7]:443")
    assert (v6.address, v6.ports) == (ipaddress.ip_address("2001:db8::7"), {443})
    (bare6,) = parse_entry("fd00::1")
    assert (bare6.address, bare6.ports) == (ipaddress.ip_address("fd00::1"), WEB_PORTS)
    (idn,) = parse_entry("bücher.de")
    assert idn.host == "xn--bcher-kva.de"


def test_named_sets_expand_to_their_members():
    pypi = parse_egress(["pypi"])
    assert [r.describe() for r in pypi.rules] == ["pypi.org:443", "files.pythonhosted.org:443"]
    assert all(r.entry.startswith("pypi: ") for r in pypi.rules)
    assert parse_egress(["PyPI"]) == pypi
    for name, members in NAMED_SETS.items():
        assert len(parse_egress([name]).rules) == len(members)
    assert pypi.allows("files.pythonhosted.org", 443) and not pypi.allows("files.pythonhosted.org", 80)


@pytest.mark.parametrize(("entry", "says"), [
    ("https://pypi.org/simple", "not URLs"),
    ("pypi.org/simple", "not URLs"),
    ("*", "wildcard"),
    ("*.org", "top-level domain"),
    ("foo.*.org", "first label"),
    ("pypi.org:0", "1 to 65535"),
    ("pypi.org:https", "1 to 65535"),
    ("[::1", "[2001:db8::1]:443"),
    ("[pypi.org]:443", "not an IPv6 address"),
    ("1:2:3", "IPv6"),
    ("-bad-.org", "not a valid host name"),
    ("a..b", "not a valid host name"),
    ("", "empty"),
])
def test_unreadable_entries_say_what_to_write(entry, says):
    with pytest.raises(EgressRuleError, match="egress") as e:
        parse_egress([entry])
    assert says in str(e.value)
    with pytest.raises(ValueError, match=r"^Policy\.egress: "):
        Policy(egress=(entry,))


def test_a_string_is_not_a_list_of_entries():
    with pytest.raises(ValueError, match=r"write egress=\('pypi',\)"):
        Policy(egress="pypi")  # type: ignore[arg-type]


def test_matching_is_case_dot_and_idna_insensitive():
    rules = parse_egress(["Files.Example.org", "xn--bcher-kva.de:443", "*.cdn.example.net:443"])
    assert rules.allows("files.example.org", 443) and rules.allows("FILES.EXAMPLE.ORG.", 80)
    assert not rules.allows("files.example.org", 8080)
    assert rules.allows("bücher.de", 443) and rules.allows("BÜCHER.de.", 443)
    assert rules.allows("a.cdn.example.net", 443) and rules.allows("a.b.cdn.example.net", 443)
    assert not rules.allows("cdn.example.net", 443)  # the wildcard is for names under it
    assert not rules.allows("evilcdn.example.net", 443) and not rules.allows("cdn.example.net.evil.org", 443)
    assert not rules.allows("not a host", 443)


def test_addresses_match_only_address_entries():
    rules = parse_egress(["127.0.0.1:8080", "[::1]:8080", "localhost:8080"])
    assert rules.allows("127.0.0.1", 8080) and rules.allows("[::1]", 8080) and rules.allows("::1", 8080)
    assert not rules.allows("127.0.0.1", 8081)
    assert not rules.allows("::ffff:127.0.0.1", 8080)  # another spelling reaches it: not named literally
    assert not parse_egress(["localhost:8080"]).allows("127.0.0.1", 8080)
    assert not parse_egress(["*.example.org"]).allows("10.0.0.1", 443)


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"), ("127.1.2.3", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "carrier-grade NAT"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("100.100.100.200", "metadata"),
    ("fd00::1", "unique local"), ("fc00::1", "unique local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("240.0.0.1", "reserved"),
    ("192.0.2.1", "not a public address"), ("2001:db8::1", "not a public address"),
    # IPv6 forms that carry an IPv4 address are judged by it
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "metadata"), ("::127.0.0.1", "loopback"),
    ("2002:7f00:1::", "loopback"), ("2002:a9fe:a9fe::1", "metadata"), ("64:ff9b::a00:1", "private"),
    ("64:ff9b:1::1", "NAT64"),
])
def test_non_public_addresses_are_named(address, why):
    problem = address_problem(ipaddress.ip_address(address))
    assert problem is not None and why in problem


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.0.223", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "2002:808:808::1", "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


def test_policy_bounds_are_validated():
    for bad in ({"egress_max_connections": 0}, {"egress_rate": -1}, {"egress_rate": 1.5}, {"egress_max_bytes": "x"}):
        with pytest.raises(ValueError, match="egress"):
            Policy(**bad)  # type: ignore[arg-type]


def test_relaxations_list_egress_and_audit_flags_broad_entries():
    assert Policy().relaxations() == []
    p = Policy(egress=["pypi", "*.hf.co:443", "169.254.169.254:80", "10.0.0.5:443"])
    assert isinstance(p.egress, tuple)
    (line,) = [r for r in p.relaxations() if r.startswith("egress=")]
    assert "pypi.org:443" in line and "*.hf.co:443" in line
    findings = audit_policy(p)
    checks = [(f.severity, f.check, f.detail) for f in findings]
    assert any(s == "medium" and "egress" == c.split(": ")[-1] for s, c, _ in checks)
    assert any(s == "high" and "metadata" in d for s, _, d in checks)
    assert any(s == "medium" and "*.hf.co" in d for s, _, d in checks)
    assert any(s == "medium" and "10.0.0.5" in d for s, _, d in checks)
    assert review(parse_egress(["pypi"])) == []


def test_policy_label_round_trip_keeps_egress():
    p = Policy(egress=("pypi", "[2001:db8::7]:443"), egress_max_bytes="64m")
    again = Policy(**{k: (tuple(v) if k == "cap_add" else v) for k, v in json.loads(p.to_json()).items()})
    assert again.egress == p.egress and again.egress_max_bytes == "64m"


PROFILES = """
[profiles.installer]
egress = ["pypi", "*.example.org:443"]
egress_max_bytes = "128m"
egress_max_connections = 4

[profiles.nothing]
extends = "strict"
"""


def test_profiles_set_egress_and_a_policy_may_only_narrow_it(tmp_path):
    path = tmp_path / "kernelexec.toml"
    path.write_text(PROFILES)
    installer = profile_policy("installer", path)
    assert installer.egress == ("pypi", "*.example.org:443") and installer.egress_max_connections == 4
    assert load_profiles(path)["nothing"].egress == ()
    narrowed = within(Policy(egress=("files.pythonhosted.org:443", "a.b.example.org:443"),
                             egress_max_bytes="64m", egress_rate=10), installer, role="installer")
    assert narrowed.egress == ("files.pythonhosted.org:443", "a.b.example.org:443")
    assert narrowed.egress_max_connections == 4  # from the profile
    assert within(Policy(egress=()), installer, role="installer").egress == ()
    for wider, says in [(("pypi.org:80",), "pypi.org:80"), (("github",), "github.com:443"),
                        (("example.org:443",), "example.org:443"), (("*.org.example.org:8443",), "8443"),
                        (("evilpypi.org:443",), "evilpypi.org"), (("sub.pypi.org:443",), "sub.pypi.org")]:
        with pytest.raises(PolicyViolation, match="egress") as e:
            within(Policy(egress=wider), installer, role="installer")
        assert says in str(e.value)
    with pytest.raises(PolicyViolation, match="egress_max_bytes"):
        within(Policy(egress_max_bytes="1g"), installer, role="installer")
    with pytest.raises(PolicyViolation, match="egress_max_connections"):
        within(Policy(egress_max_connections=5), installer, role="installer")
    with pytest.raises(PolicyViolation, match="egress"):
        within(Policy(egress=("pypi",)), profile_policy("nothing", path), role="nothing")


def test_a_profile_with_a_bad_entry_names_it(tmp_path):
    from kernelexec.profiles import ProfileError

    path = tmp_path / "kernelexec.toml"
    path.write_text('[profiles.bad]\negress = ["https://pypi.org/simple"]\n')
    with pytest.raises(ProfileError, match="'bad'.*not URLs"):
        profile_policy("bad", path)
