"""The kernelexec command, as a user runs it (a subprocess), against a real engine.

Every subprocess is checked for leftovers by its own pid afterwards: the
conftest only sees this process's sessions, and a CLI that forgot to close
its sandbox would otherwise pass unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from kernelexec import Policy, Session
from kernelexec.backend.sockdir import PREFIX, socket_root
from kernelexec.notebook import notebook_errors, run_notebook
from kernelexec.tools.cli import main

from .sdk import docker_client

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

#: every command here is checked for leftovers on the engine (owned_by)
pytestmark = pytest.mark.docker


def owned_by(pid: int) -> tuple[list[str], list[str], list[str]]:
    """Containers, volumes and socket directories of the sessions of process ``pid``."""
    api = docker_client().api
    label = {"label": f"kernelexec.owner_pid={pid}"}
    containers = [c["Id"] for c in api.containers(all=True, filters=label)]
    volumes = [v["Name"] for v in api.volumes(filters=label).get("Volumes") or []]
    dirs = [p.name for p in socket_root().glob(f"{PREFIX}{pid}-*")]
    return containers, volumes, dirs


def remove_owned_by(pid: int) -> None:
    """Last-resort cleanup for a test that failed before gc ran: no sandbox outlives the test run."""
    api = docker_client().api
    for cid in owned_by(pid)[0]:
        api.remove_container(cid, force=True)
    for name in owned_by(pid)[1]:
        api.remove_volume(name, force=True)


def kx(*args: str, image: str | None, stdin: str | None = None, env: dict[str, str] | None = None,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m kernelexec [--image IMAGE] ARGS``, asserting it left no sandbox behind."""
    cmd = [sys.executable, "-m", "kernelexec", *(["--image", image] if image else []), *args]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env or ENV) as proc:
        out, err = proc.communicate(stdin, timeout=timeout)
    assert owned_by(proc.pid) == ([], [], []), f"`kernelexec {' '.join(args)}` left its sandbox behind"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# -- run: .py files --------------------------------------------------------------------

def test_run_py_file(kernel_image):
    p = kx("run", str(ROOT / "examples" / "hello.py"), image=kernel_image)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("hello from the sandbox\n")
    assert "outbound connection: Network is unreachable" in p.stdout
    assert "writing to /usr: Read-only file system" in p.stdout
    assert "network interfaces ['lo']" in p.stdout
    uid = int(re.search(r"running as uid (\d+)", p.stdout).group(1))
    assert uid != 0
    assert p.stdout.splitlines()[-1] == "13.2"  # the value of the last line, printed as text/plain


def test_run_failing_py_exits_1_with_traceback(kernel_image, tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("print('before')\n{}['missing']\n")
    p = kx("run", str(f), image=kernel_image)
    assert p.returncode == 1
    assert p.stdout == "before\n"
    assert "KeyError: 'missing'" in p.stderr and "----> 2" in p.stderr
    assert "\x1b[" not in p.stderr  # plain text: no terminal colour codes


def test_run_streams_and_saves_images_in_process(kernel_image, tmp_path, capsys):
    f = tmp_path / "plot.py"
    f.write_text(textwrap.dedent("""
        import sys
        import matplotlib.pyplot as plt
        print('out')
        print('err', file=sys.stderr)
        plt.plot([1, 3, 2])
        plt.show()
        'done'
    """))
    assert main(["--image", kernel_image, "run", str(f)]) == 0
    captured = capsys.readouterr()
    assert "out\n" in captured.out and "err\n" in captured.err
    assert "pass --save-images DIR" in captured.out and captured.out.rstrip().endswith("'done'")

    images = tmp_path / "images"
    assert main(["--image", kernel_image, "run", str(f), "--save-images", str(images)]) == 0
    assert f"[image saved to {images / 'image-1.png'}]" in capsys.readouterr().out
    assert (images / "image-1.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_expected_errors_are_one_line(kernel_image, tmp_path):
    p = kx("run", str(tmp_path / "missing.py"), image=kernel_image)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr == f"kernelexec: cannot read {tmp_path / 'missing.py'}: No such file or directory\n"

    no_engine = kx("run", str(ROOT / "examples" / "hello.py"), image=kernel_image,
                   env={**ENV, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    assert no_engine.returncode == 2
    assert no_engine.stderr.startswith("kernelexec: cannot reach the Docker engine")
    assert no_engine.stderr.count("\n") == 1 and "Traceback" not in no_engine.stderr


def test_run_timeout_is_an_expected_error(kernel_image, tmp_path):
    f = tmp_path / "slow.py"
    f.write_text("print('started', flush=True)\nimport time\ntime.sleep(60)\n")
    p = kx("run", str(f), "--timeout", "2", image=kernel_image)
    assert p.returncode == 124 and p.stdout == "started\n"  # not 2, the usage/kernelexec-error status
    assert "exceeded its timeout of 2 s" in p.stderr and "Traceback" not in p.stderr
    assert "intact" not in p.stderr  # the one-shot run's session ends with it


# -- run: notebooks --------------------------------------------------------------------

def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_quickstart_is_committed_without_outputs():
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    nbformat.validate(nb)
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells(nb))


def test_run_notebook_writes_outputs(kernel_image, tmp_path):
    out = tmp_path / "out.ipynb"
    p = kx("run", str(ROOT / "notebooks" / "quickstart.ipynb"), "-o", str(out), image=kernel_image)
    assert p.returncode == 0, p.stderr
    nb = nbformat.read(out, as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert all(c.outputs for c in cells)
    assert any("image/png" in o.get("data", {}) for c in cells for o in c.outputs)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for c in cells for o in c.outputs)
    assert "network interfaces: ['lo']" in text and "read-only: True" in text and "565" in text
    assert all(len(c.metadata["kernelexec"]["code_sha256"]) == 64 for c in cells)


def write_nb(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nbformat.write(nb, path)
    return path


def test_run_notebook_stops_at_error_and_clears_stale_outputs(kernel_image, tmp_path):
    src = write_nb(tmp_path / "in.ipynb", "1/0", "print(2)")
    stale = nbformat.read(src, as_version=4)
    stale.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="from an older run\n")]
    nbformat.write(stale, src)
    out = tmp_path / "out.ipynb"
    p = kx("run", str(src), "-o", str(out), image=kernel_image)
    assert p.returncode == 1 and "ZeroDivisionError" in p.stderr
    cells = nbformat.read(out, as_version=4).cells
    assert cells[0].outputs[0].output_type == "error" and cells[0].outputs[0].ename == "ZeroDivisionError"
    assert isinstance(cells[0].outputs[0].traceback, list)
    assert cells[1].outputs == [] and cells[1].execution_count is None


def test_run_notebook_allow_errors_goes_on(kernel_image, tmp_path):
    src = write_nb(tmp_path / "in.ipynb", "x = 1\n1/0", "print(x + 1)")
    out = tmp_path / "out.ipynb"
    p = kx("run", str(src), "-o", str(out), "--allow-errors", image=kernel_image)
    assert p.returncode == 1  # a cell failed, even though the run went on
    cells = nbformat.read(out, as_version=4).cells
    assert cells[1].outputs[0].text == "2\n"


def test_notebook_cell_timeout_is_recorded_in_the_notebook(kernel_image, tmp_path):
    src = write_nb(tmp_path / "in.ipynb", "print('a', flush=True)\nimport time\ntime.sleep(60)", "print('b')")
    out = tmp_path / "out.ipynb"
    p = kx("run", str(src), "-o", str(out), "--timeout", "2", image=kernel_image)
    assert p.returncode == 124, p.stderr
    assert "cell 1 exceeded its timeout of 2 s" in p.stderr and "intact" not in p.stderr
    first, second = nbformat.read(out, as_version=4).cells
    assert first.outputs[0].text == "a\n"
    assert first.outputs[-1].ename == "ExecutionTimeout" and "state are intact" in first.outputs[-1].evalue
    assert second.outputs == []


def test_run_notebook_in_process_reuses_a_session(session):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("text"),
        nbformat.v4.new_code_cell("import IPython.display as d\nd.display(d.Markdown('**hi**'))\ny = 2"),
        nbformat.v4.new_code_cell("y / 0"),
        nbformat.v4.new_code_cell("y * 21"),
    ])
    seen: list[int] = []
    run_notebook(session, nb, allow_errors=True, on_cell=lambda i, cell, ex: seen.append(i))
    nbformat.validate(nb)
    assert seen == [1, 2, 3]
    assert nb.cells[1].outputs[0].output_type == "display_data"
    assert [i for i, _ in notebook_errors(nb)] == [2]
    assert nb.cells[3].outputs[0].data["text/plain"] == "42"
    assert session.execute("y").text == "2"  # the notebook ran in this session: its state is here


# -- repl ------------------------------------------------------------------------------

def test_repl_keeps_state(kernel_image):
    p = kx("repl", image=kernel_image,
           stdin="x = 20\nfor i in range(2):\n    x += 1\n\nprint(x)\nx * 2\ny = x + \\\n  1\n\ny\n1/0\nx\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["22", "44", "23", "22"]
    assert "ZeroDivisionError" in p.stderr  # an error is shown and the prompt goes on


def test_repl_ctrl_c_interrupts_the_code_and_keeps_state(kernel_image):
    cmd = [sys.executable, "-m", "kernelexec", "--image", kernel_image, "repl"]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=ENV) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("x = 5\nimport time\nprint('sleeping', flush=True); [time.sleep(0.1) for _ in range(1200)]\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "sleeping\n"  # the code is running now
        proc.send_signal(signal.SIGINT)
        # short sleeps: a SIGINT landing just before a blocking call is only seen when the call returns
        out, err = proc.communicate("print(x)\n", timeout=90)  # well under the 120 s of sleeping
    assert proc.returncode == 0, err
    assert out == "5\n"
    assert "KeyboardInterrupt" in err and "Traceback" in err  # the kernel's own traceback, as IPython shows
    assert owned_by(proc.pid) == ([], [], [])


# -- ps, gc ------------------------------------------------------------------------------

def test_ps_shows_a_live_session(kernel_image):
    with Session(Policy(image=kernel_image)) as s:
        rows = json.loads(kx("ps", "--json", image=kernel_image).stdout)
        mine = [r for r in rows if r["session_id"] == s.id]
        assert mine and mine[0]["owner_alive"] and mine[0]["status"] == "running"
        assert mine[0]["container_id"] == s.container_id and mine[0]["owner_pid"] == os.getpid()
        out = kx("ps", image=kernel_image).stdout
        engine, table = out.split("\n", 1)
        assert engine.startswith("engine: unix://") and table.startswith("SESSION") and "TRANSPORT" in table
        assert s.id in table and s.container_id[:12] in table and " ipc " in table


OWNER = textwrap.dedent("""
    import sys, time
    from kernelexec import Session
    s = Session(image=sys.argv[1])
    print(s.container_id, s.socket_dir, flush=True)
    time.sleep(600)
""")


def test_gc_removes_what_a_sigkilled_owner_left_and_keeps_live_sessions(kernel_image):
    # the live session comes first: a process's first session cleans up after dead owners itself,
    # which would leave nothing for `kernelexec gc` to show
    with Session(Policy(image=kernel_image)) as live:
        owner = subprocess.Popen([sys.executable, "-c", OWNER, kernel_image], stdout=subprocess.PIPE, text=True,
                                 env=ENV)
        try:
            assert owner.stdout is not None
            cid, sockdir = owner.stdout.readline().split()
            owner.send_signal(signal.SIGKILL)
            owner.wait(10)
            assert owned_by(owner.pid)[0] == [cid] and Path(sockdir).is_dir()  # left behind, still running
            p = kx("gc", "--json", image=kernel_image)
            assert p.returncode == 0, p.stderr
            report = json.loads(p.stdout)
            assert cid[:12] in report["containers"] and sockdir in report["socket_dirs"]
            assert owned_by(owner.pid) == ([], [], [])
            assert not Path(sockdir).exists()
            assert live.container_id[:12] not in report["containers"]  # its owner (this process) is alive
            assert live.execute("1 + 1").text == "2"
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait(10)
            remove_owned_by(owner.pid)


def test_gc_text_output(kernel_image):
    p = kx("gc", image=kernel_image)
    assert p.returncode == 0, p.stderr
    assert re.match(r"removed \d+ container\(s\), \d+ volume\(s\), \d+ socket dir\(s\)", p.stdout)


def test_ps_lists_a_paused_session_and_gc_expires_it_by_the_rule(kernel_image, tmp_path, monkeypatch):
    """Paused sessions are the user's data: kept by the default rule, never removed while a process holds
    one, removed once unheld and older than the age asked for."""
    from kernelexec.snapshot.store import Claim

    state = tmp_path / "state"
    monkeypatch.setenv("KERNELEXEC_STATE_DIR", str(state))
    env = {**ENV, "KERNELEXEC_STATE_DIR": str(state)}
    env.pop("KERNELEXEC_PAUSED_TTL", None)
    with Session(Policy(image=kernel_image)) as s:
        s.execute("x = 41\ng = (i for i in range(3))")
        snap = s.pause()
    home = state / "sessions" / s.id

    def listed() -> list[dict]:
        return [r for r in json.loads(kx("ps", "--json", image=kernel_image, env=env).stdout) if r["state"] == "paused"]

    (row,) = listed()
    assert {k: row[k] for k in ("session_id", "size", "variables", "lost", "holder", "image", "path")} == {
        "session_id": s.id, "size": snap.size, "variables": 1, "lost": 1, "holder": None, "image": kernel_image,
        "path": str(home)}
    out = kx("ps", image=kernel_image, env=env).stdout
    assert "no kernelexec sessions" not in out.splitlines()
    assert f"paused sessions in {state} (`kernelexec gc` removes those that expired):" in out
    row_text = rf"^{s.id}  \S+ \([\d.]+ s ago\)\s+\d+ kB\s+1\s+1\s+paused\s+{re.escape(kernel_image)}$"
    assert re.search(row_text, out, re.M), out

    partial = home / ".snapshot.killedwriter.partial"  # what a writer killed mid-pause leaves
    partial.write_bytes(b"half a snapshot")
    p = kx("gc", image=kernel_image, env=env)  # the default rule: 7 days
    assert p.returncode == 0, p.stderr
    assert f"from {state}: paused sessions no process holds, paused more than 7 d ago" in p.stdout
    assert f"  partial snapshot {partial}\n" in p.stdout and f"paused session {s.id}" not in p.stdout
    assert not partial.exists() and (home / "snapshot").is_file()

    claim = Claim(s.id)  # this process holds it, as one that resumed it or paused it on idle does
    try:
        (row,) = listed()
        assert row["holder"] == os.getpid()
        assert f"held by pid {os.getpid()}" in kx("ps", image=kernel_image, env=env).stdout
        p = kx("gc", "--paused-older-than", "0", image=kernel_image, env=env)
        assert p.returncode == 0 and s.id not in p.stdout and (home / "snapshot").is_file()
    finally:
        claim.release()

    p = kx("gc", "--json", image=kernel_image, env={**env, "KERNELEXEC_PAUSED_TTL": "0s"})
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["state_dir"] == str(state) and report["paused_older_than"] == 0
    assert [e.split(" (")[0] for e in report["expired"]] == [f"paused session {s.id}"]
    assert not home.exists() and listed() == []


# -- doctor, image -----------------------------------------------------------------------

def test_doctor_passes(kernel_image):
    p = kx("doctor", image=kernel_image)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "FAIL" not in p.stdout and "SKIP" not in p.stdout and p.stdout.count("PASS") == 7
    # scripts/setup.sh registers gVisor; doctor says so, with the platform runsc runs on
    assert re.search(r"PASS  gVisor runtime \(runsc\): registered: \S*runsc --network=none; platform \w+", p.stdout)
    assert re.search(r"PASS  engine reachable: Docker \S+ \(rootful, cgroup v\d \S+\), API \S+, default runtime runc", p.stdout)
    assert "PASS  transport for sessions: ipc: a local engine" in p.stdout
    assert f"PASS  kernel image present: {kernel_image}" in p.stdout


def test_doctor_names_what_to_fix(kernel_image, tmp_path):
    p = kx("doctor", image="kernelexec-no-such-image:0")
    assert p.returncode == 1 and "kernelexec image build" in p.stdout
    assert "SKIP  sandbox works" in p.stdout

    with socket.socket() as s:  # a loopback port nobody listens on: an engine that is not there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = kx("doctor", image=kernel_image, env={**ENV, "DOCKER_HOST": f"tcp://127.0.0.1:{port}"})
    assert remote.returncode == 1
    assert f"PASS  engine endpoint (DOCKER_HOST, DOCKER_CONTEXT, docker contexts): tcp://127.0.0.1:{port}" \
        in remote.stdout
    assert "FAIL  engine reachable" in remote.stdout
    assert "PASS  transport for sessions: attach: the engine is remote" in remote.stdout

    long_root = tmp_path / ("x" * 100)
    long_root.mkdir()
    deep = kx("doctor", image=kernel_image, env={**ENV, "KERNELEXEC_SOCKET_ROOT": str(long_root)})
    assert deep.returncode == 1 and "KERNELEXEC_SOCKET_ROOT" in deep.stdout


def test_image_build_is_skipped_when_up_to_date():
    from kernelexec.tools.image import image_present, image_tag

    if not image_present(tag=image_tag()):
        pytest.skip("the recipe's image is not built here; building it is test_image.py's job")
    p = kx("image", "build", image=None)
    assert p.returncode == 0, p.stderr
    assert "up to date" in p.stdout and re.search(r"^\[\s*\d+\.\ds\] ", p.stdout, re.M)
    assert p.stdout.splitlines()[-1] == image_tag()


def test_help_and_module_entry_point():
    p = kx("--help", image=None)
    assert p.returncode == 0
    for command in ("run", "repl", "image", "ps", "gc", "doctor"):
        assert command in p.stdout


# -- issue 11: what the CLI promises -------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["run", "--profile", "strict", "--image", "img", "--audit-log", "a.jsonl", "-v", "x.py"],
    ["--profile", "strict", "--image", "img", "--audit-log", "a.jsonl", "-v", "run", "x.py"],
    ["--profile", "strict", "-v", "run", "--image", "img", "--audit-log", "a.jsonl", "x.py"],
])
def test_global_options_before_or_after_the_command(argv):
    from kernelexec.tools.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.profile, args.image, args.audit_log, args.verbose, args.file) == (
        "strict", "img", "a.jsonl", True, "x.py")


def test_global_options_default_when_not_given_and_reach_every_command():
    from kernelexec.tools.cli import build_parser

    parse = build_parser().parse_args
    args = parse(["run", "x.py"])
    assert (args.profile, args.image, args.audit_log, args.verbose) == (None, None, None, False)
    assert parse(["mcp", "--profile", "analyst"]).profile == "analyst"  # the README's MCP config
    assert parse(["repl", "--profile", "strict"]).profile == "strict"
    assert parse(["audit", "--profile", "strict", "--json"]).profile == "strict"
    assert parse(["kernelspec", "install", "--image", "i"]).image == "i"
    assert parse(["doctor", "-v"]).verbose is True


def test_profile_after_run_takes_effect(kernel_image, tmp_path):
    f = tmp_path / "nofile.py"
    f.write_text("import resource\nprint(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    p = kx("run", "--profile", "strict", "--image", kernel_image, str(f), image=None)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "256\n"  # strict's nofile; the default policy gives 1024


EXITS = [
    ("import sys\nprint('a')\nsys.exit(0)\nprint('b')\n", 0, "a\n", ""),
    ("import sys\nsys.exit(3)\n", 3, "", ""),
    ("import sys\nsys.exit()\n", 0, "", ""),
    ("import sys\nsys.exit(None)\n", 0, "", ""),
    ("print('a')\nexit()\nprint('b')\n", 0, "a\n", ""),
    ("quit(5)\nprint('b')\n", 5, "", ""),
    ("exit(7)\n", 7, "", ""),
    ("raise SystemExit('msg')\n", 1, "", "msg\n"),
    ("import sys\nsys.exit('bye')\n", 1, "", "bye\n"),
    ("def f():\n    raise SystemExit(9)\nf()\n", 9, "", ""),
]


@pytest.mark.parametrize(("code", "status", "out", "err"), EXITS)
def test_a_scripts_exit_status_is_the_runs(kernel_image, tmp_path, code, status, out, err):
    f = tmp_path / "script.py"
    f.write_text(code)
    p = kx("run", str(f), image=kernel_image)
    assert (p.returncode, p.stdout, p.stderr) == (status, out, err)  # no IPython "To exit: use 'exit'..."


def test_sys_exit_ends_a_notebook_run(kernel_image, tmp_path):
    src = write_nb(tmp_path / "in.ipynb", "print(1)", "import sys\nsys.exit(4)", "print('not reached')")
    out = tmp_path / "out.ipynb"
    p = kx("run", str(src), "-o", str(out), "--allow-errors", image=kernel_image)
    assert p.returncode == 4, p.stderr
    assert "To exit" not in p.stderr and "Traceback" not in p.stderr
    cells = nbformat.read(out, as_version=4).cells
    assert cells[0].outputs[0].text == "1\n"
    assert cells[2].outputs == [] and cells[2].execution_count is None  # later cells did not run
    assert not any("To exit" in o.get("text", "") for c in cells for o in c.outputs)
    ok = kx("run", str(write_nb(tmp_path / "ok.ipynb", "exit()", "print('not reached')")), image=kernel_image)
    assert ok.returncode == 0 and "not reached" not in ok.stdout, ok.stderr
    failed = kx("run", str(write_nb(tmp_path / "f.ipynb", "1/0", "exit(0)")), "--allow-errors", image=kernel_image)
    assert failed.returncode == 1  # the failed cell still counts


def test_repl_continues_lines_the_kernel_calls_incomplete(kernel_image):
    p = kx("repl", image=kernel_image,
           stdin="x = [1,\n2]\nprint(sum(x))\nd = {'a':\n  1}\nd['a']\ns = '''one\ntwo'''\nprint(s)\n"
                 "def f(n):\n    return n * 2\n\nf(21)\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "3\n1\none\ntwo\n42\n"
    assert "SyntaxError" not in p.stderr


@pytest.mark.parametrize("leave", ["exit", "quit", "exit()", "quit()"])
def test_repl_exit_and_quit_leave(kernel_image, leave):
    p = kx("repl", image=kernel_image, stdin=f"print(1)\n{leave}\nprint('not reached')\n")
    assert (p.returncode, p.stdout) == (0, "1\n"), p.stderr
    assert "Error" not in p.stderr


def test_repl_sys_exit_leaves_with_its_status(kernel_image):
    p = kx("repl", image=kernel_image, stdin="import sys\nif True:\n    sys.exit(3)\n\nprint('not reached')\n")
    assert (p.returncode, p.stdout) == (3, ""), p.stderr


def test_input_says_plainly_it_is_not_available(kernel_image, tmp_path):
    p = kx("repl", image=kernel_image, stdin="name = input('name? ')\nprint('after')\n")
    assert p.returncode == 0 and p.stdout == "after\n"
    assert "input() is not available in kernelexec sandboxes; pass data as code or upload a file" in p.stderr
    assert "----> 1 name = input('name? ')" in p.stderr and "ipykernel" not in p.stderr
    f = tmp_path / "ask.py"
    f.write_text("input()\n")
    run = kx("run", str(f), image=kernel_image)
    assert run.returncode == 1 and "input() is not available" in run.stderr


@pytest.mark.parametrize("text", ['{"cells": 5}', "[]", "null", '"a string"', "3", '{"a": 1}',
                                  '{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": "x"}',
                                  '{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{"source": 5}]}',
                                  "not json"])
def test_json_that_is_not_a_notebook_is_a_clear_error(tmp_path, text):
    f = tmp_path / "bad.ipynb"
    f.write_text(text)
    p = kx("run", str(f), image="kernelexec-no-such-image:0")  # refused before any sandbox is asked for
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"kernelexec: {f} is ") and "notebook" in p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


@pytest.mark.parametrize("bad", ["missing-dir/out.ipynb", "."])
def test_unwritable_output_is_refused_before_any_cell_runs(kernel_image, tmp_path, bad):
    src = write_nb(tmp_path / "in.ipynb", "print('ran')")
    out = tmp_path / bad
    p = kx("run", str(src), "-o", str(out), image=kernel_image)
    assert p.returncode == 2
    assert p.stderr.startswith(f"kernelexec: cannot write {out}") and "nothing was run" in p.stderr
    assert "cell 1/" not in p.stderr
    script = tmp_path / "s.py"
    script.write_text("print('ran')\n")
    q = kx("run", str(script), "-o", str(out), image=kernel_image)
    assert q.returncode == 2 and q.stdout == "" and "nothing was run" in q.stderr


def test_a_host_notebook_gets_a_kernelspec_hint(kernel_image, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "host.ipynb")
    p = kx("run", str(tmp_path / "host.ipynb"), image=kernel_image)
    assert p.returncode == 0, p.stderr
    assert "host.ipynb names the kernel 'python3', not 'kernelexec'; its cells run in the sandbox kernel" in p.stderr
    ours = kx("run", str(write_nb(tmp_path / "ours.ipynb", "1 + 1")), image=kernel_image)
    assert ours.returncode == 0 and "names the kernel" not in ours.stderr


def test_missing_image_advice_is_cli_advice(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("1\n")
    env = kx("run", str(f), image=None, env={**ENV, "KERNELEXEC_IMAGE": "kernelexec-no-such-image:0"})
    assert env.returncode == 2
    assert env.stderr.startswith("kernelexec: the kernel image 'kernelexec-no-such-image:0' (from $KERNELEXEC_IMAGE)")
    assert "unset KERNELEXEC_IMAGE" in env.stderr and "kernelexec image build" in env.stderr
    assert "Policy(" not in env.stderr and env.stderr.count("\n") == 1
    flag = kx("run", str(f), image="kernelexec-no-such-image:1")
    assert flag.returncode == 2 and "(from --image)" in flag.stderr and "Policy(" not in flag.stderr


def test_version_and_exit_statuses_in_help():
    from kernelexec import __version__

    p = kx("--version", image=None)
    assert (p.returncode, p.stdout) == (0, f"kernelexec {__version__}\n")
    helptext = kx("run", "--help", image=None).stdout
    assert "124" in helptext and "sys.exit(N)" in helptext


def test_run_dash_reads_code_from_stdin(kernel_image):
    p = kx("run", "-", image=kernel_image, stdin="x = 6\nprint(x * 7)\n")
    assert (p.returncode, p.stdout) == (0, "42\n"), p.stderr


def test_kernelspec_install_and_uninstall(tmp_path):
    env = {**ENV, "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    spec = tmp_path / "data" / "kernels" / "kernelexec"
    assert kx("kernelspec", "install", image=None, env=env).returncode == 0
    assert (spec / "kernel.json").is_file()
    p = kx("kernelspec", "uninstall", image=None, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"removed kernelspec 'kernelexec' from {spec}\n" and not spec.exists()
    again = kx("kernelspec", "uninstall", image=None, env=env)
    assert again.returncode == 2 and "no 'kernelexec' kernelspec is installed for this user" in again.stderr
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": ["python"], "display_name": "someone else's"}))
    theirs = kx("kernelspec", "uninstall", image=None, env=env)
    assert theirs.returncode == 2 and "did not install" in theirs.stderr and (spec / "kernel.json").is_file()
