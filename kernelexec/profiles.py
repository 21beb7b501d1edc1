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

Built in (a file may redefine or extend them):

* ``default``: ``Policy()``.
* ``coder``: an agent that writes and tests code: the default sandbox with a
  60 s timeout, 512 MiB, 128 processes and 1 MiB of output per execution (a
  coding loop should see errors, not megabytes).
* ``analyst``: a data-analysis agent: 2 GiB of memory and a 1 GiB working
  directory for data sets, 10 min per execution, 2 CPUs; nothing else widened
  (still no network, no host files). It is looser than ``default`` on resources
  only, and ``kernelexec audit`` lists exactly that.
* ``strict``: the smallest useful sandbox, for untrusted notebooks.

A file's profile and a policy given with it: fields the policy sets must be
within the profile; fields it does not set come from the profile.
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
    "coder": Policy(memory="512m", pids=128, timeout=60.0, max_output_bytes="1m"),
    "analyst": Policy(memory="2g", cpus=2.0, timeout=600.0, workdir_size="1g", tmp_size="256m"),
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


def _read(file: Path | None) -> dict[str, dict[str, Any]]:
    if file is None:
        return {}
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"cannot read the profile file {file}: {e}") from e
    section = data.get("profiles", {})
    if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
        raise ProfileError(f"{file}: expected [profiles.NAME] tables, e.g.\n[profiles.analyst]\nmemory = \"2g\"")
    return section


class _Profiles:
    """The built-in profiles and a file's, each resolved on demand: one broken profile
    does not take the others down with it."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.raw = _read(file)
        self.resolved: dict[str, Policy] = {}

    def names(self) -> list[str]:
        return sorted(set(BUILTIN) | set(self.raw))

    def where(self) -> str:
        return str(self.file) if self.file is not None else "the built-in profiles"

    def get(self, name: str, chain: tuple[str, ...] = ()) -> Policy:
        if name in self.resolved:
            return self.resolved[name]
        if name not in self.raw:
            if name in BUILTIN:
                return BUILTIN[name]
            raise ProfileError(_missing(name, self.names(), self.file))
        if name in chain:
            raise ProfileError(f"{self.where()}: profile {name!r} extends itself ({' -> '.join(chain + (name,))})")
        fields = dict(self.raw[name])
        parent = fields.pop("extends", None)
        if parent is not None and not isinstance(parent, str):
            raise ProfileError(f"{self.where()}: profile {name!r}: extends must be a profile name")
        if parent == name and name in BUILTIN:  # a file refining a built-in of the same name
            base = BUILTIN.get(name) or Policy()
        else:
            base = self.get(parent, chain + (name,)) if parent is not None else Policy()
        unknown = set(fields) - _FIELDS
        if unknown:
            raise ProfileError(f"{self.where()}: profile {name!r} sets unknown fields {sorted(unknown)}; "
                               "the fields are those of kernelexec.Policy")
        if "cap_add" in fields:
            fields["cap_add"] = tuple(fields["cap_add"])
        try:
            policy = dataclasses.replace(base, **fields)
        except (TypeError, ValueError) as e:
            raise ProfileError(f"{self.where()}: profile {name!r}: {e}") from e
        self.resolved[name] = policy
        return policy


def _missing(name: str, known: list[str], file: Path | None) -> str:
    where = (f"the profile file in use is {file}" if file is not None else
             "no profile file was found (looked for $KERNELEXEC_PROFILES, ./kernelexec.toml, "
             "~/.config/kernelexec/profiles.toml)")
    return (f"no profile named {name!r}; known: {known}. Define it as a [profiles.{name}] table "
            f"(fields of kernelexec.Policy, optionally extends = \"strict\"); {where}")


def load_profiles(path: str | os.PathLike[str] | None = None) -> dict[str, Policy]:
    """Every profile: the built-in ones, then the file's (which may extend them).

    Raises :class:`ProfileError` naming the file and the profile at the first
    broken one; :func:`check_profiles` reports each instead.
    """
    profiles = _Profiles(profiles_path(path))
    return {name: profiles.get(name) for name in profiles.names()}


def check_profiles(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Policy], dict[str, str]]:
    """The profiles that load, and for each one that does not, why (for ``audit``)."""
    profiles = _Profiles(profiles_path(path))
    good: dict[str, Policy] = {}
    bad: dict[str, str] = {}
    for name in profiles.names():
        try:
            good[name] = profiles.get(name)
        except ProfileError as e:
            bad[name] = str(e)
    return good, bad


def profile_policy(name: str, path: str | os.PathLike[str] | None = None) -> Policy:
    """The named profile; only it and what it extends are read, so a broken neighbour does not matter."""
    return _Profiles(profiles_path(path)).get(name)


def within(requested: Policy, ceiling: Policy, *, role: str) -> Policy:
    """The profile ``ceiling`` with the fields ``requested`` sets, if none of them is looser;
    else PolicyViolation naming each widening."""
    changes = {f: getattr(requested, f) for f in requested.explicit_fields()}
    # packages add up: every session of the role gets the profile's, and may ask for more
    if "packages" in changes:
        changes["packages"] = tuple(dict.fromkeys(ceiling.packages + tuple(requested.packages)))
    if changes.get("image_flavour", ceiling.image_flavour) is None:
        changes.pop("image_flavour", None)
    merged = dataclasses.replace(ceiling, **changes)
    wider = merged.relaxations(base=ceiling)
    if ceiling.image is not None and merged.image not in (None, ceiling.image):
        wider.append(f"image={merged.image!r} instead of the profile's {ceiling.image!r}")
    if wider:
        raise PolicyViolation(f"the {role!r} profile does not allow: " + "; ".join(wider)
                              + ". Ask within the profile, or widen the profile in its file")
    return merged
