"""The kernelexec command, as a user runs it (a subprocess), against a real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat

from kernelexec import Policy, Session

ROOT = Path(__file__).resolve().parent.parent


def kx(*args: str, image: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernelexec", "--image", image, *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_run_py_file(kernel_image):
    p = kx("run", str(ROOT / "examples" / "hello.py"), image=kernel_image)
    assert p.returncode == 0, p.stderr
    assert "Network is unreachable" in p.stdout and "Read-only file system" in p.stdout
    assert "uid 10001" in p.stdout and p.stdout.strip().endswith("13.200000000000001")


def test_run_failing_py_exits_1_with_traceback(kernel_image, tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("print('before')\n{}['missing']\n")
    p = kx("run", str(f), image=kernel_image)
    assert p.returncode == 1
    assert p.stdout == "before\n" and "KeyError" in p.stderr and "\x1b[" not in p.stderr


def test_run_notebook_writes_outputs(kernel_image, tmp_path):
    out = tmp_path / "out.ipynb"
    p = kx("run", str(ROOT / "notebooks" / "quickstart.ipynb"), "-o", str(out), image=kernel_image)
    assert p.returncode == 0, p.stderr
    nb = nbformat.read(out, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs for c in code)
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))


def test_run_notebook_stops_at_error(kernel_image, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1/0"), nbformat.v4.new_code_cell("print(2)")])
    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    p = kx("run", str(src), "-o", str(out), image=kernel_image)
    assert p.returncode == 1 and "ZeroDivisionError" in p.stderr
    cells = nbformat.read(out, as_version=4).cells
    assert cells[0].outputs[0].output_type == "error" and cells[1].outputs == []


def test_repl_keeps_state(kernel_image):
    p = kx("repl", image=kernel_image, stdin="x = 20\nfor i in range(2):\n    x += 1\n\nprint(x)\nx * 2\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["22", "44"]


def test_ps_shows_a_live_session_and_gc_keeps_it(kernel_image):
    with Session(Policy(image=kernel_image)) as s:
        p = kx("ps", "--json", image=kernel_image)
        rows = json.loads(p.stdout)
        mine = [r for r in rows if r["session_id"] == s.id]
        assert mine and mine[0]["owner_alive"] and mine[0]["status"] == "running"
        g = kx("gc", "--json", image=kernel_image)
        assert g.returncode == 0
        assert s.container_id[:12] not in json.loads(g.stdout)["containers"]  # its owner is alive
        assert s.execute("1").text == "1"


def test_doctor_passes(kernel_image):
    p = kx("doctor", image=kernel_image)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "FAIL" not in p.stdout and p.stdout.count("PASS") == 5


def test_doctor_names_what_to_fix(kernel_image):
    p = kx("doctor", image="kernelexec-no-such-image:0")
    assert p.returncode == 1 and "kernelexec image build" in p.stdout


def test_image_build_is_skipped_when_up_to_date(kernel_image):
    p = subprocess.run([sys.executable, "-m", "kernelexec", "image", "build"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert "up to date" in p.stdout


def test_expected_errors_are_one_line(kernel_image, tmp_path):
    p = kx("run", str(tmp_path / "missing.py"), image=kernel_image)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("kernelexec:")
