"""Package requirements a policy may name (``Policy.packages``, ``Policy.image_flavour``), checked
when the policy is made, long before an image is built (:mod:`kernelexec.tools.packages` builds)."""

from __future__ import annotations

import re

__all__ = ["FLAVOURS", "REQUIREMENT_RE", "check_requirement", "flavour_requirements", "normalize_name",
           "requirement_name"]

#: Named package sets. ``analysis``: what a data-analysis agent imports on day one, on top of the kernel
#: image's numpy, pandas, matplotlib and pillow. One flag away (``image_flavour="analysis"``), not the
#: default: see the README's "Packages in the image" for the measured size and start time.
FLAVOURS: dict[str, tuple[str, ...]] = {
    "analysis": ("scipy", "scikit-learn", "seaborn", "statsmodels", "openpyxl", "pyarrow"),
}

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
# name, optional [extras], optional version specifiers (comma separated), optional environment marker
REQUIREMENT_RE = re.compile(
    rf"^\s*({_NAME})\s*(\[\s*{_NAME}(?:\s*,\s*{_NAME})*\s*\])?"
    r"\s*((?:(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+)(?:\s*,\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?"
    r"\s*(;\s*[^;#]+)?\s*$"
)


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_requirement(spec: str) -> str:
    """``spec`` if it is a requirement pip may resolve from an index: a name, extras, version
    specifiers, an environment marker. Refused (ValueError, saying why): options (``-r``,
    ``--index-url``: they would change where pip looks), URLs and paths (``pkg @ https://...``,
    ``./dir``: nothing a lock can pin by the index's hash), empty strings."""
    if not isinstance(spec, str):
        raise ValueError(f"a package must be a requirement string like 'scikit-learn>=1.4', not {spec!r}")
    text = spec.strip()
    if not text:
        raise ValueError("an empty package name")
    if text.startswith("-"):
        raise ValueError(f"{spec!r} is a pip option, not a package; give index settings with "
                         "--index-url/--find-links (or the host's pip configuration)")
    if "@" in text.split(";")[0] or "://" in text or "/" in text or "\\" in text:
        raise ValueError(f"{spec!r} names a URL or a path; packages come from an index (or --find-links) "
                         "by name, so that the lock can pin them by hash")
    if not REQUIREMENT_RE.match(text):
        raise ValueError(f"{spec!r} is not a requirement; write e.g. 'seaborn', 'scikit-learn>=1.4,<2' or "
                         "'pandas[excel]==2.2.3'")
    return text


def requirement_name(spec: str) -> str:
    """The normalized project name of a requirement (``Scikit_Learn>=1`` -> ``scikit-learn``)."""
    m = REQUIREMENT_RE.match(check_requirement(spec))
    assert m is not None
    return normalize_name(m.group(1))


def flavour_requirements(flavour: str | None) -> tuple[str, ...]:
    if flavour is None:
        return ()
    try:
        return FLAVOURS[flavour]
    except KeyError:
        raise ValueError(f"no image flavour {flavour!r}; known: {sorted(FLAVOURS)}") from None
