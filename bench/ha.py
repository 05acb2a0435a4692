"""HA takeover and giveback of a service on real agents: how long it is unreachable, and whether it ever ran twice.

    python -m bench.ha [--quick] [--trials N] [--json PATH] [--base-port N]

A dev cluster (3 servers, 2 workers) runs a shell service answering HTTP from its volume (replicated to the
partner every 2 s), home w1, partner w2.
A prober asks it every 50 ms which node answered; an observer reads /proc every 50 ms for the service's
processes (tests/support/procwatch.py). Each trial measures, by the prober's clock:

* takeover_unplanned_s: kill -9 of w1's agent until w2 answers (detection by lease expiry included);
* takeover_planned_downtime_s: the longest gap without an answer during `cortex ha takeover w1`;
* giveback_downtime_s: the same during `cortex ha giveback w1`;
* volume_lag_s: the age of the partner's copy of the volume (`cortex ha status`) just before the kill, the
  data an unplanned takeover loses (at most replicate_interval plus the time of a pull and a report);
* graceful_stop_downtime_s: the longest gap without an answer when w1's agent gets SIGTERM (it hands the
  service over to w2 before it exits);
* takeover_frozen_s: SIGSTOP of w1's agent until w2 answers; fence_margin_s: by the observer, from the
  watchdog's kill of w1's service processes to the first process on w2 (must be > 0).

Planned moves and givebacks include the final volume pull (incremental: the partner's periodic copy has
most of it).

double_runs counts observer samples in which two nodes ran the service at once (must be 0). The summary
gives the median of each figure (targets: unplanned <= 15 s, planned and giveback <= 2 s). Exit status 1
when a trial could not complete or a double run was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from cortex.dev import cluster as devcluster
from cortex.services import api
from tests.support.procwatch import Observer

NAME = f"bench-web-{os.getpid()}"  # one's own: another run's observer on the same machine does not count it


def free_base_port(start: int, width: int = 20) -> int:
    for base in range(start, start + 1000, width):
        if all(devcluster.port_free(p) for p in range(base, base + width)):
            return base
    raise SystemExit(f"no {width} free ports on loopback from {start}; pass --base-port")


class Prober:
    """Which node answers, every 50 ms: [(monotonic time, node or None)]."""

    def __init__(self, port: int):
        self.port, self.samples = port, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def ask(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=0.5) as r:
                return r.read().decode().strip()
        except OSError:
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic(), self.ask()))

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def wait_for(self, node: str, timeout: float) -> float:
        """When `node` first answered (monotonic), waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((t for t, n in list(self.samples) if n == node and t >= self._since), None)
            if hit is not None:
                return hit
            time.sleep(0.05)
        raise RuntimeError(f"{node} did not answer within {timeout:g}s")

    def mark(self) -> float:
        self._since = time.monotonic()
        return self._since

    def longest_gap(self, since: float) -> float:
        """The longest run without an answer after `since` (seconds)."""
        longest, gap_start = 0.0, None
        for t, node in self.samples:
            if t < since:
                continue
            if node is None and gap_start is None:
                gap_start = t
            elif node is not None and gap_start is not None:
                longest, gap_start = max(longest, t - gap_start), None
        return longest


def wait_lag(client, timeout: float) -> float:
    """The volume lag `cortex ha status` shows for the service, once the partner has a copy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = next(s for s in api.ha_status(client)["services"] if s["name"] == NAME)
        if doc["lag_s"] is not None:
            return doc["lag_s"]
        time.sleep(0.5)
    raise RuntimeError(f"the partner had no copy of the volume after {timeout:g}s")


def back_home(client, prober: Prober) -> None:
    """Give the service back to w1 once w1 is ready again (right after a restart it may not be yet)."""
    deadline = time.monotonic() + 120
    while True:
        result = api.giveback(client, "w1", wait=60)
        if result["moved"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    prober.mark()
    prober.wait_for("w1", 60)


def run_trials(cluster: devcluster.DevCluster, port: int, trials: int, client, observer: Observer) -> list[dict]:
    spec = {"name": NAME, "kind": "shell", "ports": [port], "auto_giveback": False, "volume": True,
            "replicate_interval": 2,
            "health": {"http": port, "interval": 0.2, "threshold": 2},
            "command": f"echo $CORTEX_NODE > index.html; exec python3 -m http.server {port} --bind 127.0.0.1",
            "placement": {"home": "w1", "partner": "w2"}, "restart": {"backoff": 0.2, "backoff_max": 2}}
    deadline = time.monotonic() + 60
    while True:  # right after start the leader may not know every server's state-machine level yet
        try:
            api.deploy(client, spec, key=f"bench-{port}")
            break
        except Exception as exc:
            if time.monotonic() > deadline or "level" not in str(exc):
                raise
            time.sleep(0.5)
    prober = Prober(port).start()
    out = []
    try:
        prober.mark()
        prober.wait_for("w1", 60)
        for i in range(trials):
            trial: dict = {"trial": i + 1}
            since = prober.mark()
            deadline = time.monotonic() + 60
            while True:  # right after a start w2 may not be ready (alive, reported) yet: the refusal says so
                result = api.takeover(client, "w1", wait=60)
                if result["moved"]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"takeover refused: {result['refused']}")
                time.sleep(1)
                since = prober.mark()
            prober.wait_for("w2", 60)
            trial["takeover_planned_downtime_s"] = round(prober.longest_gap(since), 3)
            since = prober.mark()
            result = api.giveback(client, "w1", wait=60)
            if result["refused"]:
                raise RuntimeError(f"giveback refused: {result['refused']}")
            prober.wait_for("w1", 60)
            trial["giveback_downtime_s"] = round(prober.longest_gap(since), 3)
            lag = wait_lag(client, 60)
            trial["volume_lag_s"] = lag
            since = prober.mark()
            devcluster.stop_node(cluster.node("w1"), sig=9, wait=10)
            trial["takeover_unplanned_s"] = round(prober.wait_for("w2", 120) - since, 3)
            devcluster.start_node(cluster.node("w1"))
            cluster.save()  # the restarted agent's pid, so that the final `down` stops it
            back_home(client, prober)
            since = prober.mark()
            devcluster.stop_node(cluster.node("w1"))  # SIGTERM: the agent hands the service over, then exits
            prober.wait_for("w2", 60)
            trial["graceful_stop_downtime_s"] = round(prober.longest_gap(since), 3)
            devcluster.start_node(cluster.node("w1"))
            cluster.save()
            back_home(client, prober)
            since = prober.mark()
            agent = cluster.node("w1").pid
            os.killpg(agent, signal.SIGSTOP)  # frozen: only the watchdog beside it can fence
            try:
                trial["takeover_frozen_s"] = round(prober.wait_for("w2", 120) - since, 3)
            finally:
                os.killpg(agent, signal.SIGCONT)
            samples = [(t, nodes) for t, nodes in list(observer.samples) if t >= since]
            gone = next(t for t, nodes in samples if "w1" not in nodes)
            trial["fence_margin_s"] = round(next(t for t, nodes in samples if "w2" in nodes) - gone, 3)
            back_home(client, prober)
            out.append(trial)
            print(f"trial {i + 1}: unplanned {trial['takeover_unplanned_s']:.2f}s, planned downtime "
                  f"{trial['takeover_planned_downtime_s']:.2f}s, giveback downtime {trial['giveback_downtime_s']:.2f}s, "
                  f"volume lag {trial['volume_lag_s']:.2f}s, graceful stop downtime "
                  f"{trial['graceful_stop_downtime_s']:.2f}s, frozen {trial['takeover_frozen_s']:.2f}s "
                  f"(fence margin {trial['fence_margin_s']:.2f}s)", flush=True)
    finally:
        prober.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ha", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one trial (default 5)")
    parser.add_argument("--trials", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures and trials here")
    parser.add_argument("--base-port", type=int, default=27300, help="first of the ports to try (default 27300)")
    args = parser.parse_args(argv)
    trials = args.trials or (1 if args.quick else 5)
    os.environ.setdefault(devcluster.DIE_WITH_PARENT_ENV, "1")  # the agents die with this program, whatever happens
    base = free_base_port(args.base_port)
    directory = Path(tempfile.mkdtemp(prefix="cortex-bench-ha-"))
    failed = ""
    records: list[dict] = []
    with Observer(NAME) as observer:
        try:
            cluster = devcluster.up(directory, 3, 2, base, timeout=90)
            from cortex.client import Client

            with Client(cluster.node("n1").grpc_address, timeout=15) as client:
                try:
                    records = run_trials(cluster, base + 19, trials, client, observer)
                except Exception:
                    print(json.dumps(client.read("service.get", {"name": NAME}), indent=1, default=str)[:3000],
                          file=sys.stderr)
                    raise
                api.remove(client, NAME)
        except Exception as exc:
            failed = f"{type(exc).__name__}: {exc}"
        finally:
            devcluster.down(directory)
    doubles = len(observer.double_runs())

    def p50(key: str):
        values = [t[key] for t in records]
        return round(statistics.median(values), 3) if values else None

    doc = {"takeover_unplanned_s": p50("takeover_unplanned_s"),
           "takeover_planned_downtime_s": p50("takeover_planned_downtime_s"),
           "giveback_downtime_s": p50("giveback_downtime_s"), "volume_lag_s": p50("volume_lag_s"),
           "graceful_stop_downtime_s": p50("graceful_stop_downtime_s"), "takeover_frozen_s": p50("takeover_frozen_s"),
           "fence_margin_s": min((t["fence_margin_s"] for t in records), default=None),
           "double_runs": doubles, "trials": records,
           "error": failed}
    rows = [("takeover_unplanned_s (p50)", doc["takeover_unplanned_s"], "<= 15"),
            ("takeover_planned_downtime_s (p50)", doc["takeover_planned_downtime_s"], "<= 2"),
            ("giveback_downtime_s (p50)", doc["giveback_downtime_s"], "<= 2"),
            ("volume_lag_s (p50)", doc["volume_lag_s"], "<= 5"),
            ("graceful_stop_downtime_s (p50)", doc["graceful_stop_downtime_s"], "<= 2"),
            ("takeover_frozen_s (p50)", doc["takeover_frozen_s"], "<= 15"),
            ("fence_margin_s (min)", doc["fence_margin_s"], "> 0"),
            ("double_runs", doubles, "0"), ("trials", len(records), str(trials))]
    print(f"{'FIGURE':36} {'VALUE':>8}  TARGET")
    for label, value, target in rows:
        print(f"{label:36} {'-' if value is None else value:>8}  {target}")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 1 if failed or doubles or len(records) < trials else 0


if __name__ == "__main__":
    sys.exit(main())
