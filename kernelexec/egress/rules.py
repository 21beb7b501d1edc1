"""What a session's code may reach through the egress proxy: the allowlist and the address check.

Pure logic (no I/O), so that :class:`~kernelexec.policy.Policy` can validate its ``egress`` field at
construction and the proxy, the profiles and ``kernelexec audit`` all read entries the same way.

Entries (``Policy.egress``):

* ``"pypi.org"``: that host on the web ports, 443 (``CONNECT``) and 80 (plain ``http://``).
* ``"pypi.org:8443"``: that host on that port only.
* ``"*.example.org"`` / ``"*.example.org:443"``: every name *under* example.org (any depth), not
  example.org itself. A wildcard must keep at least two labels (``"*.org"`` and ``"*"`` are refused):
  it is still broad (any host an attacker can create under that domain), so ``kernelexec audit`` flags it.
* ``"203.0.113.7"``, ``"203.0.113.7:443"``, ``"2001:db8::7"``, ``"[2001:db8::7]:443"``: an address
  literally. Only such an entry lets the code reach a loopback, private, link-local or metadata address
  (the tests' own servers on 127.0.0.1, an index on the local network): a *name* that resolves to one is
  always refused, so a DNS answer can never turn an allowed name into a way to the host's network.
* Named sets, for common needs (kept small; each is listed in :data:`NAMED_SETS`): ``"pypi"`` (the
  Python package index and its file host), ``"github"`` (clones and release downloads),
  ``"huggingface"`` (models and data sets; its file hosts change, hence its wildcards). A word that
  names a set is the set, never a host of that name.

Host names match case-insensitively, with or without a trailing dot, and internationalised names in
either form (``bücher.de`` is ``xn--bcher-kva.de``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["NAMED_SETS", "WEB_PORTS", "Address", "Allowlist", "EgressRule", "EgressRuleError",
           "address_problem", "normalize_host", "parse_egress", "parse_entry", "review"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The ports an entry without a port allows: https (``CONNECT``) and plain http.
WEB_PORTS: frozenset[int] = frozenset({80, 443})

#: Named sets and what each stands for. Small on purpose: a set is a promise about what it allows.
NAMED_SETS: dict[str, tuple[str, ...]] = {
    # pip: the simple index and the wheels/sdists it links to
    "pypi": ("pypi.org:443", "files.pythonhosted.org:443"),
    # git clone/fetch over https, the API, release assets and raw files
    "github": ("github.com:443", "api.github.com:443", "codeload.github.com:443",
               "objects.githubusercontent.com:443", "raw.githubusercontent.com:443"),
    # the Hub and its download hosts (LFS and Xet storage move between subdomains of these)
    "huggingface": ("huggingface.co:443", "*.huggingface.co:443", "*.hf.co:443"),
}


class EgressRuleError(ValueError):
    """An egress entry that cannot be read; the message says what to write instead."""


@dataclass(frozen=True)
class EgressRule:
    """One allowed destination: a host name (exact or wildcard) or an address, and its ports."""

    #: the entry as written (or the named set it came from, as ``"pypi: pypi.org:443"``)
    entry: str
    #: lower-case ASCII (IDNA) name without trailing dot, the suffix for a wildcard; "" for an address
    host: str
    ports: frozenset[int]
    #: ``*.host``: every name under ``host``, not ``host`` itself
    wildcard: bool = False
    #: set for an address entry: only that address, literally (no classification)
    address: Address | None = None

    def matches(self, host: str, port: int) -> bool:
        """Whether a request for ``host:port`` (``host`` normalised, or an address) falls under this rule."""
        if port not in self.ports:
            return False
        if self.address is not None:
            return _as_address(host) == self.address
        if _as_address(host) is not None:
            return False  # a name rule never matches an address written in the request
        return host.endswith("." + self.host) if self.wildcard else host == self.host

    def covers(self, other: EgressRule) -> bool:
        """Whether everything ``other`` allows, this rule allows too (for narrowing a profile)."""
        if not other.ports <= self.ports:
            return False
        if self.address is not None or other.address is not None:
            return self.address == other.address
        if self.wildcard:
            return other.host.endswith("." + self.host) or (other.wildcard and other.host == self.host)
        return not other.wildcard and other.host == self.host

    def describe(self) -> str:
        """``host:port`` form for messages."""
        name = (f"[{self.address}]" if self.address is not None and self.address.version == 6
                else str(self.address) if self.address is not None
                else ("*." if self.wildcard else "") + self.host)
        return f"{name}:{'/'.join(str(p) for p in sorted(self.ports))}"


@dataclass(frozen=True)
class Allowlist:
    """The parsed ``Policy.egress``; empty means no egress at all."""

    rules: tuple[EgressRule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, host: str, port: int) -> EgressRule | None:
        """The first rule allowing ``host:port`` (any spelling of the name), or ``None``."""
        try:
            name = normalize_target(host)
        except EgressRuleError:
            return None
        return next((r for r in self.rules if r.matches(name, port)), None)

    def allows(self, host: str, port: int) -> bool:
        return self.match(host, port) is not None

    def not_covered_by(self, ceiling: Allowlist) -> list[EgressRule]:
        """The rules here that ``ceiling`` does not allow: what a policy would widen over a profile."""
        return [r for r in self.rules if not any(c.covers(r) for c in ceiling.rules)]


def parse_egress(entries: Iterable[str]) -> Allowlist:
    """Every entry of ``Policy.egress`` read, named sets expanded; raises :class:`EgressRuleError`
    naming the first entry that cannot be read."""
    if isinstance(entries, str):
        raise EgressRuleError(f"egress is a list of entries, got the string {entries!r}; "
                              f"write egress=({entries!r},)")
    rules: list[EgressRule] = []
    for entry in entries:
        rules.extend(parse_entry(entry))
    return Allowlist(tuple(dict.fromkeys(rules)))


def parse_entry(entry: str) -> list[EgressRule]:
    """One entry as rules (a named set gives several)."""
    if not isinstance(entry, str):
        raise EgressRuleError(f"egress entries are strings like 'pypi.org:443', got {entry!r}")
    text = entry.strip()
    if text.lower() in NAMED_SETS:
        return [_with_entry(r, f"{text.lower()}: {r.entry}")
                for member in NAMED_SETS[text.lower()] for r in parse_entry(member)]
    if not text:
        raise EgressRuleError("an empty egress entry; write a host ('pypi.org'), host:port, an address "
                              f"or a named set ({', '.join(sorted(NAMED_SETS))})")
    if "://" in text or "/" in text or "@" in text or "?" in text:
        raise EgressRuleError(f"egress entry {entry!r}: entries name hosts, not URLs; write "
                              "'host' or 'host:port', e.g. 'pypi.org:443'")
    host, port_text = _split_port(text, entry)
    ports = WEB_PORTS if port_text is None else frozenset({_port(port_text, entry)})
    address = _as_address(host)
    if address is not None:
        return [EgressRule(entry, "", ports, address=address)]
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise EgressRuleError(f"egress entry {entry!r}: a wildcard is only allowed as the first label "
                              "('*.example.org'); '*' alone would allow everything, which egress does not do")
    try:
        name = normalize_host(host)
    except EgressRuleError as e:
        raise EgressRuleError(f"egress entry {entry!r}: {e}") from None
    if wildcard and "." not in name:
        raise EgressRuleError(f"egress entry {entry!r}: a wildcard over a top-level domain would allow "
                              f"most of the internet; name the hosts, or at least '*.example.{name}'")
    return [EgressRule(entry, name, ports, wildcard=wildcard)]


def normalize_host(host: str) -> str:
    """Lower-case ASCII form of a host name (IDNA), without the trailing dot; raises
    :class:`EgressRuleError` for what is not a host name."""
    name = host.strip().rstrip(".") if host.strip() != "." else ""
    if not name:
        raise EgressRuleError("an empty host name")
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError as e:
        raise EgressRuleError(f"{host!r} is not a valid host name ({e})") from None
    if len(ascii_name) > 253:
        raise EgressRuleError(f"{host!r} is longer than a host name can be (253 characters)")
    for label in ascii_name.split("."):
        if not label or len(label) > 63 or not all(c.isalnum() or c in "-_" for c in label) \
                or label.startswith("-") or label.endswith("-"):
            raise EgressRuleError(f"{host!r} is not a valid host name (label {label!r}); write e.g. 'pypi.org'")
    return ascii_name


def normalize_target(host: str) -> str:
    """A request's host as rules compare it: an address in its canonical text, else :func:`normalize_host`."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    address = _as_address(text)
    return str(address) if address is not None else normalize_host(text)


# --- addresses -------------------------------------------------------------------------------------

_V4_SPECIAL: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "the cloud metadata service"),
    ("100.100.100.200/32", "the cloud metadata service (Alibaba)"),
    ("127.0.0.0/8", "loopback"),
    ("0.0.0.0/8", "unspecified ('this network')"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (shared, RFC 6598)"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_SPECIAL: tuple[tuple[str, str], ...] = (
    ("fd00:ec2::254/128", "the cloud metadata service (AWS, IPv6)"),
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("fc00::/7", "unique local (private, includes fd00::/8)"),
    ("ff00::/8", "multicast"),
    ("64:ff9b:1::/48", "local-use NAT64"),
)
_V4_NETS = [(ipaddress.IPv4Network(n), why) for n, why in _V4_SPECIAL]
_V6_NETS = [(ipaddress.IPv6Network(n), why) for n, why in _V6_SPECIAL]
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPAT = ipaddress.IPv6Network("::/96")


def address_problem(address: Address) -> str | None:
    """Why the code must not reach ``address`` through a host name, or ``None`` for a public address.

    An IPv6 form that carries an IPv4 address (mapped ``::ffff:a.b.c.d``, compatible ``::a.b.c.d``,
    6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) is judged by that IPv4 address: each can reach it.
    Whatever :mod:`ipaddress` does not call global (documentation, benchmarking, protocol assignments)
    is refused too.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            inner = address_problem(embedded)
            return f"{inner}, as {embedded} inside the IPv6 address {address}" if inner else None
        for net6, why in _V6_NETS:
            if address in net6:
                return why
    else:
        for net4, why in _V4_NETS:
            if address in net4:
                return why
    if not address.is_global:
        return "not a public address (special-purpose range)"
    return None


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _V4_COMPAT and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


# --- audit -----------------------------------------------------------------------------------------

Breadth = tuple[Literal["high", "medium", "low"], str]


def review(allowlist: Allowlist) -> list[Breadth]:
    """What is broad or dangerous about an allowlist, for ``kernelexec audit``: (severity, why)."""
    out: list[Breadth] = []
    for rule in allowlist.rules:
        if rule.wildcard:
            out.append(("medium", f"{rule.entry!r} allows every name under {rule.host}, including hosts "
                        "someone else may create or control there (user content, buckets)"))
        if rule.address is not None:
            problem = address_problem(rule.address)
            if problem and "metadata" in problem:
                out.append(("high", f"{rule.entry!r} names {problem}: the code can read the host's cloud "
                            "credentials"))
            elif problem:
                out.append(("medium", f"{rule.entry!r} names {rule.address} ({problem}): the code can reach "
                            "that address on the host's side"))
    return out


def _split_port(text: str, entry: str) -> tuple[str, str | None]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise EgressRuleError(f"egress entry {entry!r}: write an IPv6 address with a port as '[2001:db8::1]:443'")
        if _as_address(host) is None:
            raise EgressRuleError(f"egress entry {entry!r}: {host!r} in brackets is not an IPv6 address")
        return host, (rest[1:] if rest else None)
    if text.count(":") > 1:  # a bare IPv6 address
        if _as_address(text) is None:
            raise EgressRuleError(f"egress entry {entry!r} is neither host:port nor an IPv6 address; "
                                  "write an IPv6 address with a port as '[2001:db8::1]:443'")
        return text, None
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise EgressRuleError(f"egress entry {entry!r}: the port must be a number from 1 to 65535")
    return int(text)


def _as_address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _with_entry(rule: EgressRule, entry: str) -> EgressRule:
    return EgressRule(entry, rule.host, rule.ports, rule.wildcard, rule.address)
