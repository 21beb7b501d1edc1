"""AG2 (AutoGen 0.2 API): the executor protocol and a two-agent conversation, no LLM."""

from __future__ import annotations

from pathlib import Path

from autogen import ConversableAgent, UserProxyAgent
from autogen.coding import CodeBlock, CodeExecutor

from kernelexec import Policy
from kernelexec.integrations.ag2 import KernelExecExecutor


def test_executor_protocol(kernel_image, tmp_path):
    # a first matplotlib import on a cold machine can take seconds: only the block meant to time out gets 2 s
    with KernelExecExecutor(timeout=120, output_dir=tmp_path, image=kernel_image) as ex:
        assert isinstance(ex, CodeExecutor)
        r = ex.execute_code_blocks([CodeBlock(code="x = 40\nprint('hi')", language="python"),
                                    CodeBlock(code="x + 2", language="python")])
        assert (r.exit_code, r.output) == (0, "hi\n42")
        r = ex.execute_code_blocks([CodeBlock(code="import matplotlib.pyplot as plt\nplt.plot([1]); plt.show()",
                                              language="python")])
        assert r.exit_code == 0 and len(r.output_files) == 1 and r.output_files[0].endswith(".png")
        assert Path(r.output_files[0]).parent == tmp_path and f"saved to {r.output_files[0]}" in r.output
        r = ex.execute_code_blocks([CodeBlock(code="undefined_thing", language="python")])
        assert r.exit_code == 1 and r.output.startswith("ERROR:") and "NameError" in r.output
        ex.timeout = 2
        r = ex.execute_code_blocks([CodeBlock(code="import time; time.sleep(30)", language="python")])
        assert r.exit_code == 1 and "Timeout" in r.output
        ex.timeout = 120
        assert ex.execute_code_blocks([CodeBlock(code="x", language="python")]).output == "40"  # kept
        r = ex.execute_code_blocks([CodeBlock(code="echo $((1+2))", language="sh")])
        assert r.exit_code == 0 and r.output.strip() == "3"
        r = ex.execute_code_blocks([CodeBlock(code="fn main() {}", language="rust")])
        assert r.exit_code == 1 and "python and bash" in r.output
        ex.restart()
        assert ex.execute_code_blocks([CodeBlock(code="'x' in dir()", language="python")]).output == "False"


SCRIPT = [
    ("Let me look at the data.\n```python\nimport pandas as pd\ndf = pd.DataFrame({'n': [1, 2, 3, 4]})\n"
     "print(df.n.sum())\n```"),
    "Now the mean, reusing df.\n```python\nprint(df.n.mean())\n```",
    "TERMINATE",
]


def test_user_proxy_runs_a_scripted_assistant_in_one_kernel(kernel_image):
    replies = iter(SCRIPT)
    assistant = ConversableAgent("assistant", llm_config=False, human_input_mode="NEVER")
    assistant.register_reply([ConversableAgent, None],
                             lambda recipient, messages, sender, config: (True, next(replies)), position=0)
    with KernelExecExecutor(timeout=30, policy=Policy(image=kernel_image)) as executor:
        proxy = UserProxyAgent("user_proxy", human_input_mode="NEVER", llm_config=False,
                               code_execution_config={"executor": executor},
                               is_termination_msg=lambda m: "TERMINATE" in (m.get("content") or ""))
        result = proxy.initiate_chat(assistant, message="Sum and average n.", max_turns=3)
    outputs = [m["content"] for m in result.chat_history if m.get("name") == "user_proxy" or m["role"] == "user"]
    text = "\n".join(str(o) for o in outputs)
    assert "exitcode: 0" in text and "10" in text and "2.5" in text


def test_an_executor_leaves_no_empty_output_directory(kernel_image):
    with KernelExecExecutor(image=kernel_image) as ex:
        empty = ex.output_dir
        assert ex.execute_code_blocks([CodeBlock(code="1 + 1", language="python")]).output == "2"
    assert not empty.exists()  # nothing was saved: the directory it made is gone
    with KernelExecExecutor(image=kernel_image) as ex:
        ex.stop()  # stopped, then used again: the directory comes back for the file
        r = ex.execute_code_blocks([CodeBlock(code="import matplotlib.pyplot as plt\nplt.plot([1]); plt.show()",
                                              language="python")])
        assert r.exit_code == 0 and len(r.output_files) == 1
    saved = Path(r.output_files[0])
    assert saved.exists()  # a saved file is the caller's: kept, with its directory
    saved.unlink()
    saved.parent.rmdir()
