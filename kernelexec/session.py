"""Sessions: one sandboxed kernel each, with state kept across executions.

``AsyncSession`` is the core; ``Session`` runs it on a background event loop
so that synchronous code (scripts, notebooks, most agent tools) gets the same
behaviour with no duplicated logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import secrets
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ._loop import LoopThread
from .auditlog import AuditLog, AuditLogError, code_digest, open_audit_log
from .backend import Backend, ChannelsClosed, EgressHandler, Sandbox, default_backend
from .errors import (
    CodeTooLarge,
    ExecutionTimeout,
    ImageNotFound,
    KernelDied,
    OutputLost,
    ProtocolError,
    ResponseTooLarge,
    SandboxError,
    SandboxStartError,
    SessionClosed,
    SnapshotError,
    SnapshotTooLarge,
    kernel_out_of_memory,
)
from .kernel.client import KernelClient, KernelGone
from .kernel.image import default_image
from .kernel.output import Callbacks
from .kernel.protocol import new_key
from .policy import WORKDIR, Policy, parse_size
from .precheck import CodePolicy
from .profiles import profile_policy, within
from .results import ErrorInfo, Execution, MimeBundle, Stream
from .snapshot import ops as snapshot_ops
from .snapshot.format import DIRECTORIES, Snapshot, encode, split_work, work_for_restore
from .snapshot.store import Claim, PausedSession

if TYPE_CHECKING:  # pragma: no cover
    from .backend.bridge import JupyterAccess
    from .backend.fanout import ChannelHub, SharedChannels
    from .egress.proxy import EgressEvent, EgressProxy

log = logging.getLogger("kernelexec")
T = TypeVar("T")


class AsyncSession:
    """A Jupyter kernel in its own hardened container.

    Use ``async with AsyncSession() as s:``. Every wait has a deadline; every
    failure is a typed error that says whether the kernel's state survived.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        image: str | None = None,
        profile: str | None = None,
        profiles_file: str | os.PathLike[str] | None = None,
        audit_log: str | os.PathLike[str] | AuditLog | None = None,
        precheck: CodePolicy | None = None,
        auto_restart: bool = False,
        share_channels: bool = False,
        backend: Backend | None = None,
    ) -> None:
        """``auto_restart``: when the kernel dies, start a fresh one at once (the
        KernelDied raised says so with ``restarted=True``), so the next call works.
        ``profile`` names a role's policy (see :mod:`kernelexec.profiles`); a ``policy``
        given with it may only tighten it. ``audit_log`` is a JSON-lines file (default
        ``$KERNELEXEC_AUDIT_LOG``). ``precheck`` refuses code before it runs.
        ``share_channels``: let other clients reach this kernel too where the transport offers
        them no sockets (attach), see :meth:`open_channels`; the Jupyter provisioner does. It costs
        a hop per message, so it is off by default. ``backend`` makes the sandboxes (default: the
        Docker engine's; see :mod:`kernelexec.backend`)."""
        if profile is not None:
            ceiling = profile_policy(profile, profiles_file)
            policy = within(policy, ceiling, role=profile) if policy is not None else ceiling
        self.policy = policy or Policy()
        self.profile = profile
        self._image = image or self.policy.image
        self._derived: str | None = None  # the image with policy.packages, once built or found
        self._audit = open_audit_log(audit_log)
        self._precheck = precheck
        self.auto_restart = auto_restart
        self._share_channels = share_channels
        self._hub: ChannelHub | None = None
        self.backend = backend or default_backend()
        #: every execution of this session, in order (for ``to_notebook``); restarts included.
        #: Bounded by ``policy.max_history_bytes``: past it the oldest lose their outputs
        #: (``outputs_dropped``), so hostile output cannot grow the host for the session's life.
        self.history: list[Execution] = []
        self._history_bytes = 0
        self._history_kept = 0  # history[:_history_kept] may still hold outputs
        self.id = secrets.token_hex(6)
        self._sandbox: Sandbox | None = None
        self._egress: EgressProxy | None = None
        self._key: bytes | None = None
        self._client: KernelClient | None = None
        self._dead: KernelDied | None = None
        self._closed = False
        self._lock: asyncio.Lock | None = None
        self.kernel_info: dict[str, Any] = {}
        #: channel -> ZeroMQ endpoint pinned to the verified socket (``ipc:///proc/self/fd/N``)
        self.endpoints: dict[str, str] = {}
        self._paused = False  # the state is in the state directory, no container runs
        self._claim: Claim | None = None  # this process's hold on the session's state directory
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_used = 0.0  # time.monotonic() of the last call that used the kernel (Policy.idle_pause)
        self._idle_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    @property
    def container_id(self) -> str | None:
        return self._sandbox.container_id if self._sandbox else None

    @property
    def socket_dir(self) -> Path | None:
        sockdir = getattr(self._sandbox, "sockdir", None)
        return sockdir.path if sockdir is not None else None

    @property
    def transport(self) -> str | None:
        """How the host reaches the kernel: ``"ipc"`` or ``"attach"`` (see ``Policy.transport``)."""
        return self._sandbox.transport if self._sandbox else None

    @property
    def key(self) -> bytes | None:
        """The kernel's HMAC key, for other Jupyter clients of the same kernel (the provisioner)."""
        return self._key

    @property
    def alive(self) -> bool:
        return self._client is not None and self._client.alive and self._dead is None

    @property
    def paused(self) -> bool:
        """The session's state is in the host's state directory and no container runs; the next call
        resumes it (see :meth:`pause`)."""
        return self._paused

    async def wait_stopped(self) -> int:
        """Until the kernel's sandbox stops, for a Jupyter client that asked the kernel itself to shut
        down (the provisioner); its exit status, 0 when there is none."""
        sandbox = self._sandbox
        return 0 if sandbox is None else await sandbox.wait_stopped()

    async def __aenter__(self) -> AsyncSession:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the container and connect to its kernel, within ``policy.start_timeout``."""
        if self._closed:
            raise SessionClosed("this session was closed; create a new one")
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._sandbox is not None:
            return
        self.backend.install_exit_hooks()  # here, on the caller's thread: it may be the main one
        if (self.policy.packages or self.policy.image_flavour) and self._derived is None:
            # before the start deadline: a first use builds the image, which takes longer than a start
            self._derived = await self.backend.image_with(self._image or default_image(), self.policy.packages,
                                                          self.policy.image_flavour)
        try:
            await asyncio.wait_for(self._start(), self.policy.start_timeout)
            self._log("created", container=self.container_id, image=self._sandbox.image if self._sandbox else None,
                      profile=self.profile, policy_sha256=code_digest(self.policy.to_json()),
                      relaxations=self.policy.relaxations())
        except asyncio.TimeoutError:
            await self._teardown()
            raise SandboxStartError(
                f"the sandbox did not come up within {self.policy.start_timeout:g} s (Policy.start_timeout); "
                "the engine may be overloaded, or the runtime cannot run the kernel. "
                "`kernelexec doctor` checks the engine, the image and the runtime"
            ) from None
        except BaseException:
            await self._teardown()
            raise

    async def _start(self) -> None:
        await self.backend.prepare()
        image = self._derived or self._image or default_image()
        self._key = key = new_key()
        sandbox = self.backend.new_sandbox(self.policy, image, key, self.id, egress=self._egress_handler())
        self._sandbox = sandbox
        try:
            await sandbox.create()
        except ImageNotFound as e:
            if not self._image and os.environ.get("KERNELEXEC_IMAGE") == image:
                raise ImageNotFound(f"{e} (the image was named by $KERNELEXEC_IMAGE={image!r}; unset it to "
                                    "use the image built from this version's recipe)") from e
            raise
        channels = await sandbox.open()
        self.endpoints = dict(sandbox.endpoints)
        if self._share_channels and not self.endpoints:
            from .backend.fanout import ChannelHub

            self._hub = ChannelHub(channels)
            channels = self._hub.owner
        client = KernelClient(key, channels, max_output_bytes=parse_size(self.policy.max_output_bytes))
        self._client = client
        await client.connect()
        try:
            self.kernel_info = await client.wait_ready()
        except (KernelGone, ProtocolError) as e:
            died = await sandbox.death(2.0, cause=str(e))
            if died.oom_killed:  # on attach the channels are up before the kernel has loaded
                raise kernel_out_of_memory(self.policy.memory, "while starting") from e
            raise SandboxStartError(f"the kernel ended while starting ({died.reason})") from e

    def _egress_handler(self) -> EgressHandler | None:
        """The session's egress proxy (one for the session's life: its byte budget spans restarts)."""
        if not self.policy.egress:
            return None
        if self._egress is None:
            from .egress.proxy import EgressProxy

            self._egress = EgressProxy.for_policy(self.policy, self._on_egress)
        return self._egress.handle

    def _on_egress(self, event: EgressEvent) -> None:
        log.debug("session %s: egress %s %s:%d %s (%s)", self.id, event.verdict, event.host, event.port,
                  event.address, event.reason)
        self._log("egress", **dataclasses.asdict(event))

    @property
    def egress_bytes(self) -> int:
        """Bytes through this session's egress proxy so far, both ways (what ``egress_max_bytes`` bounds)."""
        return self._egress.bytes_used if self._egress is not None else 0

    def __repr__(self) -> str:
        return _describe(self, "AsyncSession")

    async def close(self) -> None:
        """Stop and remove the container, its volume and the socket directory."""
        if self._closed:
            return
        self._closed = True
        had = self._sandbox is not None or self._claim is not None
        await self._stop_idle_timer()
        try:
            await self._teardown()
        finally:
            egress, self._egress = self._egress, None
            claim, self._claim = self._claim, None
            if claim is not None:  # this process owned it (resumed, or paused on idle): the session ends here
                claim.remove()
            if egress is not None:
                await egress.aclose()
        if had:
            self._log("closed")

    def _log(self, event: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.write(event, self.id, **fields)

    async def _teardown(self) -> None:
        client, self._client = self._client, None
        hub, self._hub = self._hub, None
        sandbox, self._sandbox = self._sandbox, None
        if client is not None:
            await client.close()
        if hub is not None:
            await hub.close()  # closed with the client's channels already, unless the client never came
        if sandbox is not None:
            await sandbox.destroy()

    async def restart(self) -> None:
        """A fresh kernel in a fresh container: nothing the old code left behind survives."""
        if self._lock is None:
            await self.start()
            return
        async with self._lock:
            await self._restart_unlocked()

    async def _restart_unlocked(self) -> None:
        if self._closed:
            raise SessionClosed("this session was closed; create a new one")
        await self._resume_if_paused()  # a paused session is this object's again, then starts afresh
        await self._teardown()
        self._dead = None
        await self.start()
        self._log("restarted", container=self.container_id)

    # -- execution -----------------------------------------------------------------

    def _require(self) -> KernelClient:
        if self._closed:
            raise SessionClosed("this session was closed; create a new one")
        if self._dead is not None:
            raise self._dead.again()
        if self._client is None:
            raise SandboxError("the session is not started; use `async with AsyncSession()` or call start()")
        return self._client

    async def execute(
        self,
        code: str,
        *,
        timeout: float | None = None,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
        on_result: Callable[[MimeBundle], None] | None = None,
    ) -> Execution:
        """Run ``code`` in the kernel and return everything it produced.

        ``timeout`` defaults to ``policy.timeout``. On timeout the kernel is
        interrupted and :class:`ExecutionTimeout` is raised; if the interrupt
        does not take within ``policy.interrupt_grace`` the kernel is replaced
        and the error says the state was lost.
        """
        if self._lock is None:
            await self.start()
        assert self._lock is not None
        async with self._lock:
            await self._resume_if_paused()
            client = self._require()
            if not client.alive:  # the transport went while idle: re-attach if the kernel lives
                client = await self._revive(client)
            self._arm_idle_timer()
            if self._precheck is not None:
                refusals = self._precheck.check(code)
                if refusals:
                    self._log("refused", code_sha256=code_digest(code), reasons=[str(r) for r in refusals])
                    reason = "; ".join(str(r) for r in refusals)
                    return Execution(code=code, status="refused",
                                     outputs=[ErrorInfo("CodeRefused", reason,
                                                        f"CodeRefused: the pre-check refused this code: {reason}")])
            limit = parse_size(self.policy.max_message_bytes) - REQUEST_OVERHEAD
            size = _wire_size(code)
            if size > limit:
                self._log("refused", code_sha256=code_digest(code), reasons=[f"code of {size} bytes"])
                raise CodeTooLarge(size, limit)
            ex = await self._exchange(client, code, timeout, Callbacks(on_stdout, on_stderr, on_result))
            self._remember(ex)
            if self._audit is not None:
                try:
                    self._log("executed", code_sha256=code_digest(code), code_bytes=size,
                              duration=round(ex.duration, 4), status=ex.status,
                              error=ex.error.ename if ex.error else None, truncated=ex.truncated,
                              peak_memory_bytes=ex.memory_peak, peak_memory_from="kernel")
                except AuditLogError as e:
                    e.execution = ex
                    raise
            return ex

    async def _exchange(self, client: KernelClient, code: str, timeout: float | None, callbacks: Callbacks, *,
                        silent: bool = False) -> Execution:
        """One execute_request and its outputs, with the session's answers to a timeout, a cancel and a
        lost kernel; under the lock. ``silent``: kernelexec's own code (snapshots), out of the kernel's
        history and output cache."""
        timeout = self.policy.timeout if timeout is None else timeout
        try:
            return await self._exchange_once(client, code, timeout, callbacks, silent)
        finally:
            self._last_used = time.monotonic()  # idle is counted from the end of the last call

    async def _exchange_once(self, client: KernelClient, code: str, timeout: float | None, callbacks: Callbacks,
                             silent: bool) -> Execution:
        try:
            try:
                msg_id = await client.submit(code, callbacks, silent=silent)
            except KernelGone:  # the request never reached the kernel: re-attach and send it again
                client = await self._revive(client)
                msg_id = await client.submit(code, callbacks, silent=silent)
            try:
                return await client.finish(msg_id, timeout)
            except asyncio.TimeoutError:
                assert timeout is not None
                await self._on_timeout(client, msg_id, timeout, code)
            except asyncio.CancelledError:
                # the caller gave up (a cancelled agent turn, Ctrl-C): stop the code too,
                # so the kernel is free and its state intact for the next call
                await asyncio.shield(self._on_cancel(client, msg_id, code))
                raise
        except (KernelGone, ProtocolError) as e:
            lost = await self._reattach(e) if isinstance(e, KernelGone) else None
            if lost is not None:
                self._log("reattached", code_sha256=code_digest(code), frames_lost=lost)
                raise OutputLost(lost) from e
            died = await self._died(e)
            self._log("killed", code_sha256=code_digest(code), reason=died.reason, exit_code=died.exit_code,
                      oom_killed=died.oom_killed, lost=type(died).__name__)
            if self.auto_restart:
                await self._restart_unlocked()
                raise died.again(restarted=True) from e
            raise died from e

    def _remember(self, ex: Execution) -> None:
        """Append to history, then drop the oldest outputs until the kept ones fit the budget."""
        self.history.append(ex)
        self._history_bytes += _history_cost(ex)
        budget = parse_size(self.policy.max_history_bytes)
        while self._history_bytes > budget and self._history_kept < len(self.history):
            old = self.history[self._history_kept]
            self._history_kept += 1
            if old.outputs_dropped:
                continue
            cost = _history_cost(old)
            # a new object: the caller may still hold the Execution it was given
            self.history[self._history_kept - 1] = _without_outputs(old, cost)
            self._history_bytes -= cost - _history_cost(self.history[self._history_kept - 1])

    def to_notebook(self) -> Any:
        """An nbformat v4 notebook of every executed cell with its outputs."""
        from .notebook import to_notebook

        return to_notebook(self.history, self.kernel_info)

    async def _on_timeout(self, client: KernelClient, msg_id: str, timeout: float, code: str) -> NoReturn:
        grace = self.policy.interrupt_grace
        partial: Execution | None
        try:
            partial = await self._interrupt_and_finish(client, msg_id, grace)
        except asyncio.TimeoutError:
            partial = client.abandon(msg_id)
            log.warning("session %s: kernel ignored the interrupt; replacing it", self.id)
            self._log("timeout", code_sha256=code_digest(code), timeout=timeout, state_lost=True)
            await self._restart_unlocked()
            raise ExecutionTimeout(timeout, state_lost=True, partial=partial) from None
        self._log("timeout", code_sha256=code_digest(code), timeout=timeout, state_lost=False)
        raise ExecutionTimeout(timeout, state_lost=False, partial=partial)

    async def _interrupt_and_finish(self, client: KernelClient, msg_id: str, grace: float) -> Execution:
        """Interrupt, and once more halfway through the grace: a SIGINT that lands just before a
        blocking call starts (time.sleep right after a flush) is only seen when the call returns, and
        the kernel would be replaced, its state lost, for a race rather than for code that ignores it."""
        await client.interrupt(grace)
        try:
            return await client.finish(msg_id, grace / 2)
        except asyncio.TimeoutError:
            await client.interrupt(grace / 2)
            return await client.finish(msg_id, grace / 2)

    async def _on_cancel(self, client: KernelClient, msg_id: str, code: str) -> None:
        grace = self.policy.interrupt_grace
        try:
            await self._interrupt_and_finish(client, msg_id, grace)
            self._log("interrupted", code_sha256=code_digest(code), cause="cancelled")
        except asyncio.TimeoutError:
            client.abandon(msg_id)
            log.warning("session %s: kernel ignored the interrupt after a cancel; replacing it", self.id)
            self._log("timeout", code_sha256=code_digest(code), cause="cancelled", state_lost=True)
            await self._restart_unlocked()
        except (KernelGone, ProtocolError) as e:
            died = await self._died(e)
            self._log("killed", code_sha256=code_digest(code), reason=died.reason, exit_code=died.exit_code,
                      oom_killed=died.oom_killed, lost=type(died).__name__)

    async def _reattach(self, gone: KernelGone) -> int | None:
        """Recover channels lost while the kernel kept running; frames lost, or None if it cannot."""
        sandbox, old = self._sandbox, self._client
        closed = gone.closed
        if sandbox is None or old is None or not sandbox.can_reattach or closed is None or closed.kernel_exited:
            return None
        if self._hub is not None:  # other clients share these channels: not recovered under them (yet)
            return None
        try:
            lost = await asyncio.wait_for(sandbox.reattach(), self.policy.start_timeout)
            await old.detach()
            assert self._key is not None and sandbox.channels is not None
            client = KernelClient(self._key, sandbox.channels,
                                  max_output_bytes=parse_size(self.policy.max_output_bytes))
            await client.connect()
            self._client = client
            await asyncio.wait_for(client.wait_ready(), self.policy.start_timeout)
        except (ChannelsClosed, KernelGone, ProtocolError, asyncio.TimeoutError) as e:
            log.warning("session %s: re-attaching failed (%s); the kernel is treated as lost", self.id, e)
            return None
        log.warning("session %s: the channels were lost and re-attached; %d frame(s) lost", self.id, lost)
        return lost

    async def _revive(self, client: KernelClient) -> KernelClient:
        """A client whose transport went while no execution ran: re-attach, or report the death."""
        failure = client.failure
        lost = await self._reattach(failure) if isinstance(failure, KernelGone) else None
        if lost is not None and self._client is not None:
            self._log("reattached", frames_lost=lost)
            return self._client
        died = await self._died(failure or KernelGone("the kernel's channels closed"))
        self._log("killed", reason=died.reason, exit_code=died.exit_code, oom_killed=died.oom_killed,
                  lost=type(died).__name__)
        raise died

    async def _died(self, cause: BaseException) -> KernelDied:
        """Turn a lost connection into KernelDied with Docker's reason, and remember it."""
        if isinstance(cause, ProtocolError):
            died = KernelDied(f"the kernel broke the protocol: {cause}")
        elif self._sandbox is not None:
            died = await self._sandbox.death(cause=str(cause))
        else:
            died = KernelDied("the session was torn down")
        self._dead = died
        try:
            await self._teardown()
        except SandboxError as e:
            # the death is what the caller needs to hear; the cleanup is retried at the next start
            log.warning("session %s: %s", self.id, e)
        return died

    async def interrupt(self) -> None:
        """Interrupt the running code (KeyboardInterrupt in the kernel); state is kept."""
        if self._paused:
            return  # nothing runs
        client = self._require()
        self._log("interrupted")
        try:
            await client.interrupt(self.policy.interrupt_grace)
        except asyncio.TimeoutError:
            raise SandboxError(
                f"the kernel did not acknowledge the interrupt within {self.policy.interrupt_grace:g} s; "
                "call restart() for a fresh kernel"
            ) from None
        except (KernelGone, ProtocolError) as e:
            raise await self._died(e) from e

    def open_channels(self) -> SharedChannels:
        """Channels of another client of this kernel, beside the session's own: iopub reaches both,
        each reply the client that asked. For Jupyter's clients where the transport offers no sockets
        on this host (see :mod:`kernelexec.backend.bridge`); close them when done. Needs
        ``share_channels=True``; where there are :attr:`endpoints`, connect to those instead."""
        self._require()
        if self._hub is None:
            raise SandboxError("this session's channels are not shared: create it with share_channels=True"
                               + (" (its kernel has endpoints: connect to those)" if self.endpoints else ""))
        return self._hub.join()

    async def jupyter_access(self) -> JupyterAccess:
        """Host-local sockets through which Jupyter's own clients reach this kernel (the provisioner):
        links to the sockets the session verified where the transport has them on this host (ipc),
        else a bridge over :meth:`open_channels` (attach). Its ``connection_info`` is a connection
        file without the key; close it before the session."""
        from .backend.bridge import EndpointLinks, JupyterBridge

        self._require()
        if self.endpoints:
            return EndpointLinks(self.endpoints)
        return await JupyterBridge.open(self.open_channels(),
                                        max_message_bytes=parse_size(self.policy.max_message_bytes))

    # -- snapshots, fork, pause and resume (issue 16; see kernelexec.snapshot) ------------

    async def snapshot(self, *, include: tuple[str, ...] = ()) -> Snapshot:
        """The session's state as a :class:`~kernelexec.snapshot.Snapshot`: its variables (pickled inside
        the sandbox with dill), the modules it imported, /work, and ``include``'s ``"tmp"``, ``"home"`` and
        ``"site"`` (the packages ``%pip install`` added, in a session with egress; without them a restore
        names the missing modules).
        What could not be saved (generators, open files, threads, sockets, unpicklable objects) is in
        ``.lost`` with the reason, and in the audit log. The session goes on unchanged."""
        unknown = set(include) - set(self._directories())
        if unknown:
            raise ValueError(f"include takes {', '.join(map(repr, self._directories()))}, not {sorted(unknown)}"
                             + (" ('site' exists only with Policy.egress)" if "site" in unknown else ""))
        async with self._running():
            return await self._snapshot_unlocked(tuple(sorted(set(include))))

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """The session's lock, held with the session running (resumed if it was paused) and its idle clock
        started again: a call that uses the kernel."""
        if self._lock is None:
            await self.start()
        assert self._lock is not None
        async with self._lock:
            await self._resume_if_paused()
            self._arm_idle_timer()
            yield

    def _directories(self) -> tuple[str, ...]:
        """The directories a snapshot of this session can hold besides /work (all of them for pause and fork)."""
        return ("home", "site", "tmp") if self.policy.egress else ("home", "tmp")

    async def _snapshot_unlocked(self, include: tuple[str, ...]) -> Snapshot:
        client = self._require()
        sandbox = self._sandbox
        assert sandbox is not None
        limit = parse_size(self.policy.snapshot_size)
        started = time.monotonic()
        stage = f".kernelexec-snapshot-{secrets.token_hex(6)}"
        path = f"{WORKDIR}/{stage}"
        ex = await self._exchange(client, snapshot_ops.call("snapshot", path, limit,
                                                            {name: DIRECTORIES[name] for name in include}),
                                  None, Callbacks(), silent=True)
        try:
            variables, modules, lost = snapshot_ops.snapshot_parts(snapshot_ops.report(ex, "snapshot"))
            try:
                archive = await sandbox.get_archive(WORKDIR, limit + (1 << 20))
            except ResponseTooLarge as e:
                raise SnapshotTooLarge(f"the session's files and variables are over Policy.snapshot_size ({limit:,} "
                                       "bytes); raise it, or delete large files in /work first") from e
        finally:
            if self._client is client and client.alive:
                await self._exchange(client, snapshot_ops.call("cleanup", path), None, Callbacks(), silent=True)
        work, staged = await asyncio.to_thread(split_work, archive, stage)
        sections = {"namespace": staged.get("namespace", b""), "work": work,
                    **{name: staged.get(name, b"") for name in include}}
        manifest = {"session_id": self.id, "created": time.time(), "image": sandbox.image,
                    "kernelexec_version": _version(), "variables": list(variables), "modules": modules,
                    "lost": [dataclasses.asdict(x) for x in lost], "packages": list(self.policy.packages),
                    "sizes": {k: len(v) for k, v in sections.items()}}
        data = await asyncio.to_thread(encode, manifest, sections)
        if len(data) > limit:
            raise SnapshotTooLarge(f"the snapshot would hold {len(data):,} bytes, over Policy.snapshot_size "
                                   f"({limit:,}); raise it, or delete large objects or files first")
        snap = Snapshot.from_bytes(data)
        for item in lost:
            log.warning("session %s: snapshot: %s (%s) not saved: %s", self.id, item.name, item.type, item.reason)
        self._log("snapshot", bytes=len(data), variables=len(variables), modules=sorted(set(modules.values())),
                  lost=[dataclasses.asdict(x) for x in lost], include=list(include),
                  duration=round(time.monotonic() - started, 4))
        return snap

    async def _load(self, snap: Snapshot) -> int:
        assert self._lock is not None
        async with self._lock:
            return await self._load_unlocked(snap)

    async def _load_unlocked(self, snap: Snapshot) -> int:
        """Put ``snap``'s state into this (fresh) sandbox; the number of variables restored."""
        client = self._require()
        sandbox = self._sandbox
        assert sandbox is not None
        stage = f".kernelexec-restore-{secrets.token_hex(6)}"
        # a site directory (packages installed at run time) only where this policy mounts one: elsewhere the
        # modules it held are named as missing
        directories = [name for name in self._directories() if name in snap.offsets]
        extra = {stage: snap.section("namespace"), **{f"{stage}.{name}": snap.section(name) for name in directories}}
        tar = await asyncio.to_thread(work_for_restore, snap.section("work"), sandbox.uid, sandbox.gid, extra)
        try:
            await sandbox.put_archive(WORKDIR, tar)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise SnapshotError(f"the snapshot could not be put into the new sandbox: {e}") from e
            raise SnapshotTooLarge(f"the snapshot's files and variables ({len(tar):,} bytes) do not fit in the new "
                                   f"sandbox's /work (Policy.workdir_size={self.policy.workdir_size!r})") from e
        ex = await self._exchange(client, snapshot_ops.call("restore", f"{WORKDIR}/{stage}", snap.modules,
                                                            {name: DIRECTORIES[name] for name in directories}),
                                  None, Callbacks(), silent=True)
        count = snapshot_ops.restore_outcome(snapshot_ops.report(ex, "restore"), sandbox.image)
        self._log("restored", from_session=snap.session_id, snapshot_created=snap.created, bytes=snap.size,
                  variables=count, lost=[dataclasses.asdict(x) for x in snap.lost])
        return count

    @classmethod
    async def restore(cls, snapshot: Snapshot | bytes | str | os.PathLike[str], policy: Policy | None = None, *,
                      image: str | None = None, profile: str | None = None,
                      profiles_file: str | os.PathLike[str] | None = None,
                      audit_log: str | os.PathLike[str] | AuditLog | None = None, precheck: CodePolicy | None = None,
                      auto_restart: bool = False, backend: Backend | None = None) -> AsyncSession:
        """A new session (a fresh sandbox, made from ``policy``/``profile`` as for any session, never from
        anything in the snapshot) holding ``snapshot``'s state. The snapshot is checked whole before a
        sandbox is made; its pickle is opened only inside the new sandbox. Raises
        :class:`~kernelexec.errors.RestoreError` naming the modules the image lacks."""
        s = cls(policy, image=image, profile=profile, profiles_file=profiles_file, audit_log=audit_log,
                precheck=precheck, auto_restart=auto_restart, backend=backend)
        try:
            snap = await asyncio.to_thread(_as_snapshot, snapshot, parse_size(s.policy.snapshot_size))
            await s.start()
            await s._load(snap)
        except BaseException:
            await s.close()
            raise
        return s

    async def fork(self) -> AsyncSession:
        """A second, independent session with this one's state (variables, /work, /tmp, home) in a new
        sandbox with the same policy. Later changes in either do not reach the other."""
        snap = await self.snapshot(include=self._directories())
        child = type(self)(self.policy, image=self._image, audit_log=self._audit, precheck=self._precheck,
                           auto_restart=self.auto_restart, backend=self.backend)
        child.profile = self.profile
        try:
            await child.start()
            await child._load(snap)
        except BaseException:
            await child.close()
            raise
        self._log("forked", into=child.id)
        return child

    async def pause(self) -> Snapshot:
        """Save the session's state to the host's state directory and remove its container (its memory is
        freed); returns the snapshot (see ``.lost``). Any process can then resume it by id with
        :meth:`resume`; this object resumes it on its next call if no other process has. A paused session
        outlives this object and its process: :meth:`close` leaves it paused; ``kernelexec gc`` expires it."""
        if self._lock is None:
            await self.start()
        assert self._lock is not None
        async with self._lock:
            if self._closed:
                raise SessionClosed("this session was closed; create a new one")
            snap = await self._pause_unlocked(handoff=True)
        return snap

    async def _pause_unlocked(self, *, handoff: bool) -> Snapshot:
        await self._resume_if_paused()
        snap = await self._snapshot_unlocked(self._directories())
        claim = self._claim if self._claim is not None else await asyncio.to_thread(Claim, self.id)
        record = PausedSession(id=self.id, paused_at=time.time(), policy=self.policy.to_json(), image=self._image,
                               profile=self.profile, size=snap.size, variables=len(snap.variables),
                               lost=len(snap.lost))
        try:
            await asyncio.to_thread(claim.save, snap, record)
        except BaseException:
            if claim is not self._claim:
                claim.release()
            raise
        await self._teardown()
        self._paused = True
        if handoff:
            claim.release()  # any process may resume it now
            self._claim = None
        else:
            self._claim = claim  # paused on idle: still this object's, resumed by its next call
        self._log("paused", bytes=snap.size, variables=len(snap.variables), lost=len(snap.lost), handoff=handoff)
        return snap

    async def _wake(self) -> None:
        """For calls that do not hold the lock (files): resume a paused session, restart the idle clock."""
        if self._paused:
            await self.unpause()
        if self._lock is not None:
            self._arm_idle_timer()

    async def _resume_if_paused(self) -> None:
        """Under the lock: make a paused session run again, from the state directory."""
        if not self._paused:
            return
        if self._closed:
            raise SessionClosed("this session was closed; create a new one")
        claim = self._claim if self._claim is not None else await asyncio.to_thread(Claim, self.id)
        try:
            snap, _ = await asyncio.to_thread(claim.load, parse_size(self.policy.snapshot_size))
            await self.start()
            await self._load_unlocked(snap)
        except BaseException:
            if claim is not self._claim:
                claim.release()
            await self._teardown()  # still paused: the state directory is unchanged
            raise
        self._claim = claim
        self._paused = False
        self._log("resumed", paused_at=snap.created)

    async def unpause(self) -> None:
        """Run this paused session again now, from the state directory, rather than at its next call: the
        wait for the new sandbox, or :class:`~kernelexec.errors.SessionBusy` when another process resumed
        it meanwhile, come here. A session that is not paused is left as it is."""
        if self._closed:
            raise SessionClosed("this session was closed; create a new one")
        async with self._running():
            pass

    @classmethod
    async def resume(cls, session_id: str, *, audit_log: str | os.PathLike[str] | AuditLog | None = None,
                     precheck: CodePolicy | None = None, auto_restart: bool = False,
                     backend: Backend | None = None) -> AsyncSession:
        """The paused session ``session_id`` (``kernelexec ps`` lists them), running again in a new sandbox
        with the policy, profile and image it had, in this process (which holds it until it is closed or
        paused). Raises :class:`~kernelexec.errors.SessionBusy` when another process holds it."""
        claim = await asyncio.to_thread(Claim, session_id)
        try:
            snap, record = await asyncio.to_thread(claim.load, None)
            try:
                policy = Policy.from_json(record.policy)
            except ValueError as e:
                raise SnapshotError(f"session {session_id}'s record holds no usable policy ({e})") from None
            if snap.size > parse_size(policy.snapshot_size):
                raise SnapshotTooLarge(f"session {session_id}'s snapshot is over its Policy.snapshot_size")
            s = cls(policy, image=record.image, audit_log=audit_log, precheck=precheck, auto_restart=auto_restart,
                    backend=backend)
        except BaseException:
            claim.release()
            raise
        s.id, s.profile, s._claim = session_id, record.profile, claim
        try:
            await s.start()
            await s._load(snap)
        except BaseException:
            s._claim = None  # closing must not remove the paused state: the resume failed, not the session
            claim.release()
            await s.close()
            raise
        s._log("resumed", paused_at=record.paused_at)
        return s

    def _arm_idle_timer(self) -> None:
        """(Re)start the idle clock of ``Policy.idle_pause``; called at each call that uses the kernel."""
        if self.policy.idle_pause is None or self._closed:
            return
        self._last_used = time.monotonic()
        self._schedule_idle(self.policy.idle_pause)

    def _schedule_idle(self, delay: float) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(delay, self._idle_due)

    def _idle_due(self) -> None:
        self._idle_timer = None
        if self._idle_task is None or self._idle_task.done():
            self._idle_task = asyncio.get_running_loop().create_task(self._idle_pause())

    async def _idle_pause(self) -> None:
        assert self._lock is not None
        async with self._lock:
            if self._closed or self._paused or self._sandbox is None or self._idle_timer is not None:
                return  # closed, paused, or used again since the timer fired
            assert self.policy.idle_pause is not None
            remaining = self.policy.idle_pause - (time.monotonic() - self._last_used)
            if remaining > 0:  # a call ran past the timer (a long execution): idle counts from its end
                self._schedule_idle(remaining)
                return
            try:
                await self._pause_unlocked(handoff=False)
            except (SnapshotError, SandboxError, KernelDied) as e:
                # the session runs on, unchanged; said in the log and the audit log, retried at the next idle
                log.warning("session %s: pausing on idle failed: %s", self.id, e)
                self._log("pause_failed", reason=str(e)[:500])

    async def _stop_idle_timer(self) -> None:
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()
        task, self._idle_task = self._idle_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- is_complete (issue 11, REPL continuation lines) ------------------------------

    async def complete_status(self, code: str) -> str:
        """Whether ``code`` is a whole input, in the kernel's own words: ``"complete"``,
        ``"incomplete"`` (a console asks for another line), ``"invalid"`` or ``"unknown"``."""
        if self._lock is None:
            await self.start()
        assert self._lock is not None
        async with self._lock:
            await self._resume_if_paused()
            client = self._require()
            try:
                return await client.complete_status(code, self.policy.interrupt_grace)
            except (KernelGone, ProtocolError) as e:
                raise await self._died(e) from e

    # -- files ---------------------------------------------------------------------

    async def upload(self, src: str | os.PathLike[str] | bytes, dest: str) -> str:
        """Copy a host file (or bytes) into the working directory. Returns the path inside.

        Goes through the engine's archive API: no host directory is mounted.
        """
        await self._wake()
        self._require()
        assert self._sandbox is not None and self._sandbox.container_id is not None
        data = src if isinstance(src, bytes) else await asyncio.to_thread(Path(src).read_bytes)
        target = _in_workdir(dest)
        limit = parse_size(self.policy.workdir_size)
        if len(data) > limit:
            raise SandboxError(f"{len(data)} bytes do not fit in the working directory "
                               f"(Policy.workdir_size={self.policy.workdir_size!r})")
        tar = _tar_one(target, data, self._sandbox.uid, self._sandbox.gid)
        try:
            await self._sandbox.put_archive(WORKDIR, tar)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise SandboxError(f"upload to {target} failed: {e}") from e
            # the engine wrote what fitted: an empty file in its place says plainly that nothing arrived
            await self._sandbox.put_archive(WORKDIR, _tar_one(target, b"", self._sandbox.uid, self._sandbox.gid))
            raise SandboxError(
                f"upload to {target} failed: the working directory is full ({len(data):,} bytes did not fit "
                f"in Policy.workdir_size={self.policy.workdir_size!r} with what is there). {target} was left "
                "empty; delete files in the sandbox or raise Policy.workdir_size") from e
        return str(target)

    async def download(self, src: str) -> bytes:
        """Read one regular file from the working directory (bounded by its size)."""
        await self._wake()
        self._require()
        assert self._sandbox is not None and self._sandbox.container_id is not None
        path = _in_workdir(src)
        limit = parse_size(self.policy.workdir_size)
        tar = await self._sandbox.get_archive(str(path), limit + (1 << 20))
        return _untar_one(tar, path)


def _as_snapshot(source: Snapshot | bytes | str | os.PathLike[str], max_bytes: int) -> Snapshot:
    """A checked snapshot from what ``restore`` was given (checked again if it came as an object: it may
    have been built by hand)."""
    if isinstance(source, Snapshot):
        return Snapshot.from_bytes(source.data, max_bytes=max_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Snapshot.from_bytes(bytes(source), max_bytes=max_bytes)
    return Snapshot.load(source, max_bytes=max_bytes)


def _version() -> str:
    from . import __version__

    return __version__


def _describe(s: AsyncSession, face: str) -> str:
    state = ("closed" if s._closed else "paused" if s._paused else "dead" if s._dead is not None else
             "running" if s._client is not None else "not started")
    parts = [f"id={s.id}", state]
    if s.container_id:
        parts.append(f"container={s.container_id[:12]}")
    if s.profile:
        parts.append(f"profile={s.profile}")
    parts.append(f"executions={len(s.history)}")
    return f"<{face} {' '.join(parts)}>"


#: What an execute_request's content holds besides its code, with room to spare.
REQUEST_OVERHEAD = 4096


def _wire_size(code: str) -> int:
    """The code's size as sent: JSON-escaped (a control character is six bytes), the bound every
    transport's frames are held to, on the way in as on the way out."""
    try:
        return len(json.dumps(code, ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates travel as \u escapes
        return len(json.dumps(code, ensure_ascii=True))


#: Code kept in full in a history entry whose outputs were dropped; longer code keeps its digest.
_HISTORY_CODE = 64 * 1024


def _history_cost(ex: Execution) -> int:
    """What an execution holds on the host, about: its code and its outputs."""
    out = 0
    for o in ex.outputs:
        if isinstance(o, MimeBundle):
            out += sum(len(v) if isinstance(v, str) else 64 for v in o.data.values()) + 64
        else:
            out += len(getattr(o, "text", "")) + len(getattr(o, "traceback", "")) + 64
    return len(ex.code) + out + 256


def _without_outputs(ex: Execution, cost: int) -> Execution:
    code = ex.code if len(ex.code) <= _HISTORY_CODE else (
        f"# [kernelexec: {len(ex.code):,} characters of code dropped from the session history; "
        f"sha256 {code_digest(ex.code)}]")
    note = Stream("stderr", f"[kernelexec: the outputs of this execution (about {cost:,} bytes) were dropped "
                            "from the session history to stay within Policy.max_history_bytes]\n")
    return dataclasses.replace(ex, code=code, outputs=[note], outputs_dropped=True)


def _in_workdir(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not p.is_absolute():
        p = PurePosixPath(WORKDIR) / p
    parts: list[str] = []
    for part in p.parts[1:]:
        if part == "..":
            raise SandboxError(f"{path!r} leaves the working directory; use a path under {WORKDIR}")
        if part != ".":
            parts.append(part)
    p = PurePosixPath("/", *parts)
    if p == PurePosixPath(WORKDIR) or PurePosixPath(WORKDIR) not in p.parents:
        raise SandboxError(f"{path!r} is not a file under {WORKDIR}; files move only in and out of there")
    return p


def _tar_one(target: PurePosixPath, data: bytes, uid: int, gid: int) -> bytes:
    buf = io.BytesIO()
    rel = target.relative_to(WORKDIR)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in reversed(list(rel.parents)[:-1]):
            info = tarfile.TarInfo(str(d))
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o700, uid, gid
            tar.addfile(info)
        info = tarfile.TarInfo(str(rel))
        info.size, info.mode, info.uid, info.gid = len(data), 0o600, uid, gid
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _untar_one(tar: bytes, path: PurePosixPath) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        member = tf.next()
        if member is not None and member.isdir():
            raise IsADirectoryError(f"{path} is a directory; download() reads one file at a time "
                                    "(tar the directory in the sandbox and download the archive)")
        if member is None or not member.isreg():
            raise SandboxError(f"{path} is not a regular file: it is a link or a device, and links are not "
                               "followed out of the sandbox")
        f = tf.extractfile(member)
        assert f is not None
        return f.read()


class Session:
    """The synchronous face of :class:`AsyncSession`: same API, no ``await``.

    The I/O runs on a shared background event loop; callbacks are called on
    that loop's thread.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        image: str | None = None,
        profile: str | None = None,
        profiles_file: str | os.PathLike[str] | None = None,
        audit_log: str | os.PathLike[str] | AuditLog | None = None,
        precheck: CodePolicy | None = None,
        auto_restart: bool = False,
        backend: Backend | None = None,
    ) -> None:
        self._async = AsyncSession(policy, image=image, profile=profile, profiles_file=profiles_file,
                                   audit_log=audit_log, precheck=precheck, auto_restart=auto_restart,
                                   backend=backend)
        self._async.backend.install_exit_hooks()  # from the caller's thread: the sandbox is made on the loop thread
        self._loop = LoopThread.acquire()
        self._owns_loop = True
        self._closed = False
        try:
            self._run(self._async.start())
        except BaseException:
            self._closed = True
            LoopThread.release()
            raise

    @classmethod
    def _adopt(cls, session: AsyncSession, loop: LoopThread) -> Session:
        """Wrap a started AsyncSession (from a pool, which keeps the loop alive)."""
        self = cls.__new__(cls)
        self._async, self._loop, self._owns_loop, self._closed = session, loop, False, False
        return self

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed or self._async._closed:  # closed here, or by its pool
            coro.close()  # never started: no "never awaited" warning
            raise SessionClosed("this session was closed; create a new one")
        return self._loop.run(coro)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def policy(self) -> Policy:
        return self._async.policy

    @property
    def container_id(self) -> str | None:
        return self._async.container_id

    @property
    def socket_dir(self) -> Path | None:
        return self._async.socket_dir

    @property
    def alive(self) -> bool:
        return self._async.alive

    @property
    def transport(self) -> str | None:
        """How the host reaches the kernel: ``"ipc"`` or ``"attach"``."""
        return self._async.transport

    @property
    def egress_bytes(self) -> int:
        """Bytes through this session's egress proxy so far, both ways (what ``egress_max_bytes`` bounds)."""
        return self._async.egress_bytes

    @property
    def kernel_info(self) -> dict[str, Any]:
        """The kernel's ``kernel_info_reply`` content (language, versions, features)."""
        return self._async.kernel_info

    def execute(self, code: str, *, timeout: float | None = None,
                on_stdout: Callable[[str], None] | None = None,
                on_stderr: Callable[[str], None] | None = None,
                on_result: Callable[[MimeBundle], None] | None = None) -> Execution:
        return self._run(self._async.execute(code, timeout=timeout, on_stdout=on_stdout,
                                             on_stderr=on_stderr, on_result=on_result))

    def interrupt(self) -> None:
        self._run(self._async.interrupt())

    def complete_status(self, code: str) -> str:
        return self._run(self._async.complete_status(code))

    @property
    def history(self) -> list[Execution]:
        return self._async.history

    def to_notebook(self) -> Any:
        return self._async.to_notebook()

    def restart(self) -> None:
        self._run(self._async.restart())

    def upload(self, src: str | os.PathLike[str] | bytes, dest: str) -> str:
        return self._run(self._async.upload(src, dest))

    def download(self, src: str) -> bytes:
        return self._run(self._async.download(src))

    # -- snapshots, fork, pause and resume: see AsyncSession -------------------------

    @property
    def paused(self) -> bool:
        return self._async.paused

    def snapshot(self, *, include: tuple[str, ...] = ()) -> Snapshot:
        return self._run(self._async.snapshot(include=include))

    def pause(self) -> Snapshot:
        return self._run(self._async.pause())

    def unpause(self) -> None:
        """Run this paused session again now (see :meth:`AsyncSession.unpause`)."""
        self._run(self._async.unpause())

    def fork(self) -> Session:
        """A second, independent session with this one's state (see :meth:`AsyncSession.fork`)."""
        return self._made(self._async.backend, self._async.fork)

    @classmethod
    def restore(cls, snapshot: Snapshot | bytes | str | os.PathLike[str], policy: Policy | None = None, *,
                image: str | None = None, profile: str | None = None,
                profiles_file: str | os.PathLike[str] | None = None,
                audit_log: str | os.PathLike[str] | AuditLog | None = None, precheck: CodePolicy | None = None,
                auto_restart: bool = False, backend: Backend | None = None) -> Session:
        """A new session holding ``snapshot``'s state (see :meth:`AsyncSession.restore`)."""
        return cls._made(backend, lambda: AsyncSession.restore(
            snapshot, policy, image=image, profile=profile, profiles_file=profiles_file, audit_log=audit_log,
            precheck=precheck, auto_restart=auto_restart, backend=backend))

    @classmethod
    def resume(cls, session_id: str, *, audit_log: str | os.PathLike[str] | AuditLog | None = None,
               precheck: CodePolicy | None = None, auto_restart: bool = False,
               backend: Backend | None = None) -> Session:
        """The paused session ``session_id``, running again in this process (see :meth:`AsyncSession.resume`)."""
        return cls._made(backend, lambda: AsyncSession.resume(
            session_id, audit_log=audit_log, precheck=precheck, auto_restart=auto_restart, backend=backend))

    @classmethod
    def _made(cls, backend: Backend | None, make: Callable[[], Coroutine[Any, Any, AsyncSession]]) -> Session:
        """A Session around the AsyncSession ``make`` returns, on a loop of its own holding."""
        (backend or default_backend()).install_exit_hooks()
        loop = LoopThread.acquire()
        try:
            inner = loop.run(make())
        except BaseException:
            LoopThread.release()
            raise
        self = cls.__new__(cls)
        self._async, self._loop, self._owns_loop, self._closed = inner, loop, True, False
        return self

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self._async._closed:
                self._loop.run(self._async.close())
        finally:
            self._closed = True
            if self._owns_loop:
                LoopThread.release()

    def __repr__(self) -> str:
        return _describe(self._async, "Session")
