"""Real agents, each in its own network namespace, on one bridge; a client namespace beside them (root only).

Topology: a bridge namespace and one namespace per node (and one for a client), joined by veth pairs on
10.231.<subnet>.0/24; node k is 10.231.<subnet>.k, the client .200. Cutting a node's link (`isolate`) is a
partition whose node keeps running. Every packet stays inside namespaces the lab creates: the CLI and any
client run in a namespace (nsenter), never in the root namespace, where 10.x would be routed off the machine.
Agents start through tests/support/procs.py, so they die with the process that started them. Used by
tests/system/test_partition.py and bench/ha.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tests.support import procs
from tests.support.netlab import NetLab, in_netns
from tests.support.wait import wait_until

CLIENT = 200  # the client namespace's host number


class AgentLab(NetLab):
    """`nodes`: (node id, role) in order; the first initialises the cluster, the others join it."""

    def __init__(self, root: Path, tag: str, subnet: int, nodes: list[tuple[str, str]], plugins: dict | None = None,
                 client: bool = True):
        super().__init__()
        self.root, self.tag, self.subnet = Path(root), tag, subnet
        self.ids = [node_id for node_id, _ in nodes]
        self.roles = dict(nodes)
        self.plugins = plugins or {}
        self.bridge_ns = f"{tag}-br"
        self.names = [f"{tag}-{node_id}" for node_id in self.ids]
        self.client_ns = f"{tag}-cl" if client else ""
        self.agents: dict[int, subprocess.Popen] = {}

    # --- the network ---------------------------------------------------------------------------------------
    def address(self, i: int) -> str:
        return f"10.231.{self.subnet}.{i}"

    def index(self, node_id: str) -> int:
        return self.ids.index(node_id) + 1

    def up(self) -> None:
        self.namespace(self.bridge_ns)
        self.bridge(self.bridge_ns)
        for i, ns in enumerate(self.names, start=1):
            self.namespace(ns)
            self.plug(ns, self.bridge_ns, f"{self.tag}p{i}", address=f"{self.address(i)}/24")
        if self.client_ns:
            self.namespace(self.client_ns)
            self.plug(self.client_ns, self.bridge_ns, f"{self.tag}pc", address=f"{self.address(CLIENT)}/24")

    def isolate(self, i: int) -> None:
        """Cut node i off (its end on the bridge goes down): a partition; its agent keeps running."""
        self.set_link(self.bridge_ns, f"{self.tag}p{i}", up=False)

    def heal(self, i: int) -> None:
        self.set_link(self.bridge_ns, f"{self.tag}p{i}", up=True)

    # --- the agents ----------------------------------------------------------------------------------------
    def node_dir(self, i: int) -> Path:
        return self.root / self.ids[i - 1]

    def start_agent(self, i: int) -> subprocess.Popen:
        """Start (or restart, with its data kept) node i's agent in its namespace."""
        node_dir = self.node_dir(i)
        config = node_dir / "config.yaml"
        if not config.exists():
            node_dir.mkdir(parents=True, exist_ok=True)
            boot = ("bootstrap:\n  init: true\n" if i == 1 else
                    f"bootstrap:\n  join:\n    address: {self.address(1)}:7400\n"
                    f"    token_file: {self.node_dir(1) / 'data' / 'join-token'}\n")
            raft = f"  raft: {self.address(i)}:7401\n" if self.roles[self.ids[i - 1]] == "server" else ""
            plugins = yaml.safe_dump({"plugins": self.plugins}) if self.plugins else ""
            config.write_text(f"node:\n  id: {self.ids[i - 1]}\n  role: {self.roles[self.ids[i - 1]]}\n"
                              f"data_dir: data\nlisten:\n  grpc: {self.address(i)}:7400\n{raft}{boot}{plugins}")
        with open(node_dir / "agent.log", "ab") as log:
            proc = procs.popen(in_netns(self.names[i - 1], [sys.executable, "-m", "cortex", "agent", "--config",
                                                            str(config)]),
                               stdout=log, stderr=subprocess.STDOUT, cwd=node_dir)
        self.agents[i] = proc
        return proc

    def kill_agent(self, i: int) -> None:
        """kill -9 of node i's agent (the service processes it runs die with it)."""
        proc = self.agents.pop(i)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def form(self, timeout: float = 60) -> None:
        """Start every agent and wait until the cluster has them all alive."""
        self.start_agent(1)

        def initialised() -> bool:
            assert self.agents[1].poll() is None, f"{self.ids[0]} did not init: {self.log_tail(1)}"
            return (self.node_dir(1) / "data" / "join-token").exists()

        wait_until(initialised, 30, f"{self.ids[0]} to init", interval=0.1)
        for i in range(2, len(self.ids) + 1):
            self.start_agent(i)
        wait_until(self.all_alive, timeout, "the cluster to form", interval=0.3)

    def all_alive(self) -> bool:
        s = self.status(1)
        return bool(s and len(s["nodes"]) == len(self.ids) and all(n["liveness"] == "alive" for n in s["nodes"]))

    def log_tail(self, i: int, lines: int = 20) -> str:
        path = self.node_dir(i) / "agent.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def close(self) -> None:
        for proc in self.agents.values():
            proc.kill()
            proc.wait(10)
        self.agents.clear()
        self.destroy()

    # --- the CLI -------------------------------------------------------------------------------------------
    def cortex(self, i: int, *args: str, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
        """Run the CLI inside node i's namespace against node i's own agent, with the node's own credentials
        (mTLS), as the CLI on that node finds them."""
        env = {**os.environ, "CORTEX_TLS_DIR": str(self.node_dir(i) / "data" / "tls")}
        return procs.run(in_netns(self.names[i - 1], [sys.executable, "-m", "cortex", "--addr",
                                                      f"{self.address(i)}:7400", "--timeout", "3", *args]),
                         capture_output=True, text=True, timeout=timeout, env=env, input=input)

    def status(self, i: int) -> dict | None:
        proc = self.cortex(i, "status", "--json")
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def cortex_json(self, i: int, *args: str, timeout: float = 90):
        """A CLI command's --json answer; a failure raises with what the CLI said."""
        proc = self.cortex(i, *args, "--json", timeout=timeout)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise RuntimeError(f"cortex {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}") \
                from None


# --- a client asking a floating address who serves -----------------------------------------------------------

PROBE = """
import json, sys, threading, time, urllib.request
url, period = sys.argv[1], float(sys.argv[2])
out = threading.Lock()

def ask(started):
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            answer = r.read().decode().split()
    except Exception:  # refused, timed out, or cut off mid-answer (http.client's own errors)
        answer = None
    with out:
        print(json.dumps([started, answer]), flush=True)

print("ready", flush=True)
while True:
    # one request every period, each in its own thread: one sent to the old holder, which waits for its
    # timeout, does not hide an answer the new holder gives meanwhile (the gaps are exact to one period)
    started = time.monotonic()
    threading.Thread(target=ask, args=(started,), daemon=True).start()
    time.sleep(max(0.0, period - (time.monotonic() - started)))
"""


class Prober:
    """A client asking `url` every `period` seconds, in network namespace `netns` (the lab's client) or this
    one; the page says which node answered and the pid that served it ("NODE PID"). samples: [(monotonic
    time, (node, pid) or None)] (CLOCK_MONOTONIC is the machine's, the same in every namespace)."""

    def __init__(self, url: str, netns: str = "", period: float = 0.05):
        self.samples: list[tuple[float, tuple[str, int] | None]] = []
        self._since = 0.0
        argv = [sys.executable, "-c", PROBE, url, str(period)]
        self.proc = procs.popen(in_netns(netns, argv) if netns else argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t, answer = json.loads(line)
            self.samples.append((t, (answer[0], int(answer[1])) if answer and len(answer) == 2 else None))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def mark(self) -> float:
        self._since = time.monotonic()
        return self._since

    def wait_for(self, node: str, timeout: float) -> float:
        """When `node` first answered since the last mark (monotonic), waiting up to `timeout` seconds."""
        def hit():
            return min((t for t, a in list(self.samples) if a and a[0] == node and t >= self._since), default=None)

        return wait_until(hit, timeout, f"{node} to answer", interval=0.05)

    def answers(self, since: float, until: float = float("inf")) -> list[tuple[float, tuple[str, int] | None]]:
        """By the time each request was sent (they end out of order)."""
        return sorted(((t, a) for t, a in list(self.samples) if since <= t <= until), key=lambda s: s[0])

    def longest_gap(self, since: float) -> float:
        """The longest run of requests without an answer after `since`, from the first unanswered one sent
        to the next answered one sent (seconds)."""
        longest, gap_start = 0.0, None
        for t, answer in self.answers(since):
            if answer is None and gap_start is None:
                gap_start = t
            elif answer is not None and gap_start is not None:
                longest, gap_start = max(longest, t - gap_start), None
        return longest


# --- where the floating address is --------------------------------------------------------------------------

WATCH = """
import ipaddress, json, sys, time
from pyroute2 import IPRoute
vip, period = ipaddress.ip_address(sys.argv[1]), float(sys.argv[2])
held = None
with IPRoute() as ipr:
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        has = any(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) == vip for a in ipr.get_addr())
        if has != held:
            held = has
            print(json.dumps([now, has]), flush=True)
        time.sleep(period)
"""


class VipWatch:
    """When each node's namespace gained and lost the floating address, polled every `period` seconds inside
    the namespace (netlink): changes[node] = [(monotonic time, held)]."""

    def __init__(self, lab: AgentLab, vip: str, period: float = 0.05):
        self.changes: dict[str, list[tuple[float, bool]]] = {node: [] for node in lab.ids}
        self.procs = []
        for node, ns in zip(lab.ids, lab.names, strict=True):
            proc = procs.popen(in_netns(ns, [sys.executable, "-c", WATCH, vip, str(period)]), stdout=subprocess.PIPE,
                               text=True)
            assert proc.stdout.readline().strip() == "ready"
            threading.Thread(target=self._read, args=(node, proc), daemon=True).start()
            self.procs.append(proc)

    def _read(self, node: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            t, held = json.loads(line)
            self.changes[node].append((t, held))

    def holders(self) -> list[str]:
        return [node for node, changes in self.changes.items() if changes and changes[-1][1]]

    def first(self, node: str, held: bool, since: float) -> float | None:
        """When `node` first gained (held=True) or lost the address after `since`."""
        return next((t for t, h in list(self.changes[node]) if h == held and t >= since), None)

    def overlaps(self, since: float = 0.0) -> list[tuple[float, list[str]]]:
        """Moments after `since` at which two namespaces held the address at once."""
        events = sorted((t, node, h) for node, changes in self.changes.items() for t, h in changes)
        state: dict[str, bool] = {}
        out = []
        for t, node, held in events:
            state[node] = held
            both = [n for n, h in state.items() if h]
            if len(both) > 1 and t >= since:
                out.append((t, both))
        return out

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
