"""LLM-agent tasks: a tool-using loop against the Anthropic Messages API through the official `anthropic` SDK.

Spec: {prompt, model?, system?, tools?: [shell, read_file, write_file], max_turns?, max_tokens?}. The loop sends
the conversation, runs the tools the model asks for, sends their results back, and stops at the model's final
answer, at max_turns, on cancel or at the task's time limit. Tools act only inside the task's work directory;
`shell` runs through the bubblewrap shell executor (no network, read-only system). The API key comes from the
node's environment (ANTHROPIC_API_KEY), never from the task spec, and so does the endpoint (the tasks plugin's
`agent_base_url` option, else ANTHROPIC_BASE_URL, else the SDK's default): a task cannot send the node's key
elsewhere. The transcript is streamed as task output; the result holds the final text, turns and token usage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from pathlib import Path

from cortex.tasks.executor import Outcome, TaskRun, TaskSpecError
from cortex.tasks.executors import ExecutorSettings, ShellExecutor, number, only

DEFAULT_MODEL = "claude-sonnet-4-6"  # a task may name any other
TOOL_OUTPUT_CAP = 16 * 1024
TOOLS = {
    "shell": {"name": "shell", "description": "Run a shell command in the task's sandboxed work directory "
              "(no network). Returns exit code, stdout and stderr.",
              "input_schema": {"type": "object", "required": ["command"],
                               "properties": {"command": {"type": "string"}}}},
    "read_file": {"name": "read_file", "description": "Read a file in the work directory.",
                  "input_schema": {"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}}},
    "write_file": {"name": "write_file", "description": "Write a file in the work directory.",
                   "input_schema": {"type": "object", "required": ["path", "content"],
                                    "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}},
}


class AgentExecutor:
    kind = "agent"

    def __init__(self, settings: ExecutorSettings | None = None):
        self.settings = settings or ExecutorSettings()
        self.shell = ShellExecutor(self.settings)

    def validate(self, spec: dict) -> dict:
        only(spec, {"prompt", "model", "system", "tools", "max_turns", "max_tokens"})
        prompt = spec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 200_000:
            raise TaskSpecError("prompt must be a non-empty string of at most 200000 characters")
        tools = spec.get("tools", [])
        if not isinstance(tools, list) or any(t not in TOOLS for t in tools):
            raise TaskSpecError(f"tools must be a list of {', '.join(TOOLS)}")
        for name in ("model", "system"):
            if spec.get(name) is not None and not isinstance(spec[name], str):
                raise TaskSpecError(f"{name} must be a string")
        return {"prompt": prompt, "model": spec.get("model") or DEFAULT_MODEL, "system": spec.get("system") or "",
                "tools": sorted(set(tools)), "max_turns": number(spec, "max_turns", 1, 100, integer=True) or 10,
                "max_tokens": number(spec, "max_tokens", 1, 64000, integer=True) or 4096}

    def available(self) -> str:
        if importlib.util.find_spec("anthropic") is None:  # not imported here: the SDK loads on first use
            return "the anthropic package is not installed"
        if not os.environ.get(self.settings.agent_api_key_env):
            return f"no API key in ${self.settings.agent_api_key_env} on this node"
        return ""

    def _client(self, timeout: float | None):
        import anthropic

        kwargs = {"api_key": os.environ.get(self.settings.agent_api_key_env), "max_retries": 2}
        if self.settings.agent_base_url:
            kwargs["base_url"] = self.settings.agent_base_url
        if timeout:
            kwargs["timeout"] = timeout
        return anthropic.Anthropic(**kwargs)

    def _say(self, run: TaskRun, line: str) -> None:
        run.emit("stdout", (line.rstrip("\n") + "\n").encode())

    def _tool(self, run: TaskRun, name: str, args: dict) -> tuple[str, bool]:
        """Run one tool call: (text result, is_error)."""
        if name == "shell":
            command = args.get("command")
            if not isinstance(command, str) or not command:
                return "command must be a non-empty string", True
            out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
            sub = TaskRun(task_id=run.task_id, attempt=run.attempt, spec=self.shell.validate({"command": command}),
                          workdir=run.workdir, emit=lambda s, d: out[s].extend(d[: TOOL_OUTPUT_CAP - len(out[s])]),
                          cancelled=run.cancelled, timeout=60, env=run.env)
            outcome = self.shell.run(sub)
            return json.dumps({"exit_code": outcome.exit_code, "error": outcome.error,
                               "stdout": out["stdout"].decode("utf-8", "replace"),
                               "stderr": out["stderr"].decode("utf-8", "replace")}), not outcome.ok
        path = self._inside(run.workdir, args.get("path"))
        if path is None:
            return "path must be a relative path inside the work directory", True
        try:
            if name == "read_file":
                return path.read_text(errors="replace")[:TOOL_OUTPUT_CAP], False
            if name == "write_file":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(str(args.get("content", "")))
                return f"wrote {path.relative_to(run.workdir.resolve())}", False
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}", True
        return f"unknown tool {name}", True

    @staticmethod
    def _inside(workdir: Path, rel) -> Path | None:
        if not isinstance(rel, str) or not rel:
            return None
        root = workdir.resolve()
        path = (root / rel).resolve()
        return path if path == root or root in path.parents else None

    def run(self, run: TaskRun) -> Outcome:
        import anthropic

        spec = run.spec
        client = self._client(run.timeout)
        messages: list[dict] = [{"role": "user", "content": spec["prompt"]}]
        usage = {"input_tokens": 0, "output_tokens": 0}
        timer = threading.Timer(run.timeout, run.cancelled.set) if run.timeout else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            for turn in range(1, spec["max_turns"] + 1):
                if run.cancelled.is_set():
                    failure = "timeout" if timer and not timer.is_alive() else "cancelled"
                    return Outcome(None, f"agent stopped ({failure}) after {turn - 1} turn(s)",
                                   failure == "timeout", {"failure": failure, "turns": turn - 1, "usage": usage})
                kwargs = {"model": spec["model"], "max_tokens": spec["max_tokens"], "messages": messages}
                if spec["system"]:
                    kwargs["system"] = spec["system"]
                if spec["tools"]:
                    kwargs["tools"] = [TOOLS[t] for t in spec["tools"]]
                try:
                    response = client.messages.create(**kwargs)
                except anthropic.APIStatusError as exc:
                    retryable = exc.status_code >= 500 or exc.status_code == 429
                    return Outcome(None, f"Messages API answered {exc.status_code}: {exc.message}", retryable,
                                   {"failure": "error", "turns": turn - 1, "usage": usage})
                except anthropic.APIError as exc:
                    return Outcome(None, f"Messages API unreachable: {exc}", True,
                                   {"failure": "error", "turns": turn - 1, "usage": usage})
                usage["input_tokens"] += response.usage.input_tokens
                usage["output_tokens"] += response.usage.output_tokens
                blocks = [b.model_dump(exclude_none=True) for b in response.content]
                messages.append({"role": "assistant", "content": blocks})
                for b in blocks:
                    if b["type"] == "text":
                        self._say(run, f"[assistant] {b['text']}")
                    elif b["type"] == "tool_use":
                        self._say(run, f"[tool call] {b['name']} {json.dumps(b['input'])}")
                calls = [b for b in blocks if b["type"] == "tool_use"]
                if response.stop_reason != "tool_use" or not calls:
                    text = "".join(b["text"] for b in blocks if b["type"] == "text")
                    return Outcome(0, "", True, {"exit_code": 0, "text": text, "turns": turn, "usage": usage,
                                                 "stop_reason": response.stop_reason, "model": response.model})
                results = []
                for call in calls:
                    if call["name"] not in spec["tools"]:
                        text, is_error = f"tool {call['name']} is not allowed for this task", True
                    else:
                        text, is_error = self._tool(run, call["name"], call.get("input") or {})
                    self._say(run, f"[tool result{' (error)' if is_error else ''}] {text[:2000]}")
                    results.append({"type": "tool_result", "tool_use_id": call["id"], "content": text,
                                    "is_error": is_error})
                messages.append({"role": "user", "content": results})
            return Outcome(None, f"no final answer within max_turns={spec['max_turns']}", False,
                           {"failure": "error", "turns": spec["max_turns"], "usage": usage})
        finally:
            if timer:
                timer.cancel()
