"""A container service: the container task executor's Podman command, with the service's ports published and
its volume mounted where the spec says, removed (and so killed) when the instance ends; and what ties every service's process tree to the agent."""

from __future__ import annotations

import shutil

from cortex.tasks.container import ContainerExecutor
from cortex.tasks.executor import TaskRun
from cortex.tasks.executors import ExecutorSettings, ProcessWatch


def dies_with_agent(argv: list[str]) -> list[str]:
    """argv under PR_SET_PDEATHSIG (setpriv execs it: same pid): the sandbox's outer bwrap otherwise outlives
    an agent killed with SIGKILL (its --die-with-parent ties only the sandboxed command to bwrap itself), and a
    service left running on a node presumed dead would run twice once its partner takes over."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def argv(run: TaskRun, spec: dict, settings: ExecutorSettings) -> list[str]:
    executor = ContainerExecutor(settings)
    args = executor.argv(run)
    extra = []
    for port in spec["ports"]:
        extra += ["-p", f"{port}:{port}"]
    if spec["volume"]:
        extra += ["-v", f"{run.workdir}:{spec['volume']['mount']}"]
    at = args.index("run") + 1
    return [*args[:at], *extra, *args[at:]]


def container_name(run: TaskRun) -> str:
    return ContainerExecutor()._name(run)


def run_container(run: TaskRun, spec: dict, settings: ExecutorSettings) -> tuple[int | None, str]:
    executor = ContainerExecutor(settings)
    watch = ProcessWatch(dies_with_agent(argv(run, spec, settings)), run, on_kill=lambda: executor._remove(run))
    try:
        return watch.execute()
    finally:
        executor._remove(run)  # --rm does not run when podman itself was killed
