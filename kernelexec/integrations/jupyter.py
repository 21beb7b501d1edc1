"""A Jupyter kernel provisioner: JupyterLab, ``jupyter console``, nbclient and
papermill start their kernels inside kernelexec sandboxes.

    kernelexec kernelspec install        # a "kernelexec" kernel appears in Jupyter

The provisioner starts a session (container, verified sockets, orphan
watchdog) and hands the KernelManager connection info for host-only sockets:

* over ipc, ``ip`` is a private directory of symlinks to ``/proc/self/fd/N``:
  Jupyter's own clients then reach exactly the sockets kernelexec verified,
  never a path the container could swap;
* over attach (remote engines, gVisor), the kernel has no socket on this
  host: a :class:`~kernelexec.backend.bridge.JupyterBridge` binds them in a
  private directory and carries them over the session's shared channels.

The session (and the bridge) run on kernelexec's own loop thread, not on the
caller's loop: a blocking ``KernelManager`` runs its loop only during its
calls, and the attach transport's keepalives and the bridge must run between
them. Interrupts are protocol messages; restart gives a fresh container;
shutdown removes everything (container, directory, sockets, tasks, thread).
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import Unicode

from .._loop import LoopThread
from ..backend import default_backend
from ..errors import SandboxError
from ..kernel.contract import SIGNATURE_SCHEME
from ..policy import KERNEL_PYTHON, Policy
from ..session import AsyncSession

if TYPE_CHECKING:  # pragma: no cover
    from ..backend.bridge import JupyterAccess

KERNEL_NAME = "kernelexec"
T = TypeVar("T")


class KernelExecProvisioner(KernelProvisionerBase):
    image = Unicode(None, allow_none=True, config=True, help="kernel image (default: the recipe's tag)")
    profile = Unicode(None, allow_none=True, config=True, help="named policy from the profile file")
    transport = Unicode(None, allow_none=True, config=True,
                        help="how the host reaches the kernel: auto, ipc or attach (Policy.transport)")

    session: AsyncSession | None = None
    #: the host-local sockets Jupyter's clients connect to (links over ipc, a bridge over attach)
    access: JupyterAccess | None = None
    _thread: LoopThread | None = None

    @property
    def has_process(self) -> bool:
        return self.session is not None

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on kernelexec's loop thread, where the session lives."""
        assert self._thread is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._thread.loop))

    async def poll(self) -> int | None:
        if self.session is None:
            return 0
        return None if self.session.alive else 1

    async def wait(self) -> int | None:
        """Until the container stops (the kernel exits after a shutdown request)."""
        if self.session is None:
            return 0
        return await self._on_loop(self.session.wait_stopped())

    async def send_signal(self, signum: int) -> None:
        if self.session is None:
            return
        if signum == signal.SIGINT:
            await self._on_loop(self.session.interrupt())
        elif signum in (signal.SIGTERM, signal.SIGKILL):
            await self.kill()
        else:
            raise SandboxError(f"kernelexec kernels take interrupts and kills only, not signal {signum}")

    async def kill(self, restart: bool = False) -> None:
        session, self.session = self.session, None
        access, self.access = self.access, None
        if session is not None or access is not None:
            await self._on_loop(_close(session, access))

    async def terminate(self, restart: bool = False) -> None:
        await self.kill(restart)

    async def cleanup(self, restart: bool = False) -> None:
        try:
            await self.kill(restart)
        finally:
            if self._thread is not None:
                self._thread = None
                LoopThread.release()

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        # the kernelspec's argv and a host connection file mean nothing here: the sandbox brings its own
        kwargs.pop("extra_arguments", None)
        return await super().pre_launch(cmd=[KERNEL_PYTHON], **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        default_backend().install_exit_hooks()  # from the caller's thread: the session starts on the loop thread
        fields: dict[str, Any] = {k: v for k, v in (("image", self.image), ("transport", self.transport)) if v}
        policy = Policy(**fields) if fields else None  # unset fields stay the profile's
        acquired = self._thread is None
        if acquired:
            self._thread = LoopThread.acquire()
        try:
            session, access = await self._on_loop(_open(policy, self.profile))
        except BaseException:
            if acquired:  # no cleanup() follows a failed launch
                self._thread = None
                LoopThread.release()
            raise
        self.session, self.access = session, access
        assert session.key is not None
        info = cast(KernelConnectionInfo, {
            **access.connection_info,
            # bytes, as KernelManager.get_connection_info() gives it back: launch_kernel's info must equal it
            "key": session.key, "signature_scheme": SIGNATURE_SCHEME, "kernel_name": KERNEL_NAME,
        })
        self.connection_info = info
        return info

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update({"session": self.session.id if self.session else None})
        return info


async def _open(policy: Policy | None, profile: str | None) -> tuple[AsyncSession, JupyterAccess]:
    """A started session, and the host-local sockets Jupyter's clients reach it through."""
    session = AsyncSession(policy, profile=profile, share_channels=True)
    try:
        await session.start()
        return session, await session.jupyter_access()
    except BaseException:
        await session.close()
        raise


async def _close(session: AsyncSession | None, access: JupyterAccess | None) -> None:
    try:
        if access is not None:
            await access.close()
    finally:
        if session is not None:
            await session.close()


def kernelspec(image: str | None = None, profile: str | None = None, transport: str | None = None) -> dict[str, Any]:
    config = {k: v for k, v in (("image", image), ("profile", profile), ("transport", transport)) if v}
    return {
        # absolute in-image path: jupyter_client rewrites a bare `python` to the host's interpreter
        "argv": [KERNEL_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (kernelexec sandbox)",
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {"kernel_provisioner": {"provisioner_name": "kernelexec-provisioner", "config": config}},
    }


def install_kernelspec(*, user: bool = True, prefix: str | None = None, image: str | None = None,
                       profile: str | None = None, transport: str | None = None) -> str:
    """Install the "kernelexec" kernelspec; ``transport`` pins ``Policy.transport`` (default: auto)."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(kernelspec(image, profile, transport), indent=2))
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
