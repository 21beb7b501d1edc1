"""``kernelexec audit --agents PATH``: unsafe code-execution settings in AutoGen (0.2/AG2 and 0.7) agent code.

Files are parsed with :mod:`ast`; nothing is imported or run, so auditing a
hostile repository is safe. The checks are the unsafe defaults the field's
own write-ups list: code run on the host (``use_docker=False``,
``AUTOGEN_USE_DOCKER`` off, local or embedded executors), code execution on
a ``GroupChatManager`` or on more agents than one dedicated executor, no
timeout, a work_dir that is the project or the home directory, host
directories mounted into the container, and containers run as root or with
the network on.

It is meant to gate CI, so it never passes on nothing: a path that does not
exist is an error, and the result says how many files were read (a run that
read none is not a clean run). A fix names the executor of the framework the
file uses: AutoGen 0.7 code (``autogen_agentchat``/``autogen_ext``/
``autogen_core``) gets kernelexec's AutoGen 0.7 executor, AG2 code the AG2 one.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass
from pathlib import Path

from .audit import Severity

FIX = ("run code in kernelexec: code_execution_config={'executor': KernelExecExecutor(profile='coder', "
       "timeout=60)} (from kernelexec.integrations.ag2)")
#: the same fix for AutoGen 0.7, whose agents take a CodeExecutor, not a config dict
FIX_AUTOGEN = ("run code in kernelexec: CodeExecutorAgent('executor', code_executor=KernelExecCodeExecutor("
               "profile='coder', timeout=60)) (from kernelexec.integrations.autogen)")
AGENT_CLASSES = {"UserProxyAgent", "ConversableAgent", "AssistantAgent", "GroupChatManager"}
LOCAL_EXECUTORS = {"LocalCommandLineCodeExecutor", "EmbeddedIPythonCodeExecutor", "LocalJupyterServer"}
#: AutoGen 0.7's JupyterCodeExecutor starts an ipykernel on the host (AG2's connects to a server: see above)
LOCAL_EXECUTORS_AUTOGEN = LOCAL_EXECUTORS | {"JupyterCodeExecutor"}
LOCAL_EXECUTOR_NAMES = {"commandline-local", "ipython-embedded", "jupyter-local"}
DOCKER_EXECUTORS = {"DockerCommandLineCodeExecutor", "DockerJupyterServer"}
#: module prefixes of AutoGen 0.7 (the 0.4+ line); ``autogen`` alone is AutoGen 0.2 / AG2
AUTOGEN_MODULES = ("autogen_agentchat", "autogen_ext", "autogen_core")
#: path-valued calls that give the project (working) directory or the home directory
CWD_CALLS = {"os.getcwd", "os.getcwdb", "getcwd", "Path.cwd", "pathlib.Path.cwd", "cwd"}
HOME_CALLS = {"Path.home", "pathlib.Path.home", "home"}
PATH_TYPES = {"Path", "pathlib.Path", "PurePath", "PosixPath", "pathlib.PurePath", "pathlib.PosixPath",
              "os.fspath", "str", "os.path.normpath", "normpath", "os.path.abspath", "abspath",
              "os.path.realpath", "realpath", "os.path.expandvars", "expandvars"}
PATH_METHODS = {"resolve", "absolute", "expanduser", "expandvars"}


@dataclass(frozen=True)
class AgentFinding:
    file: str
    line: int
    severity: Severity
    check: str
    detail: str
    fix: str

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _const(node: ast.expr | None) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    return _Unknown


class _UnknownType:
    def __repr__(self) -> str:
        return "<unknown>"


_Unknown = _UnknownType()


def _falsy(value: object) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() in ("false", "0", "no", ""))


def _dict_items(node: ast.expr, assigned: dict[str, ast.expr]) -> dict[str, ast.expr] | None:
    """A dict literal (or dict(...) call, or a name assigned one) as {key: value node}."""
    if isinstance(node, ast.Name) and node.id in assigned:
        node = assigned[node.id]
    if isinstance(node, ast.Dict):
        return {k.value: v for k, v in zip(node.keys, node.values, strict=True) if isinstance(k, ast.Constant)
                and isinstance(k.value, str)}
    if isinstance(node, ast.Call) and _name(node.func) == "dict":
        return {kw.arg: kw.value for kw in node.keywords if kw.arg}
    return None


def _path_kind(node: ast.expr | None, assigned: dict[str, ast.expr], depth: int = 0) -> str | None:
    """What host directory a path expression names: "project", "home", "root", or None (anything else).

    Covers the spellings found in agent code: literals (".", "~", "/home/..."),
    ``os.getcwd()``, ``Path.cwd()``, ``Path.home()``, ``os.path.expanduser("~")``,
    ``Path("~").expanduser()``, ``Path(__file__).parent``, ``os.environ["HOME"]``,
    ``Path.home() / "x"``, and a name assigned one of these.
    """
    if node is None or depth > 8:
        return None
    value = _const(node)
    if isinstance(value, (str, bytes)):
        v = (value.decode(errors="replace") if isinstance(value, bytes) else value).strip()
        if v in (".", "./", "", ".."):
            return "project"
        if v in ("~", "$HOME", "${HOME}") or v.startswith(("~/", "$HOME/", "${HOME}/", "/home/", "/root",
                                                           "/Users/")):
            return "home"
        if v == "/":
            return "root"
        return None
    if isinstance(node, ast.Name):
        if node.id in assigned and assigned[node.id] is not node:
            return _path_kind(assigned[node.id], assigned, depth + 1)
        return None
    if isinstance(node, ast.Attribute):
        if node.attr == "parent" and (_is_file_ref(node.value, assigned, depth + 1)
                                      or _path_kind(node.value, assigned, depth + 1) == "project"):
            return "project"
        if ast.unparse(node) in ("os.curdir", "os.pardir", "curdir"):
            return "project"
        return None
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
        return _env_kind(_const(node.slice))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        # below home is still the user's files (as "~/x" is); below the project is a dedicated directory
        return "home" if _path_kind(node.left, assigned, depth + 1) == "home" else None
    if not isinstance(node, ast.Call):
        return None
    called = ast.unparse(node.func)
    first = node.args[0] if node.args else None
    if called in CWD_CALLS:
        return "project"
    if called in HOME_CALLS:
        return "home"
    if called in ("os.getenv", "getenv", "os.environ.get", "environ.get"):
        return _env_kind(_const(first))
    if called in ("os.path.expanduser", "expanduser"):
        return _path_kind(first, assigned, depth + 1)
    if called in ("os.path.dirname", "dirname"):
        if first is not None and (_is_file_ref(first, assigned, depth + 1)
                                  or _path_kind(first, assigned, depth + 1) == "project"):
            return "project"
        return None
    if called in ("os.path.join", "join") and first is not None:
        return "home" if _path_kind(first, assigned, depth + 1) == "home" else None
    if called in PATH_TYPES:
        return _path_kind(first, assigned, depth + 1) if first is not None else (
            "project" if called in ("Path", "pathlib.Path", "PurePath", "PosixPath") else None)
    if isinstance(node.func, ast.Attribute) and node.func.attr in PATH_METHODS:
        return _path_kind(node.func.value, assigned, depth + 1)
    return None


def _env_kind(name: object) -> str | None:
    return {"HOME": "home", "USERPROFILE": "home", "PWD": "project"}.get(name) if isinstance(name, str) else None


def _is_file_ref(node: ast.expr, assigned: dict[str, ast.expr], depth: int) -> bool:
    """``__file__``, possibly wrapped: Path(__file__), os.path.abspath(__file__), Path(__file__).resolve()."""
    if depth > 8:
        return False
    if isinstance(node, ast.Name):
        if node.id == "__file__":
            return True
        return node.id in assigned and _is_file_ref(assigned[node.id], assigned, depth + 1)
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute) and node.func.attr in PATH_METHODS:
            return _is_file_ref(node.func.value, assigned, depth + 1)
        if ast.unparse(node.func) in PATH_TYPES and node.args:
            return _is_file_ref(node.args[0], assigned, depth + 1)
    return False


def _home_or_project(node: ast.expr, assigned: dict[str, ast.expr]) -> bool:
    return _path_kind(node, assigned) is not None


def _describe(node: ast.expr, assigned: dict[str, ast.expr]) -> str:
    kind = _path_kind(node, assigned)
    where = {"project": "the project (working) directory", "home": "the home directory",
             "root": "the host's root directory"}.get(kind or "", "a host directory")
    return f"{ast.unparse(node)} is {where}"


class _FileAudit:
    def __init__(self, path: Path, display: str) -> None:
        self.path, self.display = path, display
        self.findings: list[AgentFinding] = []
        self.executing_agents: list[tuple[int, str]] = []
        #: imported name -> (module, the name it has there): resolves aliases and tells AutoGen 0.7 from AG2
        self.imports: dict[str, tuple[str, str]] = {}
        self.default_autogen = False

    def add(self, node: ast.AST, severity: Severity, check: str, detail: str, fix: str = FIX) -> None:
        self.findings.append(AgentFinding(self.display, getattr(node, "lineno", 0), severity, check, detail, fix))

    def run(self) -> None:
        tree = ast.parse(self.path.read_bytes(), filename=str(self.path))  # bytes: honours a coding cookie
        assigned: dict[str, ast.expr] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                assigned[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                assigned[node.target.id] = node.value
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.imports[a.asname or a.name] = (node.module, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    self.imports[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0],
                                                                      "")
        modules = {m for m, _ in self.imports.values()}
        uses_autogen = any(m.startswith(AUTOGEN_MODULES) for m in modules)
        uses_ag2 = any(m == "autogen" or m.startswith(("autogen.", "ag2")) for m in modules)
        self.default_autogen = uses_autogen and not uses_ag2
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.Call)):
                self._env(node)
            if isinstance(node, ast.Call):
                self._call(node, assigned)
        if len(self.executing_agents) > 1:
            line, _ = self.executing_agents[1]
            names = ", ".join(n for _, n in self.executing_agents)
            self.findings.append(AgentFinding(
                self.display, line, "medium", "more than one executing agent",
                f"{len(self.executing_agents)} agents can execute code ({names}); give code execution to one "
                "dedicated executor agent that the others must ask", FIX))

    def _resolve(self, func: ast.expr) -> tuple[str, str | None]:
        """The called class's real name (aliases undone) and the module it came from, when known."""
        if isinstance(func, ast.Name):
            module, real = self.imports.get(func.id, (None, ""))
            return (real or func.id), module
        if isinstance(func, ast.Attribute):
            base = ast.unparse(func.value)
            head, _, rest = base.partition(".")
            if head in self.imports:
                module, real = self.imports[head]
                base = ".".join(x for x in (module, real, rest) if x)
            return func.attr, base
        return "", None

    def _is_autogen(self, module: str | None) -> bool:
        """AutoGen 0.7 (rather than AutoGen 0.2 / AG2): from the import when known, else from the file's imports."""
        if module is not None and (module.startswith(AUTOGEN_MODULES) or module == "autogen"
                                   or module.startswith("autogen.")):
            return module.startswith(AUTOGEN_MODULES)
        return self.default_autogen

    def _env(self, node: ast.Assign | ast.Call) -> None:
        """AUTOGEN_USE_DOCKER turned off through os.environ."""
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Subscript) and ast.unparse(t.value) in ("os.environ", "environ") \
                        and _const(t.slice) == "AUTOGEN_USE_DOCKER" and _falsy(_const(node.value)):
                    self.add(node, "high", "AUTOGEN_USE_DOCKER", "AUTOGEN_USE_DOCKER is set to false: every "
                             "agent runs code on the host with this process's privileges")
        elif ast.unparse(node.func) in ("os.environ.setdefault", "os.putenv", "environ.setdefault") \
                and len(node.args) == 2 and _const(node.args[0]) == "AUTOGEN_USE_DOCKER" \
                and _falsy(_const(node.args[1])):
            self.add(node, "high", "AUTOGEN_USE_DOCKER", "AUTOGEN_USE_DOCKER is set to false: every agent "
                     "runs code on the host")

    def _call(self, node: ast.Call, assigned: dict[str, ast.expr]) -> None:
        cls, module = self._resolve(node.func)
        kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        autogen = self._is_autogen(module)
        fix = FIX_AUTOGEN if autogen else FIX
        if cls in (LOCAL_EXECUTORS_AUTOGEN if autogen else LOCAL_EXECUTORS):
            self.add(node, "high", "local executor", f"{cls} runs code on the host, outside any sandbox", fix)
            for key in ("work_dir", "output_dir"):
                if key in kwargs and _home_or_project(kwargs[key], assigned):
                    self.add(kwargs[key], "high", "work_dir is the project or home",
                             f"{cls}({key}={ast.unparse(kwargs[key])}): {_describe(kwargs[key], assigned)}; "
                             "generated code reads and writes there", fix)
        if cls in DOCKER_EXECUTORS:
            self._docker_executor(node, cls, kwargs, assigned, autogen)
        if cls not in AGENT_CLASSES:
            return
        agent = _const(kwargs.get("name")) if "name" in kwargs else (
            _const(node.args[0]) if node.args else _Unknown)
        agent_name = agent if isinstance(agent, str) else cls
        cfg_node = kwargs.get("code_execution_config")
        if cfg_node is None:
            if cls == "UserProxyAgent":
                self.executing_agents.append((node.lineno, agent_name))
                self.add(node, "medium", "implicit code execution",
                         f"{agent_name}: UserProxyAgent executes code by default (code_execution_config "
                         "omitted); make it explicit")
            return
        if _const(cfg_node) is False or _const(cfg_node) is None:
            return
        self.executing_agents.append((node.lineno, agent_name))
        if cls == "GroupChatManager":
            self.add(node, "high", "code execution on GroupChatManager",
                     f"{agent_name}: a GroupChatManager routes messages; it must not execute code",
                     "remove code_execution_config from the manager; give it to one executor agent")
        cfg = _dict_items(cfg_node, assigned)
        if cfg is None:
            return
        executor = cfg.get("executor")
        if executor is not None:
            if _const(executor) in LOCAL_EXECUTOR_NAMES:
                self.add(executor, "high", "local executor", f"{agent_name}: executor "
                         f"{_const(executor)!r} runs code on the host")
            called = executor.func if isinstance(executor, ast.Call) else executor
            if (isinstance(executor, ast.Name) and executor.id in assigned
                    and isinstance(assigned[executor.id], ast.Call)):
                called = assigned[executor.id].func  # type: ignore[attr-defined]
                executor = assigned[executor.id]
            if isinstance(executor, ast.Call) and not any(kw.arg == "timeout" for kw in executor.keywords) \
                    and _name(called) not in LOCAL_EXECUTORS:
                self.add(executor, "medium", "missing timeout",
                         f"{agent_name}: the executor has no timeout; a hung block blocks the agent forever",
                         "pass timeout=... to the executor")
            return
        use_docker = cfg.get("use_docker")
        if use_docker is not None and _falsy(_const(use_docker)):
            self.add(use_docker, "high", "use_docker=False",
                     f"{agent_name}: code runs on the host with this process's privileges")
        if "timeout" not in cfg:
            self.add(cfg_node, "medium", "missing timeout",
                     f"{agent_name}: no timeout in code_execution_config; a hung block blocks the agent forever",
                     "set 'timeout' (seconds), or use the kernelexec executor, which always has one")
        work_dir = cfg.get("work_dir")
        if work_dir is not None and _home_or_project(work_dir, assigned):
            self.add(work_dir, "high", "work_dir is the project or home",
                     f"{agent_name}: work_dir {ast.unparse(work_dir)} exposes the project or home directory "
                     "to generated code", "use a dedicated empty directory, or kernelexec (no host directory)")
        if use_docker is None or not _falsy(_const(use_docker)):
            # AG2's legacy Docker path (the default): python:3-slim, as root, network on, unless docker_config
            # says otherwise
            docker_cfg = cfg.get("docker_config")
            d = (_dict_items(docker_cfg, assigned) or {}) if docker_cfg is not None else {}
            self._docker_settings(docker_cfg if docker_cfg is not None else cfg_node, agent_name, d)

    def _docker_executor(self, node: ast.Call, cls: str, kwargs: dict[str, ast.expr],
                         assigned: dict[str, ast.expr], autogen: bool) -> None:
        mounted = False
        for key in ("bind_dir", "work_dir"):
            if key in kwargs and _home_or_project(kwargs[key], assigned):
                mounted = True
                self.add(kwargs[key], "high", "host directory mounted",
                         f"{cls}({key}={ast.unparse(kwargs[key])}) mounts the project or home directory into the "
                         f"container ({_describe(kwargs[key], assigned)})",
                         "mount nothing; move files in with kernelexec's upload()")
        if not autogen and not mounted and cls == "DockerCommandLineCodeExecutor" \
                and "work_dir" not in kwargs and "bind_dir" not in kwargs:
            # AG2's default work_dir is Path("."), and bind_dir defaults to work_dir (AutoGen 0.7: a temp dir)
            self.add(node, "high", "host directory mounted",
                     f"{cls}() without work_dir mounts the current directory (AG2's default work_dir is '.') "
                     "into the container", "pass a dedicated empty work_dir, or use kernelexec (mounts nothing)")
        if "extra_volumes" in kwargs:
            self.add(kwargs["extra_volumes"], "medium", "host directory mounted",
                     f"{cls}(extra_volumes=...) mounts host directories into the container",
                     "mount nothing, or read-only and only what the task needs")
        extra = kwargs.get("container_create_kwargs") or kwargs.get("container_kwargs")
        d = _dict_items(extra, assigned) if extra is not None else None
        self._docker_settings(node, cls, d or {}, default_network_on=True)

    def _docker_settings(self, node: ast.AST, who: str, d: dict[str, ast.expr],
                         default_network_on: bool = True) -> None:
        user = _const(d.get("user")) if "user" in d else None
        if user is None or user in ("root", "0", 0) or (isinstance(user, str) and user.startswith(("0:", "root:"))):
            self.add(d.get("user", node), "medium" if user is None else "high", "container runs as root",
                     f"{who}: the container runs as root" + (" (no user set)" if user is None else ""),
                     "set a non-root user, or use kernelexec (never root, all capabilities dropped)")
        network = _const(d.get("network_mode")) if "network_mode" in d else None
        if network == "host":
            self.add(d["network_mode"], "high", "host network", f"{who}: network_mode='host' shares the host's "
                     "network stack", "network_mode='none' (kernelexec's default)")
        elif network != "none" and default_network_on:
            self.add(d.get("network_mode", node), "medium", "network on",
                     f"{who}: the container can reach the network (exfiltration, pivoting)",
                     "network_mode='none' (kernelexec's default)")
        if _const(d.get("privileged")) is True:
            self.add(d["privileged"], "high", "privileged container", f"{who}: privileged=True disables the "
                     "container boundary", "never run agent code privileged")
        if "volumes" in d:
            self.add(d["volumes"], "medium", "host directory mounted", f"{who}: host volumes are mounted",
                     "mount nothing, or read-only and only what the task needs")


@dataclass(frozen=True)
class AgentAudit:
    """What ``audit --agents`` read and found: a clean result is only as good as ``files``."""

    path: str
    files: tuple[str, ...]
    findings: list[AgentFinding]


def scan_agents(path: str | Path) -> AgentAudit:
    """Audit one file or every ``.py`` below a directory; findings most severe first.

    Raises FileNotFoundError for a path that does not exist: a CI gate pointed
    at a misspelt directory must fail, not pass on nothing.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{path} does not exist")
    files = [root] if not root.is_dir() else sorted(root.rglob("*.py"))
    out: list[AgentFinding] = []
    read: list[str] = []
    for f in files:
        display = str(f if not root.is_dir() else f.relative_to(root.parent))
        fa = _FileAudit(f, display)
        try:
            fa.run()
        except SyntaxError as e:
            out.append(AgentFinding(display, e.lineno or 0, "low", "unparseable", f"not valid Python: {e.msg}",
                                    "fix the syntax so the file can be audited"))
            continue
        except (OSError, ValueError) as e:  # unreadable, or bytes no encoding cookie explains
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            out.append(AgentFinding(display, 0, "medium", "unreadable", f"could not be read: {detail}",
                                    "make the file readable so it can be audited"))
            continue
        read.append(display)
        out.extend(fa.findings)
    rank = {"high": 0, "medium": 1, "low": 2, "info": 3}
    return AgentAudit(str(path), tuple(read),
                      sorted(out, key=lambda x: (rank[x.severity], x.file, x.line, x.check)))


def audit_agents(path: str | Path) -> list[AgentFinding]:
    """Findings for one file or every ``.py`` below a directory, most severe first (see :func:`scan_agents`)."""
    return scan_agents(path).findings


def format_findings(findings: list[AgentFinding]) -> str:
    if not findings:
        return "no unsafe code-execution settings found"
    lines = []
    for f in findings:
        lines.append(f"{f.severity.upper():<7} {f.where()}  {f.check}: {f.detail}\n        fix: {f.fix}")
    return "\n".join(lines)


def format_audit(audit: AgentAudit) -> str:
    """The findings, then how many files they come from (a run that read 0 files says so)."""
    n = len(audit.files)
    summary = f"read {n} Python file{'' if n == 1 else 's'} from {audit.path}"
    if not n:
        return summary + ": nothing was audited"
    if not audit.findings:
        return f"no unsafe code-execution settings found; {summary}"
    return format_findings(audit.findings) + f"\n{len(audit.findings)} finding(s); {summary}"


def findings_json(findings: list[AgentFinding]) -> list[dict[str, object]]:
    return [asdict(f) for f in findings]


def audit_json(audit: AgentAudit) -> dict[str, object]:
    return {"path": audit.path, "files_read": len(audit.files), "files": list(audit.files),
            "agents": findings_json(audit.findings)}
