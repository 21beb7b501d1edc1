"""What every framework adapter shares: language handling and turning an
Execution into the text and files an agent reads."""

from __future__ import annotations

import errno
import json
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..results import ErrorInfo, Execution, MimeBundle, Stream

PYTHON = {"python", "py", "python3", "ipython", ""}
SHELL = {"bash", "sh", "shell", "console"}


class UnsupportedLanguage(ValueError):
    """A code block in a language the kernel cannot run."""


def to_kernel_code(code: str, language: str) -> str:
    """Python runs as is; shell blocks run through IPython's ``%%bash`` inside the sandbox."""
    lang = (language or "").strip().lower()
    if lang in PYTHON:
        return code
    if lang in SHELL:
        return "%%bash\n" + code
    raise UnsupportedLanguage(
        f"kernelexec runs python and bash code blocks; this one is {language!r}. Rewrite it in python"
    )


@dataclass
class Rendered:
    output: str
    files: list[Path] = field(default_factory=list)
    failed: bool = False


def own_output_dir() -> Path:
    """Where an executor saves images and HTML when the caller named no directory."""
    return Path(tempfile.mkdtemp(prefix="kernelexec-out-"))


def remove_if_empty(path: Path) -> None:
    """An executor's own output directory goes with it unless it holds files (those are the caller's)."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            raise


def render(ex: Execution, output_dir: Path | None) -> Rendered:
    """Outputs in order, as AutoGen's Jupyter executor shows them: stream text and
    text/plain joined, the traceback after the output so far, images and HTML saved."""
    parts: list[str] = []
    files: list[Path] = []
    for o in ex.outputs:
        if isinstance(o, Stream):
            parts.append(o.text)
        elif isinstance(o, ErrorInfo):
            parts.append(o.traceback or f"{o.ename}: {o.evalue}")
        elif isinstance(o, MimeBundle):
            parts.extend(_bundle(o, output_dir, files))
    return Rendered("\n".join(p.rstrip("\n") for p in parts if p), files, ex.error is not None)


def _bundle(b: MimeBundle, output_dir: Path | None, files: list[Path]) -> list[str]:
    out: list[str] = []
    for mime, content in b.data.items():
        if mime == "text/plain":
            out.append(str(content))
        elif mime == "image/png" and output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)  # removed while empty by a stop(); used again
            path = output_dir / f"{uuid.uuid4().hex}.png"
            path.write_bytes(b.png or b"")
            files.append(path.absolute())
        elif mime == "text/html" and output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            path = output_dir / f"{uuid.uuid4().hex}.html"
            path.write_text(str(content))
            files.append(path.absolute())
        elif mime in ("image/jpeg", "image/png", "text/html", "image/svg+xml"):
            continue  # no output_dir: the agent gets the text/plain form only
        elif mime.startswith("application/") and "json" in mime:
            out.append(json.dumps(content))
    return out
