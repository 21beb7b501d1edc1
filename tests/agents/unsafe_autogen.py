# AutoGen 0.7: executors on the host, one in the project directory, and a container mounting the home directory.
from pathlib import Path

from autogen_agentchat.agents import CodeExecutorAgent
from autogen_ext.code_executors.docker import DockerCommandLineCodeExecutor
from autogen_ext.code_executors.jupyter import JupyterCodeExecutor
from autogen_ext.code_executors.local import LocalCommandLineCodeExecutor as Local

local = Local(work_dir=".")
jupyter = JupyterCodeExecutor(timeout=60)
docker = DockerCommandLineCodeExecutor(work_dir=Path.home(), timeout=60)
agent = CodeExecutorAgent("executor", code_executor=local)
