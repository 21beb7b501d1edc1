# A safe setup: one dedicated executor agent, code runs in a kernelexec sandbox with a role profile.
from autogen import AssistantAgent, GroupChat, GroupChatManager, UserProxyAgent

from kernelexec.integrations.ag2 import KernelExecExecutor

assistant = AssistantAgent("assistant", llm_config={"model": "gpt-4o"})
executor = KernelExecExecutor(profile="coder", timeout=60)
user_proxy = UserProxyAgent("user_proxy", human_input_mode="NEVER", code_execution_config={"executor": executor})
manager = GroupChatManager(groupchat=GroupChat(agents=[assistant, user_proxy], messages=[]),
                           llm_config={"model": "gpt-4o"}, code_execution_config=False)
