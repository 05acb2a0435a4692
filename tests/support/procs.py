"""Processes the tests start, each SIGKILLed by the kernel when the test process dies, even by SIGKILL (a
pytest timeout, CI cancelling the job): nothing keeps ports, loop devices or network namespaces afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

from cortex.dev.cluster import popen_dying_with_parent

popen = popen_dying_with_parent


def run(args: list[str], *, input: str | bytes | None = None, timeout: float | None = None, check: bool = False,
        capture_output: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for children that must not outlive the test process."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with popen(args, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def python_without_home(code: str, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `code` in this interpreter as a uid with no passwd entry and no $HOME (what the appliance's
    DynamicUser agent is: Path.home() raises there), with `unset` also dropped from the environment.
    Needs root; callers skip otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", *unset)}
    return run(["setpriv", "--reuid=64999", "--regid=64999", "--clear-groups", sys.executable, "-c", code],
               capture_output=True, text=True, env=env, cwd="/", timeout=60)
