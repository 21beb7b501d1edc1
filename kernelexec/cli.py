"""The ``kernelexec`` command.

Expected failures (no engine, no image, a timeout) print one line that says
what to do and exit 2; a Python traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import KernelExecError
from .policy import Policy


def _policy(args: argparse.Namespace) -> Policy | None:
    image = args.image or os.environ.get("KERNELEXEC_IMAGE")
    return Policy(image=image) if image else None


def _session(args: argparse.Namespace) -> Any:
    from .session import Session

    return Session(_policy(args), profile=args.profile, audit_log=args.audit_log)


def _print_result(ex: Any, save_images: Path | None, counter: list[int]) -> None:
    for b in ex.results:
        if b.png is not None and save_images is not None:
            save_images.mkdir(parents=True, exist_ok=True)
            counter[0] += 1
            path = save_images / f"image-{counter[0]}.png"
            path.write_bytes(b.png)
            print(f"[image saved to {path}]")
        elif b.png is not None:
            print("[image: pass --save-images DIR to keep it]")
        elif b.kind == "execute_result" and b.text is not None:
            print(b.text)
    if ex.error is not None:
        print(ex.error.traceback or f"{ex.error.ename}: {ex.error.evalue}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.suffix == ".ipynb":
        return _run_notebook(args, path)
    code = path.read_text()
    with _session(args) as s:
        ex = s.execute(code, timeout=args.timeout,
                       on_stdout=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                       on_stderr=lambda t: (sys.stderr.write(t), sys.stderr.flush()))
        _print_result(ex, Path(args.save_images) if args.save_images else None, [0])
        if args.output:
            _write_notebook(s.to_notebook(), Path(args.output))
    return 1 if ex.error is not None else 0


def _write_notebook(nb: Any, out: Path) -> None:
    import nbformat

    nbformat.validate(nb)
    try:
        out.write_text(nbformat.writes(nb))
    except OSError as e:
        raise KernelExecError(f"cannot write {out}: {e.strerror or e}") from e


def _run_notebook(args: argparse.Namespace, path: Path) -> int:
    import nbformat

    from .notebook import execution_to_outputs

    nb = nbformat.read(path, as_version=4)
    failed = False
    with _session(args) as s:
        for cell in nb.cells:
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            ex = s.execute(cell.source, timeout=args.timeout)
            cell.outputs = execution_to_outputs(ex)
            cell.execution_count = ex.execution_count
            print(f"[{ex.execution_count}] {ex.status} in {ex.duration:.2f} s", file=sys.stderr)
            if ex.error is not None:
                print(ex.error.traceback, file=sys.stderr)
                failed = True
                if not args.allow_errors:
                    break
        nb.metadata["kernelspec"] = {"name": "kernelexec", "display_name": "Python 3 (kernelexec sandbox)",
                                     "language": "python"}
    if args.output:
        _write_notebook(nb, Path(args.output))
        print(f"wrote {args.output}", file=sys.stderr)
    return 1 if failed else 0


def cmd_repl(args: argparse.Namespace) -> int:
    """A line-based prompt: a line ending in ':' or '\\' starts a block that ends at a blank line."""
    interactive = sys.stdin.isatty()
    with _session(args) as s:
        if interactive:
            print(f"kernelexec sandbox {s.id} (container {s.container_id[:12] if s.container_id else '?'}). "
                  "Ctrl-D to quit, Ctrl-C to interrupt.")
        n = 1
        while True:
            try:
                line = input(f"In [{n}]: " if interactive else "")
            except EOFError:
                break
            lines = [line]
            while lines[-1].rstrip().endswith((":", "\\")) or (len(lines) > 1 and lines[-1].strip()):
                try:
                    lines.append(input("   ...: " if interactive else ""))
                except EOFError:
                    break
            code = "\n".join(lines).strip()
            if not code:
                continue
            try:
                ex = s.execute(code, on_stdout=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                               on_stderr=lambda t: (sys.stderr.write(t), sys.stderr.flush()))
            except KeyboardInterrupt:
                s.interrupt()
                print("KeyboardInterrupt (the kernel was interrupted; state is kept)", file=sys.stderr)
                continue
            except KernelExecError as e:
                print(f"kernelexec: {e}", file=sys.stderr)
                continue
            _print_result(ex, None, [0])
            n = (ex.execution_count or n) + 1
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from .image import build_image

    mode = "offline" if args.offline else "online" if args.online else "auto"
    start = time.monotonic()
    tag = build_image(mode=mode, force=args.force,
                      progress=lambda line: print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True))
    print(tag)
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_ps(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .container import list_sessions

    sessions = list_sessions(all_hosts=args.all_hosts)
    if args.json:
        print(json.dumps([asdict(s) for s in sessions], indent=2))
        return 0
    rows = [["SESSION", "CONTAINER", "STATUS", "OWNER", "CREATED", "IMAGE"]]
    rows += [[s.session_id, s.container_id[:12], s.status,
              f"{s.owner_pid}{'' if s.owner_alive else ' (gone)'}", s.created, s.image] for s in sessions]
    print(_table(rows) if sessions else "no kernelexec sessions")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .container import gc

    report = gc(everything=args.all)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"removed {len(report.containers)} container(s), {len(report.volumes)} volume(s), "
              f"{len(report.socket_dirs)} socket dir(s)")
        for item in report.containers + report.volumes + report.socket_dirs:
            print(f"  {item}")
        for err in report.errors:
            print(f"error: {err}", file=sys.stderr)
    return 1 if report.errors else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check, in order, what a session needs; say how to fix the first thing missing."""
    ok = True

    def check(name: str, fn: Callable[[], str]) -> bool:
        nonlocal ok
        try:
            detail = fn()
        except Exception as e:  # doctor reports every failure as a line; that is its job
            ok = False
            print(f"FAIL  {name}: {e}")
            return False
        print(f"PASS  {name}: {detail}")
        return True

    from .container import run_blocking
    from .dockerapi import api, socket_path
    from .image import image_present, image_tag
    from .sockdir import socket_root

    check("DOCKER_HOST is a local unix socket", socket_path)
    engine = check("Docker engine reachable", lambda: "version " + str(run_blocking(api().version())["Version"]))
    root = socket_root()
    check("socket root", lambda: _socket_root_ok(root))
    image = _policy(args).image if _policy(args) else image_tag()
    if engine:
        def present() -> str:
            if not image_present(tag=image):
                raise KernelExecError(f"{image} is missing: run `kernelexec image build`")
            return image
        if check("kernel image present", present):
            check("ipc sandbox works (start, 1+1, close)", lambda: _smoke(args))
    print("all good" if ok else "fix the FAIL lines above, then run `kernelexec doctor` again")
    return 0 if ok else 1


def _socket_root_ok(root: Path) -> str:
    if not os.access(root, os.W_OK):
        raise KernelExecError(f"{root} is not writable; set KERNELEXEC_SOCKET_ROOT")
    if len(str(root)) > 60:
        raise KernelExecError(f"{root} is too long for unix socket paths; set KERNELEXEC_SOCKET_ROOT=/tmp")
    return str(root)


def _smoke(args: argparse.Namespace) -> str:
    t0 = time.monotonic()
    with _session(args) as s:
        text = s.execute("1 + 1").text
    if text != "2":
        raise KernelExecError(f"1 + 1 gave {text!r}")
    return f"ok in {time.monotonic() - t0:.2f} s"


def cmd_audit(args: argparse.Namespace) -> int:
    if args.agents:
        from .agents_audit import audit_agents, findings_json, format_findings

        findings = audit_agents(args.agents)
        if args.json:
            print(json.dumps({"agents": findings_json(findings)}, indent=2))
        else:
            print(format_findings(findings))
        return 1 if any(f.severity == "high" for f in findings) else 0
    from .audit import format_table, run_audit, to_json
    from .profiles import profile_policy

    policy = profile_policy(args.profile, args.profiles) if args.profile else _policy(args)
    audit_findings = run_audit(policy, args.profiles)
    print(to_json(audit_findings) if args.json else format_table(audit_findings))
    return 1 if any(f.severity == "high" for f in audit_findings) else 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from .integrations.mcp import run

    run("streamable-http" if args.http else "stdio", policy=_policy(args), profile=args.profile,
        max_sessions=args.max_sessions, notebook_dir=args.notebook_dir, host=args.host, port=args.port)
    return 0


def cmd_kernelspec(args: argparse.Namespace) -> int:
    from .provisioner import install_kernelspec

    path = install_kernelspec(user=not args.sys_prefix, prefix=sys.prefix if args.sys_prefix else None,
                              image=args.image or os.environ.get("KERNELEXEC_IMAGE"), profile=args.profile)
    print(f"installed kernelspec 'kernelexec' in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kernelexec", description="Sandboxed, stateful Jupyter kernels for agents.")
    p.add_argument("--image", help="kernel image (default: $KERNELEXEC_IMAGE or the built-in recipe's tag)")
    p.add_argument("--profile", help="named policy from the profile file")
    p.add_argument("--audit-log", help="append session events (JSON lines) to this file")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a .py file or a notebook in a fresh sandbox")
    r.add_argument("file")
    r.add_argument("-o", "--output", help="write the executed notebook here")
    r.add_argument("--timeout", type=float, help="seconds per cell / file")
    r.add_argument("--save-images", metavar="DIR", help="save displayed PNGs here (for .py files)")
    r.add_argument("--allow-errors", action="store_true", help="notebooks: keep going after a failing cell")
    r.set_defaults(fn=cmd_run)

    sub.add_parser("repl", help="an interactive prompt in a sandbox").set_defaults(fn=cmd_repl)

    img = sub.add_parser("image", help="the kernel image").add_subparsers(dest="image_command", required=True)
    b = img.add_parser("build", help="build the kernel image (skipped when up to date)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--offline", action="store_true", help="debootstrap base and a host-downloaded wheelhouse")
    g.add_argument("--online", action="store_true", help="public Python base image, packages from the index")
    b.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    b.set_defaults(fn=cmd_image_build)

    ps = sub.add_parser("ps", help="list sessions")
    ps.add_argument("--all-hosts", action="store_true")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(fn=cmd_ps)

    gc = sub.add_parser("gc", help="remove what crashed processes left behind")
    gc.add_argument("--all", action="store_true", help="also sessions of live processes on this host")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(fn=cmd_gc)

    sub.add_parser("doctor", help="check Docker, the image and ipc; say what to fix").set_defaults(fn=cmd_doctor)

    a = sub.add_parser("audit", help="audit the policy, the Docker daemon and live sessions (or agent code)")
    a.add_argument("--agents", metavar="PATH", help="audit AutoGen 0.2/AG2 agent files instead (parsed, never run)")
    a.add_argument("--profiles", metavar="FILE", help="the profile file (default: kernelexec.toml, ...)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_audit)

    m = sub.add_parser("mcp", help="serve sandboxes to MCP clients (stdio, or streamable HTTP)")
    m.add_argument("--http", action="store_true", help="streamable HTTP instead of stdio")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8000)
    m.add_argument("--max-sessions", type=int, default=8)
    m.add_argument("--notebook-dir", help="where save_notebook may write")
    m.set_defaults(fn=cmd_mcp)

    ks = sub.add_parser("kernelspec", help="Jupyter integration").add_subparsers(dest="ks_command", required=True)
    ki = ks.add_parser("install", help="install a 'kernelexec' kernelspec (JupyterLab, nbclient, papermill)")
    ki.add_argument("--sys-prefix", action="store_true", help="into this environment instead of the user's")
    ki.set_defaults(fn=cmd_kernelspec)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except KernelExecError as e:
        print(f"kernelexec: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"kernelexec: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
