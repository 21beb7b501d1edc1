"""What an execution produced, as plain data.

Everything here was decoded from JSON sent by the kernel; nothing is ever
unpickled or evaluated on the host. Outputs are kept in the order the kernel
sent them (as a notebook shows them); ``stdout``, ``stderr`` and ``results``
are views over that list.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any, Literal

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")

TRUNCATION_MARKER = "[kernelexec: output truncated at {limit} bytes; raise Policy.max_output_bytes to keep more]"


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes, which IPython puts in every traceback."""
    return _ANSI.sub("", text)


@dataclass
class Stream:
    """Text the code wrote to stdout or stderr."""

    name: Literal["stdout", "stderr"]
    text: str


@dataclass
class MimeBundle:
    """One ``execute_result`` or ``display_data``: the same object in several formats."""

    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: Literal["execute_result", "display_data"] = "display_data"
    execution_count: int | None = None
    display_id: str | None = None

    @property
    def text(self) -> str | None:
        return _as_text(self.data.get("text/plain"))

    @property
    def html(self) -> str | None:
        return _as_text(self.data.get("text/html"))

    @property
    def markdown(self) -> str | None:
        return _as_text(self.data.get("text/markdown"))

    @property
    def svg(self) -> str | None:
        return _as_text(self.data.get("image/svg+xml"))

    @property
    def json(self) -> Any:
        return self.data.get("application/json")

    @property
    def png(self) -> bytes | None:
        return _b64(self.data.get("image/png"))

    @property
    def jpeg(self) -> bytes | None:
        return _b64(self.data.get("image/jpeg"))


@dataclass
class ErrorInfo:
    """An exception raised by the executed code (not by kernelexec)."""

    ename: str
    evalue: str
    traceback: str  # plain text, ANSI codes removed

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}"

    def __repr__(self) -> str:
        return f"ErrorInfo({_short(str(self))})"


Output = Stream | MimeBundle | ErrorInfo


@dataclass
class Execution:
    """The outcome of one ``execute()`` call."""

    code: str
    outputs: list[Output] = field(default_factory=list)
    execution_count: int | None = None
    status: Literal["ok", "error", "aborted", "refused"] = "ok"
    duration: float = 0.0
    truncated: bool = False
    output_bytes: int = 0
    #: The container's peak memory after this execution, in bytes, as the kernel read it from its
    #: cgroup (code in the sandbox could forge it: a figure for people, not a control). None if unknown.
    memory_peak: int | None = None
    #: True when the session's history dropped these outputs to stay within ``Policy.max_history_bytes``.
    outputs_dropped: bool = False

    def __repr__(self) -> str:
        # the outputs can be megabytes: a summary, not a dump
        parts = [f"[{self.execution_count}]" if self.execution_count is not None else "[ ]", self.status]
        if self.error is not None:
            parts.append(_short(str(self.error)))
        elif self.text is not None:
            parts.append("-> " + _short(self.text))
        kinds: dict[str, int] = {}
        for o in self.outputs:
            k = o.name if isinstance(o, Stream) else o.kind if isinstance(o, MimeBundle) else "error"
            kinds[k] = kinds.get(k, 0) + 1
        if kinds:
            parts.append(", ".join(f"{n} {k}" for k, n in kinds.items()))
        if self.truncated:
            parts.append("truncated")
        if self.outputs_dropped:
            parts.append("outputs dropped from history")
        parts.append(f"{self.duration * 1000:.1f} ms")
        return f"<Execution {' '.join(parts[:2])}: {'; '.join(parts[2:])}>"

    __str__ = __repr__

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def stdout(self) -> str:
        return "".join(o.text for o in self.outputs if isinstance(o, Stream) and o.name == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(o.text for o in self.outputs if isinstance(o, Stream) and o.name == "stderr")

    @property
    def results(self) -> list[MimeBundle]:
        return [o for o in self.outputs if isinstance(o, MimeBundle)]

    @property
    def error(self) -> ErrorInfo | None:
        for o in self.outputs:
            if isinstance(o, ErrorInfo):
                return o
        return None

    @property
    def result(self) -> MimeBundle | None:
        """The ``execute_result`` (the value of the cell's last expression), if any."""
        for o in reversed(self.outputs):
            if isinstance(o, MimeBundle) and o.kind == "execute_result":
                return o
        return None

    @property
    def text(self) -> str | None:
        """``text/plain`` of the execute_result: ``'6'`` for ``df.a.sum()``."""
        r = self.result
        return r.text if r is not None else None

    @property
    def images(self) -> list[bytes]:
        """Every PNG the code displayed, decoded."""
        return [png for png in (b.png for b in self.results) if png is not None]


def _short(text: str, width: int = 60) -> str:
    one = " ".join(text.split())
    return repr(one if len(one) <= width else one[: width - 3] + "...")


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):  # nbformat allows multi-line strings as lists
        return "".join(str(v) for v in value)
    return str(value)


def _b64(value: Any) -> bytes | None:
    text = _as_text(value)
    if text is None:
        return None
    return base64.b64decode(text)  # a malformed payload raises binascii.Error: it is the kernel's fault
