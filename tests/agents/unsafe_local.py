# The "default, unsafe" setup: code on the host.
import os

from autogen import AssistantAgent, UserProxyAgent

os.environ["AUTOGEN_USE_DOCKER"] = "False"
assistant = AssistantAgent("assistant", llm_config={"model": "gpt-4o"})
agent = UserProxyAgent(
    name="code_executor",
    code_execution_config={"work_dir": "code", "use_docker": False},
)
