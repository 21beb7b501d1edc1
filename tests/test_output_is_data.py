"""Whatever ordinary code prints, raises or displays is data: it reaches the caller (repaired or
cut, with a marker) and the session goes on. Only a kernel that breaks the protocol on purpose
loses its session (tests/security/test_hostile_kernel.py)."""

from __future__ import annotations

import pytest

from kernelexec import CodeTooLarge, Policy, Session
from kernelexec.kernel.protocol import Signer, build, parse

SURROGATE_ESCAPED = 'b"caf\\xe9".decode("utf-8", "surrogateescape")'

#: Every way we know for code to put a lone surrogate (or a value JSON cannot hold) into a message.
#: Each is wrapped in prints before and after, which must both arrive.
LONE_SURROGATES = {
    "print": f"print({SURROGATE_ESCAPED})",
    "print, high surrogate": 'print("\\ud800 alone")',
    "stderr": f"import sys; sys.stderr.write({SURROGATE_ESCAPED} + '\\n')",
    "print from a thread": f"import threading; t = threading.Thread(target=lambda: print({SURROGATE_ESCAPED})); "
                           "t.start(); t.join()",
    "printed traceback": f"import traceback\ntry:\n    raise ValueError({SURROGATE_ESCAPED})\n"
                         "except ValueError:\n    traceback.print_exc()",
    "warning": f"import warnings; warnings.warn({SURROGATE_ESCAPED})",
    "html display": f"from IPython.display import HTML, display; display(HTML('<b>' + {SURROGATE_ESCAPED} + '</b>'))",
    "raw bundle with a surrogate key and NaN": "from IPython.display import display; "
        "display({'text/plain': 'x\\udce9', 'application/json': {'k\\udce9': float('nan')}}, raw=True)",
    "display metadata": "from IPython.display import display; display({'text/plain': 'y'}, "
                        "metadata={'m\\ud800': 1}, raw=True)",
    "update_display": "from IPython.display import display; h = display('a', display_id=True); "
                      "h.update({'text/plain': 'b\\udce9'}, raw=True)",
    "dataframe with surrogates": "import pandas as pd; from IPython.display import display; "
                                 "display(pd.DataFrame({'a\\udce9': ['b\\udce9']}))",
}


@pytest.mark.parametrize("fast", [True, False], ids=["fast kernel", "stock kernel"])
def test_lone_surrogates_anywhere_are_replaced_and_nothing_is_lost(kernel_image, fast):
    with Session(Policy(image=kernel_image, fast_kernel=fast)) as s:
        for name, code in LONE_SURROGATES.items():
            r = s.execute(f"print('before')\n{code}\nprint('after')")
            assert r.status == "ok", (name, r.error)
            assert r.stdout.startswith("before\n") and r.stdout.endswith("after\n"), (name, r.stdout)
            seen = r.stdout + r.stderr + repr([(b.data, b.metadata) for b in r.results])
            assert "\ufffd" in seen, (name, seen)
        # an error whose message holds one: the reply carries it too
        r = s.execute(f"raise ValueError({SURROGATE_ESCAPED})")
        assert r.error.ename == "ValueError" and r.error.evalue == "caf\ufffd"
        assert s.execute("1 + 1").text == "2"


def test_code_with_a_lone_surrogate_is_run_as_python_would(shared_session):
    # compile() refuses such source with UnicodeEncodeError: the same error, not a broken client
    r = shared_session.execute("x = '\udce9'")
    assert r.error.ename in ("UnicodeEncodeError", "SyntaxError")
    assert shared_session.execute("2 + 2").text == "4"


def test_messages_ordinary_code_makes_too_large_are_cut_not_fatal(kernel_image):
    # max_output_bytes above max_message_bytes: even a single print could break the frame limit
    policy = Policy(image=kernel_image, max_message_bytes="1m", max_output_bytes="4m", max_history_bytes="32m")
    with Session(policy) as s:
        s.execute("x = 41")
        r = s.execute("raise ValueError('v' * 3_000_000)")  # the message is in evalue and the traceback
        assert r.error.ename == "ValueError" and "[kernelexec: cut to fit" in r.error.evalue
        r = s.execute("print('p' * 3_000_000)")
        assert r.status == "ok" and "p" * 1000 in r.stdout
        r = s.execute("from IPython.display import display; display({'text/plain': 'd' * 3_000_000}, raw=True)")
        assert r.status == "ok"
        # code is measured as it is sent, escaped (a control character is six bytes of JSON): what fits
        # runs on every transport, and its echo fits too; what does not is refused before sending
        r = s.execute("z = '" + "\x01" * 150_000 + "'\nlen(z)")
        assert r.text == "150000"
        with pytest.raises(CodeTooLarge):
            s.execute("z = '" + "\x01" * 200_000 + "'")
        # a syntax error shows the offending line: a long one
        r = s.execute("y = (" + "1, " * 300_000)
        assert r.error.ename == "SyntaxError"
        assert s.execute("x + 1").text == "42"  # the same kernel, its state intact


def test_code_larger_than_a_message_is_refused_before_sending(kernel_image):
    with Session(Policy(image=kernel_image, max_message_bytes="1m")) as s:
        s.execute("x = 1")
        with pytest.raises(CodeTooLarge, match="max_message_bytes") as info:
            s.execute("y = '" + "a" * (1 << 20) + "'")
        assert info.value.size > info.value.limit and (1 << 20) - 8192 < info.value.limit < 1 << 20
        assert not info.value.state_lost
        r = s.execute("y = '" + "a" * 900_000 + "'; x + len(y)")  # just under: runs
        assert r.text == "900001"
        assert s.execute("x").text == "1"


def test_host_builds_a_valid_message_for_code_with_surrogates():
    # JSON's \u escape carries what UTF-8 cannot; the host never fails to send the caller's code
    signer = Signer(b"k")
    _, frames = build(signer, "execute_request", {"code": "'\udce9'"}, session="s")
    msg = parse(signer, [b"<IDS|MSG>", *frames[1:]])
    assert msg.content["code"] == "'\udce9'"
