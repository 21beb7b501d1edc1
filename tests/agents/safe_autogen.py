# A safe AutoGen 0.7 setup: the executor agent's code runs in a kernelexec sandbox with a role profile.
from autogen_agentchat.agents import AssistantAgent, CodeExecutorAgent

from kernelexec.integrations.autogen import KernelExecCodeExecutor

executor = KernelExecCodeExecutor(profile="coder", timeout=60)
agent = CodeExecutorAgent("executor", code_executor=executor)
assistant = AssistantAgent("assistant", model_client=None)
