"""AG2, either major, from one import path.

AG2 1.x (``pip install "kernelexec[ag2]"``, module ``ag2``)::

    from kernelexec.integrations.ag2 import KernelExecEnvironment, KernelExecTool

AG2 classic (``pip install "kernelexec[ag2]" "ag2<1"``, module ``autogen``)::

    from kernelexec.integrations.ag2 import KernelExecExecutor

The two majors cannot be installed together, so each name imports its own
framework only when it is asked for, and says which major it needs when the
other one is installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ag2_classic import KernelExecExecutor
    from .ag2_v1 import KernelExecEnvironment, KernelExecTool

__all__ = ["KernelExecEnvironment", "KernelExecExecutor", "KernelExecTool"]

_V1 = ("AG2 1.x (module ag2): pip install 'ag2>=1,<2'. With the classic AG2 (module autogen) "
       "use KernelExecExecutor")
_CLASSIC = ("the classic AG2 (module autogen, ag2<1): pip install 'ag2<1'. With AG2 1.x use "
            "KernelExecEnvironment and ag2.tools.SandboxCodeTool")
#: name -> (module here, the framework module it imports, what to install when that is missing)
_HOME = {
    "KernelExecEnvironment": ("ag2_v1", "ag2", _V1),
    "KernelExecTool": ("ag2_v1", "ag2", _V1),
    "KernelExecExecutor": ("ag2_classic", "autogen", _CLASSIC),
}


def __getattr__(name: str) -> Any:
    try:
        module, framework, needs = _HOME[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != framework:
            raise
        raise ImportError(f"{name} needs {needs}", name=e.name) from e
    return getattr(mod, name)
