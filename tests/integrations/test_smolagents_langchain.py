"""smolagents CodeAgent with a scripted model, and the LangChain tool, against real sandboxes."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import ToolCall
from smolagents import CodeAgent, Tool
from smolagents.models import ChatMessage, Model

from kernelexec import Policy
from kernelexec.integrations.langchain import KernelExecTool
from kernelexec.integrations.smolagents import KernelExecPythonExecutor


class ScriptedModel(Model):
    """Answers with prewritten steps instead of calling an LLM."""

    def __init__(self, steps: list[str]) -> None:
        super().__init__(model_id="scripted")
        self.steps = iter(steps)

    def generate(self, messages, stop_sequences=None, response_format=None, tools_to_call_from=None, **kwargs):
        return ChatMessage(role="assistant", content=next(self.steps))


class Double(Tool):
    name = "double"
    description = "Doubles a number."
    inputs = {"x": {"type": "integer", "description": "the number"}}
    output_type = "integer"

    def forward(self, x: int) -> int:
        return 2 * x


def step(code: str) -> str:
    return f"Thought: next.\n<code>\n{code}\n</code>"


def test_code_agent_keeps_state_uses_tools_and_answers(kernel_image):
    executor = KernelExecPythonExecutor(["pandas"], image=kernel_image, timeout=60)
    try:
        model = ScriptedModel([
            step("import os\ntotal = sum(range(10))\nprint(total, os.listdir('/sys/class/net'))"),
            step("final_answer(double(total))"),
        ])
        agent = CodeAgent(tools=[Double()], model=model, executor=executor, max_steps=4)
        assert agent.run("Double the sum of 0..9.") == 90
        logs = [s.observations for s in agent.memory.steps if getattr(s, "observations", None)]
        assert any("45 ['lo']" in o for o in logs)
    finally:
        executor.cleanup()


def test_missing_package_is_reported(kernel_image):
    with pytest.raises(ValueError, match="not in the kernel image"):
        KernelExecPythonExecutor(["surely_not_installed_pkg"], image=kernel_image)


def test_langchain_tool_sync_and_async(kernel_image):
    tool = KernelExecTool(policy=Policy(image=kernel_image), timeout=30)
    try:
        msg = tool.invoke(ToolCall(name="python", args={"code": "x = 3\nprint('x is', x)\nx * 2"}, id="1",
                                   type="tool_call"))
        assert msg.content == "x is 3\nOut: 6"
        msg = tool.invoke(ToolCall(name="python", args={"code": "import matplotlib.pyplot as plt\n"
                                   "plt.plot([1, 2]); plt.show()"}, id="2", type="tool_call"))
        assert "1 image(s) attached" in msg.content and msg.artifact[0][:4] == b"\x89PNG"
        msg = tool.invoke(ToolCall(name="python", args={"code": "x / 0"}, id="3", type="tool_call"))
        assert "ZeroDivisionError" in msg.content
    finally:
        tool.close()

    async def main() -> str:
        t = KernelExecTool(policy=Policy(image=kernel_image))
        try:
            await t.ainvoke({"code": "y = 5"})
            return await t.ainvoke({"code": "y + 1"})
        finally:
            await t.aclose()

    assert asyncio.run(main()) == "Out: 6"
