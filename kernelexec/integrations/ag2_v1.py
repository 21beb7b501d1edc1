"""AG2 1.x (module ``ag2``): a stateful ``CodeEnvironment`` and a tool that shows the model its plots.

    from ag2 import Agent
    from ag2.tools import SandboxCodeTool
    from kernelexec.integrations.ag2 import KernelExecEnvironment, KernelExecTool

    async with KernelExecEnvironment(profile="strict", timeout=60) as env:
        agent = Agent("analyst", config=config, tools=[SandboxCodeTool(env)])   # text results
        # or tools=[KernelExecTool(env)]: the same run_code, with the images the code displayed
        reply = await agent.ask("...")

AG2 1.x ships environments that either do not isolate (``LocalEnvironment``)
or start a fresh interpreter per call (``DockerEnvironment`` runs ``python -c``
in a long-lived container), so an agent loses its variables between two
``run_code`` calls. Here every call runs in one Jupyter kernel in its own
hardened container: variables, imports and files in ``/work`` survive, bash
runs through the kernel (``%%bash``, same files), a timeout interrupts the
code and keeps the kernel, and the container goes when the environment closes.

AG2 deep-copies every tool when an ``Agent`` is built. A live session holds
sockets and locks and must not be duplicated, so a copy of the environment is
the environment itself (as AG2's own ``DockerEnvironment`` does).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from ag2 import ImageInput, ToolResult
from ag2.tools import tool
from ag2.tools.code import CodeRunResult
from ag2.tools.tool import Tool

from ..errors import ExecutionTimeout, KernelDied
from ..policy import Policy
from ..results import ErrorInfo, Execution, Stream
from ..session import AsyncSession
from ._blocks import SHELL, UnsupportedLanguage, render, to_kernel_code

if TYPE_CHECKING:
    from collections.abc import Iterable
    from contextlib import AsyncExitStack, ExitStack

    from ag2.annotations import Context
    from ag2.context import ConversationContext
    from ag2.middleware import BaseMiddleware
    from ag2.tools.code import CodeLanguage
    from typing_extensions import Self

#: AG2's conventions (``ag2.tools.sandbox``): 2 for a language the environment does not run, 124 for a timeout
EXIT_UNSUPPORTED, EXIT_TIMEOUT = 2, 124

_BASH_STATUS = re.compile(r"returned non-zero exit status (\d+)\.\s*$")
_BASH_SIGNAL = re.compile(r"died with <Signals\.\w+: (\d+)>\.\s*$")


class KernelExecEnvironment:
    """Satisfies ``ag2.tools.code.CodeEnvironment`` on one persistent kernelexec session.

    ``policy``/``profile``/``image`` choose the sandbox as for :class:`~kernelexec.AsyncSession`
    (extra keyword arguments go to it too); or pass a ``session`` you started and close yourself.
    ``timeout`` bounds each ``run`` call. ``max_output_chars`` bounds what one call puts into the
    model's context (the head and the tail are kept). The kernel restarts by itself when it dies
    (``auto_restart``), so the next call works and the model is told its state is gone.
    """

    def __init__(self, policy: Policy | None = None, *, profile: str | None = None, image: str | None = None,
                 timeout: float = 60.0, max_output_chars: int = 20_000, session: AsyncSession | None = None,
                 **session_kwargs: Any) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_output_chars < 200:
            raise ValueError("max_output_chars must be at least 200")
        if session is not None and (policy is not None or profile is not None or image is not None or session_kwargs):
            raise ValueError("pass either a session or the arguments to start one, not both")
        self.timeout = timeout
        self.max_output_chars = max_output_chars
        self._owns_session = session is None
        if session is None:
            session_kwargs.setdefault("auto_restart", True)
            session = AsyncSession(policy, profile=profile, image=image, **session_kwargs)
        self.session = session

    # -- the CodeEnvironment protocol -----------------------------------------------

    @property
    def supported_languages(self) -> tuple[CodeLanguage, ...]:
        return ("python", "bash")

    async def run(self, code: str, language: CodeLanguage, *,
                  context: ConversationContext | None = None) -> CodeRunResult:
        """Run ``code`` in the kernel: exit code 0, or 1 with the exception's traceback, the shell's
        own status for bash, 124 after a timeout (the kernel was interrupted; say whether state survived)."""
        text, exit_code, _ = await self._run(code, language, images=False)
        return CodeRunResult(output=text, exit_code=exit_code)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sandbox now (``run`` would otherwise start it on first use)."""
        await self.session.start()

    async def restart(self) -> None:
        """A fresh kernel in a fresh container: the agent's variables and files are gone."""
        await self.session.restart()

    async def aclose(self) -> None:
        """Remove the container (a session passed in by the caller is left to the caller)."""
        if self._owns_session:
            await self.session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __copy__(self) -> KernelExecEnvironment:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> KernelExecEnvironment:
        # AG2 deep-copies tools when an Agent is built: the copy must be this very sandbox
        return self

    # -- shared by run() and KernelExecTool --------------------------------------------

    async def _run(self, code: str, language: str, *, images: bool) -> tuple[str, int, list[bytes]]:
        try:
            kernel_code = to_kernel_code(code, language)
        except UnsupportedLanguage:
            refusal = f"language {language!r} is not supported here; use one of {list(self.supported_languages)}"
            return refusal, EXIT_UNSUPPORTED, []
        bash = language.strip().lower() in SHELL
        try:
            ex = await self.session.execute(kernel_code, timeout=self.timeout)
        except ExecutionTimeout as e:
            partial = _text(e.partial, bash=bash)[0] if e.partial is not None else ""
            return self._bound("\n".join(p for p in (partial, f"Timeout: {e}") if p)), EXIT_TIMEOUT, []
        except KernelDied as e:
            return self._bound(str(e)), e.exit_code or 1, []
        text, exit_code = _text(ex, bash=bash)
        return self._bound(text), exit_code, ex.images if images else []

    def _bound(self, text: str) -> str:
        limit = self.max_output_chars
        if len(text) <= limit:
            return text
        marker = f"\n[kernelexec: {len(text) - limit} characters of output left out here]\n"
        head = (limit - len(marker)) * 2 // 3
        tail = limit - len(marker) - head
        return text[:head] + marker + text[-tail:]


def _text(ex: Execution, *, bash: bool) -> tuple[str, int]:
    """What the model reads, and the exit code. A failing bash block reports the shell's own status
    and output, not the Python traceback of the ``%%bash`` magic that ran it."""
    error = ex.error
    if bash and error is not None and error.ename == "CalledProcessError":
        status = _bash_status(error)
        if status is not None:
            shown = Execution(ex.code, [o for o in ex.outputs if isinstance(o, Stream)])
            return render(shown, None).output, status
    return render(ex, None).output, 0 if error is None else 1


def _bash_status(error: ErrorInfo) -> int | None:
    if m := _BASH_STATUS.search(error.evalue):
        return int(m.group(1))
    if m := _BASH_SIGNAL.search(error.evalue):
        return 128 + int(m.group(1))  # as a shell reports a child killed by a signal
    return None


DESCRIPTION = ("Run code in a persistent sandboxed Jupyter kernel (no network). Variables and files in /work "
               "persist between calls. Languages: {languages}. Images the code displays (plt.show()) are "
               "returned to you.")


class KernelExecTool(Tool):
    """A ``run_code(code, language)`` tool like ``ag2.tools.SandboxCodeTool``, whose result also
    carries every PNG the code displayed (``ToolResult`` image parts), so the model sees its plots.

    A deep copy (AG2 makes one per Agent) shares the environment and its session.
    """

    def __init__(self, environment: KernelExecEnvironment, *, name: str = "run_code",
                 description: str = DESCRIPTION) -> None:
        env = environment

        async def run_code(code: str, language: Literal["python", "bash"] = "python") -> ToolResult:
            text, exit_code, pngs = await env._run(code, language, images=True)
            if exit_code != 0:
                text = f"{text}\n[exit code: {exit_code}]" if text else f"[exit code: {exit_code}]"
            parts: list[Any] = [text or "(no output)"]
            parts.extend(ImageInput(data=png, media_type="image/png") for png in pngs)
            return ToolResult(*parts, metadata={"exit_code": exit_code, "images": len(pngs)})

        self.environment = env
        self.name = name
        self._tool = tool(run_code, name=name,
                          description=description.format(languages=", ".join(env.supported_languages)))

    async def schemas(self, context: Context) -> list[Any]:
        return list(await self._tool.schemas(context))

    def register(self, stack: ExitStack | AsyncExitStack, context: Context, *,
                 middleware: Iterable[BaseMiddleware] = ()) -> None:
        self._tool.register(stack, context, middleware=middleware)
