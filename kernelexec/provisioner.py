"""A Jupyter kernel provisioner: JupyterLab, ``jupyter console``, nbclient and
papermill start their kernels inside kernelexec sandboxes.

    kernelexec kernelspec install        # a "kernelexec" kernel appears in Jupyter

The provisioner starts a session (container, verified sockets, orphan
watchdog) and hands the KernelManager connection info whose ``ip`` is a
host-only directory of symlinks to ``/proc/self/fd/N``: Jupyter's own
clients then reach exactly the sockets kernelexec verified, never a path
the container could swap. Interrupts are protocol messages; restart gives a
fresh container; shutdown removes everything.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import Unicode

from .container import PORTS
from .dockerapi import DockerAPIError, api
from .errors import SandboxError
from .policy import KERNEL_PYTHON, Policy
from .session import AsyncSession
from .sockdir import SOCKET_BASENAME, private_dir, remove_path

KERNEL_NAME = "kernelexec"


class KernelExecProvisioner(KernelProvisionerBase):
    image = Unicode(None, allow_none=True, config=True, help="kernel image (default: the recipe's tag)")
    profile = Unicode(None, allow_none=True, config=True, help="named policy from the profile file")

    session: AsyncSession | None = None
    links: Path | None = None

    @property
    def has_process(self) -> bool:
        return self.session is not None

    async def poll(self) -> int | None:
        if self.session is None:
            return 0
        return None if self.session.alive else 1

    async def wait(self) -> int | None:
        """Until the container stops (the kernel exits after a shutdown request)."""
        if self.session is None or self.session.container_id is None:
            return 0
        try:
            status = await api().wait(self.session.container_id)
        except DockerAPIError as e:
            if e.status != 404:
                raise
            return 0
        return int(status.get("StatusCode", 0))

    async def send_signal(self, signum: int) -> None:
        if self.session is None:
            return
        if signum == signal.SIGINT:
            await self.session.interrupt()
        elif signum in (signal.SIGTERM, signal.SIGKILL):
            await self.kill()
        else:
            raise SandboxError(f"kernelexec kernels take interrupts and kills only, not signal {signum}")

    async def kill(self, restart: bool = False) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    async def terminate(self, restart: bool = False) -> None:
        await self.kill(restart)

    async def cleanup(self, restart: bool = False) -> None:
        await self.kill(restart)
        links, self.links = self.links, None
        if links is not None:
            remove_path(links)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        # the kernelspec's argv and a host connection file mean nothing here: the sandbox brings its own
        kwargs.pop("extra_arguments", None)
        return await super().pre_launch(cmd=[KERNEL_PYTHON], **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        policy = Policy(image=self.image) if self.image else None
        session = AsyncSession(policy, profile=self.profile)
        await session.start()
        self.session = session
        if not session.endpoints:
            await session.close()
            self.session = None
            raise RuntimeError(
                f"this sandbox's kernel is reached over the {session.transport} transport, which offers Jupyter "
                "clients no sockets on this host yet; use a local engine with runc (Policy.transport='ipc') "
                "for JupyterLab, nbclient and papermill")
        self.links = private_dir()
        for channel, port in PORTS.items():
            os.symlink(session.endpoints[channel].removeprefix("ipc://"), self.links / f"{SOCKET_BASENAME}-{port}")
        assert session.key is not None
        self.connection_info = {
            "transport": "ipc", "ip": str(self.links / SOCKET_BASENAME),
            "shell_port": PORTS["shell"], "iopub_port": PORTS["iopub"], "stdin_port": PORTS["stdin"],
            "control_port": PORTS["control"], "hb_port": PORTS["hb"],
            # bytes, as jupyter_client's own LocalProvisioner gives it (get_connection_info); its TypedDict says str
            "key": session.key,  # type: ignore[typeddict-item]
            "signature_scheme": "hmac-sha256", "kernel_name": KERNEL_NAME,
        }
        return self.connection_info

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update({"session": self.session.id if self.session else None})
        return info


def kernelspec(image: str | None = None, profile: str | None = None) -> dict[str, Any]:
    config = {k: v for k, v in (("image", image), ("profile", profile)) if v}
    return {
        # absolute in-image path: jupyter_client rewrites a bare `python` to the host's interpreter
        "argv": [KERNEL_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (kernelexec sandbox)",
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {"kernel_provisioner": {"provisioner_name": "kernelexec-provisioner", "config": config}},
    }


def install_kernelspec(*, user: bool = True, prefix: str | None = None, image: str | None = None,
                       profile: str | None = None) -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(kernelspec(image, profile), indent=2))
        return str(KernelSpecManager().install_kernel_spec(tmp, KERNEL_NAME, user=user and prefix is None,
                                                           prefix=prefix))


def _kernelspec_dir(*, user: bool, prefix: str | None) -> Path:
    """Where :func:`install_kernelspec` puts (and so where uninstall looks for) the kernelspec."""
    from jupyter_client.kernelspec import SYSTEM_JUPYTER_PATH, KernelSpecManager

    if user and prefix is None:
        return Path(KernelSpecManager().user_kernel_dir) / KERNEL_NAME
    if prefix is not None:
        return Path(prefix).absolute() / "share" / "jupyter" / "kernels" / KERNEL_NAME
    return Path(SYSTEM_JUPYTER_PATH[0]) / "kernels" / KERNEL_NAME


def uninstall_kernelspec(*, user: bool = True, prefix: str | None = None) -> str:
    """Remove what :func:`install_kernelspec` installed (same ``user``/``prefix``); returns the directory.

    Raises FileNotFoundError when it is not installed there, and refuses a
    "kernelexec" kernelspec that is not this provisioner's (someone else's kernel).
    """
    import shutil

    where = _kernelspec_dir(user=user, prefix=prefix)
    spec = where / "kernel.json"
    if not spec.is_file():
        scope = f"under {prefix}" if prefix is not None else "for this user" if user else "system-wide"
        raise FileNotFoundError(f"no 'kernelexec' kernelspec is installed {scope} ({where} does not exist); "
                                "`jupyter kernelspec list` shows where kernelspecs are")
    try:
        provisioner = json.loads(spec.read_text())["metadata"]["kernel_provisioner"]["provisioner_name"]
    except (OSError, ValueError, KeyError, TypeError):
        provisioner = None
    if provisioner != "kernelexec-provisioner":
        raise FileNotFoundError(f"{where} is a kernelspec named 'kernelexec' that kernelexec did not install "
                                "(it does not use the kernelexec provisioner); left in place, remove it with "
                                "`jupyter kernelspec remove kernelexec`")
    shutil.rmtree(where)
    return str(where)


__all__ = ["KernelExecProvisioner", "install_kernelspec", "kernelspec", "uninstall_kernelspec"]
