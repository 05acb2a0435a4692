"""Fleet-scale benchmark: 3 real servers and N simulated workers driven from one process.

    python -m bench.fleet [--sizes 50,100,250,500,1000,2000] [--window S] [--json PATH] [--base-port N]
                          [--pull-every S] [--blip S] [--profile DIR] [--keep]

A simulated worker does on the wire what a worker agent does, without the agent around it: it joins through
a server's enrollment port with a worker token (the joiner's own `enroll.call_join`, with a key and CSR of its
own, so it holds a certificate of its own), then holds one mutual-TLS channel per server and, like the
agent's background loop (node/upkeep.py), sends `Heartbeat` every WORKER_HEARTBEAT seconds to the server that
last answered, and pulls its assignments (`task.assigned`, a stale read, tasks/runner.py) the same way. All of
them run as coroutines on one asyncio loop (grpc.aio), so one process drives up to a few thousand.

For each N of the curve (workers are added to the ones already running), after a warm-up in which every
worker must be alive in the leader's view, it measures over a window: Heartbeat and assignment-pull latency
(p50/p99, as the worker sees it), failed calls, the leader's CPU (percent of one core over the window, psutil)
and RSS, the other servers' CPU, this driver's own CPU (near 100 % the driver, not the cluster, is the limit),
and whether the leader's liveness view stayed correct: every simulated worker `alive` at the end, and none
whose liveness changed during the window (a flap to suspect and back moves its `liveness_since`).

A step passes when heartbeat p99 < 200 ms, leader CPU < 50 % of one core and the liveness view is correct; the
curve ends at the first step that fails (a step that misses the latency or CPU bar is measured again first,
--retries; the machine's load is in every row). A failed bar is a result (exit 0); a measurement that breaks is not
(exit 1). Table on stdout, progress on stderr; --json writes the rows and the machine's load average.
--profile DIR records the leader with py-spy during each window (collapsed stacks, DIR/leader-N.txt) when
py-spy is installed. --blip S then silences the whole fleet for S seconds and times its return to alive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.client import Client, CortexError, channel_options
from cortex.core import domain
from cortex.dev import cluster as devcluster
from cortex.membership import enroll
from cortex.membership.join import JOIN_CONNECT_TIMEOUT_MS
from cortex.node.peers import FORWARD_TIMEOUT
from cortex.node.upkeep import WORKER_HEARTBEAT
from cortex.security import tls

from . import measure

SIZES = (50, 100, 250, 500, 1000, 2000)
HEARTBEAT_P99_BAR_MS = 200.0
LEADER_CPU_BAR = 50.0  # percent of one core
HEARTBEAT_TIMEOUT = 2.0  # the agent's own (upkeep.worker_heartbeat)
JOINS_IN_FLIGHT = 8  # the enrollment port serves 8 at a time (node/serving.py)
ALIVE_WITHIN = 120.0  # s for every worker of a step to be registered and alive before its window
SIM_PORT = 34999  # simulated workers listen nowhere; each gets its own loopback address with this port

_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[bench.fleet {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sim_address(i: int) -> str:
    """A distinct loopback address per simulated worker (the cluster records it; nobody dials it)."""
    return f"127.77.{i // 250}.{i % 250 + 1}:{SIM_PORT}"


# --------------------------------------------------------------------------- #
# Simulated workers
# --------------------------------------------------------------------------- #
@dataclass
class Samples:
    heartbeat: list[float] = field(default_factory=list)
    pull: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str, exc: BaseException) -> None:
        code = exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__
        key = f"{what} {code}"
        self.errors[key] = self.errors.get(key, 0) + 1


class SimWorker:
    """One worker's wire behaviour: a channel per server with its own certificate, calls to the server that
    last answered (the next one on UNAVAILABLE, as Router.to_servers does)."""

    def __init__(self, node_id: str, files: tls.ClientFiles, servers: list[str], connected: asyncio.Event):
        self.node_id = node_id
        self.connected = connected  # cleared: the fleet is cut off from the servers (--blip)
        self.files = files
        self.servers = list(servers)
        self._stubs: dict[str, pb_grpc.ClusterStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, address: str) -> pb_grpc.ClusterStub:
        stub = self._stubs.get(address)
        if stub is None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.files.ca, private_key=self.files.key,
                                                 certificate_chain=self.files.cert)
            # its own connection, as a separate machine has (gRPC would share one between equal channels)
            options = channel_options() + [("grpc.ssl_target_name_override", tls.SERVER_NAME),
                                           ("grpc.use_local_subchannel_pool", 1)]
            channel = grpc.aio.secure_channel(address, creds, options=options)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.ClusterStub(channel)
        return stub

    async def call(self, method: str, request, timeout: float):
        last: grpc.RpcError | None = None
        for address in list(self.servers):
            try:
                response = await getattr(self._stub(address), method)(request, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                last = exc
                continue
            if self.servers[0] != address and address in self.servers:
                self.servers.remove(address)
                self.servers.insert(0, address)
            return response
        raise last if last is not None else RuntimeError("no servers known")

    async def heartbeats(self, finished: asyncio.Event, record, interval: float) -> None:
        """upkeep.worker_heartbeat, every round of the background loop (a round, then `interval`)."""
        await _pause(finished, random.uniform(0, interval))
        request = pb.HeartbeatRequest(node_id=self.node_id)
        while not finished.is_set():
            await self.connected.wait()
            started = time.perf_counter()
            try:
                response = await self.call("Heartbeat", request, HEARTBEAT_TIMEOUT)
                samples = record()
                if samples is not None:
                    samples.heartbeat.append(time.perf_counter() - started)
                if response.server_grpc_addresses:  # the agent takes the list as given, order included
                    self.servers = list(response.server_grpc_addresses)
            except Exception as exc:  # noqa: BLE001 -- counted; the worker keeps going as the agent does
                samples = record()
                if samples is not None:
                    samples.error("heartbeat", exc)
            await _pause(finished, interval)

    async def pulls(self, finished: asyncio.Event, record, interval: float) -> None:
        """Runner._read_assigned on a worker: a stale read of `task.assigned`, forwarded once (hops=1)."""
        await _pause(finished, random.uniform(0, interval))
        request = pb.ReadRequest(query="task.assigned", args_json=json.dumps({"node_id": self.node_id}).encode(),
                                 level=pb.STALE, hops=1)
        while not finished.is_set():
            await self.connected.wait()
            started = time.perf_counter()
            try:
                response = await self.call("Read", request, FORWARD_TIMEOUT)
                json.loads(response.result_json)
                samples = record()
                if samples is not None:
                    samples.pull.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001
                samples = record()
                if samples is not None:
                    samples.error("pull", exc)
            await _pause(finished, interval)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def _pause(finished: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(finished.wait(), seconds)


def enroll_worker(join_address: str, token: str, index: int, connected: asyncio.Event,
                  attempts: int = 5) -> SimWorker:
    """The joining worker's side of a join with a token (join.Joiner._call_join): key, CSR, the enrollment
    port checked against the CA the token pins, the certificate back."""
    node_id = f"sim{index:05d}"
    key = tls.new_key_pem()
    request = pb.JoinRequest(node_id=node_id, role="worker", grpc_address=sim_address(index), token=token,
                             csr_pem=tls.new_csr(key, node_id), state_machine_level=domain.level())
    options = channel_options(connect_timeout_ms=JOIN_CONNECT_TIMEOUT_MS)
    for attempt in range(attempts):
        try:
            response, _ = enroll.call_join(join_address, request, enroll.pin_for(token), options,
                                           FORWARD_TIMEOUT * 2)
            break
        except enroll.EnrollError as exc:
            if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.RESOURCE_EXHAUSTED) or attempt + 1 == attempts:
                raise
            time.sleep(0.5 * (attempt + 1))
    if not response.admitted or not response.cert_pem:
        raise RuntimeError(f"{node_id} was not admitted: {response}")
    files = tls.ClientFiles(ca=response.ca_cert_pem, cert=response.cert_pem, key=key)
    return SimWorker(node_id, files, list(response.server_grpc_addresses), connected)


# --------------------------------------------------------------------------- #
# The cluster's view
# --------------------------------------------------------------------------- #
def find_leader(dc: devcluster.DevCluster) -> devcluster.DevNode:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for node in dc.servers:
            try:
                with Client(node.grpc_address, timeout=2) as c:
                    if c.status().state == "leader":
                        return node
            except CortexError:
                continue
        time.sleep(0.2)
    raise RuntimeError("no leader within 30 s")


def liveness_view(leader: devcluster.DevNode) -> dict[str, tuple[str, float]]:
    """{node id: (liveness, liveness_since)} as the leader's replica has it."""
    with Client(leader.grpc_address, timeout=20) as c:
        rows = c.read("nodes", {}, level="stale")
    return {r["id"]: (r["liveness"], r["liveness_since"]) for r in rows}


def wait_all_alive(leader: devcluster.DevNode, ids: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        view = liveness_view(leader)
        missing = [i for i in ids if view.get(i, ("",))[0] != "alive"]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} of {len(ids)} simulated workers not alive in the leader's view "
                               f"after {timeout:.0f} s (e.g. {sorted(missing)[:5]})")
        time.sleep(1.0)


def start_profile(profile_dir: Path | None, pid: int, seconds: float, n: int) -> subprocess.Popen | None:
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if profile_dir is None:
        return None
    if spy is None:
        progress("--profile: py-spy is not installed (.venv/bin/pip install py-spy); not profiling")
        return None
    profile_dir.mkdir(parents=True, exist_ok=True)
    out = profile_dir / f"leader-{n}.txt"
    return subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "50",
                             "--format", "raw", "-o", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --------------------------------------------------------------------------- #
# The curve
# --------------------------------------------------------------------------- #
async def run_curve(dc: devcluster.DevCluster, sizes: list[int], window: float, pull_every: float,
                    profile_dir: Path | None, blip: float, retries: int, rows: list[dict], returned: dict) -> None:
    """Measure the curve into `rows` (kept when a later step breaks) and the return after a blip into
    `returned`."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=JOINS_IN_FLIGHT)
    finished, connected = asyncio.Event(), asyncio.Event()
    connected.set()
    workers: list[SimWorker] = []
    tasks: list[asyncio.Task] = []
    current: list[Samples | None] = [None]
    record = lambda: current[0]  # noqa: E731 -- samples of the window under way (None between windows)
    join_address = dc.servers[0].grpc_address
    with Client(join_address, timeout=20) as c:
        token = c.create_token("worker", ttl_seconds=3600, uses=max(sizes)).token
    me = psutil.Process()
    try:
        for n in sizes:
            add = n - len(workers)
            progress(f"N={n}: enrolling {add} simulated workers ({JOINS_IN_FLIGHT} joins in flight)")
            started = time.monotonic()

            async def join(i: int) -> SimWorker:
                """A worker heartbeats from its join on, as the agent does (not once the others joined)."""
                w = await loop.run_in_executor(pool, enroll_worker, join_address, token, i, connected)
                tasks.append(asyncio.create_task(w.heartbeats(finished, record, WORKER_HEARTBEAT)))
                tasks.append(asyncio.create_task(w.pulls(finished, record, pull_every)))
                return w

            joined = await asyncio.gather(*(join(i) for i in range(len(workers), n)))
            progress(f"N={n}: {add} joined in {time.monotonic() - started:.1f} s")
            workers.extend(joined)
            ids = {w.node_id for w in workers}
            leader = await loop.run_in_executor(pool, find_leader, dc)
            await loop.run_in_executor(pool, wait_all_alive, leader, ids, ALIVE_WITHIN)
            await asyncio.sleep(max(2.0, WORKER_HEARTBEAT * 2))  # every worker through a few rounds
            before = await loop.run_in_executor(pool, liveness_view, leader)
            procs = {node.id: psutil.Process(node.pid) for node in dc.servers}
            for attempt in range(1 + retries):
                for p in [*procs.values(), me]:
                    p.cpu_percent(None)
                spy = start_profile(profile_dir, leader.pid, window, n)
                progress(f"N={n}: measuring for {window:.0f} s (leader {leader.id})")
                current[0] = samples = Samples()
                await asyncio.sleep(window)
                current[0] = None
                cpu = {node_id: p.cpu_percent(None) for node_id, p in procs.items()}
                driver_cpu = me.cpu_percent(None)
                rss = procs[leader.id].memory_info().rss / 1e6
                after = await loop.run_in_executor(pool, liveness_view, leader)
                leader_after = await loop.run_in_executor(pool, find_leader, dc)
                if spy is not None:
                    await loop.run_in_executor(pool, spy.wait)
                row = summarize(n, samples, window, leader, leader_after, cpu, rss, driver_cpu, ids, before, after,
                                workers)
                row["windows"] = attempt + 1
                if row["pass"] or row["alive"] != n or row["flapped"] or attempt == retries:
                    break
                # a shared machine's load spikes a latency tail now and then: a missed bar counts when it repeats
                progress(f"N={n}: missed the bar (heartbeat p99 {row['heartbeat_p99_ms']:.0f} ms, leader CPU "
                         f"{row['leader_cpu']:.0f} %, load {row['load_1m']:.1f}); measuring it again")
            rows.append(row)
            progress(f"N={n}: heartbeat p99 {row['heartbeat_p99_ms']:.1f} ms, leader CPU {row['leader_cpu']:.0f} %"
                     f", alive {row['alive']}/{n}, flapped {row['flapped']}, errors {row['errors']}"
                     f" -> {'pass' if row['pass'] else 'FAIL'}")
            if not row["pass"]:
                break
        if blip:
            returned.update(await measure_return(dc, workers, blip, connected, current, pool))
    finally:
        finished.set()
        connected.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
        pool.shutdown(wait=False, cancel_futures=True)


async def measure_return(dc, workers: list[SimWorker], blip: float, connected: asyncio.Event, current: list,
                         pool) -> dict:
    """The whole fleet silent for `blip` seconds (a switch between it and the servers restarting), then back:
    how long until the leader sees every worker alive again, and what the return costs the leader."""
    loop = asyncio.get_running_loop()
    n, ids = len(workers), {w.node_id for w in workers}
    leader = await loop.run_in_executor(pool, find_leader, dc)
    progress(f"return: {n} workers silent for {blip:g} s")
    connected.clear()
    await asyncio.sleep(blip)
    view = await loop.run_in_executor(pool, liveness_view, leader)
    silent = sum(1 for i in ids if view.get(i, ("",))[0] != "alive")
    proc = psutil.Process(leader.pid)
    proc.cpu_percent(None)
    current[0] = samples = Samples()
    started = time.monotonic()
    connected.set()
    back = None
    while time.monotonic() - started < ALIVE_WITHIN:
        view = await loop.run_in_executor(pool, liveness_view, leader)
        if all(view.get(i, ("",))[0] == "alive" for i in ids):
            back = time.monotonic() - started
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - started)))  # at least 5 s of heartbeats measured
    current[0] = None
    hb = measure.percentiles(samples.heartbeat)
    result = {"n": n, "blip_s": blip, "not_alive_after_blip": silent, "all_alive_after_s": back,
              "leader_cpu": proc.cpu_percent(None), "heartbeat_p99_ms": hb["p99"] * 1000,
              "errors": sum(samples.errors.values())}
    progress(f"return: {silent} not alive after the blip; all alive again after "
             f"{'never' if back is None else f'{back:.1f} s'}")
    return result


def summarize(n, samples: Samples, window, leader, leader_after, cpu, rss, driver_cpu, ids, before, after,
              workers) -> dict:
    hb, pull = measure.percentiles(samples.heartbeat), measure.percentiles(samples.pull)
    alive = sum(1 for i in ids if after.get(i, ("",))[0] == "alive")
    flapped = sorted(i for i in ids if before.get(i) != after.get(i))
    followers = [v for k, v in cpu.items() if k != leader.id]
    first = {}
    for w in workers:
        first[w.servers[0]] = first.get(w.servers[0], 0) + 1
    row = {
        "n": n, "window_s": window,
        "heartbeat_p50_ms": hb["p50"] * 1000, "heartbeat_p99_ms": hb["p99"] * 1000, "heartbeats": hb["n"],
        "pull_p50_ms": pull["p50"] * 1000, "pull_p99_ms": pull["p99"] * 1000, "pulls": pull["n"],
        "errors": sum(samples.errors.values()), "error_kinds": samples.errors,
        "leader": leader.id, "leader_changed": leader_after.id != leader.id,
        "leader_cpu": cpu[leader.id], "leader_rss_mb": rss, "follower_cpu_max": max(followers, default=0.0),
        "driver_cpu": driver_cpu, "alive": alive, "flapped": len(flapped), "flapped_ids": flapped[:20],
        "workers_per_first_server": first, "load_1m": os.getloadavg()[0],
    }
    row["pass"] = bool(hb["n"] and row["heartbeat_p99_ms"] < HEARTBEAT_P99_BAR_MS and row["leader_cpu"] < LEADER_CPU_BAR
                       and alive == n and not flapped and not row["leader_changed"])
    return row


COLUMNS = [("N", "n", "{:d}"), ("hb p50 ms", "heartbeat_p50_ms", "{:.1f}"), ("hb p99 ms", "heartbeat_p99_ms", "{:.1f}"),
           ("pull p50 ms", "pull_p50_ms", "{:.1f}"), ("pull p99 ms", "pull_p99_ms", "{:.1f}"),
           ("errors", "errors", "{:d}"), ("leader CPU %", "leader_cpu", "{:.0f}"),
           ("leader RSS MB", "leader_rss_mb", "{:.0f}"), ("other server CPU % max", "follower_cpu_max", "{:.0f}"),
           ("driver CPU %", "driver_cpu", "{:.0f}"), ("alive", "alive", "{:d}"), ("flapped", "flapped", "{:d}"),
           ("load 1m", "load_1m", "{:.1f}"), ("windows", "windows", "{:d}")]


def print_table(rows: list[dict]) -> str:
    headers = [h for h, _, _ in COLUMNS] + ["bar met?"]
    body = [[fmt.format(r[key]) for _, key, fmt in COLUMNS] + ["yes" if r["pass"] else "NO"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def largest_passing(rows: list[dict]) -> int:
    best = 0
    for r in rows:
        if not r["pass"]:
            break
        best = r["n"]
    return best


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes whole numbers separated by commas, e.g. 50,100,250; "
                                         f"got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes) or sizes != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"--sizes must be increasing positive numbers, e.g. 50,100,250; got {text!r}")
    return sizes


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=parse_sizes, default=list(SIZES),
                    help="the curve: simulated workers per step, increasing (default 50,100,250,500,1000,2000)")
    ap.add_argument("--window", type=float, default=None, help="seconds measured per step (default 20; --quick: 5)")
    ap.add_argument("--quick", action="store_true",
                    help="5 s windows and no second measurement of a step that missed its bar: the largest N in "
                         "a few minutes, noisier (a load spike may end the curve early)")
    ap.add_argument("--pull-every", type=float, default=WORKER_HEARTBEAT,
                    help=f"seconds between a worker's assignment pulls (default {WORKER_HEARTBEAT:g}, the heartbeat "
                         "interval; an idle agent's runner polls every 0.5)")
    ap.add_argument("--blip", type=float, default=0.0, metavar="S",
                    help="after the curve, silence every worker for S seconds (past liveness.suspect_after) and "
                         "time their return to alive")
    ap.add_argument("--retries", type=int, default=1, metavar="K",
                    help="measure a step that missed the latency or CPU bar up to K more times before the curve "
                         "ends there (default 1: a load spike of a shared machine ends no curve alone)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    ap.add_argument("--base-port", type=int, default=27800, help="first port tried for the 3 servers")
    ap.add_argument("--profile", metavar="DIR", type=Path, help="py-spy the leader during each window into DIR")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) after the run")
    args = ap.parse_args(argv)
    if args.window is None:
        args.window = 5.0 if args.quick else 20.0
    if args.quick:
        args.retries = 0
    if args.window < 1 or args.pull_every <= 0 or args.blip < 0 or args.retries < 0:
        ap.error("--window must be at least 1 second, --pull-every above 0, --blip and --retries not negative")
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="cortex-bench-fleet-"))
    rows: list[dict] = []
    returned: dict = {}
    failed = False
    started = time.monotonic()
    try:
        base = args.base_port
        while not all(devcluster.port_free(p) for p in range(base, base + 9)):
            base += 10
        progress(f"starting 3 servers on 127.0.0.1:{base}-{base + 8} in {workdir}")
        dc = devcluster.up(workdir / "cluster", servers=3, workers=0, base_port=base, timeout=90,
                           progress=lambda s: progress(f"cluster: {s}"))
        asyncio.run(run_curve(dc, args.sizes, args.window, args.pull_every, args.profile, args.blip,
                              args.retries, rows, returned))
    except Exception as exc:  # noqa: BLE001 -- reported; the rows measured so far are still printed
        failed = True
        progress(f"FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
    finally:
        progress("taking the cluster down")
        with contextlib.suppress(Exception):
            devcluster.down(workdir / "cluster")
        if args.keep or failed:
            progress(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    best = largest_passing(rows)
    print(f"Fleet, 3 servers + N simulated workers (heartbeat every {WORKER_HEARTBEAT:g} s, pull every "
          f"{args.pull_every:g} s, {args.window:g} s windows)", flush=True)
    print_table(rows)
    load = os.getloadavg()
    print(f"largest N with heartbeat p99 < {HEARTBEAT_P99_BAR_MS:g} ms, leader CPU < {LEADER_CPU_BAR:g} % of one "
          f"core and a correct liveness view: {best or 'none'}", flush=True)
    if returned:
        back = returned["all_alive_after_s"]
        print(f"return after {returned['blip_s']:g} s of silence, {returned['n']} workers: "
              f"{returned['not_alive_after_blip']} not alive, all alive again after "
              f"{'NEVER' if back is None else f'{back:.1f} s'}; leader CPU {returned['leader_cpu']:.0f} %, heartbeat "
              f"p99 {returned['heartbeat_p99_ms']:.0f} ms, {returned['errors']} failed calls", flush=True)
    print(f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs; "
          f"{time.monotonic() - started:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "largest_passing": best, "return": returned or None,
                                               "sizes": args.sizes, "window_s": args.window, "pull_every_s": args.pull_every,
                                               "load_average": list(load), "cpus": os.cpu_count(),
                                               "failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
