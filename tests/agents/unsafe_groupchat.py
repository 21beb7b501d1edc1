# Code execution everywhere, including on the manager, and a local executor.
from autogen import AssistantAgent, GroupChat, GroupChatManager, UserProxyAgent
from autogen.coding import LocalCommandLineCodeExecutor

coder = AssistantAgent("coder", llm_config={"model": "x"},
                       code_execution_config={"work_dir": ".", "use_docker": True, "timeout": 60,
                                              "docker_config": {"image": "python:3-slim", "user": "nobody"}})
runner = UserProxyAgent("runner", code_execution_config={"executor": LocalCommandLineCodeExecutor(work_dir="/tmp/x")})
manager = GroupChatManager(groupchat=GroupChat(agents=[coder, runner], messages=[]),
                           code_execution_config={"use_docker": True, "timeout": 30, "work_dir": "scratch"})
