"""AutoGen 0.7: the executor protocol and CodeExecutorAgent, against real sandboxes."""

from __future__ import annotations

import asyncio

import pytest

# the test extra installs AutoGen: a missing framework fails here, it is never skipped
from autogen_agentchat.agents import CodeExecutorAgent
from autogen_agentchat.messages import TextMessage
from autogen_core import CancellationToken
from autogen_core.code_executor import CodeBlock, CodeExecutor

from kernelexec import Policy
from kernelexec.integrations.autogen import KernelExecCodeExecutor


def run(coro):
    return asyncio.run(coro)


def test_state_output_errors_and_files(kernel_image, tmp_path):
    async def main():
        async with KernelExecCodeExecutor(timeout=30, output_dir=tmp_path, image=kernel_image) as ex:
            tok = CancellationToken()
            r1 = await ex.execute_code_blocks([CodeBlock("x = 20\nprint('hello')", "python"),
                                               CodeBlock("x + 22", "python")], tok)
            r2 = await ex.execute_code_blocks([CodeBlock("print('before')\n1/0", "python"),
                                               CodeBlock("print('never')", "python")], tok)
            r3 = await ex.execute_code_blocks([CodeBlock(
                "import matplotlib.pyplot as plt, pandas as pd\nplt.plot([1, 2]); plt.show()\n"
                "pd.DataFrame({'a': [1]})", "python")], tok)
            r4 = await ex.execute_code_blocks([CodeBlock("echo from-bash $((6*7))", "bash")], tok)
            r5 = await ex.execute_code_blocks([CodeBlock("console.log(1)", "javascript")], tok)
            return r1, r2, r3, r4, r5

    r1, r2, r3, r4, r5 = run(main())
    assert r1.exit_code == 0 and r1.output == "hello\n42"
    assert r2.exit_code == 1
    assert r2.output.startswith("before") and "ZeroDivisionError" in r2.output and "never" not in r2.output
    assert "\x1b[" not in r2.output
    assert r3.exit_code == 0 and sorted(p.suffix for p in r3.output_files) == [".html", ".png"]
    assert all(p.parent == tmp_path and p.stat().st_size > 0 for p in r3.output_files)
    assert r4.exit_code == 0 and "from-bash 42" in r4.output
    assert r5.exit_code == 1 and "python and bash" in r5.output


def test_timeout_and_cancel_interrupt_and_keep_the_executor(kernel_image):
    async def main():
        async with KernelExecCodeExecutor(timeout=2, image=kernel_image) as ex:
            await ex.execute_code_blocks([CodeBlock("kept = 'yes'", "python")], CancellationToken())
            with pytest.raises(asyncio.TimeoutError):
                await ex.execute_code_blocks([CodeBlock("import time; time.sleep(30)", "python")],
                                             CancellationToken())
            after_timeout = await ex.execute_code_blocks([CodeBlock("kept", "python")], CancellationToken())
            tok = CancellationToken()
            asyncio.get_running_loop().call_later(0.5, tok.cancel)
            with pytest.raises(asyncio.CancelledError):
                await ex.execute_code_blocks([CodeBlock("import time; time.sleep(1.5)", "python")], tok)
            after_cancel = await ex.execute_code_blocks([CodeBlock("kept", "python")], CancellationToken())
            await ex.restart()
            after_restart = await ex.execute_code_blocks([CodeBlock("'kept' in dir()", "python")],
                                                         CancellationToken())
            return after_timeout, after_cancel, after_restart

    a, b, c = run(main())
    assert a.output == "'yes'" and b.output == "'yes'" and c.output == "False"


def test_component_config_round_trip(kernel_image, tmp_path):
    ex = KernelExecCodeExecutor(timeout=12, output_dir=tmp_path, image=kernel_image,
                                policy=Policy(memory="512m", pids=64))
    model = ex.dump_component()
    assert model.provider == "kernelexec.integrations.autogen.KernelExecCodeExecutor"
    assert model.config["policy"] == {"memory": "512m", "pids": 64}
    loaded = CodeExecutor.load_component(model)
    assert isinstance(loaded, KernelExecCodeExecutor)
    assert loaded.dump_component().config == model.config

    async def main():
        async with loaded:
            r = await loaded.execute_code_blocks([CodeBlock("int(open('/sys/fs/cgroup/pids/pids.max').read())",
                                                            "python")], CancellationToken())
            return r.output

    assert run(main()) == "64"


def test_code_executor_agent_runs_a_code_block_from_a_message(kernel_image):
    async def main():
        async with KernelExecCodeExecutor(image=kernel_image) as ex:
            agent = CodeExecutorAgent("executor", code_executor=ex)
            msg = TextMessage(content="Here is the code:\n```python\nimport os\nprint(os.listdir('/sys/class/net'))\n```",
                              source="assistant")
            response = await agent.on_messages([msg], CancellationToken())
            return response.chat_message.content

    assert "['lo']" in run(main())
