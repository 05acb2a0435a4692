"""Executors by task kind, and the built-in ones that need no daemon: noop and the bubblewrap shell.

The registry is the entry-point group `cortex.executors` and nothing else (name = the kind, value =
`module:Class`; the class is built with no arguments, or with `settings=` when its constructor takes it).
Cortex's own kinds are listed there in pyproject.toml like a third party's would be, so every node and the
command validator agree on the kinds that exist, whichever plugins a node enables. A kind whose executor
is unavailable on a node (no bwrap, no kubeconfig) is simply not offered by that node's reports, so its
tasks wait in the queue until a node that can run them appears.
"""

from __future__ import annotations

import inspect
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path

from cortex.core.commands import CommandError
from cortex.tasks.executor import Executor, Outcome, TaskRun, TaskSpecError

ENTRY_POINT_GROUP = "cortex.executors"
RESULT_FILE = "result.json"  # a task may leave a JSON result here; workflows and fan-in read it
MAX_RESULT_BYTES = 64 * 1024
STDOUT_TAIL = 4096
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL


@dataclass(frozen=True)
class ExecutorSettings:
    """Node-level settings an executor may use (from the tasks plugin's options)."""

    hide_paths: tuple[str, ...] = ()  # never visible inside a sandbox (the node's data dir: Raft secret)
    podman: str = "podman"
    agent_base_url: str = ""  # Anthropic Messages API base URL ("" = the SDK's default / ANTHROPIC_BASE_URL)
    agent_api_key_env: str = "ANTHROPIC_API_KEY"
    extra: dict = field(default_factory=dict)


def _load(value: str):
    module, _, attr = value.partition(":")
    return getattr(import_module(module), attr)


@cache
def factories() -> dict[str, str]:
    """{kind: "module:Class"} of the installed executors."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def kinds() -> list[str]:
    return sorted(factories())


def create(kind: str, settings: ExecutorSettings | None = None) -> Executor:
    cls = _load(factories()[kind])
    try:
        takes_settings = "settings" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes_settings = False
    return cls(settings=settings or ExecutorSettings()) if takes_settings else cls()


@cache
def _validator_instance(kind: str) -> Executor:
    return create(kind)


def validator_for(kind: str):
    if kind not in factories():
        raise CommandError(f"unknown task kind {kind!r}; known: {', '.join(kinds())}")
    try:
        return _validator_instance(kind).validate
    except (ImportError, AttributeError) as exc:
        raise CommandError(f"task kind {kind!r} cannot be loaded here: {exc}") from None


# --- helpers shared by executors ---------------------------------------------------------------------------

def check_env(env, where: str = "env") -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and k and "=" not in k and "\0" not in k and isinstance(v, str) and "\0" not in v
            for k, v in env.items()):
        raise TaskSpecError(f"{where} must map variable names to strings")
    if sum(len(k) + len(v) for k, v in env.items()) > 64 * 1024:
        raise TaskSpecError(f"{where} is larger than 64 KiB")
    return dict(sorted(env.items()))


def check_command(command) -> str | list[str]:
    if isinstance(command, str):
        if not command.strip():
            raise TaskSpecError("command is empty")
        if len(command) > 64 * 1024:
            raise TaskSpecError("command is longer than 64 KiB")
        return command
    if isinstance(command, list) and command and all(isinstance(a, str) and "\0" not in a for a in command):
        return list(command)
    raise TaskSpecError("command must be a shell string or a non-empty list of strings (argv)")


def number(spec: dict, name: str, lo: float, hi: float, integer: bool = False):
    value = spec.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TaskSpecError(f"{name} must be {'an integer' if integer else 'a number'}")
    if not lo <= value <= hi:
        raise TaskSpecError(f"{name} must be between {lo:g} and {hi:g}")
    return value


def only(spec: dict, allowed: set[str]) -> None:
    extra = set(spec) - allowed
    if extra:
        raise TaskSpecError(f"unknown field(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")


def read_result(workdir: Path) -> tuple[dict | list | str | int | float | None, str]:
    """The task's own result file (JSON), if it left one: (value, problem)."""
    import json

    path = workdir / RESULT_FILE
    try:
        if path.is_symlink() or not path.is_file():
            return None, ""
        if path.stat().st_size > MAX_RESULT_BYTES:
            return None, f"{RESULT_FILE} is larger than {MAX_RESULT_BYTES} bytes; ignored"
        return json.loads(path.read_text()), ""
    except (OSError, ValueError) as exc:
        return None, f"{RESULT_FILE} is not valid JSON: {exc}"


class ProcessWatch:
    """Run one process tree to completion: stream its output, enforce a deadline, kill it on cancel.

    The process gets its own session (process group); killing that group kills the tree. Sandboxes started
    through it (bwrap, podman) additionally tie their inner processes to it, so nothing survives.
    """

    def __init__(self, argv: list[str], run: TaskRun, env: dict[str, str] | None = None,
                 on_kill=None):
        self.argv, self.run, self.env, self.on_kill = argv, run, env, on_kill
        self.tail = bytearray()

    def _pump(self, stream, name: str) -> None:
        fd = stream.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            if name == "stdout":
                self.tail += data
                del self.tail[:-STDOUT_TAIL]
            self.run.emit(name, data)
        stream.close()

    def execute(self) -> tuple[int | None, str]:
        """(exit code, failure) where failure is '', 'timeout' or 'cancelled'."""
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=self.run.workdir, env=self.env,
                                    start_new_session=True)
        except OSError as exc:
            raise RuntimeError(f"cannot start {self.argv[0]}: {exc}") from exc
        pumps = [threading.Thread(target=self._pump, args=(proc.stdout, "stdout"), daemon=True),
                 threading.Thread(target=self._pump, args=(proc.stderr, "stderr"), daemon=True)]
        for t in pumps:
            t.start()
        deadline = None if self.run.timeout is None else time.monotonic() + self.run.timeout
        failure = ""
        while proc.poll() is None:
            if self.run.cancelled.wait(0.05):
                failure = "cancelled"
            elif deadline is not None and time.monotonic() >= deadline:
                failure = "timeout"
            if failure:
                self._kill(proc)
                break
        code = proc.wait()
        for t in pumps:
            t.join(timeout=5)
        return code, failure

    def _kill(self, proc: subprocess.Popen) -> None:
        if self.on_kill is not None:
            self.on_kill()
        for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue


def outcome_of(code: int | None, failure: str, run: TaskRun, extra: dict | None = None,
               tail: bytes = b"") -> Outcome:
    result = {"exit_code": code, "stdout_tail": tail.decode("utf-8", "replace"), **(extra or {})}
    value, problem = read_result(run.workdir)
    if value is not None:
        result["value"] = value
    if problem:
        result["result_problem"] = problem
    if failure == "timeout":
        return Outcome(None, f"timed out after {run.timeout:g} s; the process tree was killed", True,
                       {**result, "failure": "timeout"})
    if failure == "cancelled":
        return Outcome(None, "cancelled; the process tree was killed", False, {**result, "failure": "cancelled"})
    if code != 0:
        return Outcome(code, f"exited with code {code}", True, {**result, "failure": "exit"})
    return Outcome(0, "", True, result)


# --- noop ----------------------------------------------------------------------------------------------

class NoopExecutor:
    """Does nothing (optionally sleeps): measures the durable task pipeline itself, without process costs."""

    kind = "noop"
    needs_workdir = False  # the runner creates no working directory for it

    def validate(self, spec: dict) -> dict:
        only(spec, {"sleep", "output"})
        out = {}
        if spec.get("sleep") is not None:
            out["sleep"] = float(number(spec, "sleep", 0, 86400))
        if spec.get("output") is not None:
            if not isinstance(spec["output"], str) or len(spec["output"]) > 64 * 1024:
                raise TaskSpecError("output must be a string of at most 64 KiB")
            out["output"] = spec["output"]
        return out

    def available(self) -> str:
        return ""

    def run(self, run: TaskRun) -> Outcome:
        if run.spec.get("output"):
            run.emit("stdout", run.spec["output"].encode())
        sleep = run.spec.get("sleep", 0)
        if sleep:
            limit = sleep if run.timeout is None else min(sleep, run.timeout)
            if run.cancelled.wait(limit):
                return Outcome(None, "cancelled", False, {"failure": "cancelled"})
            if run.timeout is not None and sleep > run.timeout:
                return Outcome(None, f"timed out after {run.timeout:g} s", True, {"failure": "timeout"})
        return Outcome(0, "", True, {"exit_code": 0})


# --- shell (bubblewrap) -------------------------------------------------------------------------------------

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


class ShellExecutor:
    """A command in a bubblewrap sandbox: the system read-only, a private /tmp, the task's work directory the
    only writable place, no network unless asked, no capabilities, the node's data directory hidden, only
    the given environment; CPU seconds and memory capped with rlimits (prlimit)."""

    kind = "shell"

    def __init__(self, settings: ExecutorSettings | None = None):
        self.settings = settings or ExecutorSettings()

    def validate(self, spec: dict) -> dict:
        only(spec, {"command", "env", "network", "cpu_seconds", "memory_mb", "max_files"})
        out = {"command": check_command(spec.get("command")), "env": check_env(spec.get("env")),
               "network": spec.get("network", False)}
        if not isinstance(out["network"], bool):
            raise TaskSpecError("network must be true or false")
        for name, hi in (("cpu_seconds", 7 * 86400), ("memory_mb", 1024 * 1024), ("max_files", 1 << 20)):
            value = number(spec, name, 1, hi, integer=True)
            if value is not None:
                out[name] = value
        return out

    def available(self) -> str:
        missing = [b for b in ("bwrap", "prlimit") if shutil.which(b) is None]
        return f"{' and '.join(missing)} not installed (apt install bubblewrap util-linux)" if missing else ""

    def argv(self, run: TaskRun) -> list[str]:
        spec = run.spec
        workdir = str(Path(run.workdir).resolve())
        limits = ["prlimit"]
        if spec.get("memory_mb"):
            limits.append(f"--as={spec['memory_mb'] * 1024 * 1024}")
        if spec.get("cpu_seconds"):
            limits.append(f"--cpu={spec['cpu_seconds']}")
        limits.append(f"--nofile={spec.get('max_files', 1024)}")
        bwrap = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                 "--tmpfs", "/run", "--tmpfs", "/var/tmp"]
        for hidden in self.settings.hide_paths:  # an empty tmpfs over it; the workdir is bound in after
            if Path(hidden).is_dir():
                bwrap += ["--tmpfs", str(hidden)]
        bwrap += ["--bind", workdir, workdir, "--chdir", workdir,
                  "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
        if spec.get("network"):
            bwrap.append("--share-net")
        env = {"PATH": DEFAULT_PATH, "HOME": workdir, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "CORTEX_TASK_ID": run.task_id, "CORTEX_ATTEMPT": str(run.attempt),
               "CORTEX_RESULT": str(Path(workdir) / RESULT_FILE), **run.env, **spec.get("env", {})}
        for key, value in env.items():
            bwrap += ["--setenv", key, value]
        command = spec["command"]
        inner = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        return [*limits, "--", *bwrap, "--", *inner]

    def run(self, run: TaskRun) -> Outcome:
        watch = ProcessWatch(self.argv(run), run, env={"PATH": DEFAULT_PATH})
        try:
            code, failure = watch.execute()
        except RuntimeError as exc:
            return Outcome(None, str(exc), True, {"failure": "error"})
        return outcome_of(code, failure, run, tail=bytes(watch.tail))


def describe_argv(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
