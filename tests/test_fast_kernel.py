"""The fast kernel launcher (kernelexec.kernel.launch) speaks the same protocol as stock ipykernel.

What it changes is who sends on the IOPub socket (the publishing thread, under
a lock) and who owns the shell socket (the main thread); these tests hold it to
the stock kernel's behaviour where that change could show: ordering, output
from threads and forked children, interrupts in the middle of a send, and the
features it says it has.
"""

from __future__ import annotations

import time

import pytest

from kernelexec import ExecutionTimeout, Session
from kernelexec.results import ErrorInfo, MimeBundle, Stream

MIXED = """
import sys
from IPython.display import display, HTML
print("one")
display(HTML("<b>two</b>"))
print("three", file=sys.stderr)
print("four")
5
"""


def shape(ex) -> list[tuple]:
    out = []
    for o in ex.outputs:
        if isinstance(o, Stream):
            out.append(("stream", o.name, o.text))
        elif isinstance(o, MimeBundle):
            out.append((o.kind, o.data.get("text/plain"), o.data.get("text/html")))
        elif isinstance(o, ErrorInfo):
            out.append(("error", o.ename, o.evalue))
    return out


@pytest.fixture(scope="module")
def stock(policy):
    with Session(policy.replace(fast_kernel=False)) as s:
        yield s


def test_fast_and_stock_kernels_give_the_same_outputs(shared_session, stock):
    for code in (MIXED, "1/0", "for i in range(3): print(i)", "x = 1", "'é' * 3"):
        fast, slow = shared_session.execute(code), stock.execute(code)
        assert shape(fast) == shape(slow), code
        assert fast.status == slow.status


def test_kernel_info_says_what_the_kernel_has(shared_session, stock):
    assert shared_session.kernel_info["implementation"] == "ipython"
    assert shared_session.kernel_info["protocol_version"] == stock.kernel_info["protocol_version"]
    # subshells need ipykernel's shell channel thread, which the fast kernel does without
    assert "kernel subshells" not in shared_session.kernel_info.get("supported_features", [])
    assert "kernel subshells" in stock.kernel_info.get("supported_features", [])


def test_output_from_threads_arrives_whole(shared_session):
    code = """
import sys, threading
def worker(n):
    for i in range(500):
        # one write per line: print() writes the text and the newline separately, and another thread
        # may write between them (in a terminal too), which is not what this test is about
        sys.stdout.write(f"t{n}-{i}\\n")
threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
for t in threads: t.start()
for t in threads: t.join()
"""
    lines = shared_session.execute(code).stdout.splitlines()
    assert sorted(lines) == sorted(f"t{n}-{i}" for n in range(4) for i in range(500))
    for n in range(4):  # each thread's lines in the order it printed them
        mine = [int(x.split("-")[1]) for x in lines if x.startswith(f"t{n}-")]
        assert mine == list(range(500))


@pytest.mark.parametrize("kernel", ["fast", "stock"])
def test_output_from_forked_children_arrives(kernel, shared_session, stock):
    code = """
import multiprocessing as mp, os, sys
def child(i):
    sys.stdout.write(f"child {i}\\n")  # one write: a child sends each write as it comes
    sys.stdout.flush()
ctx = mp.get_context("fork")
ps = [ctx.Process(target=child, args=(i,)) for i in range(3)]
for p in ps: p.start()
for p in ps: p.join()
pid = os.fork()
if pid == 0:
    print("forked", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent")
"""
    out = (shared_session if kernel == "fast" else stock).execute(code).stdout
    assert sorted(out.splitlines()) == sorted(["child 0", "child 1", "child 2", "forked", "parent"])


def test_interrupts_in_the_middle_of_sends_leave_the_session_healthy(session):
    """A KeyboardInterrupt between the frames of one message would leave half a message on the socket."""
    for i in range(12):
        with pytest.raises(ExecutionTimeout) as err:
            session.execute("while True:\n    print('x' * 3000)", timeout=0.3 + 0.05 * i)
        assert not err.value.state_lost
        assert session.execute(f"{i} + 1").text == str(i + 1)
    assert session.alive
    ex = session.execute("print('still here')")
    assert ex.stdout == "still here\n"


def test_output_published_from_a_signal_handler_mid_send(session):
    """A handler that prints and flushes can run between the frames of a message being sent."""
    code = """
import itertools, signal, sys
counter = itertools.count(1)  # next() is one C call: a handler interrupting a handler cannot repeat a number
def on_alarm(signum, frame):
    sys.stdout.write(f"tick {next(counter)}\\n")
    sys.stdout.flush()
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
try:
    for i in range(20000):
        sys.stdout.write(f"line {i}\\n")  # one write: a handler can run between print()'s writes
        sys.stdout.flush()
finally:
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
next(counter) - 1
"""
    ex = session.execute(code, timeout=120)
    assert ex.status == "ok", ex.error
    ticks = int(ex.text)
    assert ticks > 0
    lines = ex.stdout.splitlines()
    assert [x for x in lines if x.startswith("line ")] == [f"line {i}" for i in range(20000)]
    assert sorted(int(x.split()[1]) for x in lines if x.startswith("tick ")) == list(range(1, ticks + 1))
    assert session.execute("6 * 7").text == "42"


def test_a_flushing_print_loop_loses_nothing_when_the_host_reads_slowly(session):
    """A subscriber with no room slows the printer down instead of losing its output."""
    slow = {"calls": 0}

    def on_stdout(text: str) -> None:
        slow["calls"] += 1
        if slow["calls"] % 500 == 0:
            time.sleep(0.05)  # a host busy elsewhere: the kernel must wait for it, not drop

    ex = session.execute("for i in range(50000):\n    print(i, flush=True)", on_stdout=on_stdout, timeout=300)
    assert ex.status == "ok"
    assert ex.stdout.split() == [str(i) for i in range(50000)]
