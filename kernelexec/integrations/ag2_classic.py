"""AutoGen 0.2 / AG2 (``ag2`` < 1, module ``autogen``): a drop-in code executor.

    from kernelexec.integrations.ag2 import KernelExecExecutor
    executor = KernelExecExecutor(profile="strict", timeout=60)
    user_proxy = UserProxyAgent("user_proxy", code_execution_config={"executor": executor})

Every code block the agent receives runs in one persistent, sandboxed kernel:
variables survive from one block to the next, nothing touches the host.
Images and HTML are saved as files, as AG2's Jupyter executor does; a timeout
interrupts the kernel and keeps it (and its state) usable; ``sh``/``bash``
blocks run through ``%%bash`` inside the sandbox; other languages are refused
with a message the assistant can act on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from autogen.coding.base import CodeBlock, CodeExtractor, IPythonCodeResult
from autogen.coding.markdown_code_extractor import MarkdownCodeExtractor

from ..errors import ExecutionTimeout, KernelDied
from ..policy import Policy
from ..session import Session
from ._blocks import (
    UnsupportedLanguage,
    own_output_dir,
    remove_if_empty,
    render,
    to_kernel_code,
)

if TYPE_CHECKING:
    from typing_extensions import Self


class KernelExecExecutor:
    """Satisfies ``autogen.coding.CodeExecutor``: ``code_extractor``, ``execute_code_blocks``, ``restart``."""

    def __init__(self, timeout: float = 60.0, output_dir: str | Path | None = None, *,
                 policy: Policy | None = None, profile: str | None = None, image: str | None = None,
                 **session_kwargs: Any) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self._own_output_dir = not output_dir
        self.output_dir = Path(output_dir) if output_dir else own_output_dir()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._session_args = dict(policy=policy, profile=profile, image=image, **session_kwargs)
        self._session: Session | None = None

    @property
    def code_extractor(self) -> CodeExtractor:
        return MarkdownCodeExtractor()

    @property
    def session(self) -> Session:
        """The sandbox (started on first use)."""
        if self._session is None:
            policy = self._session_args.pop("policy")
            self._session = Session(policy, **self._session_args)
            self._session_args["policy"] = policy
        return self._session

    def execute_code_blocks(self, code_blocks: list[CodeBlock]) -> IPythonCodeResult:
        outputs: list[str] = []
        files: list[str] = []
        for block in code_blocks:
            try:
                code = to_kernel_code(block.code, block.language)
                ex = self.session.execute(code, timeout=self.timeout)
            except UnsupportedLanguage as e:
                return IPythonCodeResult(exit_code=1, output=f"ERROR: {e}")
            except ExecutionTimeout as e:
                return IPythonCodeResult(exit_code=1, output=f"ERROR: Timeout: {e}")
            except KernelDied as e:
                return IPythonCodeResult(exit_code=1, output=f"ERROR: {e}")
            rendered = render(ex, self.output_dir)
            saved = [str(p) for p in rendered.files]
            if rendered.failed:
                return IPythonCodeResult(exit_code=1, output="ERROR: " + "\n".join(outputs + [rendered.output]),
                                         output_files=files + saved)
            outputs.append(rendered.output)
            outputs.extend(f"{'Image' if p.endswith('.png') else 'HTML'} data saved to {p}" for p in saved)
            files.extend(saved)
        return IPythonCodeResult(exit_code=0, output="\n".join(o for o in outputs if o), output_files=files)

    def restart(self) -> None:
        """A fresh kernel in a fresh container (AG2 calls this when the agent is reset)."""
        if self._session is not None:
            self._session.restart()

    def stop(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._own_output_dir:
            remove_if_empty(self.output_dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
