"""The memory plugin inside real agents on a 3-server cluster, with backups to a real local S3 server.

One follower runs in the test process (its other nodes are processes), so the tools are called exactly as
the agent's plugin host calls them: through PluginBridge, writes forwarded to the leader, reads served from
the follower's own replica. S3 is moto's server mode: a real HTTP server on loopback spoken to by boto3.
The MCP front end (branch `mcp`) is not merged yet: calling these tools through an MCP client is left to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cortex import config
from cortex.dev import cluster as devcluster
from cortex.node.agent import Agent
from cortex.plugins import Caller
from tests.support import procs
from tests.support.cluster import free_base_port
from tests.support.wait import wait_until

OPERATOR = Caller(role="operator", identity="test")
BUCKET = "cortex-memory"


@pytest.fixture
def s3(tmp_path: Path, monkeypatch):
    port = free_base_port(width=1)
    log = open(tmp_path / "moto.log", "wb")
    proc = procs.popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def moto_answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"moto did not start: {(tmp_path / 'moto.log').read_text()}")
        urllib.request.urlopen(url + "/", timeout=1)
        return True

    try:
        try:
            wait_until(moto_answers, 30, "moto to answer", interval=0.1, ignore=(OSError,))
        except AssertionError as exc:
            raise AssertionError(f"moto did not start: {(tmp_path / 'moto.log').read_text()}") from exc
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(name, value)  # the agents started below inherit them
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log.close()


def in_process(node: devcluster.DevNode) -> Agent:
    """Replace a node's agent process by an agent in this process, on the same data directory."""
    devcluster.stop_node(node)
    agent = Agent(config.load(node.config_path))
    agent.start()
    wait_until(lambda: agent.raft and agent.raft.leader_address() and agent.plugins.plugins["memory"].state == "running",
               30, "the in-process agent to rejoin")
    return agent


def whereami(node: devcluster.DevNode) -> str:
    path = Path(node.dir) / "data" / "plugins" / "memory" / "whereami.md"
    return path.read_text() if path.exists() else ""


def test_memory_tools_in_a_follower_agent_with_whereami_and_s3_backups(make_cluster, s3, tmp_path: Path):
    import boto3

    options = {"whereami_debounce": 0.1,
               "backup": {"interval": 1, "s3": {"bucket": BUCKET, "prefix": "memory", "endpoint_url": s3}}}
    cluster = make_cluster(3, plugins={"memory": options})
    follower = cluster.node(cluster.followers()[0])
    agent = in_process(follower)
    try:
        call = lambda tool, **args: agent.plugins.call_tool(tool, args, OPERATOR)  # noqa: E731

        # read-your-writes on the follower that wrote, with no wait in between
        for n in range(20):
            written = call("memory_set_context", key=f"build/{n}", value={"n": n}, category="fact")
            assert [e["value"] for e in call("memory_get_context", key=f"build/{n}")] == [{"n": n}]
        assert agent.store.last_applied >= written["index"]  # served by this replica, not forwarded
        thread = call("memory_log_thought", new_thread="Ship memory", project="cortex", type="decision",
                      content="backups go to S3 with a staged restore")["thread_id"]
        for n in range(10):
            call("memory_log_thought", thread_id=thread, content=f"step {n}")
        assert call("memory_list_threads")[0]["thoughts"] == 11
        assert call("memory_search", query="staged restore")[0]["thread_id"] == thread
        assert call("memory_stats")["cluster"]["tables"]["memory_context"]["rows"] == 20

        # a handoff: this node's whereami.md at once, the other nodes' after their debounce
        call("memory_handoff", thread_id=thread, summary="memory done; MCP client tests next",
             next_steps=["merge mcp", "run the MCP client tests"], to="laptop")
        assert "Handed off to laptop" in whereami(follower) and "- [ ] merge mcp" in whereami(follower)
        for node in cluster.nodes:
            wait_until(lambda n=node: "memory done; MCP client tests next" in whereami(n), 20, f"{node.id} whereami")
        assert all("### Ship memory" in whereami(n) for n in cluster.nodes)

        # the leader backs up to S3; wait for a backup holding exactly the current content
        assert call("memory_query", sql="SELECT count(*) FROM memory_thoughts")["rows"] == [[12]]
        digest = agent.plugins.plugins["memory"].plugin._read("memory.digest")["digest"]
        client = boto3.client("s3", endpoint_url=s3)

        def backed_up():
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="memory/").get("Contents", [])]
            docs = [json.loads(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys
                    if k.endswith(".json")]
            return [d for d in docs if d["content_digest"] == digest]
        (manifest,) = wait_until(backed_up, 30, "a backup in S3")
        assert manifest["rows"]["memory_context"] == 20 and manifest["tiers"] == ["public", "internal"]

        # wipe, then restore from S3 through the CLI on a running cluster
        for table in ("memory_thoughts", "memory_threads", "memory_context"):
            call("memory_write", kind="sql", sql=f"DELETE FROM {table}")
        assert call("memory_stats")["cluster"]["tables"]["memory_context"]["rows"] == 0
        cli = [sys.executable, "-m", "cortex", "--json", "--addr", cluster.node(cluster.leader()).grpc_address]
        listed = json.loads(subprocess.run([*cli, "backup", "list", "--s3-bucket", BUCKET, "--s3-prefix", "memory",
                                            "--s3-endpoint", s3], capture_output=True, text=True, check=True,
                                           timeout=60).stdout)
        assert manifest["name"] in [m["name"] for m in listed]
        restored = subprocess.run([*cli, "backup", "restore", manifest["name"], "--yes", "--s3-bucket", BUCKET,
                                   "--s3-prefix", "memory", "--s3-endpoint", s3], capture_output=True, text=True,
                                  timeout=120)
        assert restored.returncode == 0, restored.stderr
        assert json.loads(restored.stdout)["matches"]
        # every replica holds the backup's content again
        def digests():
            out = set()
            for node in cluster.dc.servers:
                with cluster.client(node.id) as c:
                    out.add(c.read("memory.digest", {}, level="stale")["digest"])
            return out
        assert wait_until(lambda: digests() == {digest}, 20, "replicas to converge on the restored content")
        assert call("memory_list_threads")[0]["id"] == thread
        assert len(set(cluster.wait_converged().values())) == 1
    finally:
        agent.stop()
