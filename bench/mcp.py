"""MCP benchmark: tool-call latency through the real front ends against a live local cluster.

    python -m bench.mcp [--quick] [--json PATH] [--base-port N]

Starts a dev cluster (3 servers + 1 worker, real agent processes on 127.0.0.1), then measures with the `mcp`
SDK's client, one call at a time (what an assistant does):

- stdio: `cortex mcp` spawned as a subprocess, talking to a *follower* over gRPC: a read served by that node
  (kv_get, stale level), a read at the leader's replica (kv_get, leader level: forwarded), and a write
  (kv_put, forwarded to the leader); the same write through a *worker*;
- streamable HTTP: the follower's own MCP endpoint (in the agent, bearer token), read and forwarded write;
- baseline: the same put as a plain gRPC Write to the follower, to show what the MCP layers add.

Prints one table (metric | p50 ms | p99 ms | n) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from cortex.client import Client
from cortex.dev import cluster as devcluster

from . import measure

FULL = dict(calls=300, warmup=20)
QUICK = dict(calls=30, warmup=5)
_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench.mcp {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@asynccontextmanager
async def stdio_session(node: devcluster.DevNode, profile: str = "operator"):
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, env=dict(os.environ),
                                   args=["-m", "cortex", "--addr", node.grpc_address, "mcp", "--via", "addr",
                                         "--profile", profile, "--toolsets", "kv"])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def http_session(node: devcluster.DevNode):
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    info = json.loads((Path(node.dir) / "data/plugins/mcp/mcp.json").read_text())
    token = Path(info["token_file"]).read_text().strip()
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http, \
            streamable_http_client(info["url"] + "?profile=operator&toolsets=kv", http_client=http) as (r, w, *_), \
            ClientSession(r, w) as session:
        await session.initialize()
        yield session


async def timed_calls(session, name: str, args_for: Callable[[int], dict], calls: int, warmup: int) -> list[float]:
    for i in range(warmup):
        await checked(session.call_tool(name, args_for(-1 - i)))
    samples = []
    for i in range(calls):
        start = time.perf_counter()
        await checked(session.call_tool(name, args_for(i)))
        samples.append(time.perf_counter() - start)
    return samples


async def checked(call: Awaitable):
    result = await call
    if result.is_error:
        raise RuntimeError(result.content[0].text)
    return result


def row(label: str, samples: list[float]) -> dict:
    p = measure.percentiles(samples)
    return {"metric": label, "p50_ms": p["p50"] * 1000, "p99_ms": p["p99"] * 1000, "n": p["n"]}


async def run_all(cluster: devcluster.DevCluster, leader: str, sizes: dict) -> list[dict]:
    follower = next(n for n in cluster.servers if n.id != leader)
    worker = cluster.workers[0]
    calls, warmup = sizes["calls"], sizes["warmup"]
    put = lambda prefix: lambda i: {"key": f"bench/mcp/{prefix}/{i}", "value": "v"}  # noqa: E731
    rows = []
    async with stdio_session(follower) as s:
        progress(f"stdio via follower {follower.id}")
        rows.append(row(f"stdio read kv_get (stale, on follower {follower.id})",
                        await timed_calls(s, "kv_get", lambda i: {"key": "bench/mcp/x", "level": "stale"},
                                          calls, warmup)))
        rows.append(row("stdio read kv_get (leader level, forwarded)",
                        await timed_calls(s, "kv_get", lambda i: {"key": "bench/mcp/x"}, calls, warmup)))
        rows.append(row("stdio write kv_put via follower (forwarded)",
                        await timed_calls(s, "kv_put", put("sf"), calls, warmup)))
    async with stdio_session(worker) as s:
        progress(f"stdio via worker {worker.id}")
        rows.append(row(f"stdio write kv_put via worker {worker.id} (forwarded)",
                        await timed_calls(s, "kv_put", put("sw"), calls, warmup)))
    async with http_session(follower) as s:
        progress(f"HTTP on follower {follower.id}")
        rows.append(row("HTTP read kv_get (stale, on follower)",
                        await timed_calls(s, "kv_get", lambda i: {"key": "bench/mcp/x", "level": "stale"},
                                          calls, warmup)))
        rows.append(row("HTTP write kv_put via follower (forwarded)",
                        await timed_calls(s, "kv_put", put("hf"), calls, warmup)))
    return rows


def grpc_baseline(follower: devcluster.DevNode, sizes: dict) -> dict:
    with Client(follower.grpc_address) as c:
        for i in range(sizes["warmup"]):
            c.put(f"bench/mcp/warm/{i}", "v")
        samples = []
        for i in range(sizes["calls"]):
            start = time.perf_counter()
            c.put(f"bench/mcp/grpc/{i}", "v")
            samples.append(time.perf_counter() - start)
    return row("baseline: gRPC Write via follower (no MCP)", samples)


def table(rows: list[dict]) -> str:
    width = max(len(r["metric"]) for r in rows)
    lines = [f"{'metric':<{width}}  {'p50 ms':>8}  {'p99 ms':>8}  {'n':>5}", "-" * (width + 27)]
    lines += [f"{r['metric']:<{width}}  {r['p50_ms']:8.2f}  {r['p99_ms']:8.2f}  {r['n']:5d}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mcp", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls (the test suite's smoke run)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--base-port", type=int, default=26400)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    directory = Path(tempfile.mkdtemp(prefix="cortex-bench-mcp-"))
    extra = lambda node: "plugins:\n  mcp:\n    listen: 127.0.0.1:0\n"  # noqa: E731
    try:
        progress(f"starting 3 servers + 1 worker in {directory}")
        cluster = devcluster.up(directory, 3, 1, args.base_port, timeout=90, extra_config=extra)
        for node in cluster.nodes:
            deadline = time.monotonic() + 30
            while not (Path(node.dir) / "data/plugins/mcp/mcp.json").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.id}: MCP did not start; {devcluster.tail(node.log_path)}")
                time.sleep(0.1)
        with Client(cluster.servers[0].grpc_address) as c:
            leader = c.status().leader_id
            c.put("bench/mcp/x", "value", retry_for=10)
        rows = anyio.run(run_all, cluster, leader, sizes)
        rows.append(grpc_baseline(next(n for n in cluster.servers if n.id != leader), sizes))
    finally:
        devcluster.down(directory, purge=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "sizes": sizes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
