"""AG2 1.x (module ``ag2``): Agents with a scripted model (ag2.testing, no LLM) running code through the real
SandboxCodeTool and KernelExecTool on a real kernelexec sandbox. The classic AG2 (module ``autogen``) is
tested in tests/integrations/previous/test_ag2_classic.py."""

from __future__ import annotations

import asyncio
import copy
import io
import json

import pytest
from ag2 import Agent
from ag2.events import (
    BinaryInput,
    TextInput,
    ToolCallEvent,
    ToolResultEvent,
    ToolResultsEvent,
)
from ag2.testing import TestConfig, TrackingConfig
from ag2.tools import SandboxCodeTool
from ag2.tools.code import CodeEnvironment
from PIL import Image

from kernelexec import AsyncSession, Policy
from kernelexec.integrations.ag2 import KernelExecEnvironment, KernelExecTool


def run_code(code: str, language: str = "python") -> ToolCallEvent:
    return ToolCallEvent("run_code", arguments=json.dumps({"code": code, "language": language}))


async def tool_results(reply) -> list[ToolResultEvent]:
    return [e for e in await reply.history.get_events() if isinstance(e, ToolResultEvent)]


def gone(docker, container_id: str) -> bool:
    return docker.api.containers(all=True, filters={"id": container_id}) == []


def test_an_agent_keeps_state_between_run_code_calls_in_one_sandbox(docker, kernel_image):
    async def main() -> str:
        async with KernelExecEnvironment(Policy(image=kernel_image), timeout=60) as env:
            container = env.session.container_id
            assert container is not None
            tool = SandboxCodeTool(env)
            agent = Agent("coder", config=TestConfig(
                run_code("x = 41"),
                run_code("x += 1\nprint(x)"),
                run_code("import os, socket\nprint(sorted(os.listdir('/sys/class/net')), socket.if_nameindex())"),
                run_code("echo $((6 * 7)) > from_bash.txt; ls /sys/class/net; pwd", "bash"),
                run_code("print(open('from_bash.txt').read().strip() == str(x))"),
                run_code("1/0"),
                run_code("echo out; echo err >&2; exit 3", "bash"),
                run_code("x"),
                "done",
            ), tools=[tool])
            # the Agent made its own deep copy of the tool; the copy runs in this very sandbox
            assert agent.tools[0] is not tool and agent.tools[0].environment is env
            reply = await agent.ask("go")
            assert reply.body == "done"
            texts = [r.result.parts[0].content for r in await tool_results(reply)]
            assert texts[:5] == ["", "42", "['lo'] [(1, 'lo')]", "lo\n/work", "True"]
            assert texts[5].startswith("-----") and "ZeroDivisionError: division by zero" in texts[5]
            assert "Traceback" in texts[5] and "\x1b[" not in texts[5] and texts[5].endswith("[exit code: 1]")
            assert texts[6] == "out\nerr\n[exit code: 3]"  # the shell's status, not a Python traceback
            assert texts[7] == "42"  # the errors left the kernel and its state as they were
            assert env.session.container_id == container  # one sandbox for the whole conversation
        return container

    container = asyncio.run(main())
    assert gone(docker, container)  # closed with the environment


def test_the_environment_on_its_own(docker, kernel_image):
    async def main() -> None:
        env = KernelExecEnvironment(Policy(image=kernel_image), timeout=60)
        assert isinstance(env, CodeEnvironment) and env.supported_languages == ("python", "bash")
        assert copy.deepcopy(env) is env and copy.copy(env) is env
        async with env:
            assert (await env.run("y = 7", "python")).exit_code == 0
            env.timeout = 2
            r = await env.run("print('begun', flush=True)\nimport time; time.sleep(60)", "python")
            assert r.exit_code == 124 and r.output.startswith("begun") and "state are intact" in r.output
            r = await env.run("echo begun; sleep 60", "bash")
            assert r.exit_code == 124 and r.output.startswith("begun") and "state are intact" in r.output
            env.timeout = 60
            assert (await env.run("print(y)", "python")).output == "7"  # interrupted, not restarted
            r = await env.run("console.log(1)", "javascript")  # type: ignore[arg-type]
            assert r.exit_code == 2 and "['python', 'bash']" in r.output
            env.max_output_chars = 1000
            r = await env.run("print('a' * 3000 + 'END')", "python")
            assert len(r.output) <= 1000 and r.output.startswith("aaa") and r.output.endswith("END")
            assert "characters of output left out here" in r.output
            r = await env.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "python")
            assert r.exit_code != 0 and "state is lost" in r.output
            r = await env.run("print(y)", "python")  # a fresh kernel answers: auto_restart
            assert r.exit_code == 1 and "NameError" in r.output
            container = env.session.container_id
        assert not env.session.alive and container is not None and gone(docker, container)

    asyncio.run(main())


def test_an_environment_on_the_callers_session_leaves_it_open(kernel_image):
    async def main() -> None:
        with pytest.raises(ValueError, match="either a session"):
            KernelExecEnvironment(Policy(image=kernel_image), session=AsyncSession())
        async with AsyncSession(Policy(image=kernel_image)) as s:
            await s.execute("z = 3")
            async with KernelExecEnvironment(session=s) as env:
                assert (await env.run("print(z)", "python")).output == "3"
            assert s.alive and (await s.execute("z")).text == "3"

    asyncio.run(main())


def test_the_kernelexec_tool_shows_the_model_its_plots(docker, kernel_image):
    async def main() -> None:
        model = TrackingConfig(TestConfig(
            run_code("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2]); plt.show()\nprint('plotted')"),
            run_code("print('no image')"),
            run_code("undefined_name"),
            "done",
        ))
        async with KernelExecEnvironment(Policy(image=kernel_image)) as env:
            tool = KernelExecTool(env)
            agent = Agent("analyst", config=model, tools=[tool])
            assert agent.tools[0] is not tool and agent.tools[0].environment is env
            reply = await agent.ask("plot it")
            plotted, plain, failed = (r.result for r in await tool_results(reply))

        text, png = plotted.parts
        assert isinstance(text, TextInput) and text.content.endswith("plotted")
        assert isinstance(png, BinaryInput) and png.media_type == "image/png" and png.data[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(png.data)).size[0] > 100
        assert plotted.metadata == {"exit_code": 0, "images": 1}
        assert [p.content for p in plain.parts] == ["no image"]  # type: ignore[attr-defined]
        assert "NameError" in failed.parts[0].content and failed.parts[0].content.endswith("[exit code: 1]")
        assert failed.metadata["exit_code"] == 1
        # the model's next call was handed the image
        handed = model.mock.call_args_list[1].args[0]
        assert isinstance(handed, ToolResultsEvent)
        assert any(isinstance(p, BinaryInput) and p.data == png.data for p in handed.results[0].result.parts)

    asyncio.run(main())


def test_each_major_names_the_other_when_its_framework_is_missing():
    with pytest.raises(ImportError, match=r"ag2<1.*KernelExecEnvironment"):
        from kernelexec.integrations.ag2 import KernelExecExecutor  # noqa: F401
