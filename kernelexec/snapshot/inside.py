"""The half of a snapshot that runs inside the sandbox's kernel; the host never imports it.

The host reads this file as text and sends it in a silent execute_request (so any kernel image with
``dill`` can be snapshotted or restored, whether or not kernelexec made it); it runs in a namespace of
its own and leaves no name in the user's. Everything here handles hostile objects inside the sandbox
it belongs to: a pickle made or opened here can only touch this sandbox. What it tells the host is
one JSON line on stdout, which the host bounds and checks like any other output of the sandbox.

Why one pickle for all variables: objects shared between variables (an instance and its class, two
names for one list) stay shared after a restore. Why a first pass per variable only when the whole
fails: to name exactly what cannot be saved, at no cost when everything can.
"""

import importlib
import io
import json
import os
import re
import socket
import sys
import tarfile
import threading
import types
from collections.abc import Iterator
from typing import Any

#: the marker before the JSON line the host reads
MARK = "\x1ekernelexec-snapshot:"
#: IPython's own names in the user namespace (history, output cache), never the user's
_IPYTHON_NAME = re.compile(r"^(_|__|___|_i|_ii|_iii|_i\d+|_\d+|_dh|_ih|_oh|In|Out|exit|quit|get_ipython)$")
#: a lost entry's reason is cut to this
_REASON = 300


class _Lost(Exception):
    """An object that must not be saved: the variable holding it is reported lost, with this reason."""


class _Full(Exception):
    pass


def _kind_of(obj: object) -> str | None:
    """Why ``obj`` cannot be saved, or None. Open files are never pickled: dill would reopen them in
    their original mode on restore, and ``'w+'`` truncates the file (measured); they are reported."""
    if isinstance(obj, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return "a generator or coroutine: its running frame cannot be saved"
    if isinstance(obj, io.IOBase):
        return "an open file: never reopened on restore (reopening can truncate it); the file itself is kept"
    if isinstance(obj, socket.socket):
        return "a socket: connections do not survive the container"
    if isinstance(obj, threading.Thread):
        return "a thread: threads do not survive the container"
    return None


def _pickler_class() -> Any:
    import dill

    class Pickler(dill.Pickler):
        def reducer_override(self, obj: object) -> Any:
            kind = _kind_of(obj)
            if kind is not None:
                raise _Lost(("holds " if obj is not self._top else "") + kind)
            return NotImplemented

    return Pickler


class _Bounded(io.RawIOBase):
    """A write-only file that counts, and refuses past ``limit``; ``target`` None counts only."""

    def __init__(self, target: Any, limit: int) -> None:
        self.target, self.limit, self.count = target, limit, 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.count += len(b)
        if self.count > self.limit:
            raise _Full(self.count)
        if self.target is not None:
            self.target.write(b)
        return len(b)


def _dump(pickler_class: Any, obj: object, out: Any) -> None:
    p = pickler_class(out, protocol=5)
    p._top = obj
    p.dump(obj)


def _user_names(shell: Any) -> Iterator[str]:
    ns, hidden = shell.user_ns, shell.user_ns_hidden
    for name in list(ns):
        if _IPYTHON_NAME.match(name) or (name.startswith("__") and name.endswith("__")):
            continue
        if name in hidden and hidden[name] is ns[name]:
            continue
        yield name


def _tar_dir(src: str, dest: str, limit: int) -> int:
    """``src`` (the tmpfs /tmp or home) into a tar at ``dest``: regular files, directories, symlinks."""
    with open(dest, "wb") as raw:
        out = _Bounded(raw, limit)
        with tarfile.open(fileobj=out, mode="w|") as tar:
            for root, dirs, files in os.walk(src):
                for name in sorted(dirs) + sorted(files):
                    path = os.path.join(root, name)
                    if path.startswith("/work/"):
                        continue
                    try:
                        info = tar.gettarinfo(path, os.path.relpath(path, src))
                    except OSError:
                        continue
                    if info.isreg():
                        try:
                            with open(path, "rb") as f:
                                tar.addfile(info, f)
                        except OSError:
                            continue
                    elif info.isdir() or info.issym():
                        tar.addfile(info)
    return out.count


def snapshot(stage: str, limit: int, extra: dict[str, str]) -> None:
    """Pickle the user's variables into ``stage``, and tar each directory of ``extra`` (section -> path:
    /tmp, home, the egress site directory) into ``stage.<section>``; print the report. Nothing is kept
    in memory beyond what pickling needs."""
    from IPython import get_ipython

    shell = get_ipython()
    ns = shell.user_ns
    Pickler = _pickler_class()
    variables: dict[str, Any] = {}
    modules: dict[str, str] = {}
    lost: list[dict[str, str]] = []
    for name in _user_names(shell):
        value = ns[name]
        if isinstance(value, types.ModuleType):
            spec = getattr(value, "__spec__", None)
            if spec is not None and sys.modules.get(value.__name__) is value:
                modules[name] = value.__name__
            else:
                lost.append({"name": name, "type": "module", "reason": "a module that cannot be imported again"})
            continue
        kind = _kind_of(value)
        if kind is not None:
            lost.append({"name": name, "type": type(value).__name__, "reason": kind})
            continue
        variables[name] = value
    sizes: dict[str, int] = {}
    report: dict[str, Any] = {"modules": modules, "lost": lost, "sizes": sizes}
    try:
        sizes["namespace"] = used = _write(Pickler, variables, stage, limit, lost)
        for section, path in extra.items():
            sizes[section] = _tar_dir(path, f"{stage}.{section}", limit - used)
            used += sizes[section]
    except _Full as e:
        _remove(stage)
        report = {"error": "too_large", "bytes": e.args[0], "limit": limit}
    except OSError as e:
        _remove(stage)
        report = {"error": "no_room", "detail": f"{type(e).__name__}: {e}"[:_REASON]}
    except Exception as e:  # (the pickle failed as a whole though each part passed alone)
        _remove(stage)
        report = {"error": "failed", "detail": f"{type(e).__name__}: {e}"[:_REASON]}
    report["variables"] = sorted(variables)
    print(MARK + json.dumps(report))


def _write(Pickler: Any, variables: dict[str, Any], stage: str, limit: int,
           lost: list[dict[str, str]]) -> int:
    """The variables in one pickle; when that fails, each alone finds the ones to report lost."""
    try:
        with open(stage, "wb") as f:
            out = _Bounded(f, limit)
            _dump(Pickler, variables, out)
            return out.count
    except (_Full, OSError):
        raise
    except Exception:  # (some variable cannot be pickled: each alone says which, below)
        pass
    for name in list(variables):
        try:
            _dump(Pickler, variables[name], _Bounded(None, limit))
        except _Full:
            continue  # too large alone: the whole pickle below says so
        except Exception as e:  # (every failure is reported, with its reason)
            reason = str(e) if isinstance(e, _Lost) else f"cannot be pickled: {type(e).__name__}: {e}"
            lost.append({"name": name, "type": type(variables.pop(name)).__name__, "reason": reason[:_REASON]})
    with open(stage, "wb") as f:
        out = _Bounded(f, limit)
        _dump(Pickler, variables, out)
        return out.count


def restore(stage: str, modules: dict[str, str], extra: dict[str, str]) -> None:
    """Load a snapshot's parts from ``stage`` into this kernel (the directories of ``extra`` first, so
    that packages installed at run time are there to import); print the report. Missing modules are
    named (all of them) before any variable is loaded."""
    import dill
    from IPython import get_ipython

    shell = get_ipython()
    missing: list[str] = []
    errors: list[str] = []
    imported: dict[str, Any] = {}
    for section, path in extra.items():
        try:
            with tarfile.open(f"{stage}.{section}") as tar:
                _extract(tar, path)
        except (OSError, tarfile.TarError) as e:
            errors.append(f"{section}: {type(e).__name__}: {e}"[:_REASON])
        finally:
            _remove(f"{stage}.{section}")
    importlib.invalidate_caches()
    for name, module in modules.items():
        try:
            imported[name] = importlib.import_module(module)
        except ImportError as e:
            missing.append(getattr(e, "name", None) or module)
    loaded: dict[str, Any] = {}
    if not missing:
        try:
            with open(stage, "rb") as f:
                loaded = dill.load(f)
            if not isinstance(loaded, dict):
                raise TypeError(f"the namespace is a {type(loaded).__name__}, not a dict")
        except ImportError as e:
            missing.append(getattr(e, "name", None) or str(e))
        except Exception as e:  # (reported to the host, which raises)
            errors.append(f"namespace: {type(e).__name__}: {e}"[:_REASON])
    _remove(stage)
    if not missing and not errors:
        shell.user_ns.update(loaded)
        shell.user_ns.update(imported)
    print(MARK + json.dumps({"variables": sorted(str(k) for k in loaded), "missing": sorted(set(missing)),
                             "errors": errors}))


def _extract(tar: tarfile.TarFile, path: str) -> None:
    """Regular files, directories and symlinks, each under ``path`` (tarfile's "data" filter where this
    Python has it)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(path, filter="data")
        return
    root = os.path.realpath(path)
    for m in tar:  # checked one by one: a symlink extracted earlier counts for the members after it
        inside = os.path.realpath(os.path.join(root, m.name)).startswith(root + os.sep)
        if (m.isreg() or m.isdir() or m.issym()) and not m.name.startswith("/") and inside:
            m.mode &= 0o777
            tar.extract(m, path)


def cleanup(stage: str) -> None:
    for path in (stage, f"{stage}.tmp", f"{stage}.home", f"{stage}.site"):
        _remove(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
