# Docker, but configured to undo the sandbox.
import os

from autogen import UserProxyAgent
from autogen.coding import DockerCommandLineCodeExecutor

executor = DockerCommandLineCodeExecutor(
    image="python:3-slim",
    bind_dir=os.getcwd(),
    container_create_kwargs={"network_mode": "host", "privileged": True},
)
proxy = UserProxyAgent("proxy", code_execution_config={"executor": executor})
