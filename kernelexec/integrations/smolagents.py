"""smolagents: a remote Python executor for ``CodeAgent`` backed by a kernelexec sandbox.

    agent = CodeAgent(tools=[...], model=model, executor=KernelExecPythonExecutor(profile="coder"))

State is kept from one step to the next (the kernel persists); tools are
defined in the kernel from their source, as smolagents does for every remote
executor; ``final_answer`` is detected from the exception it raises there.
Nothing is unpickled on the host (``allow_pickle`` stays False). Packages
cannot be installed at run time (there is no network): they must be in the
kernel image, and a missing one is reported when the executor starts.
"""

from __future__ import annotations

from typing import Any

from smolagents.local_python_executor import CodeOutput
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.remote_executors import RemotePythonExecutor
from smolagents.utils import AgentError

from ..policy import Policy
from ..session import Session

#: pip names whose import name differs
_MODULE_OF = {"pillow": "PIL", "scikit-learn": "sklearn", "beautifulsoup4": "bs4", "pyyaml": "yaml",
              "opencv-python": "cv2", "python-dateutil": "dateutil"}


class KernelExecPythonExecutor(RemotePythonExecutor):
    def __init__(self, additional_imports: list[str] | None = None, logger: AgentLogger | None = None, *,
                 policy: Policy | None = None, profile: str | None = None, image: str | None = None,
                 timeout: float | None = None, **session_kwargs: Any) -> None:
        super().__init__(list(additional_imports or []), logger or AgentLogger(level=LogLevel.INFO),
                         allow_pickle=False)
        self.timeout = timeout
        self.session = Session(policy, profile=profile, image=image, **session_kwargs)
        try:
            self.installed_packages = self.install_packages(self.additional_imports)
        except BaseException:
            self.session.close()
            raise

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """Check instead of install: the sandbox has no network, so packages come with the image."""
        wanted = sorted({_MODULE_OF.get(m, m.replace("-", "_")).split(".")[0]
                         for m in additional_imports if m and m != "*"})
        if not wanted:
            return []
        ex = self.session.execute(f"import importlib.util as _u; [m for m in {wanted!r} if _u.find_spec(m) is None]")
        missing = ex.text or "[]"
        if missing != "[]":
            raise ValueError(f"these modules are not in the kernel image: {missing}. The sandbox has no network; "
                             "add them to kernel-image/requirements.in and run `kernelexec image build`")
        return wanted

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        ex = self.session.execute(code, timeout=self.timeout)
        logs = ex.stdout + ex.stderr
        if ex.error is not None:
            if ex.error.ename == self.FINAL_ANSWER_EXCEPTION:
                value = self._deserialize_final_answer(ex.error.evalue, self.allow_pickle)
                return CodeOutput(output=value, logs=logs, is_final_answer=True)
            raise AgentError(f"{logs}\n{ex.error.traceback}".strip(), self.logger)
        return CodeOutput(output=ex.text, logs=logs, is_final_answer=False)

    def cleanup(self) -> None:
        self.session.close()

    def delete(self) -> None:
        self.cleanup()
