"""MCP 2025-06-18 features against one real cluster (a server and a worker on loopback): every tool's output
schema checked against what the tool really answers, structuredContent beside the text, destructive calls
confirmed through elicitation (accepted, declined, refused to a client that cannot ask), `--read-only`, and
the RFC 9728 protected-resource metadata with its 401 challenge; and the official TypeScript SDK's client
(tests/conformance/client.mjs) over stdio and HTTP against the same cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import jsonschema
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from cortex._proto.cortex.v1 import plugins_pb2 as ppb
from cortex._proto.cortex.v1 import plugins_pb2_grpc as ppb_grpc
from cortex.client import Client, open_channel
from cortex.dev import cluster as devcluster
from cortex.plugins import structured
from tests.support import procs
from tests.support.cluster import Cluster, free_base_port
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def pc(tmp_path_factory):
    """n1 (server) offers destructive tools and confirms them where a client can ask; w1 (worker) refuses
    them to clients that cannot (confirm_destructive: require)."""
    directory = tmp_path_factory.mktemp("mcp-protocol")

    def extra(node: devcluster.DevNode) -> str:
        confirm = "require" if node.id == "w1" else "elicit"
        return (f"plugins:\n  mcp:\n    listen: 127.0.0.1:0\n    allow_destructive: true\n"
                f"    confirm_destructive: {confirm}\n    authorization_servers: [https://auth.example.invalid]\n")

    try:
        dc = devcluster.up(directory, 1, 1, free_base_port(), timeout=90, extra_config=extra)
        for node in dc.nodes:
            wait_until(lambda node=node: (Path(node.dir) / "data/plugins/mcp/mcp.json").exists(), 30,
                       f"{node.id}'s MCP plugin", interval=0.1, detail=lambda node=node: devcluster.tail(node.log_path))
    except BaseException:
        devcluster.down(directory)
        raise
    yield Cluster(dc)
    devcluster.down(directory)


def http_info(node) -> tuple[str, str]:
    info = json.loads((Path(node.dir) / "data/plugins/mcp/mcp.json").read_text())
    return info["url"], Path(info["token_file"]).read_text().strip()


@asynccontextmanager
async def http_session(node, query: str = "", elicit=None):
    url, token = http_info(node)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http, \
            streamable_http_client(url + query, http_client=http) as (read, write, *_), \
            ClientSession(read, write, elicitation_callback=elicit) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def stdio_session(node, *extra: str, elicit=None):
    args = ["-m", "cortex", "--addr", node.grpc_address, "--socket", str(node.admin_socket), "mcp", *extra]
    params = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
    async with stdio_client(params) as (read, write), \
            ClientSession(read, write, elicitation_callback=elicit) as session:
        await session.initialize()
        yield session


def plugins_stub(node):
    return ppb_grpc.PluginsStub(open_channel(f"unix:{node.admin_socket}"))


# Arguments for the read tools that need some, made from what the cluster holds (see _arguments_for).
NEEDS_STATE = {"get_node", "kv_get", "get_message", "tasks_get", "workflows_get", "get_skill", "k8s_job_status",
               "k8s_job_logs"}


def test_every_tool_declares_an_output_schema_its_real_answers_match(pc):
    """The declarations, then the answers: each read tool (and the kv and messaging writes) is called on the
    agent and its structured result validated against the schema it declares."""
    stub = plugins_stub(pc.node("n1"))
    tools = {t.name: t for t in stub.ListTools(ppb.ListToolsRequest(), timeout=30).tools}
    assert len(tools) >= 40
    schemas = {}
    for name, tool in tools.items():
        assert tool.output_schema_json, f"{name} declares no output schema"
        schema = json.loads(tool.output_schema_json)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object" and (schema.get("properties") or schema.get("anyOf")), name
        assert tool.has_plan or not tool.destructive, name
        schemas[name] = schema

    def call(name: str, arguments: dict):
        r = stub.CallTool(ppb.CallToolRequest(name=name, arguments_json=json.dumps(arguments).encode()), timeout=60)
        return r.error, json.loads(r.result_json) if r.result_json else None

    def check(name: str, arguments: dict) -> bool:
        error, result = call(name, arguments)
        if error:
            return False
        errors = sorted(jsonschema.Draft202012Validator(schemas[name]).iter_errors(structured(result)), key=str)
        assert not errors, f"{name}: {errors[0].message} at {list(errors[0].path)} in {json.dumps(result)[:400]}"
        return True

    assert check("kv_put", {"key": "schemas/a", "value": "1"})
    sent = call("send_message", {"recipient": "n1", "body": "hello", "subject": "s"})[1]
    assert check("send_message", {"recipient": "n1", "body": "again"})
    assert check("mark_message_read", {"ids": [sent["id"]]})
    submitted = call("tasks_submit", {"tasks": [{"kind": "noop"}]})
    task_id = submitted[1]["task_ids"][0] if not submitted[0] else ""
    specific = {"get_node": {"node_id": "n1"}, "kv_get": {"key": "schemas/a"}, "get_message": {"id": sent["id"]},
                "tasks_get": {"task_id": task_id}}
    validated, failed = [], {}
    for name, tool in sorted(tools.items()):
        if not tool.read_only:
            continue
        arguments = specific.get(name, {})
        if name in NEEDS_STATE and not arguments:
            continue
        if check(name, arguments):
            validated.append(name)
        else:
            failed[name] = call(name, arguments)[0]
    # Tools whose subsystem has nothing to show here (no Kubernetes context, no Tailscale) may refuse; the
    # core ones must answer and match.
    must = {"cluster_status", "cluster_health", "list_nodes", "get_node", "list_plugins", "recent_events",
            "list_join_requests", "list_join_tokens", "kv_get", "kv_list", "list_alerts", "list_skills",
            "check_messages", "list_messages", "get_message", "tasks_list", "dlq_list", "workflows_list",
            "nodes_resources", "memory_stats", "memory_schema", "memory_list_threads", "update_status"}
    missing = {n: failed.get(n, "not called") for n in must & set(tools) if n not in validated}
    assert not missing, missing
    assert check("kv_delete", {"key": "schemas/a"})


def test_structured_content_and_output_schemas_over_http_and_stdio(pc):
    async def main():
        async with http_session(pc.node("n1"), "?profile=operator&toolsets=kv") as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert all(t.output_schema and t.output_schema["type"] == "object" for t in tools.values())
            await s.call_tool("kv_put", {"key": "sc/k", "value": "v"})
            got = await s.call_tool("kv_get", {"key": "sc/k"})
            assert not got.is_error and got.structured_content["value"] == "v"
            assert json.loads(got.content[0].text) == got.structured_content
            listed = await s.call_tool("kv_list", {"prefix": "sc/"})
            assert listed.structured_content == {"result": json.loads(listed.content[0].text)}
            jsonschema.validate(listed.structured_content, tools["kv_list"].output_schema)
    anyio.run(main)


def test_destructive_calls_are_confirmed_through_elicitation(pc):
    asked: list[str] = []

    def answer(action: str, confirm: bool | None = None):
        async def callback(context, params):
            from mcp.types import ElicitResult

            asked.append(params.message)
            return ElicitResult(action=action, content=None if confirm is None else {"confirm": confirm})
        return callback

    async def main():
        async with http_session(pc.node("n1"), "?profile=admin&toolsets=kv") as s:
            await s.call_tool("kv_put", {"key": "el/k", "value": "twelve chars"})
        async with http_session(pc.node("n1"), "?profile=admin&toolsets=kv", answer("decline")) as s:
            declined = await s.call_tool("kv_delete", {"key": "el/k"})
            assert declined.is_error and "declined by the user: nothing was changed" in declined.content[0].text
            assert (await s.call_tool("kv_get", {"key": "el/k"})).structured_content["found"] is True
        async with http_session(pc.node("n1"), "?profile=admin&toolsets=kv", answer("accept", False)) as s:
            assert (await s.call_tool("kv_delete", {"key": "el/k"})).is_error
        async with http_session(pc.node("n1"), "?profile=admin&toolsets=kv", answer("accept", True)) as s:
            done = await s.call_tool("kv_delete", {"key": "el/k"})
            assert not done.is_error and done.structured_content == {"key": "el/k", "deleted": True}
        # The message is the plan, read from the state: which key, at which version.
        assert asked and all("delete key 'el/k' (version 1, 12 characters" in m for m in asked), asked
        # A client without elicitation: n1 keeps today's policy (the call runs), w1 requires a confirmation.
        async with http_session(pc.node("n1"), "?profile=admin&toolsets=kv") as s:
            await s.call_tool("kv_put", {"key": "el/k2", "value": "x"})
            assert not (await s.call_tool("kv_delete", {"key": "el/k2"})).is_error
        async with http_session(pc.node("w1"), "?profile=admin&toolsets=kv") as s:
            await s.call_tool("kv_put", {"key": "el/k3", "value": "x"})
            refused = await s.call_tool("kv_delete", {"key": "el/k3"})
            assert refused.is_error and "confirm_destructive: require" in refused.content[0].text
            assert (await s.call_tool("kv_get", {"key": "el/k3"})).structured_content["found"] is True
        # Over stdio the plan comes from the agent over gRPC (CallTool plan_only).
        stub = plugins_stub(pc.node("n1"))
        plan = stub.CallTool(ppb.CallToolRequest(name="kv_delete", arguments_json=b'{"key": "el/k3"}',
                                                 plan_only=True), timeout=30)
        assert plan.plan.startswith("delete key 'el/k3' (version 1") and not plan.result_json
        bad = stub.CallTool(ppb.CallToolRequest(name="kv_delete", arguments_json=b'{"key": 5}', plan_only=True),
                            timeout=30)
        assert "invalid arguments" in bad.error and not bad.plan
        asked.clear()
        async with stdio_session(pc.node("n1"), "--profile", "admin", "--toolsets", "kv",
                                 elicit=answer("accept", True)) as s:
            done = await s.call_tool("kv_delete", {"key": "el/k3"})
            assert not done.is_error and done.structured_content == {"key": "el/k3", "deleted": True}
        assert len(asked) == 1 and "delete key 'el/k3' (version 1" in asked[0]
    anyio.run(main)


def test_read_only_hides_and_refuses_every_tool_that_changes_state(pc):
    async def main():
        async with stdio_session(pc.node("n1"), "--profile", "admin", "--toolsets", "all", "--read-only") as s:
            tools = (await s.list_tools()).tools
            assert tools and all(t.annotations.read_only_hint for t in tools)
            for name, arguments in (("kv_put", {"key": "ro", "value": "x"}), ("kv_delete", {"key": "ro"})):
                refused = await s.call_tool(name, arguments)
                assert refused.is_error and "serves read-only tools only" in refused.content[0].text
            got = await s.call_tool("kv_get", {"key": "ro"})  # reads answer, structured, over stdio too
            assert got.structured_content == {"key": "ro", "found": False} == json.loads(got.content[0].text)
            kv_get = next(t for t in tools if t.name == "kv_get")
            assert kv_get.output_schema["properties"]["found"] == {"type": "boolean"}
    anyio.run(main)


def test_protected_resource_metadata_and_the_401_challenge(pc):
    url, token = http_info(pc.node("n1"))
    origin = url.rsplit("/mcp", 1)[0]
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with httpx2.Client(timeout=10) as http:
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            doc = http.get(origin + path)
            assert doc.status_code == 200, doc.text
            assert doc.json()["resource"] == url and doc.json()["bearer_methods_supported"] == ["header"]
            assert doc.json()["authorization_servers"] == ["https://auth.example.invalid"]
        for auth in ({}, {"Authorization": "Bearer wrong"}):
            refused = http.post(url, json=body, headers={**headers, **auth})
            assert refused.status_code == 401
            challenge = refused.headers["www-authenticate"]
            assert challenge.startswith("Bearer ") and \
                f'resource_metadata="{origin}/.well-known/oauth-protected-resource/mcp"' in challenge
            assert ('error="invalid_token"' in challenge) == bool(auth)
        # The static token still gets in (past the guard; the MCP layer answers, 2xx or a protocol error).
        assert http.post(url, json=body, headers={**headers, "Authorization": f"Bearer {token}"}).status_code != 401


# --- the official TypeScript SDK's client (tests/conformance, pinned in package-lock.json) ---------------------

CONFORMANCE = Path(__file__).resolve().parents[1] / "conformance"
CHECKS = {"initialize", "capabilities", "tools/list", "tools/outputSchema", "tools/call write", "tools/call read",
          "tools/call list result", "resources/list", "resources/read", "resources/templates/list",
          "errors/unknown tool", "errors/bad arguments", "notifications/tools/list_changed",
          "tools/list after change"}


def _typescript_client(pc, config: dict) -> dict[str, dict]:
    """Run client.mjs; when it waits for a tool-list change, stop the skills plugin (then start it again)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the TypeScript SDK conformance client needs node >= 20 and npm ci "
                    "in tests/conformance (bootstrap.sh does it when npm is present)")
    if not (CONFORMANCE / "node_modules/@modelcontextprotocol/sdk").is_dir():
        pytest.fail("tests/conformance/node_modules is missing: run `npm ci` there (bootstrap.sh does it)")
    stub = plugins_stub(pc.node("n1"))
    checks: dict[str, dict] = {}
    proc = procs.popen([node, str(CONFORMANCE / "client.mjs"), json.dumps(config)], cwd=CONFORMANCE,
                       stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            message = json.loads(line)
            if message.get("waiting"):
                stub.SetPluginState(ppb.SetPluginStateRequest(name="skills", running=False), timeout=30)
            elif "check" in message:
                checks[message["check"]] = message
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stub.SetPluginState(ppb.SetPluginStateRequest(name="skills", running=True), timeout=30)
    return checks


@pytest.mark.parametrize("mode", ["stdio", "http"])
def test_the_typescript_sdk_client_conforms(pc, mode):
    n1 = pc.node("n1")
    if mode == "stdio":
        config = {"mode": "stdio", "command": sys.executable, "env": dict(os.environ),
                  "args": ["-m", "cortex", "--socket", str(n1.admin_socket), "mcp", "--via", "socket",
                           "--profile", "operator", "--toolsets", "all"]}
    else:
        url, token = http_info(n1)
        config = {"mode": "http", "url": url + "?profile=operator&toolsets=all", "token": token}
    checks = _typescript_client(pc, config)
    expected = CHECKS | ({"errors/wrong token"} if mode == "http" else set())
    assert set(checks) == expected, expected ^ set(checks)
    failed = {name: c["detail"] for name, c in checks.items() if not c["ok"]}
    assert not failed, failed


# --- plugin policies and the audit log (the `access` domain) ----------------------------------------------------

def test_plugin_policies_narrow_callers_and_every_change_is_audited(pc):
    from cortex.plugins.audit import digest

    n1 = pc.node("n1")
    stub = plugins_stub(n1)  # the admin socket: identity admin-socket, role admin
    client = Client(n1.grpc_address, timeout=30)  # the dev cluster's admin certificate, as the CLI uses

    def cli(*args):
        out = procs.run([sys.executable, "-m", "cortex", "--addr", n1.grpc_address, *args], capture_output=True,
                        timeout=60)
        return out.returncode, out.stdout.decode(), out.stderr.decode()

    def call(name, arguments):
        r = stub.CallTool(ppb.CallToolRequest(name=name, arguments_json=json.dumps(arguments).encode()), timeout=30)
        return r.error or None, json.loads(r.result_json) if r.result_json else None

    def records():
        return client.read("access.log", {"limit": 200})

    async def until(session, refused: bool) -> None:
        """Put over HTTP (mcp-http-token, operator) until the node enforces the policy change."""
        with anyio.fail_after(30):
            while (await session.call_tool("kv_put", {"key": "audit/b", "value": "2"})).is_error != refused:
                await anyio.sleep(0.2)

    async def main():
        first = call("kv_put", {"key": "audit/a", "value": "1", "idempotency_key": "k-audit-a"})
        again = call("kv_put", {"key": "audit/a", "value": "1", "idempotency_key": "k-audit-a"})
        assert first[0] is None and again[0] is None and first[1]["index"] == again[1]["index"]
        # Only the admin socket may change through cluster-tools now; HTTP (mcp-http-token) may still read.
        code, out, err = cli("--json", "audit", "set", "cluster-tools", "--change-callers", "admin-socket",
                             "--idempotency-key", "policy-1")
        assert code == 0, err
        assert json.loads(out)["change"] == {"roles": [], "callers": ["admin-socket"]}
        retried = client.write("access.policy_set", {"plugin": "cluster-tools",
                                                     "change": {"callers": ["admin-socket"]}},
                               idempotency_key="policy-1")
        assert retried["duplicate"] is True  # a retry under the same key: the first answer, applied once
        skip = ("duplicate", "_duplicate", "_index")
        assert {k: v for k, v in retried.items() if k not in skip} == \
            {k: v for k, v in json.loads(out).items() if k not in skip}
        async with http_session(n1, "?profile=operator&toolsets=kv") as s:
            await until(s, refused=True)
            refused = await s.call_tool("kv_put", {"key": "audit/b", "value": "2"})
            assert "policy for plugin 'cluster-tools' lets only admin-socket change anything" in \
                refused.content[0].text
            assert not (await s.call_tool("kv_get", {"key": "audit/a"})).is_error
            assert call("kv_put", {"key": "audit/c", "value": "3"})[0] is None  # the named caller still may
            code, out, err = cli("audit", "policies")
            assert code == 0 and "cluster-tools" in out and "admin-socket" in out, out + err
            wait_until(lambda: any(r["outcome"] == "refused" for r in records()), 30, "the refusal in the audit log")
            rows = records()
            put_a = [r for r in rows if r["digest"] == digest({"key": "audit/a", "value": "1"})]
            assert [(r["tool"], r["caller"], r["role"], r["outcome"], r["node"]) for r in put_a] == \
                [("kv_put", "admin-socket", "admin", "ok", "n1")] * 2  # the retry under the same key ran too
            refusal = next(r for r in rows if r["outcome"] == "refused")
            assert (refusal["caller"], refusal["role"], refusal["tool"]) == ("mcp-http-token", "operator", "kv_put")
            assert not any(r["tool"] == "kv_get" for r in rows)  # reads are not audited
            # The same log through the MCP tool, and the CLI's table.
            error, through_tool = call("audit_log", {"outcome": "refused"})
            assert error is None and through_tool and all(r["outcome"] == "refused" for r in through_tool)
            code, out, _ = cli("audit", "log", "--outcome", "refused")
            assert code == 0 and "mcp-http-token" in out and "OUTCOME" in out
            assert cli("audit", "clear", "cluster-tools")[0] == 0
            await until(s, refused=False)
        assert [r["tool"] for r in records() if r["kind"] == "policy"] == ["access.policy_clear", "access.policy_set"]
    anyio.run(main)
