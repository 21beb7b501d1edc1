"""An optional pre-check that refuses code before it runs.

Defense in depth, not the boundary: the container is the boundary. An AST
check cannot see through ``getattr(__builtins__, 'ev' + 'al')``, pickles or
data-driven imports, so it never makes a looser sandbox safe. What it does
do is stop the obvious (an agent that decided to shell out, or to import
``ctypes``) with a clear refusal the agent can read and correct, and log it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Refusal:
    line: int
    what: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what} ({self.reason})"


@dataclass(frozen=True)
class CodePolicy:
    """Deny-lists of modules and calls. Names match by prefix: ``os.exec`` covers ``os.execv``."""

    deny_imports: frozenset[str] = field(default_factory=frozenset)
    deny_calls: frozenset[str] = field(default_factory=frozenset)
    #: IPython shell escapes (``!cmd``, ``%%bash``) and magics.
    deny_magics: bool = True

    @classmethod
    def default(cls) -> CodePolicy:
        """Shelling out, native code and dynamic evaluation."""
        return cls(
            deny_imports=frozenset({"subprocess", "ctypes", "cffi", "pty", "multiprocessing", "socket",
                                    "_posixsubprocess", "importlib"}),
            deny_calls=frozenset({"os.system", "os.popen", "os.exec", "os.spawn", "os.fork", "os.posix_spawn",
                                  "os.kill", "os.setsid", "eval", "exec", "compile", "__import__",
                                  "getattr", "globals", "vars", "breakpoint"}),
        )

    def check(self, code: str) -> list[Refusal]:
        out: list[Refusal] = []
        if self.deny_magics:
            for n, line in enumerate(code.splitlines(), 1):
                s = line.lstrip()
                if s.startswith(("!", "%")):
                    out.append(Refusal(n, s.split()[0] if s.split() else s,
                                       "IPython magics and shell escapes are refused"))
        if out:
            return out
        try:
            # IPython runs top-level await, so the check must parse it too
            tree = compile(code, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                           dont_inherit=True)
        except SyntaxError as e:
            # IPython accepts more than Python (help?, line continuations of magics): what the
            # check cannot read, it does not let through
            return [Refusal(e.lineno or 0, "code the pre-check cannot parse", str(e.msg))]
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                    if self._denied(a.name, self.deny_imports):
                        out.append(Refusal(node.lineno, f"import {a.name}", "module is deny-listed"))
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    aliases[a.asname or a.name] = full
                    if self._denied(node.module, self.deny_imports) or self._denied(full, self.deny_calls):
                        out.append(Refusal(node.lineno, f"from {node.module} import {a.name}", "deny-listed"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name is None:
                    continue
                head, _, rest = name.partition(".")
                full = aliases.get(head, head) + (f".{rest}" if rest else "")
                if self._denied(full, self.deny_calls):
                    out.append(Refusal(node.lineno, f"{full}()", "call is deny-listed"))
        return sorted(set(out), key=lambda r: (r.line, r.what))

    @staticmethod
    def _denied(name: str, denied: frozenset[str]) -> bool:
        return any(name == d or name.startswith(d + ".") or (d.endswith(("exec", "spawn")) and name.startswith(d))
                   for d in denied)


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None
