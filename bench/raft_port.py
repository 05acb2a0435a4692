"""Raft port benchmark: sequential puts via the leader while a stranger feeds its Raft port a frame that
announces 0x7fffffff bytes and then trickles them in.

    python -m bench.raft_port [--mib 16] [--puts 200] [--base-port 30400] [--json PATH]

Starts a 3-server dev cluster on 127.0.0.1, measures put latency via the leader before and during the
trickle, and reports how many bytes the server took before it closed the connection, the slowest put while
it lasted, and whether the leader or its term changed. pysyncobj's own transport buffered the whole trickle
on its one thread (16 MiB moved leadership); the Cortex transport refuses the header before buffering.
The cluster tests hold the short version (tests/cluster/test_raft_transport.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cortex.client import Client, CortexError
from cortex.dev import cluster as devcluster


def _leader(dc) -> tuple[devcluster.DevNode, int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for node in dc.servers:
            try:
                with Client(node.grpc_address, timeout=2) as c:
                    status = c.status()
            except Exception:  # noqa: BLE001 - electing or restarting: ask again
                continue
            if status.state == "leader":
                return node, status.term
        time.sleep(0.1)
    raise RuntimeError("no leader within 30 s")


def _puts(address: str, count: int, tag: str, failures: list[str] | None = None) -> list[float]:
    """Latencies (ms) of `count` puts; with `failures`, a failed put is noted there (its time still counts)."""
    out = []
    with Client(address, timeout=10) as c:
        for i in range(count):
            t = time.perf_counter()
            try:
                c.put(f"bench-{tag}-{i}", "v" * 100)
            except CortexError as exc:
                if failures is None:
                    raise
                failures.append(str(exc)[:120])
            out.append((time.perf_counter() - t) * 1000)
    return out


def _trickle(address: str, total: int, result: dict) -> None:
    host, port = address.rsplit(":", 1)
    sent = 0
    started = time.perf_counter()
    try:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"\xff\xff\xff\x7f")
            while sent < total:
                s.sendall(b"A" * 16384)
                sent += 16384
            s.settimeout(5)
            result["closed_by_server"] = s.recv(1) == b""
    except (BrokenPipeError, ConnectionResetError):
        result["closed_by_server"] = True
    except TimeoutError:
        result["closed_by_server"] = False
    result["bytes_taken"] = sent
    result["seconds"] = time.perf_counter() - started


def run(mib: int, puts: int, base_port: int) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="bench-raft-port-"))
    dc = devcluster.up(directory, 3, 0, base_port, timeout=60)
    try:
        leader, term = _leader(dc)
        baseline = _puts(leader.grpc_address, puts, "base")
        attack: dict = {}
        thread = threading.Thread(target=_trickle, args=(leader.raft_address, mib << 20, attack), daemon=True)
        thread.start()
        during: list[float] = []
        failed: list[str] = []
        while thread.is_alive():
            during += _puts(leader.grpc_address, 10, f"during-{len(during)}", failed)
        thread.join()
        after_leader, after_term = _leader(dc)
        return {
            "put_p50_ms": round(statistics.median(baseline), 2),
            "put_max_ms": round(max(baseline), 2),
            "put_p50_during_ms": round(statistics.median(during), 2) if during else None,
            "put_max_during_ms": round(max(during), 2) if during else None,
            "puts_failed_during": len(failed),
            "first_failure": failed[0] if failed else "",
            "trickle_mib": mib,
            "bytes_taken": attack.get("bytes_taken", 0),
            "closed_by_server": attack.get("closed_by_server", False),
            "leader_changed": after_leader.id != leader.id or after_term != term,
        }
    finally:
        devcluster.down(directory)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.raft_port", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=16, help="size of the trickle (MiB)")
    ap.add_argument("--puts", type=int, default=200, help="sequential puts for the baseline")
    ap.add_argument("--base-port", type=int, default=30400)
    ap.add_argument("--json", help="also write the results as JSON to this path")
    args = ap.parse_args(argv)
    result = run(args.mib, args.puts, args.base_port)
    width = max(len(k) for k in result)
    print(f"{'metric':<{width}}  value")
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
