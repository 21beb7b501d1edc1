"""Named policies for agent roles, read from a TOML file.

A multi-agent system should not give every role the same sandbox: an
"analyst" may need more memory than a "coder", and neither should be able to
widen its own. A profile file defines the roles; a session started with
``profile="analyst"`` gets exactly that policy, and a policy passed alongside
may only tighten it (:class:`PolicyViolation` otherwise).

```toml
[profiles.analyst]
memory = "2g"
cpus = 2.0
timeout = 600

[profiles.coder]
extends = "strict"
timeout = 60
```

Built in: ``default`` (``Policy()``) and ``strict``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from .errors import KernelExecError
from .policy import Policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN: dict[str, Policy] = {
    "default": Policy(),
    "strict": Policy(memory="512m", cpus=0.5, pids=128, nofile=256, timeout=60.0, tmp_size="32m",
                     home_size="32m", shm_size="16m", workdir_size="64m", max_output_bytes="1m",
                     max_message_bytes="4m", max_file_size="64m"),
}
_FIELDS = {f.name for f in dataclasses.fields(Policy)}


class PolicyViolation(KernelExecError):
    """A policy asked for more than its role's profile allows."""


class ProfileError(KernelExecError):
    """The profile file is unreadable or names something that does not exist."""


def profiles_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The profile file in effect: explicit, ``$KERNELEXEC_PROFILES``, ``./kernelexec.toml``,
    or ``~/.config/kernelexec/profiles.toml``; ``None`` when there is none."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("KERNELEXEC_PROFILES")
    if env:
        return Path(env)
    for candidate in (Path("kernelexec.toml"), Path.home() / ".config" / "kernelexec" / "profiles.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_profiles(path: str | os.PathLike[str] | None = None) -> dict[str, Policy]:
    """Every profile: the built-in ones, then the file's (which may extend them)."""
    file = profiles_path(path)
    raw: dict[str, dict[str, Any]] = {}
    if file is not None:
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ProfileError(f"cannot read the profile file {file}: {e}") from e
        section = data.get("profiles", {})
        if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
            raise ProfileError(f"{file}: expected [profiles.NAME] tables")
        raw = section
    out = dict(BUILTIN)
    resolving: set[str] = set()

    def resolve(name: str) -> Policy:
        if name in out and name not in raw:
            return out[name]
        if name not in raw:
            raise ProfileError(f"no profile named {name!r}; known: {sorted(set(out) | set(raw))}")
        if name in resolving:
            raise ProfileError(f"profile {name!r} extends itself")
        resolving.add(name)
        fields = dict(raw[name])
        base = resolve(fields.pop("extends")) if "extends" in fields else Policy()
        unknown = set(fields) - _FIELDS
        if unknown:
            raise ProfileError(f"profile {name!r} sets unknown fields {sorted(unknown)}; see Policy")
        if "cap_add" in fields:
            fields["cap_add"] = tuple(fields["cap_add"])
        try:
            policy = dataclasses.replace(base, **fields)
        except (TypeError, ValueError) as e:
            raise ProfileError(f"profile {name!r}: {e}") from e
        resolving.discard(name)
        out[name] = policy
        return policy

    for name in raw:
        resolve(name)
    return out


def profile_policy(name: str, path: str | os.PathLike[str] | None = None) -> Policy:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"no profile named {name!r}; known: {sorted(profiles)}")
    return profiles[name]


def within(requested: Policy, ceiling: Policy, *, role: str) -> Policy:
    """``requested`` if it is no looser than ``ceiling``; else PolicyViolation naming each widening."""
    wider = requested.relaxations(base=ceiling)
    if ceiling.image is not None and requested.image not in (None, ceiling.image):
        wider.append(f"image={requested.image!r} instead of the profile's {ceiling.image!r}")
    if wider:
        raise PolicyViolation(f"the {role!r} profile does not allow: " + "; ".join(wider))
    return requested if requested.image is not None or ceiling.image is None else requested.replace(image=ceiling.image)
