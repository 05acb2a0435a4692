"""MCP end to end: a real `mcp` SDK client over stdio (spawning `cortex mcp`) and over streamable HTTP (every
agent serves it) against a live local cluster, calling every tool of cluster-tools, messaging and skills with
valid and invalid arguments; writes issued from a follower and from a worker; failure isolation; a third-party
plugin installed through its entry point (tests/cluster/fixtures/plugin_site on the agents' PYTHONPATH); list-changed
notifications when a plugin stops and starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.client import Client
from cortex.dev import cluster as devcluster
from cortex.security import authz
from tests.support import procs
from tests.support.cluster import Cluster, free_base_port
from tests.support.wait import wait_until

FIXTURES = Path(__file__).parent / "fixtures" / "plugin_site"
MY_TOOLS = {
    "cluster_status", "cluster_health", "list_nodes", "get_node", "transfer_leadership", "list_plugins",
    "recent_events", "list_join_requests", "approve_node", "reject_node", "remove_node", "drain_node",
    "undrain_node", "create_join_token", "list_join_tokens", "revoke_join_token", "kv_get", "kv_put", "kv_list",
    "kv_delete", "list_alerts", "squelch_alerts", "unsquelch_alerts", "list_skills", "get_skill", "send_message",
    "check_messages", "list_messages", "get_message", "mark_message_read",
}
SKILL = "---\nname: restart-service\ndescription: Restart a systemd service safely\ntags: [ops]\n---\n1. Check it.\n"


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    """3 servers + 2 workers with the test plugins installed; n3 keeps destructive tools off."""
    directory = tmp_path_factory.mktemp("mcp")
    skills = directory / "skills"
    skills.mkdir()

    def extra(node: devcluster.DevNode) -> str:
        return (f"plugins:\n  mcp:\n    listen: 127.0.0.1:0\n    allow_destructive: {str(node.id != 'n3').lower()}\n"
                f"  skills:\n    paths: [{skills}]\n    reload_seconds: 0.2\n")

    try:
        dc = devcluster.up(directory, 3, 2, free_base_port(), timeout=90, extra_config=extra,
                           env={"PYTHONPATH": str(FIXTURES)})
        for node in dc.nodes:  # plugins start once the node is in the cluster
            wait_until(lambda node=node: (Path(node.dir) / "data/plugins/mcp/mcp.json").exists(), 30,
                       f"{node.id}'s MCP plugin", interval=0.1, detail=lambda node=node: devcluster.tail(node.log_path))
    except BaseException:
        devcluster.down(directory)
        raise
    cluster = Cluster(dc)
    cluster.skills = skills
    yield cluster
    devcluster.down(directory)


def run(coro_fn, *args):
    return anyio.run(coro_fn, *args)


@contextmanager
def socket_bound():
    """A loopback port that is bound but never listens: a connection there is refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@asynccontextmanager
async def stdio_session(node, via="addr", profile="", toolsets="", handler=None):
    args = ["-m", "cortex", "--addr", node.grpc_address, "--socket", str(node.admin_socket), "mcp", "--via", via]
    args += ["--profile", profile] if profile else []
    args += ["--toolsets", toolsets] if toolsets else []
    params = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
    async with stdio_client(params) as (read, write), ClientSession(read, write, message_handler=handler) as s:
        await s.initialize()
        yield s


def http_info(node) -> tuple[str, str]:
    info = json.loads((Path(node.dir) / "data/plugins/mcp/mcp.json").read_text())
    return info["url"], Path(info["token_file"]).read_text().strip()


@asynccontextmanager
async def http_session(node, query="", handler=None):
    url, token = http_info(node)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http, \
            streamable_http_client(url + query, http_client=http) as (read, write, *_), \
            ClientSession(read, write, message_handler=handler) as s:
        await s.initialize()
        yield s


async def ok(session, name, args=None):
    result = await session.call_tool(name, args or {})
    assert not result.is_error, f"{name}: {result.content[0].text}"
    return result.structured_content if "result" not in (result.structured_content or {}) \
        else result.structured_content["result"]


async def err(session, name, args, expect):
    result = await session.call_tool(name, args)
    assert result.is_error, f"{name} {args} should fail; got {result.content[0].text[:300]}"
    assert expect in result.content[0].text, result.content[0].text
    return result.content[0].text


def follower(mc: Cluster, avoid: tuple[str, ...] = ()) -> devcluster.DevNode:
    return mc.node(next(n for n in mc.followers() if n not in avoid))


# --- read-only by default, toolsets, annotations -------------------------------------------------------------

def test_default_session_is_read_only_annotated_and_small(mc):
    async def main():
        async with stdio_session(mc.node("w1")) as s:
            tools = (await s.list_tools()).tools
            assert s.server_capabilities.tools.list_changed is True
            assert 0 < len(tools) <= 40
            assert all(t.annotations.read_only_hint and not t.annotations.destructive_hint for t in tools)
            assert {"cluster_status", "kv_get", "list_skills", "check_messages", "hello_world"} <= {t.name for t in tools}
            assert all(t.input_schema["type"] == "object" for t in tools)
            await err(s, "kv_put", {"key": "a", "value": "b"}, "this session is read-only: connect with the 'operator'")
        async with stdio_session(mc.node("w1"), profile="operator", toolsets="kv") as s:
            names = {t.name for t in (await s.list_tools()).tools}
            assert names == {"kv_get", "kv_list", "kv_put"}  # kv_delete is destructive: not in this profile
            await err(s, "cluster_status", {}, "toolset 'cluster' is not loaded in this session")
    run(main)


# --- every tool from a worker over stdio (network role: operator) -----------------------------------------

def test_every_tool_over_stdio_from_a_worker(mc):
    (mc.skills / "restart-service").mkdir(exist_ok=True)
    (mc.skills / "restart-service" / "SKILL.md").write_text(SKILL)
    (mc.skills / "restart-service" / "check.sh").write_text("systemctl is-active $1\n")

    async def main():
        async with stdio_session(mc.node("w2"), profile="operator", toolsets="all") as s:
            names = {t.name for t in (await s.list_tools()).tools}
            # the operator profile over the network port: no admin-only and no destructive tools
            assert {"approve_node", "remove_node", "create_join_token", "kv_delete"}.isdisjoint(names)
            status = await ok(s, "cluster_status")
            assert status["connected_node"] == "w2" and status["has_quorum"] and len(status["nodes"]) == 5
            await err(s, "cluster_status", {"bogus": 1}, "Additional properties are not allowed")
            health = await ok(s, "cluster_health")
            assert health["status"] == "degraded"
            assert "plugin.failed:broken-start@w2" in [a["key"] for a in health["alerts"]]
            assert [n["id"] for n in await ok(s, "list_nodes", {"role": "worker"})] == ["w1", "w2"]
            await err(s, "list_nodes", {"role": "king"}, '"king" is not one of ["server", "worker"]')  # JSON words
            assert (await ok(s, "get_node", {"node_id": "n1"}))["role"] == "server"
            await err(s, "get_node", {"node_id": "zz"}, "no node 'zz' in the cluster; list_nodes")
            await err(s, "get_node", {"node_id": 5}, "5 is not of type 'string'")
            plugins = {p["name"]: p for p in (await ok(s, "list_plugins"))["plugins"]}
            assert plugins["broken-start"]["state"] == "failed" and plugins["hello"]["state"] == "running"
            assert [e["type"] for e in await ok(s, "recent_events", {"pattern": "plugin.*"})] == ["plugin.failed"]
            await err(s, "recent_events", {"limit": 0}, "less than the minimum of 1")
            assert await ok(s, "list_join_requests") == []
            await err(s, "list_join_requests", {"state": "maybe"}, "is not one of")
            assert len(await ok(s, "list_join_tokens")) >= 1
            await err(s, "list_join_tokens", {"include_revoked": "yes"}, "is not of type 'boolean'")

            # key-value store: a write from a worker, forwarded to the leader
            put = await ok(s, "kv_put", {"key": "from/worker", "value": "w2", "idempotency_key": "kv-w2-1"})
            again = await ok(s, "kv_put", {"key": "from/worker", "value": "w2", "idempotency_key": "kv-w2-1"})
            assert again["version"] == put["version"] == 1  # a retry with the same key applies once
            with mc.client(mc.leader()) as c:
                assert c.get("from/worker") == "w2"
            await err(s, "kv_put", {"key": "", "value": "x"}, "should be non-empty")
            assert (await ok(s, "kv_get", {"key": "from/worker", "level": "linearizable"}))["value"] == "w2"
            await err(s, "kv_get", {}, "'key' is a required property")
            assert [r["key"] for r in await ok(s, "kv_list", {"prefix": "from/"})] == ["from/worker"]
            await err(s, "kv_list", {"limit": -1}, "less than the minimum")

            # alerts: squelch the failed plugin's alert cluster-wide, then end the squelch
            squelch = await ok(s, "squelch_alerts", {"pattern": "plugin.failed:*", "minutes": 5, "reason": "test"})
            assert "plugin.failed:broken-start@w2" in squelch["now_squelched"]
            assert (await ok(s, "cluster_health"))["status"] == "healthy"
            listed = await ok(s, "list_alerts")
            assert listed["alerts"] == [] and listed["squelches"][0]["id"] == squelch["id"]
            await err(s, "squelch_alerts", {"pattern": "", "minutes": 5}, "should be non-empty")
            await err(s, "list_alerts", {"x": 1}, "Additional properties")
            assert (await ok(s, "unsquelch_alerts", {"squelch_id": squelch["id"]}))["removed"] is True
            await err(s, "unsquelch_alerts", {"squelch_id": squelch["id"]}, "no squelch")

            # skills: SKILL.md folders with front matter, read from this node's folder
            skills = await ok(s, "list_skills", {"query": "systemd"})
            assert [k["name"] for k in skills["skills"]] == ["restart-service"]
            await err(s, "list_skills", {"query": 5}, "is not of type 'string'")
            skill = await ok(s, "get_skill", {"name": "restart-service"})
            assert skill["instructions"].startswith("1. Check it.") and skill["files"] == ["check.sh"]
            assert skill["metadata"] == {"tags": ["ops"]}
            await err(s, "get_skill", {"name": "nope"}, "no skill 'nope' on this node; known: restart-service")

            # messaging: an inbox in the replicated state, written from a worker
            sent = await ok(s, "send_message", {"recipient": "agent:reviewer", "subject": "hi", "body": "look at w2"})
            await err(s, "send_message", {"recipient": "w1"}, "'body' is a required property")
            await err(s, "send_message", {"recipient": "w1", "body": "x", "reply_to": "nope"}, "is no message")
            inbox = await ok(s, "check_messages", {"recipient": "agent:reviewer"})
            assert inbox["unread"] == 1 and inbox["messages"][0]["id"] == sent["id"]
            await err(s, "check_messages", {"recipient": "Not An Address"}, "does not match")
            assert len(await ok(s, "list_messages", {"sender": "grpc@w2"})) == 1
            await err(s, "list_messages", {"limit": 0}, "less than the minimum")
            message = await ok(s, "get_message", {"id": sent["id"]})
            assert message["body"] == "look at w2" and message["read"] is False
            await err(s, "get_message", {"id": "none"}, "no message 'none'")
            assert (await ok(s, "mark_message_read", {"ids": [sent["id"]]}))["marked"] == [sent["id"]]
            assert (await ok(s, "check_messages", {"recipient": "agent:reviewer"}))["unread"] == 0
            await err(s, "mark_message_read", {"ids": ["nope"]}, "no such message(s): nope")
            await err(s, "mark_message_read", {"ids": []}, "should be non-empty")
            await err(s, "mark_message_read", {"ids": True}, "at ids: true is not of type 'array'")  # JSON, not True

            # draining is the task engine's (task.drain / task.undrain), reached from a worker's session
            drained = await ok(s, "drain_node", {"node_id": "w1", "deadline_seconds": 60})
            assert drained["node_id"] == "w1" and drained["drain_deadline"] > 0
            assert (await ok(s, "undrain_node", {"node_id": "w1"}))["node_id"] == "w1"
            await err(s, "drain_node", {"node_id": "BAD!"}, "does not match")

            # leadership moves, requested from a worker
            before = mc.leader()
            moved = await ok(s, "transfer_leadership", {})
            assert moved["leader"] and moved["leader"] != before
            await err(s, "transfer_leadership", {"node_id": "w1"}, "no server named 'w1'")

            # bad input of every kind is a tool error, never a dead server
            await err(s, "no_such_tool", {}, "unknown tool 'no_such_tool'")
            await err(s, "approve_node", {"node_id": "x"}, "needs the 'admin' role and this connection has 'operator'")
            await err(s, "kv_put", {"key": "big", "value": "x" * 1_100_000}, "the limit is 1048576")
            await err(s, "crash_now", {}, "crash_now failed: division by zero")
            assert (await ok(s, "hello_world", {"name": "ada"}))["greeting"] == "hello, ada"
            await err(s, "hello_world", {"name": "nobody"}, "there is nobody to greet")
            assert (await ok(s, "cluster_health"))["status"] == "degraded"  # still answering
    run(main)


# --- admin tools from a follower over its admin socket ----------------------------------------------------

def _pending_join(mc: Cluster, node_id: str) -> None:
    """A join request without a token, as `cortex join` without --token sends it."""
    # joiners have no certificate: they call a server's enrollment port (gRPC port + 2)
    with authz.enroll_channel(mc.node("n1").grpc_address, []) as channel:
        response = pb_grpc.ClusterStub(channel).Join(pb.JoinRequest(
            node_id=node_id, role="worker", grpc_address="127.0.0.1:9", request_secret="s" * 32), timeout=10)
    assert response.admission == "pending"


def test_admin_tools_over_a_followers_admin_socket(mc):
    node = follower(mc, avoid=("n3",))
    _pending_join(mc, "x1")
    _pending_join(mc, "x2")

    async def main():
        async with stdio_session(node, via="socket", profile="admin", toolsets="all") as s:
            names = {t.name for t in (await s.list_tools()).tools}
            assert MY_TOOLS <= names  # every tool, when asked for all
            kinds = {t.name: t.annotations for t in (await s.list_tools()).tools}
            assert kinds["remove_node"].destructive_hint and not kinds["remove_node"].read_only_hint
            assert kinds["approve_node"].idempotent_hint and not kinds["create_join_token"].idempotent_hint
            pending = await ok(s, "list_join_requests", {"state": "pending"})
            assert {r["node_id"] for r in pending} == {"x1", "x2"}
            assert (await ok(s, "approve_node", {"node_id": "x1"}))["state"] == "approved"
            await err(s, "approve_node", {"node_id": "zz"}, "no join request from node 'zz'")
            assert (await ok(s, "reject_node", {"node_id": "x2"}))["state"] == "rejected"
            await err(s, "reject_node", {}, "'node_id' is a required property")
            assert (await ok(s, "get_node", {"node_id": "x1"}))["join_request"]["state"] == "approved"

            token = await ok(s, "create_join_token", {"role": "worker", "ttl_seconds": 600, "uses": 1})
            assert token["token"] and token["use"].startswith(f"cortex join {node.grpc_address}")
            await err(s, "create_join_token", {"role": "king"}, "is not one of")
            assert token["token_id"] in [t["id"] for t in await ok(s, "list_join_tokens")]
            assert (await ok(s, "revoke_join_token", {"token_id": token["token_id"]}))["revoked"]
            await err(s, "revoke_join_token", {"token_id": token["token_id"]}, "no active token")
            await err(s, "revoke_join_token", {"token_id": "xyz"}, "does not match")

            await ok(s, "kv_put", {"key": "doomed", "value": "1"})
            assert (await ok(s, "kv_delete", {"key": "doomed"}))["deleted"] is True
            await err(s, "kv_delete", {}, "'key' is a required property")

            await err(s, "remove_node", {"node_id": node.id}, "is the node this session is connected to")
            await err(s, "remove_node", {"node_id": "zz"}, "no node 'zz' in the cluster")
    run(main)


def test_destructive_tools_only_where_the_node_allows_them(mc):
    async def main():
        async with stdio_session(mc.node("n3"), via="socket", profile="admin", toolsets="all") as s:
            names = {t.name for t in (await s.list_tools()).tools}
            assert "approve_node" in names and not {"remove_node", "kv_delete"} & names
            await err(s, "kv_delete", {"key": "a"}, "node n3 does not offer destructive tools; its owner can set "
                                                    "plugins.mcp.allow_destructive: true")
    run(main)


# --- streamable HTTP: authentication, writes from a follower and a worker, hang-ups ------------------------

def test_http_requires_the_bearer_token(mc):
    url, token = http_info(mc.node("n1"))
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with httpx2.Client(timeout=10) as http:
        assert http.post(url, json=body, headers=headers).status_code == 401
        wrong = http.post(url, json=body, headers={**headers, "Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "plugins/mcp/token" in wrong.json()["error"]
        assert http.post(url, json=body, headers={**headers, "Authorization": f"Bearer {token}"}).status_code != 401


def test_http_writes_from_a_follower_and_a_worker(mc):
    async def main():
        for node in (follower(mc), mc.node("w1")):
            async with http_session(node, "?profile=operator&toolsets=kv,messaging") as s:
                tools = (await s.list_tools()).tools
                assert len(tools) <= 40
                result = await ok(s, "kv_put", {"key": f"http/{node.id}", "value": node.id})
                assert result["version"] >= 1
                await ok(s, "send_message", {"recipient": "ops", "body": f"from {node.id}"})
                await err(s, "kv_put", {"key": 7, "value": "x"}, "7 is not of type 'string'")
        with mc.client(mc.leader()) as c:
            assert c.get(f"http/{follower(mc).id}") and c.get("http/w1") == "w1"
            assert {m["body"] for m in c.read("message.list", {"recipient": "ops"})} >= {"from w1"}
    run(main)


def test_http_bad_input_and_a_client_that_hangs_up_mid_call(mc):
    node = mc.node("w1")

    async def main():
        async with http_session(node, "?profile=operator&toolsets=all") as s:
            await err(s, "kv_put", {"key": "k", "value": "v" * 1_200_000}, "the limit is 1048576")
            await err(s, "crash_now", {}, "division by zero")
            resources = {r.uri for r in (await s.list_resources()).resources}
            assert {"cluster://state", "cluster://nodes", "cluster://tasks", "cluster://k8s",
                    "hello://greeting", "cluster://skills", "cluster://messages"} <= resources
            state = json.loads((await s.read_resource("cluster://state")).contents[0].text)
            assert state["has_quorum"] and state["health"]["status"] in ("healthy", "degraded")
            tasks = json.loads((await s.read_resource("cluster://tasks")).contents[0].text)
            assert tasks["enabled"] is True and "noop" in tasks["kinds_here"]  # the running engine answers
            assert "dlq" in tasks["counts"] and isinstance(tasks["items"], list)
            k8s = json.loads((await s.read_resource("cluster://k8s")).contents[0].text)
            assert {"records", "capacity"} <= set(k8s)  # served by the kubernetes plugin
            with pytest.raises(MCPError, match="no resource 'cluster://nope'"):
                await s.read_resource("cluster://nope")
        async with http_session(node, "?profile=king") as s:
            with pytest.raises(MCPError, match="unknown profile 'king'"):
                await s.list_tools()
        with anyio.move_on_after(1.0):  # hang up while slow_echo runs
            async with http_session(node) as s:
                await s.call_tool("slow_echo", {"seconds": 3})
        async with http_session(node) as s:  # the server is still there
            assert (await ok(s, "slow_echo", {"seconds": 0}))["slept"] == 0
    run(main)

    async def stdio_hangup():
        with anyio.move_on_after(3.0):
            async with stdio_session(node) as s:
                await s.call_tool("slow_echo", {"seconds": 5})
        async with stdio_session(node) as s:
            assert (await ok(s, "hello_world", {"name": "again"}))["node"] == "w1"
    run(stdio_hangup)
    assert devcluster.alive(node.pid)


# --- list-changed, failure isolation, CLI -----------------------------------------------------------------

def test_tool_list_changes_reach_stdio_and_http_clients(mc):
    node = mc.node("w1")
    stdio_seen, http_seen = [], []

    async def collect(into, message):
        if getattr(message, "method", "") == "notifications/tools/list_changed":
            into.append(time.monotonic())

    def plugins_cli(*args):
        out = subprocess.run([sys.executable, "-m", "cortex", "--socket", str(node.admin_socket), "--json",
                              "plugins", *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    async def wait_for(seen, count):
        with anyio.fail_after(15):
            while len(seen) < count:
                await anyio.sleep(0.05)

    async def main():
        async with stdio_session(node, via="socket", handler=lambda m: collect(stdio_seen, m)) as a, \
                http_session(node, handler=lambda m: collect(http_seen, m)) as b:
            for session in (a, b):  # both transports advertise the notifications they send
                assert session.server_capabilities.tools.list_changed is True
                assert session.server_capabilities.resources.list_changed is True
            assert "hello_world" in {t.name for t in (await a.list_tools()).tools}
            assert (await anyio.to_thread.run_sync(plugins_cli, "stop", "hello"))["state"] == "stopped"
            await wait_for(stdio_seen, 1)
            await wait_for(http_seen, 1)
            assert "hello_world" not in {t.name for t in (await a.list_tools()).tools}
            assert "hello_world" not in {t.name for t in (await b.list_tools()).tools}
            await err(a, "hello_world", {"name": "x"}, "unknown tool 'hello_world'")
            assert (await anyio.to_thread.run_sync(plugins_cli, "start", "hello"))["state"] == "running"
            await wait_for(stdio_seen, 2)
            await wait_for(http_seen, 2)
            assert (await ok(b, "hello_world", {"name": "back"}))["greeting"] == "hello, back"
    run(main)


def test_failing_plugins_leave_the_core_running(mc):
    for node in mc.nodes:
        out = subprocess.run([sys.executable, "-m", "cortex", "--addr", node.grpc_address, "--json", "plugins"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        plugins = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
        assert plugins["broken-start"]["state"] == "failed"
        assert plugins["broken-start"]["error"] == "start: OSError: cannot bind its port"
        assert plugins["crashing-tool"]["state"] == "running"
        assert {plugins[p]["state"] for p in ("cluster-tools", "mcp", "messaging", "skills", "hello")} == {"running"}
    with mc.client("w2") as c:
        assert c.put("core/still", "works")["version"] >= 1
        assert c.status().has_quorum


def test_cli_tools_list_and_call(mc):
    node = mc.node("w1")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cortex", "--addr", node.grpc_address, *args],
                              capture_output=True, text=True, timeout=30)

    listed = cli("--json", "tools", "list")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert doc["caller_role"] == "operator" and MY_TOOLS <= {t["name"] for t in doc["tools"]}
    called = cli("tools", "call", "kv_get", "--args", '{"key": "from/worker"}')
    assert called.returncode == 0 and json.loads(called.stdout)["value"] == "w2"
    bad = cli("tools", "call", "kv_get", "--args", "{not json")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    wrong = cli("tools", "call", "kv_get", "--args", '{"key": 1}')
    assert wrong.returncode == 1 and "1 is not of type 'string'" in wrong.stderr
    refused = cli("--socket", "/nonexistent.sock", "plugins", "stop", "hello")
    assert refused.returncode == 2 and "no agent admin socket" in refused.stderr


def test_remove_node_from_a_follower(mc):
    """Last: it takes w2 out of the cluster."""
    node = follower(mc, avoid=("n3",))

    async def main():
        async with stdio_session(node, via="socket", profile="admin", toolsets="membership,cluster") as s:
            assert (await ok(s, "remove_node", {"node_id": "w2"}))["removed"] is True
            assert "w2" not in [n["id"] for n in await ok(s, "list_nodes")]
    run(main)
    with Client(node.grpc_address) as c:
        assert "w2" not in [n["id"] for n in c.read("nodes", {})]


# --- every plugin's tools, over MCP -------------------------------------------------------------------------

def test_every_installed_tool_over_mcp_refuses_bad_arguments_and_answers_good_ones(mc):
    """All built-in plugins' tools (tasks, memory, kubernetes, netboot, ... not only this module's): each one
    is served with a strict schema, refuses an argument it does not know with a tool error, and each read-only
    tool that needs no arguments answers a call with none."""
    node = follower(mc, avoid=("n3",))

    async def main():
        async with stdio_session(node, via="socket", profile="admin", toolsets="all") as s:
            tools = (await s.list_tools()).tools
            assert len(tools) >= 47, sorted(t.name for t in tools)
            loose = [t.name for t in tools if t.input_schema.get("additionalProperties") is not False]
            assert loose == [], f"tools whose schema accepts unknown arguments: {loose}"
            answered = []
            for tool in tools:
                await err(s, tool.name, {"no_such_argument": 1}, "invalid arguments")
                if tool.name == "crash_now":  # the test plugin's deliberately broken tool (see above)
                    continue
                if tool.annotations.read_only_hint and not tool.input_schema.get("required"):
                    await ok(s, tool.name, {})
                    answered.append(tool.name)
            assert len(answered) >= 20, answered
            print(f"{len(tools)} tools over MCP; {len(answered)} read-only tools answered with no arguments")
    run(main)


def test_memory_written_on_a_follower_reads_back_there_at_once_over_mcp(mc):
    node = follower(mc)

    async def main():
        async with stdio_session(node, profile="operator", toolsets="memory") as s:
            for i in range(5):
                logged = await ok(s, "memory_log_thought", {"new_thread": f"mcp thread {i}", "content":
                                                            f"discovered the flux capacitor {i}", "type": "discovery"})
                threads = await ok(s, "memory_list_threads", {"limit": 200})  # at once, on the same follower
                assert logged["thread_id"] in {t["id"] for t in threads}, threads
            found = await ok(s, "memory_search", {"query": "flux capacitor"})
            assert len([h for h in found if h["kind"] == "thought" and "[flux] [capacitor]" in h["snippet"]]) >= 5, found
            await err(s, "memory_query", {"sql": "DELETE FROM memory_threads"},
                      "a DELETE from memory_threads: memory_query runs read-only queries only")
    run(main)


# --- what third-party clients and CLI users meet ---------------------------------------------------------------

def test_an_operator_session_has_kv_cancels_its_tasks_and_reads_templates(mc):
    node = mc.node("w1")

    async def main():
        async with stdio_session(node, profile="operator") as s, http_session(node, "?profile=operator") as h:
            # the node's default toolsets (up to 40 tools) hold the kv tools; an operator may cancel
            names = {t.name for t in (await s.list_tools()).tools}
            assert {"kv_get", "kv_put", "kv_list", "tasks_submit", "tasks_cancel"} <= names and len(names) <= 40
            submitted = await ok(s, "tasks_submit", {"tasks": [{"kind": "shell", "spec": {"command": "sleep 60"},
                                                                 "placement": {"nodes": ["w1"]}}]})
            sleeper = submitted["task_ids"][0]
            await ok(s, "tasks_cancel", {"task_id": sleeper, "idempotency_key": f"cancel-{sleeper}"})
            await ok(s, "tasks_cancel", {"task_id": sleeper, "idempotency_key": f"cancel-{sleeper}"})  # a retry

            async def state() -> str:
                return json.loads((await s.call_tool("tasks_get", {"task_id": sleeper})).content[0].text)["state"]

            with anyio.fail_after(60):
                while await state() != "cancelled":
                    await anyio.sleep(0.2)

            # resource templates: one node, task or key, through the tool that answers the same question
            for session in (s, h):
                shapes = {t.uri_template for t in (await session.list_resource_templates()).resource_templates}
                assert {"cluster://nodes/{node_id}", "cluster://tasks/{task_id}", "cluster://kv/{key}"} <= shapes
            task_id = (await ok(s, "tasks_submit", {"tasks": [{"kind": "noop", "name": "templated"}]}))["task_ids"][0]
            await ok(h, "kv_put", {"key": "tmpl/a b", "value": "v1"})
            for session in (s, h):
                task = json.loads((await session.read_resource(f"cluster://tasks/{task_id}")).contents[0].text)
                assert task["id"] == task_id and task["name"] == "templated"
                got = json.loads((await session.read_resource("cluster://nodes/n1")).contents[0].text)
                assert got["id"] == "n1" and got["role"] == "server"
                kv = json.loads((await session.read_resource("cluster://kv/tmpl%2Fa%20b")).contents[0].text)
                assert kv["value"] == "v1"
                with pytest.raises(MCPError, match="no task 'nope'"):
                    await session.read_resource("cluster://tasks/nope")
                overview = json.loads((await session.read_resource("cluster://tasks")).contents[0].text)
                assert overview["enabled"] is True and task_id in [t["id"] for t in overview["items"]]
    run(main)


def test_an_oversize_http_request_is_a_tool_error(mc):
    async def main():
        async with http_session(mc.node("n1"), "?profile=operator&toolsets=kv") as s:
            text = await err(s, "kv_put", {"key": "huge", "value": "x" * 3_000_000}, "kv_put: the request is")
            assert "tool arguments may be at most 1048576 bytes" in text
            assert (await ok(s, "kv_put", {"key": "after-huge", "value": "fine"}))["version"] >= 1  # same session
        async with http_session(mc.node("n1"), "?profile=admin&toolsets=membership") as s:  # the token: operator
            listed = await s.list_tools()
            assert "plugins.mcp.http_role" in listed.meta["cortex/notice"]
            assert "approve_node" not in {t.name for t in listed.tools}
    run(main)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (its fetch is what TypeScript MCP clients use)")
def test_a_call_sent_while_the_agent_is_paused_is_answered_over_http(mc):
    """A call on a kept-alive connection, sent while the agent is stopped for 5 s (a suspended VM, a long GC),
    is answered when it resumes: the server's keep-alive outlasts any client's, so it never closes a
    connection with a request waiting in it (which Node's fetch reports as `fetch failed`)."""
    node = mc.node("w1")
    url, token = http_info(node)
    script = Path(__file__).parent / "fixtures" / "mcp_fetch" / "paused_call.mjs"
    try:  # 5 s stopped, 1 s after the last answer: the connection idles past the 5 s keep-alive uvicorn defaults to
        out = procs.run(["node", str(script), url, token, str(node.pid), "5"], capture_output=True, timeout=60)
    finally:
        os.kill(node.pid, signal.SIGCONT)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert answer.get("status") == 200, answer
    assert "connected_node" in answer["body"] and '"isError":false' in answer["body"].replace(" ", ""), answer


def test_cortex_mcp_names_a_missing_certificate_and_a_capped_profile(mc, tmp_path, monkeypatch, capsys):
    """What `cortex mcp` says on stderr at start, before any tool call (run in this process: a subprocess spends
    seconds importing the SDK). `localhost:PORT` is the same node under an address no credentials are known for."""
    from cortex.mcp.server import GrpcBackend, parse_view
    from cortex.plugins.cli import preflight

    node = mc.node("n1")
    monkeypatch.delenv("CORTEX_TLS_DIR", raising=False)
    monkeypatch.setenv("CORTEX_DEV_TRUST_DIR", str(tmp_path / "no-notes"))
    port = node.grpc_address.rpartition(":")[2]
    for target, profile in ((f"localhost:{port}", ""), (node.grpc_address, "admin")):
        backend = GrpcBackend(target, timeout=30)
        try:
            preflight(backend, parse_view(profile, ""))
        finally:
            backend.close()
    said = capsys.readouterr().err
    assert f"no client certificate was found for localhost:{port}" in said and "set CORTEX_TLS_DIR" in said, said
    assert "is `cortex agent` running" not in said
    assert "the 'admin' profile was asked for, but this connection's credential has the 'operator' role" in said


def test_cli_socket_and_hints_follow_the_actual_cause(mc, monkeypatch, capsys):
    from cortex.cli.main import main

    node = mc.node("n1")
    for name in ("CORTEX_ADDR", "CORTEX_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    for argv in (["status"], ["tools", "list"], ["plugins", "list"]):  # the socket alone names the node
        assert main(["--socket", str(node.admin_socket), "--json", *argv]) == 0, capsys.readouterr().err
        doc = json.loads(capsys.readouterr().out)
        assert doc["node_id"] == "n1"
        if argv == ["tools", "list"]:
            assert doc["caller_role"] == "admin"  # the admin socket, not the network port
    from cortex.client import CortexError

    with Client(f"unix:{node.admin_socket}") as on_socket:  # Status and Read there; writes need the gRPC port
        assert on_socket.read("cluster", {}, level="stale")["cluster_id"]
        with pytest.raises(CortexError, match="the admin socket answers Status and Read of the Cluster service only"):
            on_socket.put("socket/write", "no")
    assert main(["--addr", node.grpc_address, "tasks", "cancel", "nope"]) == 1
    said = capsys.readouterr().err
    assert "no such task" in said and "cortex status" not in said, said
    with socket_bound() as port:  # bound, never listening: refused
        assert main(["--addr", f"127.0.0.1:{port}", "status"]) == 1
    said = capsys.readouterr().err
    assert "nothing listens at" in said and "no client certificate" not in said and "just up" not in said, said
    # the MCP HTTP port given as --addr, in a process of its own: its stderr also shows gRPC's C core lines
    url, _ = http_info(node)
    with httpx2.Client(timeout=30) as http:  # the port loads its web stack on a first connection; not this test's
        assert http.get(url).status_code == 401
    tls = {**os.environ, "CORTEX_TLS_DIR": str(Path(node.dir) / "data" / "tls")}  # TLS to a web port: handshakes fail
    web = procs.run([sys.executable, "-m", "cortex", "--addr", url.split("//")[1].split("/")[0], "--timeout", "1",
                     "status"], capture_output=True, timeout=60, env=tls)
    assert b"answers HTTP, not gRPC" in web.stderr and b"quorum" not in web.stderr, web.stderr
    assert b"ssl_transport_security" not in web.stderr, web.stderr
