"""What the session sends to the kernel for a snapshot or a restore, and how it reads the answer.

Pure functions: the code of a silent execute_request, and the checks on the one JSON line the kernel
prints back (hostile output, bounded like any other).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ..errors import RestoreError, SnapshotError, SnapshotTooLarge
from ..results import Execution
from .format import MAX_ENTRIES, MAX_NAME, MAX_REASON, LostItem

#: the marker before the kernel's JSON line (inside.MARK; inside.py is never imported on the host)
MARK = "\x1ekernelexec-snapshot:"
#: a report longer than this is not one inside.py printed
MAX_REPORT = 16 << 20


@functools.cache
def _inside() -> str:
    return (Path(__file__).with_name("inside.py")).read_text()


def call(function: str, *args: Any) -> str:
    """Code that runs ``inside.<function>(*args)`` in a namespace of its own: the user's keeps no name
    of it (and the request is silent, so no history or output cache entry either). ``args`` are
    JSON-like values; their repr is a Python literal."""
    json.dumps(args)  # only plain data crosses: it is written into code
    return (f"(lambda ns: (exec(compile({_inside()!r}, '<kernelexec-snapshot>', 'exec'), ns), "
            f"ns[{function!r}](*{args!r})))({{'__name__': '_kernelexec_snapshot'}})\n")


def report(ex: Execution, what: str) -> dict[str, Any]:
    """The kernel's report of a snapshot or restore step, or the error that says why there is none."""
    if ex.status != "ok":
        err = ex.error
        detail = f"{err.ename}: {err.evalue}" if err is not None else ex.status
        if err is not None and err.ename == "ModuleNotFoundError" and "dill" in err.evalue:
            raise SnapshotError(f"the {what} needs dill in the kernel's image, which this image lacks ({detail}); "
                                "kernelexec's own image has it, or add Policy.packages=('dill',)")
        raise SnapshotError(f"the {what} failed in the kernel: {detail[:MAX_REASON]}")
    line = None
    for chunk in ex.stdout.split("\n"):
        if chunk.startswith(MARK):
            line = chunk[len(MARK):]
    if line is None or len(line) > MAX_REPORT:
        raise SnapshotError(f"the kernel did not report on the {what} (its output was {len(ex.stdout)} characters); "
                            "the code in the sandbox may have replaced print or sys.stdout")
    try:
        data = json.loads(line)
    except ValueError:
        raise SnapshotError(f"the kernel's report on the {what} is not JSON") from None
    if not isinstance(data, dict):
        raise SnapshotError(f"the kernel's report on the {what} is not an object")
    return data


def snapshot_parts(data: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, str], tuple[LostItem, ...]]:
    """Variables, modules and lost entries from the kernel's snapshot report, checked and bounded; or
    the error the kernel reported."""
    error = data.get("error")
    if error == "too_large":
        raise SnapshotTooLarge(f"the session's variables and files are over Policy.snapshot_size "
                               f"({_int(data.get('limit')):,} bytes); raise it, or delete large objects first")
    if error == "no_room":
        raise SnapshotTooLarge(f"the kernel could not stage the snapshot in /work ({_text(data.get('detail'))}); "
                               "free some room there or raise Policy.workdir_size")
    if error is not None:
        raise SnapshotError(f"the snapshot failed in the kernel: {_text(data.get('detail') or error)}")
    try:
        variables = tuple(_name(v) for v in _bounded_list(data.get("variables")))
        raw_modules = data.get("modules")
        if not isinstance(raw_modules, dict) or len(raw_modules) > MAX_ENTRIES:
            raise TypeError("modules")
        modules = {_name(k): _name(v) for k, v in raw_modules.items()}
        lost = tuple(LostItem(_name(x.get("name")), _name(x.get("type")), _text(x.get("reason")))
                     for x in _bounded_list(data.get("lost")) if isinstance(x, dict))
    except TypeError as e:
        raise SnapshotError(f"the kernel's snapshot report is malformed ({e})") from None
    return variables, modules, lost


def restore_outcome(data: dict[str, Any], image: str) -> int:
    """How many variables came back; RestoreError naming what is missing or what failed."""
    missing = tuple(_text(m) for m in _bounded_list(data.get("missing")))
    errors = tuple(_text(e) for e in _bounded_list(data.get("errors")))
    if missing:
        raise RestoreError(f"the image {image} lacks module(s) the snapshot needs: {', '.join(missing)}; restore "
                           "with an image or Policy.packages that has them. Nothing was restored",
                           missing=missing, errors=errors)
    if errors:
        raise RestoreError(f"the kernel could not take the snapshot's state: {'; '.join(errors)}",
                           errors=errors)
    return len(_bounded_list(data.get("variables")))


def _bounded_list(v: Any) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > MAX_ENTRIES:
        raise TypeError("expected a bounded list")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v[:MAX_NAME]


def _text(v: Any) -> str:
    return str(v)[:MAX_REASON]


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0
