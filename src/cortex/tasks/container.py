"""Container tasks with Podman (Debian's package): an image run with limits, output streamed, no registry pulls.

The image must already be on the node (`podman import` of a root filesystem tarball, `podman load`, or a
build): `--pull=never`, so a missing image is a clear, non-retryable error instead of a hang on a registry
this network may not reach. The task's work directory is mounted at /work (its result file at
/work/result.json). Flags that make Podman work on hosts without systemd and on cgroup v1/hybrid (runc,
cgroupfs, file events, explicit ulimits below the hard limits) are always given: they are also right on a
plain Debian node. Cancel and timeout remove the container (`podman rm -f`), which kills everything in it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from cortex.tasks.executor import Outcome, TaskRun, TaskSpecError
from cortex.tasks.executors import (
    RESULT_FILE,
    ExecutorSettings,
    ProcessWatch,
    check_command,
    check_env,
    number,
    only,
    outcome_of,
)

_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]{0,254}$")
BASE_FLAGS = ["--runtime=runc", "--cgroup-manager=cgroupfs", "--events-backend=file"]
MISSING_IMAGE = 125  # podman's exit code when it could not run the container at all


class ContainerExecutor:
    kind = "container"

    def __init__(self, settings: ExecutorSettings | None = None):
        self.settings = settings or ExecutorSettings()

    def validate(self, spec: dict) -> dict:
        only(spec, {"image", "command", "env", "network", "memory_mb", "cpus", "pids"})
        image = spec.get("image")
        if not isinstance(image, str) or not _IMAGE_RE.match(image):
            raise TaskSpecError("image must be an image reference like localhost/tool:1")
        out: dict = {"image": image, "env": check_env(spec.get("env")), "network": spec.get("network", False)}
        if not isinstance(out["network"], bool):
            raise TaskSpecError("network must be true or false")
        if spec.get("command") is not None:
            out["command"] = check_command(spec["command"])
        for name, lo, hi, integer in (("memory_mb", 4, 1024 * 1024, True), ("cpus", 0.01, 1024, False),
                                      ("pids", 1, 1 << 20, True)):
            value = number(spec, name, lo, hi, integer=integer)
            if value is not None:
                out[name] = value
        return out

    def available(self) -> str:
        missing = [b for b in (self.settings.podman, "runc") if shutil.which(b) is None]
        return f"{' and '.join(missing)} not installed (apt install podman runc)" if missing else ""

    def _name(self, run: TaskRun) -> str:
        return re.sub(r"[^a-zA-Z0-9_.-]", "-", f"cortex-{run.task_id}-{run.attempt}")

    def argv(self, run: TaskRun) -> list[str]:
        spec = run.spec
        argv = [self.settings.podman, *BASE_FLAGS, "run", "--rm", "--pull=never", "--name", self._name(run),
                "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
                "--pids-limit", str(spec.get("pids", 1024)),
                "--network", "slirp4netns" if spec.get("network") else "none",
                "-v", f"{run.workdir.resolve()}:/work", "-w", "/work"]
        if spec.get("memory_mb"):
            argv += ["--memory", f"{spec['memory_mb']}m"]
        if spec.get("cpus"):
            argv += ["--cpus", str(spec["cpus"])]
        env = {"CORTEX_TASK_ID": run.task_id, "CORTEX_ATTEMPT": str(run.attempt),
               "CORTEX_RESULT": f"/work/{RESULT_FILE}", **run.env, **spec.get("env", {})}
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        argv.append(spec["image"])
        command = spec.get("command")
        if isinstance(command, str):
            argv += ["/bin/sh", "-c", command]
        elif command:
            argv += command
        return argv

    def _remove(self, run: TaskRun) -> None:
        subprocess.run([self.settings.podman, *BASE_FLAGS, "rm", "-f", "-t", "0", self._name(run)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)

    def run(self, run: TaskRun) -> Outcome:
        watch = ProcessWatch(self.argv(run), run, on_kill=lambda: self._remove(run))
        try:
            code, failure = watch.execute()
        except RuntimeError as exc:
            return Outcome(None, str(exc), True, {"failure": "error"})
        finally:
            self._remove(run)  # --rm does not run when podman itself was killed
        if code == MISSING_IMAGE and not failure:
            return Outcome(code, f"podman could not run image {run.spec['image']!r} (not on this node? "
                                 "import or load it first; see the task's stderr)", False,
                           {"failure": "error", "exit_code": code})
        return outcome_of(code, failure, run, {"image": run.spec["image"]}, tail=bytes(watch.tail))
