"""Executions as notebook cells: the session's audit trail a person can open.

``session.to_notebook()`` and ``kernelexec run NB.ipynb -o OUT.ipynb`` use
these, so a notebook written by either opens in JupyterLab with the outputs
the agent saw. Each cell's metadata links it to the audit log (code SHA-256).
"""

from __future__ import annotations

from typing import Any, Iterable

import nbformat
from nbformat import NotebookNode

from .auditlog import code_digest
from .results import ErrorInfo, Execution, MimeBundle, Stream

KERNELSPEC = {"name": "kernelexec", "display_name": "Python 3 (kernelexec sandbox)", "language": "python"}


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
            out.append(nbformat.v4.new_output("error", ename=o.ename, evalue=o.evalue,
                                              traceback=o.traceback.splitlines()))
    return out


def execution_to_cell(ex: Execution) -> NotebookNode:
    cell = nbformat.v4.new_code_cell(source=ex.code, execution_count=ex.execution_count,
                                     outputs=execution_to_outputs(ex))
    cell.metadata["kernelexec"] = {"status": ex.status, "duration": round(ex.duration, 4),
                                   "code_sha256": code_digest(ex.code), "truncated": ex.truncated}
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
