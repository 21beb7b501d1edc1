"""LangChain: a tool that runs Python in a persistent kernelexec sandbox.

    tool = KernelExecTool(profile="analyst")
    llm.bind_tools([tool])

The tool returns ``(content, artifact)``: the text an LLM reads (output,
value, error) and, as the artifact, the PNG images the code displayed.
Sync (``invoke``) and async (``ainvoke``) each get their own session, created
on first use and closed with :meth:`close`/:meth:`aclose`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from langchain_core.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..errors import ExecutionTimeout, KernelDied
from ..policy import Policy
from ..results import Execution
from ..session import AsyncSession, Session


class CodeInput(BaseModel):
    code: str = Field(description="Python code to run. Variables persist between calls. No network access.")


def _content(ex: Execution) -> str:
    parts = [ex.stdout, ex.stderr]
    if ex.text is not None:
        parts.append(f"Out: {ex.text}")
    if ex.error is not None:
        parts.append(ex.error.traceback or str(ex.error))
    if ex.images:
        parts.append(f"[{len(ex.images)} image(s) attached]")
    return "\n".join(p.rstrip("\n") for p in parts if p) or "(no output)"


class KernelExecTool(BaseTool):
    """Python in a sandboxed, stateful Jupyter kernel."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str = "python"
    description: str = ("Run Python code in a sandboxed Jupyter kernel. State (variables, imports, dataframes) "
                        "persists between calls. No network, no host files. Print what you need to see.")
    args_schema: type[BaseModel] = CodeInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    timeout: float | None = None
    policy: Policy | None = None
    profile: str | None = None
    image: str | None = None
    _session: Session | None = PrivateAttr(default=None)
    _asession: AsyncSession | None = PrivateAttr(default=None)

    def _settings(self) -> dict[str, Any]:
        return dict(profile=self.profile, image=self.image)

    def _run(self, code: str, **_: Any) -> tuple[str, list[bytes]]:
        if self._session is None:
            self._session = Session(self.policy, **self._settings())
        try:
            ex = self._session.execute(code, timeout=self.timeout)
        except (ExecutionTimeout, KernelDied) as e:
            return str(e), []
        return _content(ex), ex.images

    async def _arun(self, code: str, **_: Any) -> tuple[str, list[bytes]]:
        if self._asession is None:
            s = AsyncSession(self.policy, **self._settings())
            await s.start()
            self._asession = s
        try:
            ex = await self._asession.execute(code, timeout=self.timeout)
        except (ExecutionTimeout, KernelDied) as e:
            return str(e), []
        return _content(ex), ex.images

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    async def aclose(self) -> None:
        if self._asession is not None:
            await self._asession.close()
            self._asession = None
        await asyncio.to_thread(self.close)
