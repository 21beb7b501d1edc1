"""``kernelexec audit --agents PATH``: unsafe code-execution settings in AutoGen 0.2 / AG2 agent code.

Files are parsed with :mod:`ast`; nothing is imported or run, so auditing a
hostile repository is safe. The checks are the unsafe defaults the field's
own write-ups list: code run on the host (``use_docker=False``,
``AUTOGEN_USE_DOCKER`` off, local or embedded executors), code execution on
a ``GroupChatManager`` or on more agents than one dedicated executor, no
timeout, a work_dir that is the project or the home directory, host
directories mounted into the container, and containers run as root or with
the network on.
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .audit import Severity

FIX = ("run code in kernelexec: code_execution_config={'executor': KernelExecExecutor(profile='coder', "
       "timeout=60)} (from kernelexec.integrations.ag2)")
AGENT_CLASSES = {"UserProxyAgent", "ConversableAgent", "AssistantAgent", "GroupChatManager"}
LOCAL_EXECUTORS = {"LocalCommandLineCodeExecutor", "EmbeddedIPythonCodeExecutor", "LocalJupyterServer"}
LOCAL_EXECUTOR_NAMES = {"commandline-local", "ipython-embedded", "jupyter-local"}
DOCKER_EXECUTORS = {"DockerCommandLineCodeExecutor", "DockerJupyterServer"}


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
        return {k.value: v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)
                and isinstance(k.value, str)}
    if isinstance(node, ast.Call) and _name(node.func) == "dict":
        return {kw.arg: kw.value for kw in node.keywords if kw.arg}
    return None


def _home_or_project(node: ast.expr) -> bool:
    value = _const(node)
    if isinstance(value, str):
        v = value.strip()
        return v in (".", "./", "", "~", "..") or v.startswith(("~/", "/home/", "/root", "/Users/"))
    if isinstance(node, ast.Call):
        called = ast.unparse(node.func)
        return called in ("os.getcwd", "Path.cwd", "pathlib.Path.cwd", "Path.home", "pathlib.Path.home",
                          "os.path.expanduser") or called.endswith((".cwd", ".home"))
    return False


class _FileAudit:
    def __init__(self, path: Path, display: str) -> None:
        self.path, self.display = path, display
        self.findings: list[AgentFinding] = []
        self.executing_agents: list[tuple[int, str]] = []

    def add(self, node: ast.AST, severity: Severity, check: str, detail: str, fix: str = FIX) -> None:
        self.findings.append(AgentFinding(self.display, getattr(node, "lineno", 0), severity, check, detail, fix))

    def run(self) -> None:
        tree = ast.parse(self.path.read_text(), filename=str(self.path))
        assigned: dict[str, ast.expr] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                assigned[node.targets[0].id] = node.value
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
        cls = _name(node.func)
        kwargs = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        if cls in LOCAL_EXECUTORS:
            self.add(node, "high", "local executor", f"{cls} runs code on the host, outside any sandbox")
        if cls in DOCKER_EXECUTORS:
            self._docker_executor(node, cls, kwargs, assigned)
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
            if isinstance(executor, ast.Name) and executor.id in assigned and isinstance(assigned[executor.id], ast.Call):
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
        if work_dir is not None and _home_or_project(work_dir):
            self.add(work_dir, "high", "work_dir is the project or home",
                     f"{agent_name}: work_dir {ast.unparse(work_dir)} exposes the project or home directory "
                     "to generated code", "use a dedicated empty directory, or kernelexec (no host directory)")
        if use_docker is None or not _falsy(_const(use_docker)):
            # AG2's legacy Docker path (the default): python:3-slim, as root, network on, unless docker_config says otherwise
            docker_cfg = cfg.get("docker_config")
            d = (_dict_items(docker_cfg, assigned) or {}) if docker_cfg is not None else {}
            self._docker_settings(docker_cfg if docker_cfg is not None else cfg_node, agent_name, d)

    def _docker_executor(self, node: ast.Call, cls: str, kwargs: dict[str, ast.expr],
                         assigned: dict[str, ast.expr]) -> None:
        for key in ("bind_dir", "work_dir"):
            if key in kwargs and _home_or_project(kwargs[key]):
                self.add(kwargs[key], "high", "host directory mounted",
                         f"{cls}({key}={ast.unparse(kwargs[key])}) mounts the project or home directory into the "
                         "container", "mount nothing; move files in with kernelexec's upload()")
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


def audit_agents(path: str | Path) -> list[AgentFinding]:
    """Findings for one file or every ``.py`` below a directory, most severe first."""
    root = Path(path)
    files: Iterator[Path] = iter([root]) if root.is_file() else iter(sorted(root.rglob("*.py")))
    out: list[AgentFinding] = []
    for f in files:
        display = str(f if root.is_file() else f.relative_to(root.parent))
        fa = _FileAudit(f, display)
        try:
            fa.run()
        except SyntaxError as e:
            out.append(AgentFinding(display, e.lineno or 0, "low", "unparseable", f"not valid Python: {e.msg}",
                                    "fix the syntax so the file can be audited"))
        out.extend(fa.findings)
    rank = {"high": 0, "medium": 1, "low": 2, "info": 3}
    return sorted(out, key=lambda x: (rank[x.severity], x.file, x.line, x.check))


def format_findings(findings: list[AgentFinding]) -> str:
    if not findings:
        return "no unsafe code-execution settings found"
    lines = []
    for f in findings:
        lines.append(f"{f.severity.upper():<7} {f.where()}  {f.check}: {f.detail}\n        fix: {f.fix}")
    return "\n".join(lines)


def findings_json(findings: list[AgentFinding]) -> list[dict[str, object]]:
    return [asdict(f) for f in findings]
