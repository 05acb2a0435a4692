"""Agent tasks against a local fake of the Anthropic Messages API (a real HTTP server speaking its paths and JSON),
driven through the official `anthropic` SDK: no real model is reachable from here."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cortex.tasks import api
from cortex.tasks.agent_executor import AgentExecutor
from cortex.tasks.executor import TaskRun
from cortex.tasks.executors import ExecutorSettings
from tests.support.wait import wait_until


class FakeMessagesAPI:
    """POST /v1/messages: asks for the `shell` tool once, then answers with what the tool printed."""

    def __init__(self):
        self.requests: list[dict] = []
        self.status = 200
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if self.path != "/v1/messages":
                    return self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": "no"}})
                # the SDK sends the key as x-api-key or (newer releases) as a bearer token
                key = self.headers.get("x-api-key") or self.headers.get("authorization", "").removeprefix("Bearer ")
                if key != "test-key":
                    return self._send(401, {"type": "error", "error": {"type": "authentication_error",
                                                                       "message": "invalid x-api-key"}})
                if fake.status != 200:
                    return self._send(fake.status, {"type": "error", "error": {"type": "overloaded_error",
                                                                               "message": "overloaded"}})
                last = body["messages"][-1]
                results = [b for b in last["content"] if isinstance(b, dict) and b.get("type") == "tool_result"] \
                    if isinstance(last["content"], list) else []
                if results:
                    printed = json.loads(results[0]["content"])["stdout"].strip()
                    content, stop = [{"type": "text", "text": f"The command printed: {printed}"}], "end_turn"
                elif body.get("tools"):
                    content = [{"type": "text", "text": "Let me run it."},
                               {"type": "tool_use", "id": f"toolu_{len(fake.requests)}", "name": "shell",
                                "input": {"command": "echo hello-from-tool; echo note > note.txt"}}]
                    stop = "tool_use"
                else:
                    content, stop = [{"type": "text", "text": "no tools, plain answer"}], "end_turn"
                self._send(200, {"id": f"msg_{len(fake.requests)}", "type": "message", "role": "assistant",
                                 "model": body["model"], "content": content, "stop_reason": stop,
                                 "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 7}})

            def _send(self, code: int, doc: dict):
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(monkeypatch):
    server = FakeMessagesAPI()
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    yield server
    server.close()


def agent_run(executor: AgentExecutor, spec: dict, workdir: Path) -> tuple:
    out = bytearray()
    workdir.mkdir(exist_ok=True)
    run = TaskRun(task_id="t1", attempt=1, spec=executor.validate(spec), workdir=workdir,
                  emit=lambda s, d: out.extend(d), cancelled=threading.Event(), timeout=60)
    return executor.run(run), out.decode()


def test_the_agent_loop_runs_tools_in_the_sandbox_and_returns_the_answer(fake, tmp_path):
    ex = AgentExecutor(ExecutorSettings(agent_base_url=fake.url))
    assert ex.available() == ""
    outcome, transcript = agent_run(ex, {"prompt": "say hello", "tools": ["shell"], "model": "claude-test"},
                                    tmp_path / "w")
    assert outcome.ok, outcome
    assert outcome.result["text"] == "The command printed: hello-from-tool"
    assert outcome.result["turns"] == 2 and outcome.result["usage"] == {"input_tokens": 22, "output_tokens": 14}
    assert "[tool call] shell" in transcript and "hello-from-tool" in transcript
    assert (tmp_path / "w" / "note.txt").read_text() == "note\n"  # the tool ran in the task's workdir
    first, second = fake.requests
    assert first["path"] == "/v1/messages" and first["headers"]["anthropic-version"].startswith("20")
    assert first["body"]["tools"][0]["name"] == "shell" and first["body"]["model"] == "claude-test"
    assert second["body"]["messages"][1]["content"][1]["type"] == "tool_use"
    assert second["body"]["messages"][2]["content"][0]["tool_use_id"] == "toolu_1"


def test_agent_errors_are_reported_with_retryability(fake, tmp_path, monkeypatch):
    ex = AgentExecutor(ExecutorSettings(agent_base_url=fake.url))
    fake.status = 529
    outcome, _ = agent_run(ex, {"prompt": "x"}, tmp_path / "w")
    assert not outcome.ok and outcome.retryable and "529" in outcome.error
    fake.status = 200
    monkeypatch.setenv("ANTHROPIC_API_KEY", "wrong")
    outcome, _ = agent_run(ex, {"prompt": "x"}, tmp_path / "w")
    assert not outcome.ok and not outcome.retryable and "401" in outcome.error
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    assert "no API key" in ex.available()
    with pytest.raises(Exception, match="tools must be a list of"):
        ex.validate({"prompt": "x", "tools": ["rm_rf"]})
    with pytest.raises(Exception, match="prompt must be"):
        ex.validate({"prompt": ""})


def test_agent_task_through_the_cluster(fake, monkeypatch, make_cluster):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)  # the nodes inherit the endpoint and the key
    cluster = make_cluster(servers=1, workers=0)
    with cluster.client("n1") as c:
        with contextlib.suppress(AssertionError):  # the submit below fails clearly if it never does
            wait_until(lambda: "agent" in c.read("task.nodes", {})[0]["kinds"], 30, "the agent executor",
                       interval=0.2)
        (task_id,) = api.submit(c, [{"kind": "agent", "timeout": 60,
                                     "spec": {"prompt": "run echo", "tools": ["shell"], "max_turns": 4}}])
        done = api.wait(c, [task_id], 60)[0]
        assert done["state"] == "succeeded", done
        assert done["result"]["text"] == "The command printed: hello-from-tool"
        assert "[tool result] " in api.output_text(c, task_id)["stdout"]
