"""Client-pattern measurements, generic over the system under test.

Every function takes any client object with the benchmark's common interface::

    client.put(key: str, value: bytes)                 # returns once acknowledged
    client.get(key: str, linearizable: bool = True) -> bytes | None
    client.put_many_pipelined(items, concurrency) -> int

so Cortex and etcd are driven with exactly the same pattern in the same run.
`failover_time` additionally needs a cluster object with ``follower_endpoint()``
and ``kill_leader()``, plus ``client_factory(endpoint) -> client``.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable

DEFAULT_VALUE_SIZE = 100


def _value(size: int) -> bytes:
    return os.urandom(size)


def _prefix(tag: str) -> str:
    return f"bench/{tag}/{uuid.uuid4().hex[:8]}/"


def sequential_put_latency(client, n: int, value_size: int = DEFAULT_VALUE_SIZE) -> list[float]:
    """n puts one after another (each waits for its ack); per-put latency in seconds."""
    prefix, value = _prefix("seq"), _value(value_size)
    out: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        client.put(f"{prefix}{i:08d}", value)
        out.append(time.perf_counter() - t0)
    return out


def pipelined_throughput(client, n: int, concurrency: int, value_size: int = DEFAULT_VALUE_SIZE) -> float:
    """n puts with up to `concurrency` in flight; acknowledged puts per second."""
    prefix, value = _prefix("pipe"), _value(value_size)
    items = [(f"{prefix}{i:08d}", value) for i in range(n)]
    t0 = time.perf_counter()
    acked = client.put_many_pipelined(items, concurrency)
    elapsed = time.perf_counter() - t0
    if acked != n:
        raise RuntimeError(f"only {acked}/{n} pipelined puts acknowledged")
    return n / elapsed if elapsed > 0 else math.inf


def read_latency(client, n: int, linearizable: bool, value_size: int = DEFAULT_VALUE_SIZE) -> list[float]:
    """Write one key, then read it n times; per-read latency in seconds.

    The first read's value is checked (a linearizable read must see the write;
    a stale read is only checked when linearizable=True)."""
    key, value = f"{_prefix('read')}k", _value(value_size)
    client.put(key, value)
    out: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        got = client.get(key, linearizable=linearizable)
        out.append(time.perf_counter() - t0)
        if i == 0 and linearizable and got != value:
            raise RuntimeError(f"linearizable read of {key!r} returned {got!r}")
    return out


def failover_time(
    cluster,
    client_factory,
    timeout: float = 15.0,
    retry_pause: float = 0.01,
    value_size: int = DEFAULT_VALUE_SIZE,
) -> float:
    """SIGKILL the leader, then put in a loop through a surviving member until
    the first put is acknowledged; returns seconds from the kill to that ack.

    The surviving member is chosen (as a follower) before the kill so the kill
    can't take it down.  Bounded by `timeout`: raises TimeoutError when no put
    is acknowledged in time.  The client's own per-call deadline bounds each
    attempt, and an attempt sent toward the dead leader typically hangs until
    that deadline, so the result's resolution is about one per-call deadline:
    give both systems the same short deadline via the factory (e.g. 0.25 s).
    """
    endpoint = cluster.follower_endpoint()
    client = client_factory(endpoint)
    prefix, value = _prefix("failover"), _value(value_size)
    try:
        client.put(f"{prefix}warmup", value)  # connection established before the clock starts
        t_kill = time.perf_counter()
        cluster.kill_leader()
        deadline = t_kill + timeout
        attempt = 0
        last_err: BaseException | None = None
        while time.perf_counter() < deadline:
            attempt += 1
            try:
                client.put(f"{prefix}{attempt:06d}", value)
                return time.perf_counter() - t_kill
            except Exception as e:  # RpcError / client-specific "no leader" errors
                last_err = e
            time.sleep(retry_pause)
        raise TimeoutError(
            f"no put acknowledged within {timeout:.1f}s after leader kill (last error: {last_err!r})"
        )
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()


def percentiles(samples) -> dict:
    """p50/p99 (linear interpolation, like numpy's default) plus mean/min/max/n."""
    xs = sorted(samples)
    if not xs:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "mean": math.nan, "min": math.nan, "max": math.nan}

    def pct(q: float) -> float:
        pos = (len(xs) - 1) * q / 100.0
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {
        "n": len(xs),
        "p50": pct(50),
        "p99": pct(99),
        "mean": sum(xs) / len(xs),
        "min": xs[0],
        "max": xs[-1],
    }


def idle_usage(pids, seconds: float = 5.0) -> tuple[list[int], list[float]]:
    """RSS (bytes) and CPU% (100 = one core) of each pid while idle for `seconds`.

    Returned lists are in the order of `pids`.  RSS is sampled at the end of the
    window; CPU% is averaged over the window.  A process that vanishes reads as 0.
    """
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.cpu_percent(None)  # prime the counter
            procs.append(p)
        except psutil.NoSuchProcess:
            procs.append(None)
    time.sleep(seconds)
    rss, cpu = [], []
    for p in procs:
        try:
            if p is None:
                raise psutil.NoSuchProcess(0)
            cpu.append(p.cpu_percent(None))
            rss.append(p.memory_info().rss)
        except psutil.NoSuchProcess:
            cpu.append(0.0)
            rss.append(0)
    return rss, cpu


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(rows, headers, file=None) -> str:
    """Print (and return) a plain, left/right-aligned text table.

    Numbers are right-aligned, everything else left-aligned; floats get 3
    decimals (or thousands separators when >= 1000)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    heads = [str(h) for h in headers]
    ncol = len(heads)
    for r in cells:
        if len(r) != ncol:
            raise ValueError(f"row has {len(r)} cells, expected {ncol}: {r}")
    widths = [max([len(heads[c])] + [len(r[c]) for r in cells]) for c in range(ncol)]
    numeric = [all(isinstance(row[c], int | float) for row in rows) and bool(rows) for c in range(ncol)]

    def line(vals):
        return "  ".join(
            v.rjust(widths[c]) if numeric[c] else v.ljust(widths[c]) for c, v in enumerate(vals)
        ).rstrip()

    out = [line(heads), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    text = "\n".join(out)
    print(text, file=file, flush=True)
    return text


def windowed(requests: Iterable, start: Callable, concurrency: int, slot_wait: float,
             count: Callable = lambda response: 1) -> int:
    """Send `requests` with at most `concurrency` in flight: the client pattern of every pipelined row.

    start(request) returns a gRPC future; count(response) says how many operations it acknowledged (and
    raises for a failed one). Returns the total acknowledged; raises the first error after draining.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    window = threading.BoundedSemaphore(concurrency)
    lock = threading.Lock()
    errors: list[BaseException] = []
    acked = 0

    def on_done(fut):
        nonlocal acked
        try:
            n = count(fut.result())
            with lock:
                acked += n
        except BaseException as e:  # grpc.RpcError, CancelledError, a failed command
            with lock:
                errors.append(e)
        finally:
            window.release()

    for request in requests:
        if errors:
            break
        if not window.acquire(timeout=slot_wait):
            raise TimeoutError(f"no in-flight slot freed within {slot_wait:.1f}s")
        try:
            fut = start(request)
        except BaseException:
            window.release()
            raise
        fut.add_done_callback(on_done)
    # Drain: re-acquiring every slot means every in-flight RPC finished.
    for _ in range(concurrency):
        if not window.acquire(timeout=slot_wait):
            raise TimeoutError(f"in-flight requests did not drain within {slot_wait:.1f}s")
    for _ in range(concurrency):
        window.release()
    if errors:
        raise errors[0]
    return acked
