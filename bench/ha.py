"""HA takeover and giveback of a service on real agents: how long it is unreachable, and whether it ever ran twice.

    python -m bench.ha [--quick] [--trials N] [--json PATH] [--base-port N] [--loopback]

A cluster of 3 servers and 2 workers runs a shell service answering HTTP from its volume (replicated to the
partner every 2 s), home w1, partner w2; its page says which node and pid serve it. As root, each agent runs
in its own network namespace (tests/support/agentlab.py) and the service has a floating address (VIP): a
client in a namespace of its own asks http://VIP/ every 50 ms, so a figure ends when the service answers on
its VIP again, and a partition is w1's link cut while its agent keeps running. Without root (or with
--loopback) it is a dev cluster on 127.0.0.1, asked on the port, and there is no partition. An observer
reads /proc every 50 ms for the service's processes (tests/support/procwatch.py). Each trial measures, by
the client's clock:

* takeover_planned_downtime_s: the longest gap without an answer during `cortex ha takeover w1`;
* giveback_downtime_s: the same during `cortex ha giveback w1`;
* volume_lag_s: the age of the partner's copy of the volume (`cortex ha status`) just before the kill, the
  data an unplanned takeover loses (at most replicate_interval plus the time of a pull and a report);
* takeover_unplanned_kill_s: kill -9 of w1's agent until w2 answers (detection by lease expiry included);
* takeover_unplanned_partition_s: w1's link cut until w2 answers (namespaces only);
* graceful_stop_downtime_s: the longest gap without an answer when w1's agent gets SIGTERM (it hands the
  service over to w2 before it exits);
* takeover_frozen_s: SIGSTOP of w1's agent until w2 answers; fence_margin_s: by the observer, from the
  watchdog's kill of w1's service processes to the first process on w2 (must be > 0).

takeover_unplanned_s is the median over both unplanned kinds. Planned moves and givebacks include the final
volume pull (incremental: the partner's periodic copy has most of it). After each unplanned takeover w1 comes
back (its agent started again, its link healed) and the service is given back for the next trial.

double_runs counts observer samples in which two nodes ran the service at once (must be 0). The summary
gives the median of each figure and its range (targets: unplanned <= 15 s, planned and giveback <= 2 s).
Exit status 1 when a trial could not complete or a double run was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cortex.dev import cluster as devcluster
from cortex.services import api
from tests.support.agentlab import AgentLab, Prober
from tests.support.procwatch import Observer

NAME = "bench-web"
PORT = 8080  # in the namespaces; on loopback a free port near --base-port
KINDS = ("planned", "giveback", "kill", "partition", "graceful", "frozen")


def free_base_port(start: int, width: int = 20) -> int:
    for base in range(start, start + 1000, width):
        if all(devcluster.port_free(p) for p in range(base, base + width)):
            return base
    raise SystemExit(f"no {width} free ports on loopback from {start}; pass --base-port")


def service_spec(port: int, bind: str, vip: str = "") -> dict:
    return {"name": NAME, "kind": "shell", "ports": [port], "auto_giveback": False, "volume": True,
            "replicate_interval": 2, "health": {"http": port, "interval": 0.2, "threshold": 2},
            "command": f"echo $CORTEX_NODE $$ > index.html; exec python3 -m http.server {port} --bind {bind}",
            "placement": {"home": "w1", "partner": "w2"}, "restart": {"backoff": 0.2, "backoff_max": 2},
            **({"vip": vip} if vip else {})}


class Loopback:
    """A dev cluster on 127.0.0.1: the service asked on its port; no partition (that needs namespaces)."""

    kinds = ("planned", "giveback", "kill", "graceful", "frozen")
    where = "dev cluster on 127.0.0.1 (asked on the port; no partition)"

    def __init__(self, directory: Path, base_port: int):
        from cortex.client import Client

        base = free_base_port(base_port)
        self.cluster = devcluster.up(directory, 3, 2, base, timeout=90)
        self.port = base + 19
        self.client = Client(self.cluster.node("n1").grpc_address, timeout=15).__enter__()
        self.url, self.netns = f"http://127.0.0.1:{self.port}/", ""
        self.spec = service_spec(self.port, "127.0.0.1")

    def deploy(self) -> None:
        api.deploy(self.client, self.spec, key=f"bench-{self.port}")

    def takeover(self, node: str) -> dict:
        return api.takeover(self.client, node, wait=60)

    def giveback(self, node: str) -> dict:
        return api.giveback(self.client, node, wait=60)

    def ha_status(self) -> dict:
        return api.ha_status(self.client)

    def service(self) -> dict:
        return self.client.read("service.get", {"name": NAME})

    def kill(self, node: str) -> None:
        devcluster.stop_node(self.cluster.node(node), sig=9, wait=10)

    def restart(self, node: str) -> None:
        devcluster.start_node(self.cluster.node(node))
        self.cluster.save()  # the restarted agent's pid, so that the final `down` stops it

    def stop(self, node: str) -> None:
        devcluster.stop_node(self.cluster.node(node))  # SIGTERM: the agent hands its services over, then exits

    def pid(self, node: str) -> int:
        return self.cluster.node(node).pid

    def remove(self) -> None:
        api.remove(self.client, NAME)

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        devcluster.down(Path(self.cluster.dir))


class Namespaces:
    """Every agent in its own network namespace, the service on a VIP, the client in a namespace of its own
    (root). The CLI runs in n1's namespace (a server that is never killed or cut off)."""

    kinds = KINDS
    where = "agents in network namespaces (asked on the VIP)"

    def __init__(self, directory: Path):
        tag = f"cxb{os.getpid() % 10000}"
        self.lab = AgentLab(directory, tag, subnet=os.getpid() % 250,
                            nodes=[("n1", "server"), ("n2", "server"), ("n3", "server"), ("w1", "worker"),
                                   ("w2", "worker")])
        self.lab.up()
        self.lab.form(timeout=120)
        vip = self.lab.address(100)
        self.url, self.netns = f"http://{vip}:{PORT}/", self.lab.client_ns
        self.spec = service_spec(PORT, "0.0.0.0", f"{vip}/24")
        self.spec_file = directory / "service.json"  # JSON is YAML
        self.spec_file.write_text(json.dumps(self.spec))

    def _cli(self, *args: str) -> dict:
        return self.lab.cortex_json(1, *args)

    def deploy(self) -> None:
        done = self.lab.cortex(1, "services", "deploy", str(self.spec_file), "--idempotency-key", "bench")
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or done.stdout.strip())

    def takeover(self, node: str) -> dict:
        return self._cli("ha", "takeover", node)

    def giveback(self, node: str) -> dict:
        return self._cli("ha", "giveback", node)

    def ha_status(self) -> dict:
        return self._cli("ha", "status")

    def service(self) -> dict:
        return self._cli("services", "show", NAME)

    def kill(self, node: str) -> None:
        self.lab.kill_agent(self.lab.index(node))

    def restart(self, node: str) -> None:
        self.lab.start_agent(self.lab.index(node))

    def stop(self, node: str) -> None:
        proc = self.lab.agents.pop(self.lab.index(node))
        proc.send_signal(signal.SIGTERM)  # the agent hands its services over, then exits
        proc.wait(30)

    def pid(self, node: str) -> int:
        return self.lab.agents[self.lab.index(node)].pid

    def isolate(self, node: str) -> None:
        self.lab.isolate(self.lab.index(node))

    def heal(self, node: str) -> None:
        self.lab.heal(self.lab.index(node))

    def remove(self) -> None:
        self.lab.cortex(1, "services", "remove", NAME)

    def close(self) -> None:
        self.lab.close()


def retry_move(target, move, node: str, holder: str, timeout: float) -> None:
    """A takeover or giveback of `node`, asked again until `holder` holds the service: right after a start
    or a heal the node may not be ready (alive, its lease renewed) yet, and the refusal says so; right after
    an election the new leader may not know every server's level yet, and the error says so. An answer lost
    after the move was made is seen in the service's holder."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = move(node)
            if result.get("moved"):
                return
            last = result.get("refused")
        except Exception as exc:
            last = exc
        try:
            if target.service()["holder"] == holder:
                return
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node}: not moved to {holder}: {last}")
        time.sleep(1)


def wait_lag(target, timeout: float) -> float:
    """The volume lag `cortex ha status` shows for the service, once the partner has a copy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = next(s for s in target.ha_status()["services"] if s["name"] == NAME)
        if doc["lag_s"] is not None:
            return doc["lag_s"]
        time.sleep(0.5)
    raise RuntimeError(f"the partner had no copy of the volume after {timeout:g}s")


def back_home(target, prober: Prober) -> None:
    """The service given back to w1 (asked again until w1 is ready to take it) and answering there."""
    retry_move(target, target.giveback, "w1", "w1", 120)
    prober.mark()
    prober.wait_for("w1", 60)


def run_trials(target, trials: int, progress, observer: Observer) -> list[dict]:
    deadline = time.monotonic() + 60
    while True:  # right after start the leader may not know every server's state-machine level yet
        try:
            target.deploy()
            break
        except Exception as exc:
            if time.monotonic() > deadline or "level" not in str(exc):
                raise
            time.sleep(0.5)
    prober = Prober(target.url, target.netns)
    out = []
    try:
        prober.mark()
        prober.wait_for("w1", 60)
        for i in range(trials):
            trial: dict = {"trial": i + 1}
            since = prober.mark()
            retry_move(target, target.takeover, "w1", "w2", 60)
            prober.wait_for("w2", 60)
            trial["takeover_planned_downtime_s"] = round(prober.longest_gap(since), 3)
            since = prober.mark()
            retry_move(target, target.giveback, "w1", "w1", 60)
            prober.wait_for("w1", 60)
            trial["giveback_downtime_s"] = round(prober.longest_gap(since), 3)
            trial["volume_lag_s"] = wait_lag(target, 60)

            since = prober.mark()
            target.kill("w1")
            trial["takeover_unplanned_kill_s"] = round(prober.wait_for("w2", 120) - since, 3)
            target.restart("w1")
            back_home(target, prober)

            if "partition" in target.kinds:
                since = prober.mark()
                target.isolate("w1")
                try:
                    trial["takeover_unplanned_partition_s"] = round(prober.wait_for("w2", 120) - since, 3)
                finally:
                    target.heal("w1")
                back_home(target, prober)

            since = prober.mark()
            target.stop("w1")
            prober.wait_for("w2", 60)
            trial["graceful_stop_downtime_s"] = round(prober.longest_gap(since), 3)
            target.restart("w1")
            back_home(target, prober)

            since = prober.mark()
            agent = target.pid("w1")
            os.killpg(agent, signal.SIGSTOP)  # frozen: only the watchdog beside it can fence
            try:
                trial["takeover_frozen_s"] = round(prober.wait_for("w2", 120) - since, 3)
            finally:
                os.killpg(agent, signal.SIGCONT)
            samples = [(t, nodes) for t, nodes in list(observer.samples) if t >= since]
            gone = next(t for t, nodes in samples if "w1" not in nodes)
            trial["fence_margin_s"] = round(next(t for t, nodes in samples if "w2" in nodes) - gone, 3)
            back_home(target, prober)
            out.append(trial)
            progress(f"trial {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in trial.items() if k != "trial"))
    finally:
        prober.close()
    return out


def summarise(records: list[dict], doubles: int, trials: int, where: str, failed: str) -> dict:
    def values(*keys: str) -> list[float]:
        return [t[k] for t in records for k in keys if k in t]

    def p50(*keys: str):
        found = values(*keys)
        return round(statistics.median(found), 3) if found else None

    def spread(*keys: str):
        found = values(*keys)
        return [min(found), max(found)] if found else None

    figures = {"takeover_unplanned_s": ("takeover_unplanned_kill_s", "takeover_unplanned_partition_s"),
               "takeover_unplanned_kill_s": ("takeover_unplanned_kill_s",),
               "takeover_unplanned_partition_s": ("takeover_unplanned_partition_s",),
               "takeover_planned_downtime_s": ("takeover_planned_downtime_s",),
               "giveback_downtime_s": ("giveback_downtime_s",), "volume_lag_s": ("volume_lag_s",),
               "graceful_stop_downtime_s": ("graceful_stop_downtime_s",), "takeover_frozen_s": ("takeover_frozen_s",)}
    doc: dict = {key: p50(*keys) for key, keys in figures.items()}
    doc["ranges"] = {key: spread(*keys) for key, keys in figures.items()}
    doc.update({"double_runs": doubles, "trials": records, "trials_per_kind": len(records),
                "trials_asked": trials, "where": where,
                "load_average": [round(x, 2) for x in os.getloadavg()], "error": failed})
    return doc


TARGETS = {"takeover_unplanned_s": "<= 15", "takeover_unplanned_kill_s": "<= 15",
           "takeover_unplanned_partition_s": "<= 15", "takeover_planned_downtime_s": "<= 2",
           "giveback_downtime_s": "<= 2", "volume_lag_s": "<= 5", "graceful_stop_downtime_s": "<= 2",
           "takeover_frozen_s": "<= 15"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ha", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one trial of each kind (default 5)")
    parser.add_argument("--trials", type=int, default=None, help="trials of each kind (default 5; 1 with --quick)")
    parser.add_argument("--json", type=Path, help="also write the figures and trials here")
    parser.add_argument("--base-port", type=int, default=27300,
                        help="first of the loopback ports to try (default 27300; --loopback only)")
    parser.add_argument("--loopback", action="store_true",
                        help="a dev cluster on 127.0.0.1 even as root (no VIP, no partition)")
    args = parser.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        parser.error("--trials must be at least 1")
    trials = args.trials or (1 if args.quick else 5)
    os.environ.setdefault(devcluster.DIE_WITH_PARENT_ENV, "1")  # the agents die with this program, whatever happens
    directory = Path(tempfile.mkdtemp(prefix="cortex-bench-ha-"))
    loopback = args.loopback or os.geteuid() != 0
    failed = ""
    records: list[dict] = []
    where = Loopback.where if loopback else Namespaces.where

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with Observer(NAME, directory) as observer:  # this run's agents only: others may run bench.ha too
        target = None
        try:
            target = Loopback(directory, args.base_port) if loopback else Namespaces(directory)
            try:
                records = run_trials(target, trials, progress, observer)
            except Exception:
                print(json.dumps(target.service(), indent=1, default=str)[:3000], file=sys.stderr)
                raise
            target.remove()
        except Exception as exc:
            failed = f"{type(exc).__name__}: {exc}"
        finally:
            if target is not None:
                target.close()
            elif loopback:
                devcluster.down(directory)
    doubles = len(observer.double_runs())
    doc = summarise(records, doubles, trials, where, failed)
    doc["fence_margin_s"] = min((t["fence_margin_s"] for t in records if "fence_margin_s" in t), default=None)
    doc["double_run_samples"] = [[round(t - observer.samples[0][0], 2), sorted(nodes)]
                                 for t, nodes in observer.double_runs()[:50]]  # seconds since the start
    slow = [t["trial"] for t in records if max(t.get("takeover_unplanned_kill_s", 0),
                                               t.get("takeover_unplanned_partition_s", 0)) > 15
            or max(t["takeover_planned_downtime_s"], t["giveback_downtime_s"]) > 2]
    if not failed and not slow and not doubles:  # otherwise kept: the agents' logs say what happened
        shutil.rmtree(directory, ignore_errors=True)
    else:
        print(f"the agents' logs: {directory}", file=sys.stderr)
    print(f"bench.ha: {where}, {len(records)} trials of each kind, load average {doc['load_average'][0]}")
    print(f"{'FIGURE':36} {'P50':>8} {'RANGE':>14}  TARGET")
    for key, target_text in TARGETS.items():
        value, spread = doc[key], doc["ranges"][key]
        print(f"{key:36} {'-' if value is None else value:>8} "
              f"{'-' if spread is None else f'{spread[0]:.2f}-{spread[1]:.2f}':>14}  {target_text}")
    print(f"{'fence_margin_s (min)':36} {'-' if doc['fence_margin_s'] is None else doc['fence_margin_s']:>8} "
          f"{'':>14}  > 0")
    print(f"{'double_runs':36} {doubles:>8} {'':>14}  0")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 1 if failed or doubles or len(records) < trials else 0


if __name__ == "__main__":
    sys.exit(main())
