"""CEL (Common Expression Language) for workflow conditions: compiled at submit, evaluated in a child process.

CEL has no loops and no side effects, but macros over large lists can still take long, and evaluation must
never stall the leader: the leader evaluates through one long-lived child process (`python -m
cortex.tasks.celeval`, JSON lines on stdin/stdout) that it kills and restarts when an evaluation overruns
EVAL_TIMEOUT. No `eval` anywhere: cel-python parses and interprets the expression itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

MAX_EXPRESSION = 2000  # characters
EVAL_TIMEOUT = 2.0  # seconds
START_TIMEOUT = 30.0  # the child's interpreter start and imports are not the expression's fault


class CelError(ValueError):
    pass


def compile_check(expr: str) -> None:
    """Raise CelError when the expression does not parse (at submit time, before anything is stored)."""
    import celpy

    if not isinstance(expr, str) or not expr.strip():
        raise CelError("a CEL expression must be a non-empty string")
    if len(expr) > MAX_EXPRESSION:
        raise CelError(f"CEL expression longer than {MAX_EXPRESSION} characters")
    try:
        celpy.Environment().compile(expr)
    except Exception as exc:
        raise CelError(f"CEL does not compile: {' '.join(str(exc).split())}") from None


def evaluate_here(expr: str, context: dict):
    """Evaluate in this process (the child uses it); returns plain JSON values."""
    import celpy
    from celpy import adapter

    env = celpy.Environment()
    program = env.program(env.compile(expr))
    activation = {k: celpy.json_to_cel(v) for k, v in context.items()}
    value = program.evaluate(activation)
    if isinstance(value, Exception):
        raise CelError(str(value))
    return json.loads(json.dumps(value, cls=adapter.CELJSONEncoder))


class Evaluator:
    """The leader's handle on the child process; thread-safe, restarts the child after a timeout."""

    def __init__(self, timeout: float = EVAL_TIMEOUT):
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "cortex.tasks.celeval"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            if self._readline(self._proc, START_TIMEOUT) != "ready\n":
                self.close()
                raise CelError("the CEL evaluator process did not start")
        return self._proc

    @staticmethod
    def _readline(proc: subprocess.Popen, timeout: float) -> str:
        answer: list[str] = []
        reader = threading.Thread(target=lambda: answer.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return answer[0] if answer else ""

    def evaluate(self, expr: str, context: dict):
        with self._lock:
            proc = self._child()
            proc.stdin.write(json.dumps({"expr": expr, "context": context}) + "\n")
            proc.stdin.flush()
            line = self._readline(proc, self.timeout)
            if not line:
                self.close()
                raise CelError(f"CEL evaluation did not finish within {self.timeout:g} s; stopped")
            doc = json.loads(line)
            if "error" in doc:
                raise CelError(doc["error"])
            return doc["value"]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def main() -> None:
    import celpy  # noqa: F401  (imported before saying ready: evaluation time is the expression's alone)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            out = {"value": evaluate_here(request["expr"], request["context"])}
        except Exception as exc:
            out = {"error": f"CEL evaluation failed: {' '.join(str(exc).split())[:500]}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
