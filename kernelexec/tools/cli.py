"""The ``kernelexec`` command.

Expected failures (no engine, no image, an unreadable file) print one line
that says what to do; a Python traceback means a bug. Exit statuses:

    0    everything ran
    1    the user's code failed (an exception, a failed notebook cell), or a
         finding of high severity (audit)
    2    kernelexec could not do what was asked: a bad argument, an unreadable
         or unwritable file, no engine, no image, a dead kernel
    124  the code ran past --timeout (the run, and its sandbox, ended there)
    130  interrupted (Ctrl-C)
    N    the code called sys.exit(N), exit(N) or raise SystemExit(N): Python's
         status for it (None 0, an int itself, else printed to stderr and 1)

So a script run here exits as it would under ``python FILE.py``; in a notebook
run, a cell's sys.exit ends the run (later cells do not run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from ..errors import ExecutionTimeout, ImageNotFound, KernelDied, KernelExecError
from ..policy import Policy
from ..results import ErrorInfo, Execution, MimeBundle, Stream

if TYPE_CHECKING:  # pragma: no cover
    from ..backend.docker.sessions import SessionInfo
    from ..session import Session
    from ..snapshot import PausedSession

EXIT_OK, EXIT_CODE_FAILED, EXIT_KERNELEXEC_ERROR, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 124, 130
EXIT_CODES_HELP = __doc__.split("Exit statuses:\n\n", 1)[1].split("\n\n", 1)[0] if __doc__ else ""


class CliError(KernelExecError):
    """A bad argument or an unreadable/unwritable file: reported like any expected error."""


# -- shared helpers ---------------------------------------------------------------

def _image(args: argparse.Namespace) -> str | None:
    """The image asked for: ``--image``, else ``$KERNELEXEC_IMAGE``, else None (the library's default)."""
    return args.image or os.environ.get("KERNELEXEC_IMAGE") or None


def _policy(args: argparse.Namespace) -> Policy | None:
    image = _image(args)
    return Policy(image=image) if image else None


def _session(args: argparse.Namespace, **kw: Any) -> Session:
    """A session honouring ``--image``, ``--profile`` and ``--audit-log``.

    With a profile the image goes into the policy, so the profile's check
    (which may pin an image) sees it; ``$KERNELEXEC_IMAGE`` is not applied over
    a profile, since a profile is the stricter statement of intent.
    """
    from ..session import Session

    if args.profile:
        from ..profiles import profile_policy

        policy = profile_policy(args.profile)
        if args.image:
            policy = policy.replace(image=args.image)
        return Session(policy, profile=args.profile, audit_log=args.audit_log, **kw)
    return Session(image=_image(args), audit_log=args.audit_log, **kw)


def _session_policy(args: argparse.Namespace) -> Policy:
    """The policy a session of these options gets (for what doctor reports)."""
    if args.profile:
        from ..profiles import profile_policy

        return profile_policy(args.profile)
    return Policy()


def _echo(stream: TextIO) -> Callable[[str], None]:
    """A callback writing kernel output through as it arrives (flushed: a pipe would hold it back)."""
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()
    return write


#: IPython's advice after a SystemExit in a cell ("To exit: use 'exit', ..."): wrong for a script run
_EXIT_WARNING = re.compile(r"[^\n]*UserWarning: To exit: use 'exit', 'quit', or Ctrl-D\.\n(?:  warn\([^\n]*\n?)?")


def _echo_stderr(stream: TextIO) -> Callable[[str], None]:
    """Like :func:`_echo`, without IPython's exit advice (a script's exit is honoured here)."""
    def write(text: str) -> None:
        text = _EXIT_WARNING.sub("", text)
        if text:
            stream.write(text)
            stream.flush()
    return write


def _scrub_exit_warning(ex: Execution) -> None:
    """Drop IPython's exit advice from what is kept (the notebook written with -o)."""
    for o in ex.outputs:
        if isinstance(o, Stream) and o.name == "stderr":
            o.text = _EXIT_WARNING.sub("", o.text)
    ex.outputs[:] = [o for o in ex.outputs if not (isinstance(o, Stream) and not o.text)]


def exit_status(error: ErrorInfo) -> tuple[int, str | None] | None:
    """The status Python gives a ``SystemExit`` the kernel reported, and what it prints; None if not one.

    Python's rule: ``None`` exits 0, an int exits with itself, anything else
    is printed to stderr and exits 1. The kernel sends only ``str(code)``, so
    a string that spells an int (``sys.exit("3")``) is read as that int.
    """
    if error.ename != "SystemExit":
        return None
    value = error.evalue.strip()
    if value in ("", "None"):
        return 0, None
    if value in ("True", "False"):
        return int(value == "True"), None
    if re.fullmatch(r"[+-]?\d+", value):
        code = int(value)
        return (code & 0xFF, None) if -(2**31) <= code < 2**31 else (1, value)
    return 1, error.evalue


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CliError(f"cannot read {path}: it is not UTF-8 text ({e.reason} at byte {e.start})") from e


def _check_writable(out: Path) -> None:
    """Fail before anything runs when ``-o`` cannot be written (not after every cell did)."""
    existed = out.exists()
    try:
        with out.open("a"):
            pass
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror or e}; nothing was run") from e
    if not existed:
        out.unlink()


def _write_notebook(nb: Any, out: Path) -> None:
    import nbformat

    nbformat.validate(nb)
    try:
        out.write_text(nbformat.writes(nb))
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror or e}") from e


class ResultPrinter:
    """Shows results as they arrive (an ``on_result`` callback), interleaved with stdout in order.

    A terminal cannot show a PNG, so each image is saved to ``save_dir`` when
    given, else the user is told how to keep it.
    """

    def __init__(self, save_dir: Path | None, out: TextIO | None = None) -> None:
        self.save_dir = save_dir
        self.out = out
        self.saved: list[Path] = []

    def __call__(self, bundle: MimeBundle) -> None:
        out = self.out or sys.stdout
        png = bundle.png
        if png is not None:
            print(self._image(png), file=out, flush=True)
        elif bundle.text is not None:
            print(bundle.text, file=out, flush=True)
        elif bundle.data:
            print(f"[{', '.join(sorted(bundle.data))} output: no text/plain form]", file=out, flush=True)

    def _image(self, png: bytes) -> str:
        if self.save_dir is None:
            return f"[image/png, {len(png)} bytes: pass --save-images DIR to save it]"
        path = self.save_dir / f"image-{len(self.saved) + 1}.png"
        try:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        except OSError as e:
            raise CliError(f"cannot save an image to {path}: {e.strerror or e}") from e
        self.saved.append(path)
        return f"[image saved to {path}]"


def _print_error(ex: Execution) -> None:
    err = ex.error
    if err is None:
        return
    status = exit_status(err)
    if status is not None:
        if status[1] is not None:
            print(status[1], file=sys.stderr, flush=True)  # what Python prints for SystemExit("msg")
        return
    if err.ename == "StdinNotImplementedError":
        # the user's frames, not ipykernel's, then what the user can do instead
        mine = re.split(r"\n+File [^\n]*/ipykernel/", err.traceback, maxsplit=1)[0].rstrip()
        print(f"{mine}\n\nStdinNotImplementedError: {NO_INPUT}", file=sys.stderr, flush=True)
        return
    print(err.traceback or str(err), file=sys.stderr, flush=True)


NO_INPUT = "input() is not available in kernelexec sandboxes; pass data as code or upload a file"


def _code_status(ex: Execution) -> int:
    """A run's exit status from its execution: 0, 1, or a script's own SystemExit status."""
    if ex.error is None:
        return EXIT_OK
    status = exit_status(ex.error)
    return status[0] if status is not None else EXIT_CODE_FAILED


class RunTimeout(KernelExecError):
    """A one-shot run passed ``--timeout``: the run ends, and its sandbox with it."""


def _run_timeout(what: str, e: ExecutionTimeout) -> RunTimeout:
    return RunTimeout(f"{what} exceeded its timeout of {e.timeout:g} s; the run was stopped and its sandbox "
                      "removed (raise --timeout to give it longer)")


# -- run ----------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    stdin = args.file == "-"
    path = Path(args.file)
    if not stdin and path.suffix == ".ipynb":
        return _run_notebook(args, path)
    code = sys.stdin.read() if stdin else _read_text(path)
    if args.output:
        _check_writable(Path(args.output))
    printer = ResultPrinter(Path(args.save_images) if args.save_images else None)
    with _session(args) as s:
        try:
            ex = s.execute(code, timeout=args.timeout, on_stdout=_echo(sys.stdout),
                           on_stderr=_echo_stderr(sys.stderr), on_result=printer)
        except ExecutionTimeout as e:
            raise _run_timeout("the code from stdin" if stdin else str(path), e) from None
        _scrub_exit_warning(ex)
        if args.output:
            from ..notebook import to_notebook

            _write_notebook(to_notebook([ex], s.kernel_info), Path(args.output))
    _print_error(ex)
    return _code_status(ex)


class _EndOfRun(Exception):
    """Raised from the per-cell callback to end a notebook run (a cell called sys.exit)."""


def _run_notebook(args: argparse.Namespace, path: Path) -> int:
    from ..notebook import KERNELSPEC, execution_to_outputs, notebook_errors, run_notebook

    nb = _read_notebook(path)
    if args.output:
        _check_writable(Path(args.output))
    else:
        print("note: no -o OUT.ipynb given; outputs are not kept", file=sys.stderr)
    spec = nb.metadata.get("kernelspec") or {}
    if isinstance(spec, dict) and spec.get("name") not in (None, KERNELSPEC["name"]):
        print(f"note: {path.name} names the kernel {spec.get('name')!r}, not 'kernelexec'; its cells run in the "
              "sandbox kernel anyway (a notebook that drives kernelexec from the host runs with "
              "`jupyter nbconvert --execute`, not here)", file=sys.stderr)
    ended: list[int] = []  # the exit status of a cell that called sys.exit
    timed_out = False

    def report(index: int, cell: Any, ex: Execution) -> None:
        nonlocal timed_out
        _scrub_exit_warning(ex)
        cell.outputs = execution_to_outputs(ex)
        print(f"cell {index + 1}/{len(nb.cells)} [{ex.execution_count}]: {ex.status} in {ex.duration:.2f} s",
              file=sys.stderr)
        if any(isinstance(o, ErrorInfo) and o.ename == "ExecutionTimeout" for o in ex.outputs):
            # the cell keeps the library's record; here, the run's own account (it ends with its sandbox
            # unless --allow-errors goes on)
            timed_out = True
            limit = f" of {args.timeout:g} s" if args.timeout else " (the policy's)"
            print(f"kernelexec: cell {index + 1} exceeded its timeout{limit}", file=sys.stderr)
            return
        _print_error(ex)
        status = exit_status(ex.error) if ex.error is not None else None
        if status is not None:
            ended.append(status[0])
            raise _EndOfRun  # as a script ends at sys.exit: later cells do not run, even with --allow-errors

    with _session(args) as s:
        try:
            run_notebook(s, nb, timeout=args.timeout, allow_errors=args.allow_errors, on_cell=report)
        except _EndOfRun:
            nb.metadata["kernelspec"] = dict(KERNELSPEC)
    if args.output:
        _write_notebook(nb, Path(args.output))
        print(f"wrote {args.output}", file=sys.stderr)
    failed = any(o.get("ename") != "SystemExit" for _, o in notebook_errors(nb))
    if timed_out:
        return EXIT_TIMEOUT
    if ended:  # sys.exit(0) after a failed cell (--allow-errors) does not make the run a success
        return ended[0] or (EXIT_CODE_FAILED if failed else EXIT_OK)
    return EXIT_CODE_FAILED if failed else EXIT_OK


def _read_notebook(path: Path) -> Any:
    """The notebook at ``path`` as nbformat v4, or a one-line error saying why it is not one."""
    import nbformat

    text = _read_text(path)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CliError(f"{path} is not a readable notebook: it is not JSON ({e})") from e
    if not isinstance(data, dict) or not (isinstance(data.get("cells"), list) or "worksheets" in data):
        raise CliError(f"{path} is JSON but not a notebook: a notebook is an object with 'cells', 'metadata' "
                       "and 'nbformat' (nbformat v4)")
    try:
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
    # nbformat reports JSON that is not a notebook as whatever its converters hit: a schema error,
    # a ValueError, or a TypeError/AttributeError/KeyError from a value of the wrong type
    except (ValueError, TypeError, AttributeError, KeyError, nbformat.ValidationError) as e:
        detail = str(getattr(e, "message", None) or e).splitlines()[0] if str(e) else type(e).__name__
        raise CliError(f"{path} is not a readable notebook ({detail}); expected nbformat JSON "
                       "with a list of cells") from e
    return nb


# -- repl ---------------------------------------------------------------------------

def read_block(prompt: Callable[[str], str], number: int, interactive: bool,
               status: Callable[[str], str] | None = None) -> str | None:
    """One input: a line, and more lines while the kernel says the code is incomplete.

    ``status`` is the kernel's ``is_complete_request`` (as Jupyter's consoles
    use it): ``x = [1,`` asks for another line, and a compound statement ends
    with a blank line. Without an answer ("unknown"), a line ending in ':' or
    '\\' opens a block that a blank line closes. Returns None at end of input.
    Prompts are shown only on a terminal, so piped input gives output a test
    (or a script) can compare.
    """
    try:
        lines = [prompt(f"In [{number}]: " if interactive else "")]
    except EOFError:
        return None
    while _needs_more(lines, status):
        try:
            lines.append(prompt("   ...: " if interactive else ""))
        except EOFError:
            break  # run what was typed, then the next read ends the session
    return "\n".join(lines)


def _needs_more(lines: list[str], status: Callable[[str], str] | None) -> bool:
    code = "\n".join(lines)
    verdict = status(code) if status is not None and code.strip() else "unknown"
    if verdict == "unknown":
        return lines[0].rstrip().endswith((":", "\\")) and (len(lines) == 1 or bool(lines[-1].strip()))
    return verdict == "incomplete"


#: inputs that leave the REPL, as in Python's and IPython's own
REPL_EXITS = {"exit", "quit", "exit()", "quit()"}


def cmd_repl(args: argparse.Namespace) -> int:
    """An interactive prompt in one sandbox: Ctrl-C interrupts the code (state kept), Ctrl-D leaves."""
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    printer = ResultPrinter(Path(args.save_images) if args.save_images else None)
    status = EXIT_OK
    with _session(args, auto_restart=True) as s:
        if not args.verbose:
            # from here on a warning is news to the user (a kernel replaced after a Ctrl-C)
            logging.getLogger("kernelexec").setLevel(logging.WARNING)
        if interactive:
            print(f"kernelexec sandbox {s.id} (container {(s.container_id or '?')[:12]}); "
                  "Ctrl-C interrupts, Ctrl-D or exit() quits.")
        number = 1
        while True:
            try:
                code = read_block(input, number, interactive, _complete_status(s))
            except KeyboardInterrupt:
                print("\nKeyboardInterrupt (input discarded)", file=sys.stderr)
                continue
            if code is None or code.strip() in REPL_EXITS:
                break
            if code.strip():
                number, ended = _repl_execute(s, code, args.timeout, printer, number)
                if ended is not None:  # the code called sys.exit(): leave, as Python's REPL does
                    status = ended
                    break
    if interactive:
        print()
    return status


def _complete_status(s: Session) -> Callable[[str], str]:
    def status(code: str) -> str:
        try:
            return s.complete_status(code)
        except KernelDied as e:
            s.restart()  # as after a death during execute (auto_restart): the prompt goes on
            print(f"kernelexec: {e.again(restarted=True)}", file=sys.stderr)
            return "unknown"
    return status


def _repl_execute(s: Session, code: str, timeout: float | None, printer: ResultPrinter,
                  number: int) -> tuple[int, int | None]:
    """Run one input; return the next prompt number, and the exit status when the code called sys.exit.

    Errors are shown and the prompt goes on.
    """
    try:
        with CtrlCInterrupts(s):
            ex = s.execute(code, timeout=timeout, on_stdout=_echo(sys.stdout), on_stderr=_echo_stderr(sys.stderr),
                           on_result=printer)
    except KeyboardInterrupt:
        # the second Ctrl-C: execute() was cancelled, which interrupts the kernel once more and
        # replaces it (with a warning) if it still does not stop within the policy's grace
        print("KeyboardInterrupt: stopped waiting for the code", file=sys.stderr)
        return number + 1, None
    except (ExecutionTimeout, KernelDied) as e:
        print(f"kernelexec: {e}", file=sys.stderr)
        return (1 if e.state_lost else number + 1), None
    _print_error(ex)
    ended = exit_status(ex.error) if ex.error is not None else None
    return (ex.execution_count or number) + 1, (ended[0] if ended is not None else None)


class CtrlCInterrupts:
    """While code runs, the first Ctrl-C interrupts the kernel; the second one stops waiting.

    A plain KeyboardInterrupt would abandon ``execute()`` (which then interrupts
    the kernel in the background and loses the execution's outputs). Calling
    ``session.interrupt()`` from the SIGINT handler instead lets ``execute()``
    return normally, with the kernel's own KeyboardInterrupt traceback, as in
    IPython. The handler runs on the main thread while it waits for
    ``execute()``; the interrupt goes through the session's I/O thread.
    Outside the main thread (where signals cannot be handled) it does nothing.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.presses = 0
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> CtrlCInterrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.presses += 1
        if self.presses > 1:
            raise KeyboardInterrupt
        try:
            self.session.interrupt()
        except KernelExecError as e:
            # raising here would abandon execute() with the code still running: say it, keep waiting
            print(f"kernelexec: {e}; press Ctrl-C again to stop waiting", file=sys.stderr, flush=True)


# -- image, ps, gc ------------------------------------------------------------------

def cmd_image_build(args: argparse.Namespace) -> int:
    from .image import build_image

    mode: Literal["auto", "online", "offline"] = "offline" if args.offline else "online" if args.online else "auto"
    start = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True)

    if args.with_ or args.requirements or args.flavour:
        tag = _build_derived(args, progress)
    else:
        if args.find_links or args.no_index or args.index_url or args.base:
            raise CliError("--find-links, --no-index, --index-url and --base are for derived images: add "
                           "--with PKG, --requirements FILE or --flavour NAME")
        tag = build_image(mode=mode, force=args.force, progress=progress)
    print(tag)
    return EXIT_OK


def _build_derived(args: argparse.Namespace, progress: Callable[[str], None]) -> str:
    """``image build --with/--requirements/--flavour``: a derived image (see :mod:`kernelexec.tools.packages`)."""
    from .packages import build_packages, read_requirements

    specs = list(args.with_ or [])
    lock = None
    for file in args.requirements or []:
        more, given_lock = read_requirements(file)
        if given_lock is not None:
            if lock is not None or len(args.requirements) > 1:
                raise CliError("give one lock file (a requirements file pinned by hash), alone")
            lock = given_lock
        specs += more
    if lock is not None and (specs or args.flavour):
        raise CliError(f"{args.requirements[0]} is a lock (every line pinned by hash): it is installed as is, "
                       "so it cannot be combined with --with or --flavour")
    try:
        return build_packages(specs, base=args.base, flavour=args.flavour, lock=lock,
                              mode="online" if args.online else "offline", force=args.force,
                              find_links=args.find_links or [], index_url=args.index_url, no_index=args.no_index,
                              progress=progress)
    except ValueError as e:
        raise CliError(str(e)) from None


def cmd_image_ls(args: argparse.Namespace) -> int:
    from .packages import list_images

    images = list_images()
    if args.json:
        print(json.dumps([asdict(i) for i in images], indent=2))
        return EXIT_OK
    rows = [["TAG", "SIZE", "CREATED", "BASE", "ADDS"]]
    sizes = {i.tag: i.size for i in images}
    for i in images:
        adds = ", ".join(i.packages) if i.packages else "(the kernel image recipe)"
        if i.flavour:
            adds = f"[{i.flavour}] {adds}"
        size = f"{i.size / 1e6:.0f} MB"
        if i.base in sizes:  # the layers it adds; the base's are shared
            size += f" (+{(i.size - sizes[i.base]) / 1e6:.0f})"
        rows.append([i.tag, size, i.created, i.base or "-", adds])
    print(_table(rows))
    return EXIT_OK


def cmd_image_rm(args: argparse.Namespace) -> int:
    from .packages import remove_image

    for tag in args.tags:
        remove_image(tag)
        print(f"removed {tag}")
    return EXIT_OK


def cmd_image_lock(args: argparse.Namespace) -> int:
    from .packages import image_lock

    print(image_lock(args.tag), end="")
    return EXIT_OK


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_ps(args: argparse.Namespace) -> int:
    from ..backend.docker.sessions import list_sessions
    from ..snapshot import store

    sessions = list_sessions(all_hosts=args.all_hosts)
    # a resumed session keeps its state directory while it runs (its owner holds it): it is listed as running
    running = {s.session_id for s in sessions}
    paused = [p for p in store.paused() if p.id not in running]
    if args.json:
        print(json.dumps(ps_json(sessions, paused), indent=2))
    else:
        print(ps_text(sessions, paused, _engine_line, time.time()))
    return EXIT_OK


def _engine_line() -> str:
    from .._loop import run_blocking
    from ..backend.docker.api import api

    kind = run_blocking(api().engine_kind())
    return f"engine: {api().endpoint.describe()}: {kind.describe()}, default runtime {kind.default_runtime}"


def ps_text(sessions: Sequence[SessionInfo], paused: Sequence[PausedSession], engine: Callable[[], str],
            now: float) -> str:
    """``kernelexec ps``: the engine and its sessions' containers, then the paused sessions. ``engine`` is
    asked only when a session runs (naming the engine is an extra round trip)."""
    if not sessions and not paused:
        return "no kernelexec sessions"
    if sessions:
        rows = [["SESSION", "CONTAINER", "STATUS", "TRANSPORT", "RUNTIME", "OWNER", "HOST", "CREATED", "IMAGE"]]
        rows += [[s.session_id, s.container_id[:12], s.status, s.transport, s.runtime or "default",
                  f"{s.owner_pid}{'' if s.owner_alive else ' (gone)'}", s.host, s.created, s.image] for s in sessions]
        parts = [engine(), _table(rows)]
    else:
        parts = ["no running kernelexec sessions"]
    if paused:
        from ..snapshot.store import state_dir

        parts += ["", f"paused sessions in {state_dir()} (`kernelexec gc` removes those that expired):",
                  paused_table(paused, now)]
    return "\n".join(parts)


def _iso(epoch: float) -> str:
    """A time as the CREATED column shows it (the container label's form)."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _held(holder: int | None) -> str:
    """The STATE column: whether a process owns the paused session (it cannot be resumed elsewhere then)."""
    if holder is None:
        return "paused"
    return "held (pid unknown)" if holder < 0 else f"held by pid {holder}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n / 1e3:.0f} kB"


def paused_table(paused: Sequence[PausedSession], now: float) -> str:
    """``kernelexec ps``'s table of paused sessions; STATE is "paused" (any process may resume it) or the
    pid holding it (it resumed the session, or paused it on idle and resumes it at its next call)."""
    from ..snapshot.store import age

    rows = [["SESSION", "PAUSED", "SIZE", "VARIABLES", "LOST", "STATE", "IMAGE"]]
    rows += [[p.id, f"{_iso(p.paused_at)} ({age(max(0.0, now - p.paused_at))} ago)", _size(p.size),
              str(p.variables), str(p.lost), _held(p.holder), p.image or "default"] for p in paused]
    return _table(rows)


def ps_json(sessions: Sequence[SessionInfo], paused: Sequence[PausedSession]) -> list[dict[str, Any]]:
    """``ps --json``: one object a session, ``state`` telling which kind. "running": it has a container
    (``status`` is the engine's word for the container); "paused": its state is in the state directory,
    ``holder`` the pid that owns it (-1: a process whose pid is unknown), null when any process may resume it."""
    out: list[dict[str, Any]] = [{"state": "running", **asdict(s)} for s in sessions]
    out += [{"state": "paused", "session_id": p.id, "paused_at": _iso(p.paused_at), "size": p.size,
             "variables": p.variables, "lost": p.lost, "holder": p.holder, "image": p.image, "profile": p.profile,
             "path": str(p.path)} for p in paused]
    return out


def duration(value: str) -> float:
    """``--paused-older-than``'s reading of a duration; argparse turns the error into a usage line."""
    from ..snapshot.store import parse_duration

    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_gc(args: argparse.Namespace) -> int:
    from ..backend.docker.sessions import gc
    from ..snapshot import store

    try:
        ttl = store.paused_ttl() if args.paused_older_than is None else args.paused_older_than
    except ValueError as e:
        raise CliError(f"{e}; fix or unset it, or pass --paused-older-than") from None
    report = gc(everything=args.all)
    expired = store.expire(ttl)
    if args.json:
        print(json.dumps(asdict(report) | {"state_dir": str(store.state_dir()), "paused_older_than": ttl,
                                           "expired": expired}, indent=2))
    else:
        print(f"removed {len(report.containers)} container(s), {len(report.volumes)} volume(s), "
              f"{len(report.socket_dirs)} socket dir(s)")
        for kind, items in (("container", report.containers), ("volume", report.volumes),
                            ("socket dir", report.socket_dirs)):
            for item in items:
                print(f"  {kind} {item}")
        print(f"removed {len(expired)} item(s) from {store.state_dir()}: paused sessions no process holds, paused "
              f"more than {store.age(ttl)} ago, and partial snapshot files")
        for line in expired:
            print(f"  {line}")
    for err in report.errors:
        print(f"kernelexec gc: {err}", file=sys.stderr)
    return EXIT_CODE_FAILED if report.errors else EXIT_OK


# -- doctor -------------------------------------------------------------------------

class Doctor:
    """Runs checks in order, printing PASS/FAIL/SKIP lines; a FAIL line says what to fix.

    Later checks need earlier ones (no engine, no image check), so a check
    whose prerequisite failed is skipped, not failed again with a confusing message.
    """

    def __init__(self) -> None:
        self.failed = 0

    def check(self, name: str, fn: Callable[[], str], *, needs: bool = True) -> bool:
        if not needs:
            print(f"SKIP  {name}: an earlier check failed", flush=True)
            return False
        try:
            detail = fn()
        except _Absent as e:  # an optional feature is missing: said, not failed
            print(f"INFO  {name}: {e}", flush=True)
            return False
        except KernelExecError as e:
            return self._fail(name, str(e))
        except Exception as e:  # reported as a FAIL line with its type: doctor must get to its summary
            return self._fail(name, f"{type(e).__name__}: {e}")
        print(f"PASS  {name}: {detail}", flush=True)
        return True

    def _fail(self, name: str, why: str) -> bool:
        self.failed += 1
        print(f"FAIL  {name}: {why}", flush=True)
        return False


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check, in order, what a session needs; say how to fix each thing missing."""
    d = Doctor()
    found = d.check("engine endpoint (DOCKER_HOST, DOCKER_CONTEXT, docker contexts)", _check_endpoint)
    engine = d.check("engine reachable", _check_engine, needs=found)
    transport = d.check("transport for sessions", lambda: _check_transport(args), needs=found)
    if transport and _transport(args)[0] == "ipc":
        d.check("socket root writable, paths short enough", _check_socket_root)
    image = _image(args) or _default_tag()
    present = d.check("kernel image present", lambda: _check_image(image), needs=engine)
    d.check("sandbox works (start, 1+1, close)", lambda: _check_smoke(args), needs=present)
    d.check("gVisor runtime (runsc)", _check_runsc, needs=engine)
    print("all good" if not d.failed else "fix the FAIL lines above, then run `kernelexec doctor` again")
    return EXIT_OK if not d.failed else EXIT_CODE_FAILED


def _check_endpoint() -> str:
    from ..backend.docker.api import api

    endpoint = api().endpoint
    endpoint.require_supported()
    return endpoint.describe()


def _transport(args: argparse.Namespace) -> tuple[str, str]:
    from ..backend import choose_transport

    return choose_transport(_session_policy(args))


def _check_transport(args: argparse.Namespace) -> str:
    transport, why = _transport(args)
    return f"{transport}: {why}"


class _Absent(Exception):
    """An optional feature is not there; doctor says so without failing."""


def _check_runsc() -> str:
    """Is runsc registered with the engine, and on which gVisor platform will it run (from /info Runtimes)."""
    import re
    import shutil
    import subprocess

    from .._loop import run_blocking
    from ..backend.docker.api import api

    info = run_blocking(api().call("GET", "/info", what="engine info"))
    runtime = (info.get("Runtimes") or {}).get("runsc")
    if not isinstance(runtime, dict):
        raise _Absent("not registered with the engine, so Policy(runtime='runsc') fails; scripts/setup.sh "
                      "installs Debian's runsc and registers it (daemon.json runtimes, args --network=none)")
    args = [str(a) for a in runtime.get("runtimeArgs") or []]
    platform = next((a.split("=", 1)[1] for a in args if a.startswith(("--platform=", "-platform="))), None)
    if platform is None and "--platform" in args[:-1]:
        platform = args[args.index("--platform") + 1]
    if platform is None:
        binary = shutil.which(str(runtime.get("path") or "runsc")) if api().endpoint.is_local else None
        found = None
        if binary:
            flags = subprocess.run([binary, "flags"], capture_output=True, text=True, timeout=30, check=False)
            found = re.search(r'-platform string\n.*?\(default "([^"]+)"\)', flags.stdout + flags.stderr)
        platform = f"{found.group(1)} (runsc's default)" if found else "runsc's default (not visible from here)"
    return f"registered: {runtime.get('path')} {' '.join(args)}".rstrip() + f"; platform {platform}"


def _check_engine() -> str:
    from .._loop import run_blocking
    from ..backend.docker.api import api

    kind = run_blocking(api().engine_kind())
    return f"{kind.describe()}, API {kind.api_version}, default runtime {kind.default_runtime}"


def _check_socket_root() -> str:
    """The real thing: create a socket directory as a session would (it checks the path length)."""
    from ..backend.sockdir import SocketDir, socket_root

    root = socket_root()
    try:
        probe = SocketDir(os.getuid(), os.getgid())
    except OSError as e:
        raise CliError(f"cannot create a directory in {root} ({e.strerror or e}); "
                       "set KERNELEXEC_SOCKET_ROOT to a writable directory with a short path") from e
    probe.remove()
    return f"{root} (socket paths like {probe.path}/k-5 fit)"


def _default_tag() -> str:
    from .image import image_tag

    return image_tag()


def _check_image(image: str) -> str:
    from .image import image_present

    if not image_present(tag=image):
        raise CliError(f"{image} is not on the engine: run `kernelexec image build` (or pass --image)")
    return image


def _check_smoke(args: argparse.Namespace) -> str:
    t0 = time.monotonic()
    with _session(args) as s:
        text = s.execute("1 + 1", timeout=30).text
    if text != "2":
        raise CliError(f"1 + 1 gave {text!r} in the sandbox; the image's kernel is broken, rebuild it with "
                       "`kernelexec image build --force`")
    return f"ok in {time.monotonic() - t0:.2f} s"


# -- audit, mcp, kernelspec -----------------------------------------------------------

def cmd_audit(args: argparse.Namespace) -> int:
    if args.agents:
        return _audit_agents(args)
    from ..profiles import profile_policy
    from .audit import format_table, run_audit, to_json

    policy = profile_policy(args.profile, args.profiles) if args.profile else _policy(args)
    audit_findings = run_audit(policy, args.profiles)
    print(to_json(audit_findings) if args.json else format_table(audit_findings))
    return EXIT_CODE_FAILED if any(f.severity == "high" for f in audit_findings) else EXIT_OK


def _audit_agents(args: argparse.Namespace) -> int:
    """A CI gate: a missing path, or one with no Python file to read, fails (exit 2), never passes."""
    from .agents_audit import audit_json, format_audit, format_findings, scan_agents

    try:
        audit = scan_agents(args.agents)
    except FileNotFoundError as e:
        raise CliError(f"audit --agents: {args.agents} does not exist; nothing was audited") from e
    if args.json:
        print(json.dumps(audit_json(audit), indent=2))
    elif audit.files:
        print(format_audit(audit))
    elif audit.findings:
        print(format_findings(audit.findings))
    if not audit.files:
        raise CliError(f"audit --agents: read 0 Python files in {args.agents}; nothing was audited "
                       "(point it at your agent code: a .py file or a directory holding some)")
    return EXIT_CODE_FAILED if any(f.severity == "high" for f in audit.findings) else EXIT_OK


def cmd_mcp(args: argparse.Namespace) -> int:
    from ..integrations.mcp import run

    run("streamable-http" if args.http else "stdio", policy=_policy(args), profile=args.profile,
        max_sessions=args.max_sessions, notebook_dir=args.notebook_dir, host=args.host, port=args.port)
    return EXIT_OK


def cmd_kernelspec(args: argparse.Namespace) -> int:
    from ..integrations.jupyter import install_kernelspec

    path = install_kernelspec(user=not args.sys_prefix, prefix=sys.prefix if args.sys_prefix else None,
                              image=_image(args), profile=args.profile)
    print(f"installed kernelspec 'kernelexec' in {path}")
    return EXIT_OK


def cmd_kernelspec_uninstall(args: argparse.Namespace) -> int:
    from ..integrations.jupyter import uninstall_kernelspec

    try:
        path = uninstall_kernelspec(user=not args.sys_prefix, prefix=sys.prefix if args.sys_prefix else None)
    except FileNotFoundError as e:
        raise CliError(str(e)) from e
    print(f"removed kernelspec 'kernelexec' from {path}")
    return EXIT_OK


# -- kubernetes ----------------------------------------------------------------------------

def cmd_kubernetes_manifest(args: argparse.Namespace) -> int:
    """Print one session's objects (or, with --rbac, an administrator's one-time setup) for
    ``kubectl apply -f -``: nothing is sent anywhere, no cluster is needed."""
    import secrets

    from ..profiles import profile_policy
    from . import kubernetes as k8s

    policy = profile_policy(args.profile) if args.profile else Policy()
    ns = args.namespace
    if args.rbac:
        docs = k8s.setup_manifests(policy, ns)
        notes = [f"kernelexec: one-time setup of namespace {ns!r} for a host that runs sandboxes there.",
                 "The host's ServiceAccount may create, watch, delete and attach to pods, nothing else.",
                 "Enforce the restricted Pod Security Standard on the namespace:",
                 f"  kubectl label namespace {ns} pod-security.kubernetes.io/enforce=restricted",
                 "NetworkPolicies need a network plugin that enforces them (Calico, Cilium, ...)."]
        if policy.runtime:
            notes.append(f"The RuntimeClass is cluster-scoped; every node must register the {policy.runtime!r} "
                         "handler with its container runtime.")
        print(k8s.render(docs, notes), end="")
        return EXIT_OK
    image = args.image or policy.image or os.environ.get("KERNELEXEC_IMAGE") or _default_tag()
    session = args.session or secrets.token_hex(6)
    try:
        docs = k8s.session_manifests(policy, image=image, session=session, namespace=ns, seccomp=args.seccomp,
                                     active_deadline=args.deadline, user_namespace=args.user_namespace)
    except k8s.ManifestError as e:
        raise CliError(str(e)) from e
    pod = docs[-1]
    notes = [f"kernelexec session {session}: its NetworkPolicy (deny all) and Pod, from "
             + (f"profile {args.profile!r}" if args.profile else "the default policy") + ".",
             f"The image must be pullable by the nodes: {image}.",
             f"Policy.pids={policy.pids} has no Pod field: set the kubelet's podPidsLimit (node-wide) to at most it."]
    seccomp = pod["spec"]["securityContext"]["seccompProfile"]
    if seccomp["type"] == "Localhost":
        notes.append(f"Each node needs the seccomp profile at <kubelet seccomp root>/{seccomp['localhostProfile']} "
                     "(`kernelexec kubernetes seccomp-profile`), or pass --seccomp runtime-default.")
    rc = k8s.runtime_class(policy)
    if rc is not None:
        notes += [f"The pod runs under RuntimeClass {rc['metadata']['name']!r}, which a cluster administrator "
                  "creates once (`--rbac` prints it):", *[f"  {line}" for line in json.dumps(rc).splitlines()]]
    notes.append("Nothing runs until a host attaches (pods/attach) and sends the relay its hello.")
    print(k8s.render(docs, notes), end="")
    problems = k8s.restricted_violations(pod)
    for p in problems:
        print(f"kernelexec: warning: the restricted Pod Security Standard refuses this pod: {p}", file=sys.stderr)
    return EXIT_OK


def cmd_kubernetes_seccomp(args: argparse.Namespace) -> int:
    from ..seccomp import profile

    print(json.dumps(profile(), indent=2))
    return EXIT_OK


# -- parser -------------------------------------------------------------------------

def _positive(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if f <= 0:
        raise argparse.ArgumentTypeError("a timeout must be positive")
    return f


#: what ``kernelexec gc`` expires, in the words of its help (one rule, said once)
GC_PAUSED_RULE = ("paused sessions that no process holds and that were paused more than KERNELEXEC_PAUSED_TTL "
                  "(default 7 days) ago")


def _global_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after its name (``kernelexec mcp --profile analyst``).

    On the subcommands they default to SUPPRESS, so an option given before
    the command is not reset by the subcommand's own parse.
    """
    d: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("--image", help="kernel image (default: $KERNELEXEC_IMAGE, else the built-in recipe's tag)", **d)
    p.add_argument("--profile", help="named policy from the profile file", **d)
    p.add_argument("--audit-log", help="append session events (JSON lines) to this file", **d)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the library's warnings and what it cleans up", **d)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="kernelexec", description="Sandboxed, stateful Jupyter kernels for agents.",
                                epilog="exit status:\n" + EXIT_CODES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kernelexec {__version__}")
    _global_options(p, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    sub = p.add_subparsers(dest="command", required=True)

    def command(parent: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
        return parent.add_parser(name, parents=[common], **kw)

    r = command(sub, "run", help="run a .py file or a notebook in a fresh sandbox",
                epilog="exit status:\n" + EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("file", help="a .py file, '-' for Python code on stdin, or a .ipynb notebook (its code "
                                "cells run in order in one sandbox)")
    r.add_argument("-o", "--output", help="write the executed notebook here (for a .py: the run as a notebook)")
    r.add_argument("--timeout", type=_positive, help="seconds for the file, or per notebook cell")
    r.add_argument("--save-images", metavar="DIR", help="save displayed PNGs here (.py files)")
    r.add_argument("--allow-errors", action="store_true", help="notebooks: keep going after a failing cell")
    r.set_defaults(fn=cmd_run)

    rp = command(sub, "repl", help="an interactive prompt in a sandbox")
    rp.add_argument("--timeout", type=_positive, help="seconds per input (default: the policy's)")
    rp.add_argument("--save-images", metavar="DIR", help="save displayed PNGs here")
    rp.set_defaults(fn=cmd_repl)

    img = sub.add_parser("image", help="the kernel image").add_subparsers(dest="image_command", required=True)
    b = command(img, "build", help="build the kernel image (skipped when up to date)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--offline", action="store_true", help="debootstrap base and a host-downloaded wheelhouse")
    g.add_argument("--online", action="store_true", help="public Python base image, packages from the index")
    b.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    b.add_argument("--with", dest="with_", action="append", metavar="PKG",
                   help="a derived image with this package (a requirement, e.g. 'seaborn>=0.13'); repeatable")
    b.add_argument("--requirements", action="append", metavar="FILE",
                   help="a derived image with a requirements file's packages; a lock (every line pinned by "
                        "hash, see `image lock`) is installed as is")
    b.add_argument("--flavour", metavar="NAME", help="a derived image with a named package set: analysis")
    b.add_argument("--base", metavar="TAG", help="derive from this image (default: the kernel image)")
    b.add_argument("--find-links", action="append", metavar="DIR|URL", help="where the host's pip also looks")
    b.add_argument("--no-index", action="store_true", help="the host's pip uses --find-links only")
    b.add_argument("--index-url", metavar="URL", help="the index of the host's pip (and of pip in an --online build)")
    b.set_defaults(fn=cmd_image_build)
    ls = command(img, "ls", help="list kernelexec images: base and derived, with what each adds")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_image_ls)
    rm = command(img, "rm", help="remove kernelexec images (refused while a session uses one)")
    rm.add_argument("tags", nargs="+", metavar="TAG")
    rm.set_defaults(fn=cmd_image_rm)
    lk = command(img, "lock", help="print the lock a derived image was built from (reuse: --requirements)")
    lk.add_argument("tag", metavar="TAG")
    lk.set_defaults(fn=cmd_image_lock)

    ps = command(sub, "ps", help="list sessions: running (in containers) and paused (in the state directory)",
                 description="List kernelexec sessions: those in containers on the engine, then the paused ones in "
                             "the state directory ($KERNELEXEC_STATE_DIR, default ~/.local/state/kernelexec), "
                             "with the pid that holds each, if any. --json gives each a \"state\": "
                             "\"running\" or \"paused\".")
    ps.add_argument("--all-hosts", action="store_true", help="include sessions of other hosts sharing the engine")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(fn=cmd_ps)

    gc = command(sub, "gc", help="remove what crashed processes left behind, and expired paused sessions",
                 description=f"Remove the containers, volumes and socket directories of sessions whose process "
                             f"died; {GC_PAUSED_RULE}; and partial snapshot files that killed writers left. "
                             "--all does not change that rule: a paused session is the user's data, removed only "
                             "once it expired, and one a process holds never.")
    gc.add_argument("--all", action="store_true", help="also the containers of live processes on this host "
                                                       "(not their paused sessions)")
    gc.add_argument("--paused-older-than", type=duration, metavar="DURATION",
                    help="expire paused sessions paused more than this long ago, instead of KERNELEXEC_PAUSED_TTL: "
                         "seconds, or a number with s, m, h or d (30m, 12h, 7d); 0: every one no process holds")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(fn=cmd_gc)

    command(sub, "doctor", help="check Docker, the image and ipc; say what to fix").set_defaults(fn=cmd_doctor)

    a = command(sub, "audit", help="audit the policy, the Docker daemon and live sessions (or agent code)")
    a.add_argument("--agents", metavar="PATH", help="audit AutoGen (0.2/AG2, 0.7) agent files instead (parsed, "
                                                    "never run); a missing path or no .py file read fails")
    a.add_argument("--profiles", metavar="FILE", help="the profile file (default: kernelexec.toml, ...)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_audit)

    m = command(sub, "mcp", help="serve sandboxes to MCP clients (stdio, or streamable HTTP)")
    m.add_argument("--http", action="store_true", help="streamable HTTP instead of stdio")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8000)
    m.add_argument("--max-sessions", type=int, default=8)
    m.add_argument("--notebook-dir", help="where save_notebook may write")
    m.set_defaults(fn=cmd_mcp)

    ks = sub.add_parser("kernelspec", help="Jupyter integration").add_subparsers(dest="ks_command", required=True)
    ki = command(ks, "install", help="install a 'kernelexec' kernelspec (JupyterLab, nbclient, papermill)")
    ki.add_argument("--sys-prefix", action="store_true", help="into this environment instead of the user's")
    ki.set_defaults(fn=cmd_kernelspec)
    ku = command(ks, "uninstall", help="remove the 'kernelexec' kernelspec that install added")
    ku.add_argument("--sys-prefix", action="store_true", help="from this environment instead of the user's")
    ku.set_defaults(fn=cmd_kernelspec_uninstall)

    kube = sub.add_parser("kubernetes", help="a session as Kubernetes objects (printed; no cluster is contacted)")
    kube_sub = kube.add_subparsers(dest="kube_command", required=True)
    km = command(kube_sub, "manifest", help="print a session's Pod and NetworkPolicy for `kubectl apply -f -`",
                 description="Print one session's NetworkPolicy and Pod as a YAML stream (each document in "
                             "JSON form) for `kubectl apply -f -`; with --rbac, the namespace's one-time setup.")
    km.add_argument("--namespace", default="default", help="the namespace of the objects (default: default)")
    km.add_argument("--seccomp", choices=["localhost", "runtime-default"],
                    help="localhost: kernelexec's profile from each node's seccomp root; runtime-default: the "
                         "runtime's (default: as the policy says, kernelexec's)")
    km.add_argument("--session", help="session id in the names and labels (default: a random one)")
    km.add_argument("--deadline", type=int, metavar="SECONDS", help="activeDeadlineSeconds: the kubelet ends "
                                                                    "the pod after this long, whatever the host does")
    km.add_argument("--user-namespace", action="store_true",
                    help="hostUsers: false (nodes with user-namespace support): the sandbox uid is unmapped "
                         "on the node")
    km.add_argument("--rbac", action="store_true",
                    help="print the setup instead: the host's ServiceAccount, Role and RoleBinding, the namespace's "
                         "default-deny NetworkPolicy, and the RuntimeClass the policy names")
    km.set_defaults(fn=cmd_kubernetes_manifest)
    command(kube_sub, "seccomp-profile", help="print kernelexec's seccomp profile, for each node's seccomp root"
            ).set_defaults(fn=cmd_kubernetes_seccomp)
    return p


@contextlib.contextmanager
def _cli_logging(verbose: bool) -> Iterator[None]:
    """The library's log lines on stderr, prefixed like the CLI's own, only when asked.

    Without ``-v`` only errors show: a warning such as "could not clean up
    after earlier crashed processes" would otherwise repeat, in other words,
    the one error line the command prints. The logger is restored on return
    because ``main()`` is also called in-process (tests, other tools).
    """
    logger = logging.getLogger("kernelexec")
    saved = logger.level, logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kernelexec: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _cli_logging(args.verbose):
            return int(args.fn(args))
    except ImageNotFound as e:
        print(f"kernelexec: {_missing_image_advice(args, e)}", file=sys.stderr)
        return EXIT_KERNELEXEC_ERROR
    except RunTimeout as e:
        print(f"kernelexec: {e}", file=sys.stderr)
        return EXIT_TIMEOUT
    except KernelExecError as e:
        print(f"kernelexec: {e}", file=sys.stderr)
        return EXIT_KERNELEXEC_ERROR
    except KeyboardInterrupt:
        print("kernelexec: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _missing_image_advice(args: argparse.Namespace, e: ImageNotFound) -> str:
    """The library says "pass Policy(image=...)"; on the command line the cause and the fix are named here."""
    env = os.environ.get("KERNELEXEC_IMAGE")
    if args.image:
        return (f"the kernel image {args.image!r} (from --image) is not on this Docker engine; pull or build it, "
                "or drop --image to use the built-in one (`kernelexec image build`)")
    pinned = None
    if args.profile:
        from ..profiles import profile_policy

        pinned = profile_policy(args.profile).image
    if pinned:
        return (f"the kernel image {pinned!r} (pinned by profile {args.profile!r}) is not on this Docker engine; "
                "pull or build it, or change the profile's image")
    if env:
        return (f"the kernel image {env!r} (from $KERNELEXEC_IMAGE) is not on this Docker engine; pull or build "
                "it, or unset KERNELEXEC_IMAGE to use the built-in one (`kernelexec image build`)")
    return (f"the kernel image {_default_tag()!r} is not built on this Docker engine: run `kernelexec image "
            "build` (works offline), or pass --image")
