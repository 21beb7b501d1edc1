"""Executions as notebook cells: the session's audit trail a person can open.

``session.to_notebook()`` and ``kernelexec run NB.ipynb -o OUT.ipynb`` use
these, so a notebook written by either opens in JupyterLab with the outputs
the agent saw. Each cell's metadata links it to the audit log (code SHA-256).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import nbformat
from nbformat import NotebookNode

from .auditlog import code_digest
from .errors import ExecutionTimeout, KernelDied, OutputLost
from .results import ErrorInfo, Execution, MimeBundle, Stream

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

KERNELSPEC = {"name": "kernelexec", "display_name": "Python 3 (kernelexec sandbox)", "language": "python"}

#: called after each executed cell with its index in ``nb.cells``, the cell and what ran
CellCallback = Callable[[int, NotebookNode, Execution], None]


def execution_to_outputs(ex: Execution) -> list[NotebookNode]:
    """nbformat v4 output dicts, in the order the kernel sent them."""
    out: list[NotebookNode] = []
    for o in ex.outputs:
        if isinstance(o, Stream):
            out.append(nbformat.v4.new_output("stream", name=o.name, text=o.text))
        elif isinstance(o, MimeBundle):
            if o.kind == "execute_result":
                out.append(nbformat.v4.new_output("execute_result", data=o.data, metadata=o.metadata,
                                                  execution_count=o.execution_count or ex.execution_count))
            else:
                out.append(nbformat.v4.new_output("display_data", data=o.data, metadata=o.metadata))
        elif isinstance(o, ErrorInfo):
            out.append(_error_output(o))
    return out


def _error_output(e: ErrorInfo) -> NotebookNode:
    return nbformat.v4.new_output("error", ename=e.ename, evalue=e.evalue, traceback=e.traceback.splitlines())


def _cell_metadata(ex: Execution) -> dict[str, Any]:
    """What ties a cell to the audit log: the same SHA-256 the log records for the code."""
    return {"status": ex.status, "duration": round(ex.duration, 4), "code_sha256": code_digest(ex.code),
            "truncated": ex.truncated}


def execution_to_cell(ex: Execution) -> NotebookNode:
    cell = nbformat.v4.new_code_cell(source=ex.code, execution_count=ex.execution_count,
                                     outputs=execution_to_outputs(ex))
    cell.metadata["kernelexec"] = _cell_metadata(ex)
    return cell


def to_notebook(executions: Iterable[Execution], kernel_info: dict[str, Any] | None = None) -> NotebookNode:
    """A valid nbformat v4 notebook of the executions."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    lang = (kernel_info or {}).get("language_info")
    if isinstance(lang, dict):
        nb.metadata["language_info"] = {k: v for k, v in lang.items() if isinstance(v, (str, int, dict))}
    nb.cells = [execution_to_cell(ex) for ex in executions]
    nbformat.validate(nb)
    return nb


def run_notebook(session: Session, nb: NotebookNode, *, timeout: float | None = None, allow_errors: bool = False,
                 on_cell: CellCallback | None = None) -> NotebookNode:
    """Execute ``nb``'s code cells in order in ``session``, writing outputs into ``nb`` (and returning it).

    Outputs of every code cell are cleared first, so cells not reached after a
    failure never show a stale earlier run as if it were this one. A timeout or
    a kernel death becomes an error output in its cell (the notebook should say
    where and why it stopped) and always ends the run when the kernel's state is
    gone, since later cells would run against state they do not expect.
    ``timeout`` is per cell; ``None`` means the session's policy timeout.
    """
    code_cells = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for _, cell in code_cells:
        cell.outputs = []
        cell.execution_count = None
        cell.metadata.pop("kernelexec", None)
    for index, cell in code_cells:
        if not cell.source.strip():
            continue
        ex, state_lost = _execute_cell(session, cell.source, timeout)
        cell.outputs = execution_to_outputs(ex)
        cell.execution_count = ex.execution_count
        cell.metadata["kernelexec"] = _cell_metadata(ex)
        if on_cell is not None:
            on_cell(index, cell, ex)
        if state_lost or (ex.error is not None and not allow_errors):
            break
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return nb


def _execute_cell(session: Session, code: str, timeout: float | None) -> tuple[Execution, bool]:
    """Run one cell; a timeout or a death is returned as an error in the cell, with whether state was lost."""
    try:
        return session.execute(code, timeout=timeout), False
    except ExecutionTimeout as e:
        ex = e.partial or Execution(code=code)
        ex.code = code
        ex.status = "error"
        ex.outputs.append(ErrorInfo("ExecutionTimeout", str(e), f"ExecutionTimeout: {e}"))
        return ex, bool(e.state_lost)
    except OutputLost as e:  # the connection came back; the kernel and its state survived
        return Execution(code=code, status="error", outputs=[ErrorInfo(type(e).__name__, str(e),
                                                                        f"{type(e).__name__}: {e}")]), False
    except KernelDied as e:
        return Execution(code=code, status="error", outputs=[ErrorInfo(type(e).__name__, str(e),
                                                                        f"{type(e).__name__}: {e}")]), True


def notebook_errors(nb: NotebookNode) -> list[tuple[int, NotebookNode]]:
    """Each error output of ``nb`` with the index of its cell: a run failed if this is not empty."""
    return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
