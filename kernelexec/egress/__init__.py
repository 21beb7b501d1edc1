"""Egress for sandboxes that have no network interface: an allowlist and a host-side HTTP(S) proxy.

:mod:`.rules` reads ``Policy.egress`` (pure); :mod:`.proxy` serves one session's connections, each
carried from the sandbox as a :class:`~kernelexec.backend.base.ByteStream`, whatever the transport.
"""

from .rules import NAMED_SETS, Allowlist, EgressRule, EgressRuleError, address_problem, parse_egress

__all__ = ["NAMED_SETS", "Allowlist", "EgressRule", "EgressRuleError", "address_problem", "parse_egress"]
