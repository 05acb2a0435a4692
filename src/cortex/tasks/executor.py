"""The contract between the task engine and the things that run a task (shell, container, agent, k8s_job).

The engine owns the task's lifecycle in replicated state: assignment, attempts, retries, the dead-letter
queue. An executor only runs one attempt on this node: it checks a spec at submit time (`validate`), then
`run`s an attempt, streaming output through `TaskRun.emit` and watching `TaskRun.cancelled`, and says how
the attempt ended (`Outcome`). Executors are looked up by task kind in the entry-point group
`cortex.executors` (executors.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class TaskSpecError(ValueError):
    """The task spec is malformed; nothing was submitted. The message says what to fix."""


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None  # None when the attempt never produced one (not started, killed, lost)
    error: str = ""  # why it failed, for a person ("timed out after 30 s", "image not found")
    retryable: bool = True  # False: retrying cannot help (bad spec discovered late, permission denied)
    result: dict = field(default_factory=dict)  # structured result for fan-in steps and workflow conditions

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.error


@dataclass
class TaskRun:
    """One attempt of one task on this node, as handed to an executor."""

    task_id: str
    attempt: int
    spec: dict  # validated by the executor's `validate`
    workdir: Path  # private, empty at start, removed after the attempt (not created when the executor
    # says `needs_workdir = False`, as the noop executor does)
    emit: Callable[[str, bytes], None]  # (stream "stdout"|"stderr", bytes): stored in chunks, capped
    cancelled: threading.Event  # set on cancel, drain deadline or node shutdown: stop promptly
    timeout: float | None = None  # seconds; the executor enforces it and reports a timeout error
    env: dict[str, str] = field(default_factory=dict)


class Executor(Protocol):
    kind: str  # the task kind it runs: "shell", "container", "agent", "k8s_job"

    def validate(self, spec: dict) -> dict:
        """Normalize a spec at submit time or raise TaskSpecError; pure, no I/O beyond cheap checks."""

    def available(self) -> str:
        """'' when this node can run this kind, else why not (e.g. "podman not installed")."""

    def run(self, run: TaskRun) -> Outcome:
        """Run one attempt to completion on the calling thread; never raise for a task failure."""
