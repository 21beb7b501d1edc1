"""AutoGen 0.7 (``autogen-core``/``autogen-ext``): a ``CodeExecutor`` whose code
runs statefully in a kernelexec sandbox.

It behaves like AutoGen's own Jupyter executor where users rely on it (output
joins stream text and text/plain results; an error gives exit code 1 and the
traceback after the output so far; images and HTML are saved in
``output_dir``), with two differences: the code cannot touch the host, and a
timeout or a cancelled token interrupts the kernel instead of abandoning it,
so the executor stays usable with its state.

    async with KernelExecCodeExecutor(profile="analyst") as executor:
        agent = CodeExecutorAgent("executor", code_executor=executor)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autogen_core import CancellationToken, Component
from autogen_core.code_executor import CodeBlock, CodeExecutor, CodeResult
from pydantic import BaseModel, Field
from typing_extensions import Self

from ..errors import ExecutionTimeout
from ..policy import Policy
from ..session import AsyncSession
from ._blocks import UnsupportedLanguage, own_output_dir, remove_if_empty, render, to_kernel_code


@dataclass
class KernelExecCodeResult(CodeResult):
    """A CodeResult with the files (images, HTML) the code displayed."""

    output_files: list[Path] = field(default_factory=list)


class KernelExecCodeExecutorConfig(BaseModel):
    """Serializable configuration (``dump_component``/``load_component``)."""

    timeout: float = 60.0
    output_dir: str | None = None
    profile: str | None = None
    image: str | None = None
    policy: dict[str, Any] = Field(default_factory=dict)


class KernelExecCodeExecutor(CodeExecutor, Component[KernelExecCodeExecutorConfig]):
    """Runs code blocks in one persistent, sandboxed Jupyter kernel."""

    component_config_schema = KernelExecCodeExecutorConfig
    component_provider_override = "kernelexec.integrations.autogen.KernelExecCodeExecutor"

    def __init__(self, timeout: float = 60.0, output_dir: Path | str | None = None, *,
                 policy: Policy | None = None, profile: str | None = None, image: str | None = None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._timeout = timeout
        self._own_output_dir = output_dir is None
        self._output_dir = Path(output_dir) if output_dir is not None else own_output_dir()
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._policy, self._profile, self._image = policy, profile, image
        self._session: AsyncSession | None = None

    @property
    def output_dir(self) -> Path:
        return self._output_dir

    @property
    def session(self) -> AsyncSession | None:
        """The sandbox, for uploads, downloads and notebook export."""
        return self._session

    async def start(self) -> None:
        if self._session is None:
            session = AsyncSession(self._policy, profile=self._profile, image=self._image)
            await session.start()
            self._session = session

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        if self._own_output_dir:
            remove_if_empty(self._output_dir)

    async def restart(self) -> None:
        if self._session is None:
            await self.start()
        else:
            await self._session.restart()

    async def execute_code_blocks(self, code_blocks: list[CodeBlock],
                                  cancellation_token: CancellationToken) -> KernelExecCodeResult:
        """Run the blocks in order; stop at the first that fails.

        Raises ``asyncio.TimeoutError`` on timeout and ``asyncio.CancelledError``
        when the token is cancelled; in both cases the kernel was interrupted
        and keeps its state.
        """
        await self.start()
        assert self._session is not None
        outputs: list[str] = []
        files: list[Path] = []
        for block in code_blocks:
            try:
                code = to_kernel_code(block.code, block.language)
            except UnsupportedLanguage as e:
                outputs.append(str(e))
                return KernelExecCodeResult(exit_code=1, output="\n".join(outputs), output_files=files)
            task = asyncio.ensure_future(self._session.execute(code, timeout=self._timeout))
            cancellation_token.link_future(task)
            try:
                ex = await task
            except ExecutionTimeout as e:
                raise asyncio.TimeoutError(str(e)) from e
            rendered = render(ex, self._output_dir)
            outputs.append(rendered.output)
            files.extend(rendered.files)
            if rendered.failed:
                return KernelExecCodeResult(exit_code=1, output="\n".join(outputs), output_files=files)
        return KernelExecCodeResult(exit_code=0, output="\n".join(outputs), output_files=files)

    def _to_config(self) -> KernelExecCodeExecutorConfig:
        policy = {}
        if self._policy is not None:
            # what the caller set: with a profile, the rest must keep coming from the profile
            policy = {k: getattr(self._policy, k) for k in sorted(self._policy.explicit_fields())}
            policy = {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v)
                      for k, v in policy.items()}
        return KernelExecCodeExecutorConfig(timeout=self._timeout, output_dir=str(self._output_dir),
                                            profile=self._profile, image=self._image, policy=policy)

    @classmethod
    def _from_config(cls, config: KernelExecCodeExecutorConfig) -> Self:
        fields = dict(config.policy)
        if "cap_add" in fields:
            fields["cap_add"] = tuple(fields["cap_add"])
        policy = Policy(**fields) if fields else None
        return cls(timeout=config.timeout, output_dir=config.output_dir, policy=policy, profile=config.profile,
                   image=config.image)
