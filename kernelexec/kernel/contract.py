"""What the host and the kernel it starts must agree on, whatever carries the channels.

Every backend (a container over ipc, the attach relay, a host process, Jupyter's own clients through
the bridge) lays the kernel's directory out the same way: a connection file, the kernel's main
program, its startup file, and ipc sockets named ``<ip>-<port>``. One definition here, so that a new
backend cannot disagree with the kernel side by a file name or a port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CONNECTION_FILE", "LAUNCH_FILE", "PORTS", "SIGNATURE_SCHEME", "SOCKET_BASENAME", "STARTUP_FILE",
           "connection_file", "kernel_argv", "launch_source", "startup_source"]

#: The five Jupyter channels and the "ports" of their ipc sockets (``<ip>-<port>``).
PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
#: The ipc sockets' common prefix (the connection file's ``ip``), inside the kernel's directory.
SOCKET_BASENAME = "k"
CONNECTION_FILE = "connection.json"
#: :mod:`.startup`, run by the kernel before the first cell.
STARTUP_FILE = "startup.py"
#: :mod:`.launch`, the kernel's main program when ``Policy.fast_kernel``.
LAUNCH_FILE = "launch.py"
SIGNATURE_SCHEME = "hmac-sha256"

_HERE = Path(__file__).resolve().parent


def launch_source() -> bytes:
    """:mod:`kernelexec.kernel.launch` as bytes: it is sent to the kernel, never imported on the host."""
    return (_HERE / "launch.py").read_bytes()


def startup_source() -> bytes:
    """:mod:`kernelexec.kernel.startup` as bytes: it is sent to the kernel, never imported on the host."""
    return (_HERE / "startup.py").read_bytes()


def connection_file(directory: str, key: bytes | None = None, *, kernel_name: str = "kernelexec") -> dict[str, Any]:
    """A Jupyter connection file for sockets in ``directory`` (as the reader of the file sees it).

    Without ``key``, the transport part only (for a caller that adds its own key, as Jupyter's
    ``KernelConnectionInfo`` wants it in bytes)."""
    info: dict[str, Any] = {"transport": "ipc", "ip": f"{directory.rstrip('/')}/{SOCKET_BASENAME}",
                            **{f"{name}_port": port for name, port in PORTS.items()}}
    if key is not None:
        info.update(key=key.decode(), signature_scheme=SIGNATURE_SCHEME, kernel_name=kernel_name)
    return info


def kernel_argv(python: str, directory: str, *, fast: bool, startup: bool = True) -> list[str]:
    """The kernel's command line, its files in ``directory`` (as the kernel sees it)."""
    base = directory.rstrip("/")
    main = [f"{base}/{LAUNCH_FILE}"] if fast else ["-m", "ipykernel_launcher"]
    argv = [python, *main, "-f", f"{base}/{CONNECTION_FILE}",
            # history on disk is pointless in a throwaway sandbox and costs time per cell
            "--HistoryManager.hist_file=:memory:", "--IPKernelApp.quiet=True"]
    if startup:
        argv.append(f"--IPKernelApp.exec_files={base}/{STARTUP_FILE}")
    return argv
