"""An execution's outputs, collected from its IOPub messages: pure code, no I/O.

What a notebook front end does with the messages (streams merged, ``clear_output`` with and without
``wait``, display updates by id, output after ``idle`` ignored as a background thread's), with the
host's bounds on top: an output budget with a visible marker where it cut, tracebacks bounded, the
cell's small value kept even past the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..results import TRUNCATION_MARKER, ErrorInfo, Execution, MimeBundle, Stream, strip_ansi

__all__ = ["Callbacks", "OutputCollector"]

MAX_TRACEBACK = 64 * 1024
KERNEL_CUT = TRUNCATION_MARKER.split(" at {")[0]  # the kernel side writes the same marker
#: An execute_result this small is kept even past the output budget: it is the
#: cell's value, what an agent reads first, and there is only one per cell.
SMALL_RESULT = 64 * 1024

StreamName = Literal["stdout", "stderr"]


@dataclass
class Callbacks:
    on_stdout: Callable[[str], None] | None = None
    on_stderr: Callable[[str], None] | None = None
    on_result: Callable[[MimeBundle], None] | None = None


@dataclass
class OutputCollector:
    """One execution's outputs, built from its IOPub messages as a notebook front end would, within
    the output budget ``limit`` (bytes). Pure: no I/O, no clock, so it is tested alone.

    A callback that raises does not stop the collection: the first error is kept in
    ``callback_error`` for the caller to raise once the execution has ended."""

    execution: Execution
    limit: int
    callbacks: Callbacks = field(default_factory=lambda: Callbacks())
    clear_on_next: bool = False
    host_cut: bool = False
    frozen: bool = False
    callback_error: BaseException | None = None

    def handle(self, t: str, c: dict[str, Any], size: int) -> bool:
        """Take one IOPub message (type, content, its size on the wire); True when it says the
        kernel is idle again (the execution's last message)."""
        ex = self.execution
        if t == "status":
            state = c.get("execution_state")
            if state == "idle":
                self.frozen = True  # output after idle (a background thread) is not this cell's
                return True
            if state == "busy":
                self.frozen = False  # a forged idle is followed by busy again
            return False
        if self.frozen and t in ("stream", "execute_result", "display_data", "error", "clear_output",
                                 "update_display_data"):
            return False
        if t == "execute_input":
            if isinstance(c.get("execution_count"), int):
                ex.execution_count = c["execution_count"]
            return False
        if t == "clear_output":
            if c.get("wait"):
                self.clear_on_next = True
            else:
                ex.outputs.clear()
            return False
        if t == "update_display_data":
            did = _display_id(c)
            for o in ex.outputs:
                if isinstance(o, MimeBundle) and did is not None and o.display_id == did:
                    o.data = _dict(c.get("data"))
                    o.metadata = _dict(c.get("metadata"))
            return False
        if t not in ("stream", "execute_result", "display_data", "error"):
            return False
        if self.clear_on_next:
            ex.outputs.clear()
            self.clear_on_next = False
        if t == "error":
            tb = strip_ansi("\n".join(str(line) for line in _list(c.get("traceback"))))
            ex.outputs.append(ErrorInfo(str(c.get("ename", "")), str(c.get("evalue", "")), tb[-MAX_TRACEBACK:]))
            return False
        if t == "stream":
            name: StreamName = "stderr" if c.get("name") == "stderr" else "stdout"
            text = str(c.get("text", ""))
            if KERNEL_CUT in text:
                ex.truncated = True  # the kernel cut it already; keep its marker
            text = self._take(text, name)
            if not text:
                return False
            last = ex.outputs[-1] if ex.outputs else None
            if isinstance(last, Stream) and last.name == name:
                last.text += text
            else:
                ex.outputs.append(Stream(name, text))
            self._call(self.callbacks.on_stdout if name == "stdout" else self.callbacks.on_stderr, text)
            return False
        small_result = t == "execute_result" and size <= SMALL_RESULT
        if not small_result and (self.host_cut or ex.output_bytes + size > self.limit):
            self._mark_truncated("stderr")
            return False
        ex.output_bytes += size
        if KERNEL_CUT in str(_dict(c.get("data")).get("text/plain", ""))[:200]:
            ex.truncated = True
        bundle = MimeBundle(
            data=_dict(c.get("data")), metadata=_dict(c.get("metadata")),
            kind="execute_result" if t == "execute_result" else "display_data",
            execution_count=c.get("execution_count") if isinstance(c.get("execution_count"), int) else None,
            display_id=_display_id(c),
        )
        ex.outputs.append(bundle)
        self._call(self.callbacks.on_result, bundle)
        return False

    def finish(self, content: dict[str, Any], metadata: dict[str, Any]) -> Execution:
        """Take the execute_reply (its content and metadata): the authoritative status, and the error
        when IOPub lost it."""
        ex = self.execution
        status = content.get("status")
        ex.status = status if status in ("ok", "error", "aborted") else "error"
        if isinstance(content.get("execution_count"), int):
            ex.execution_count = content["execution_count"]
        peak = _dict(metadata.get("kernelexec")).get("memory_peak")
        if isinstance(peak, int) and not isinstance(peak, bool):
            ex.memory_peak = peak
        if ex.status == "error" and ex.error is None:
            tb = strip_ansi("\n".join(str(x) for x in _list(content.get("traceback"))))
            ex.outputs.append(ErrorInfo(str(content.get("ename", "")), str(content.get("evalue", "")),
                                        tb[-MAX_TRACEBACK:]))
        return ex

    def _take(self, text: str, name: StreamName) -> str:
        """What of ``text`` fits in the output budget; marks the cut."""
        ex = self.execution
        if ex.output_bytes >= self.limit:
            self._mark_truncated(name)
            return ""
        room = self.limit - ex.output_bytes
        data = text.encode("utf-8", errors="replace")
        if len(data) <= room:
            ex.output_bytes += len(data)
            return text
        kept = data[:max(room, 0)].decode("utf-8", errors="ignore")
        ex.output_bytes = self.limit
        if kept:
            last = ex.outputs[-1] if ex.outputs else None
            if isinstance(last, Stream) and last.name == name:
                last.text += kept
            else:
                ex.outputs.append(Stream(name, kept))
        self._mark_truncated(name)
        return ""

    def _mark_truncated(self, name: StreamName) -> None:
        if not self.host_cut:
            self.host_cut = True
            self.execution.truncated = True
            self.execution.outputs.append(Stream(name, "\n" + TRUNCATION_MARKER.format(limit=self.limit) + "\n"))

    def _call(self, cb: Callable[[Any], None] | None, arg: Any) -> None:
        if cb is None or self.callback_error is not None:
            return
        try:
            cb(arg)
        except BaseException as e:  # re-raised by execute() once the execution has ended
            self.callback_error = e


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _display_id(c: dict[str, Any]) -> str | None:
    did = _dict(c.get("transient")).get("display_id")
    return did if isinstance(did, str) else None
