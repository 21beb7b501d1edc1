"""The output collector and the host-kernel contract, alone: pure code, no engine, no kernel.

The same collector runs under every transport (the session's tests prove it against real kernels);
here each rule is pinned with messages a hostile or merely busy kernel could send.
"""

from __future__ import annotations

import json

import pytest

from kernelexec.backend.attach.boot import boot_message
from kernelexec.backend.attach.framing import BOOT_HEADER, decode_boot_header
from kernelexec.kernel.contract import (
    CONNECTION_FILE,
    LAUNCH_FILE,
    PORTS,
    STARTUP_FILE,
    connection_file,
    kernel_argv,
    launch_source,
    startup_source,
)
from kernelexec.kernel.output import MAX_TRACEBACK, SMALL_RESULT, Callbacks, OutputCollector
from kernelexec.policy import Policy
from kernelexec.results import ErrorInfo, Execution, MimeBundle, Stream


def collector(limit: int = 1000, **callbacks) -> OutputCollector:
    return OutputCollector(Execution(code="x"), limit, Callbacks(**callbacks))


def stream(text: str, name: str = "stdout") -> tuple[str, dict, int]:
    return "stream", {"name": name, "text": text}, len(text)


def display(data: dict, kind: str = "display_data", display_id: str | None = None, **extra) -> tuple[str, dict, int]:
    content = {"data": data, "metadata": {}, **extra}
    if display_id is not None:
        content["transient"] = {"display_id": display_id}
    return kind, content, len(json.dumps(data))


def feed(c: OutputCollector, *messages: tuple[str, dict, int]) -> list[bool]:
    return [c.handle(*m) for m in messages]


def test_streams_of_one_name_merge_and_the_idle_status_is_reported():
    c = collector()
    idles = feed(c, ("status", {"execution_state": "busy"}, 0), stream("a"), stream("b"), stream("!", "stderr"),
                 stream("c"), ("status", {"execution_state": "idle"}, 0))
    assert idles == [False, False, False, False, False, True]
    assert c.execution.outputs == [Stream("stdout", "ab"), Stream("stderr", "!"), Stream("stdout", "c")]
    assert c.execution.output_bytes == 4


def test_output_past_the_budget_is_cut_once_with_a_marker():
    c = collector(limit=10)
    feed(c, stream("0123456789abc"), stream("more"), display({"text/plain": "x" * 100}))
    ex = c.execution
    assert ex.truncated and ex.output_bytes == 10
    assert ex.outputs[0] == Stream("stdout", "0123456789")
    markers = [o for o in ex.outputs if isinstance(o, Stream) and "truncated" in o.text]
    assert len(markers) == 1 and "10" in markers[0].text
    assert not any(isinstance(o, MimeBundle) for o in ex.outputs)


def test_a_small_cell_value_is_kept_past_the_budget_and_a_large_one_is_not():
    c = collector(limit=5)
    feed(c, stream("x" * 50), display({"text/plain": "42"}, "execute_result", execution_count=1))
    assert [o.data for o in c.execution.outputs if isinstance(o, MimeBundle)] == [{"text/plain": "42"}]
    c = collector(limit=5)
    feed(c, stream("x" * 50), display({"text/plain": "y" * (SMALL_RESULT + 1)}, "execute_result"))
    assert not any(isinstance(o, MimeBundle) for o in c.execution.outputs)


def test_multibyte_text_is_cut_on_a_character_boundary():
    c = collector(limit=5)
    feed(c, stream("ééé"))  # 6 bytes
    assert c.execution.outputs[0] == Stream("stdout", "éé")
    assert c.execution.truncated


def test_clear_output_now_and_on_the_next_output():
    c = collector()
    feed(c, stream("old"), ("clear_output", {"wait": False}, 0))
    assert c.execution.outputs == []
    feed(c, stream("kept"), ("clear_output", {"wait": True}, 0))
    assert c.execution.outputs == [Stream("stdout", "kept")]
    feed(c, stream("new"))
    assert c.execution.outputs == [Stream("stdout", "new")]


def test_a_display_is_updated_by_its_id_only():
    c = collector()
    feed(c, display({"text/plain": "0%"}, display_id="bar"), display({"text/plain": "other"}, display_id="x"),
         display({"text/plain": "100%"}, "update_display_data", display_id="bar"))
    assert [o.data["text/plain"] for o in c.execution.outputs] == ["100%", "other"]


def test_output_after_idle_is_a_background_threads_until_the_kernel_is_busy_again():
    c = collector()
    feed(c, stream("cell"), ("status", {"execution_state": "idle"}, 0), stream("late"),
         display({"text/plain": "late"}), ("error", {"ename": "E", "evalue": "", "traceback": []}, 0))
    assert c.execution.outputs == [Stream("stdout", "cell")]
    feed(c, ("status", {"execution_state": "busy"}, 0), stream("again"))  # a forged idle, then busy
    assert c.execution.outputs == [Stream("stdout", "cellagain")]


def test_malformed_content_is_read_as_nothing_rather_than_raising():
    c = collector()
    feed(c, ("display_data", {"data": "not a dict", "metadata": 3, "transient": []}, 10),
         ("error", {"traceback": "not a list"}, 10), ("execute_input", {"execution_count": "7"}, 0),
         ("update_display_data", {"transient": {"display_id": 5}}, 0), ("comm_open", {}, 0))
    assert c.execution.outputs[0] == MimeBundle(data={}, metadata={}, kind="display_data")
    assert isinstance(c.execution.outputs[1], ErrorInfo)
    assert c.execution.execution_count is None


def test_the_reply_is_authoritative_and_supplies_an_error_iopub_lost():
    c = collector()
    tb = ["\x1b[31mTraceback\x1b[0m", "x" * (MAX_TRACEBACK * 2)]
    ex = c.finish({"status": "error", "ename": "ValueError", "evalue": "bad", "traceback": tb, "execution_count": 3},
                  {"kernelexec": {"memory_peak": 1234}})
    assert (ex.status, ex.execution_count, ex.memory_peak) == ("error", 3, 1234)
    assert ex.error is not None and ex.error.ename == "ValueError"
    assert len(ex.error.traceback) == MAX_TRACEBACK and "\x1b" not in ex.error.traceback
    odd = collector().finish({"status": "weird"}, {"kernelexec": {"memory_peak": True}})
    assert odd.status == "error" and odd.memory_peak is None


def test_a_callback_that_raises_is_kept_for_later_and_collection_goes_on():
    seen: list[str] = []

    def on_stdout(text: str) -> None:
        seen.append(text)
        raise RuntimeError("the caller's bug")

    c = collector(on_stdout=on_stdout)
    feed(c, stream("a"), stream("!", "stderr"), stream("b"))
    assert seen == ["a"]  # not called again once it failed
    assert isinstance(c.callback_error, RuntimeError)
    assert c.execution.outputs == [Stream("stdout", "a"), Stream("stderr", "!"), Stream("stdout", "b")]


# -- the contract --------------------------------------------------------------------------------------


def test_the_connection_file_is_what_jupyter_reads():
    jupyter_client = pytest.importorskip("jupyter_client")
    info = connection_file("/run/kernelexec/", b"k3y")
    assert info == {"transport": "ipc", "ip": "/run/kernelexec/k", "shell_port": 1, "iopub_port": 2,
                    "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": "k3y",
                    "signature_scheme": "hmac-sha256", "kernel_name": "kernelexec"}
    km = jupyter_client.KernelManager()
    km.load_connection_info(info)  # Jupyter's own reader accepts it whole
    assert (km.transport, km.ip, km.shell_port, km.hb_port) == ("ipc", "/run/kernelexec/k", 1, 5)
    assert "key" not in connection_file("/d") and connection_file("/d")["iopub_port"] == PORTS["iopub"]


def test_the_kernel_command_line_names_the_contracts_files():
    fast = kernel_argv("/py", "/run/kernelexec", fast=True)
    assert fast[:4] == ["/py", f"/run/kernelexec/{LAUNCH_FILE}", "-f", f"/run/kernelexec/{CONNECTION_FILE}"]
    assert fast[-1] == f"--IPKernelApp.exec_files=/run/kernelexec/{STARTUP_FILE}"
    stock = kernel_argv("/py", "/d/", fast=False, startup=False)
    assert stock[:5] == ["/py", "-m", "ipykernel_launcher", "-f", f"/d/{CONNECTION_FILE}"]
    assert not any("exec_files" in a for a in stock)


def test_the_attach_hello_carries_the_same_contract():
    """The relay writes the files the hello carries: the same names, connection file and sources as ipc."""
    message = boot_message(Policy(), b"secret")
    n = decode_boot_header(message[:BOOT_HEADER.size])
    config = json.loads(message[BOOT_HEADER.size:BOOT_HEADER.size + n])["config"]
    files = config["files"]
    assert json.loads(files[CONNECTION_FILE]) == connection_file("/run/kernelexec", b"secret")
    assert files[STARTUP_FILE].encode() == startup_source()
    assert files[LAUNCH_FILE].encode() == launch_source()
    assert config["argv"] == kernel_argv("/opt/kernel/bin/python", "/run/kernelexec", fast=True)
    assert config["ports"] == PORTS
