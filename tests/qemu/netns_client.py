"""Cortex gRPC clients that the VM tests run inside the lab namespace (`ip netns exec NS python THIS ...`):
the VMs' addresses exist only there. Output is one JSON document per line, stamped with the host's
CLOCK_MONOTONIC (shared with the pytest process, so its times compare with the harness's).

    watch ADDR...              poll every node's status every 0.1 s; print a line when a node's view changes
    write ADDR... --prefix P   put P-1, P-2, ... until stdin closes; print each acknowledged write
    get ADDR KEY... [--level]  read keys, print {"key": value-or-null}
    http URL [--interval]      GET the URL every 0.2 s; print a line when the answer's first line (or the
                               kind of failure) changes, stamped with when that request began
    scan ADDR PREFIX [--level] read every key under PREFIX, print {"key": value}
"""

from __future__ import annotations

import argparse
import json
import select
import string
import sys
import threading
import time
import urllib.request
from http.client import HTTPException

from cortex.client import Client, CortexError

_out = threading.Lock()
LIST_LIMIT = 10_000  # the most kv.list returns in one read


def emit(doc: dict) -> None:
    with _out:
        print(json.dumps({"t": time.monotonic(), **doc}), flush=True)


def view(client: Client) -> dict:
    s = client.status()
    return {"state": s.state, "leader": s.leader_id, "term": s.term, "applied": s.applied_index,
            "nodes": {n.id: n.liveness for n in s.nodes}}


def watch(addresses: list[str], interval: float) -> None:
    """One poller per node, so a dead node's timeouts do not delay the news from the others."""
    for address in addresses:
        threading.Thread(target=poll, args=(address, interval), daemon=True).start()
    while not stdin_closed(1.0):
        pass


def poll(address: str, interval: float) -> None:
    client = Client(address, timeout=0.5)
    last: dict = {}
    while True:
        try:
            now = view(client)
        except CortexError as exc:
            now = {"error": exc.code.name}
        if now != last:
            last = now
            emit({"addr": address, **now})
        time.sleep(interval)


def write(addresses: list[str], prefix: str) -> None:
    """Acknowledged writes only are printed; a failed put is retried (same key, same idempotency key)
    through the next address, so every key is acknowledged at most once and in order."""
    clients = [Client(a, timeout=2) for a in addresses]
    n, turn = 1, 0
    while not stdin_closed(0):
        key = f"{prefix}-{n}"
        client = clients[turn % len(clients)]
        try:
            client.put(key, str(n), idempotency_key=key)
        except CortexError as exc:
            emit({"failed": key, "via": addresses[turn % len(clients)], "error": exc.code.name})
            turn += 1
            time.sleep(0.1)
            continue
        emit({"acked": key, "value": str(n), "via": addresses[turn % len(clients)]})
        n += 1
        time.sleep(0.05)


def answers(url: str, interval: float, timeout: float) -> None:
    """Who answers at `url` (a service's floating address): the first line of the body, or the kind of failure
    (refused, timed out: nobody holds the address, or a neighbour still sends to its last holder). Each line
    carries when its request began, so a gap without answers is measured from the first request that failed."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the lab only, whatever $http_proxy says
    last: dict = {}
    while not stdin_closed(0):
        began = time.monotonic()
        try:
            with opener.open(url, timeout=timeout) as answer:
                now = {"answer": answer.read().decode("utf-8", "replace").split("\n", 1)[0]}
        except (OSError, HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            now = {"error": type(reason).__name__ if not isinstance(reason, str) else reason}
        if now != last:
            last = now
            emit({"t": began, **now})
        time.sleep(max(0.0, interval - (time.monotonic() - began)))


def get(address: str, keys: list[str], level: str) -> None:
    with Client(address, timeout=10) as client:
        emit({"values": {k: client.get(k, level=level) for k in keys}})


def scan(address: str, prefix: str, level: str) -> None:
    """Every key under `prefix` with its value, in a few reads (a get per key took minutes for the ~12,000
    keys a rollout's writer acknowledges): kv.list pages hold up to LIST_LIMIT keys, and a full page is read
    again split by the next character."""
    values: dict[str, str] = {}
    with Client(address, timeout=30) as client:
        pending = [prefix]
        while pending:
            part = pending.pop()
            rows = client.read("kv.list", {"prefix": part, "limit": LIST_LIMIT}, level=level)
            if len(rows) < LIST_LIMIT:
                values.update((r["key"], r["value"]) for r in rows)
                continue
            exact = client.read("kv.get", {"key": part}, level=level)
            if exact is not None:
                values[part] = exact["value"]
            pending.extend(part + c for c in {r["key"][len(part)] for r in rows if len(r["key"]) > len(part)}
                           | set(string.printable.strip()))
    emit({"values": values})


def stdin_closed(timeout: float) -> bool:
    """The parent ends a long-running mode by closing our stdin."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready) and not sys.stdin.readline()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("watch")
    p.add_argument("addresses", nargs="+")
    p.add_argument("--interval", type=float, default=0.1)
    p = sub.add_parser("write")
    p.add_argument("addresses", nargs="+")
    p.add_argument("--prefix", required=True)
    p = sub.add_parser("http")
    p.add_argument("url")
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=1.0)
    p = sub.add_parser("scan")
    p.add_argument("address")
    p.add_argument("prefix")
    p.add_argument("--level", default="linearizable")
    p = sub.add_parser("get")
    p.add_argument("address")
    p.add_argument("keys", nargs="+")
    p.add_argument("--level", default="linearizable")
    args = parser.parse_args()
    if args.mode == "watch":
        watch(args.addresses, args.interval)
    elif args.mode == "write":
        write(args.addresses, args.prefix)
    elif args.mode == "http":
        answers(args.url, args.interval, args.timeout)
    elif args.mode == "scan":
        scan(args.address, args.prefix, args.level)
    else:
        get(args.address, args.keys, args.level)


if __name__ == "__main__":
    main()
