"""A local cluster of real agent processes on loopback: `cortex dev up` / `cortex dev down`.

Each node gets its own data directory and config under the cluster folder; the first server runs
`bootstrap.init`, the others join with the token it writes. The tests drive clusters through this module
too, so what a person runs is what is tested.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from cortex.client import Client, CortexError, register_credentials
from cortex.security import tls

STATE_FILE = "devcluster.json"
# Set to 1 by a test run: its agents must not outlive it, even when it is SIGKILLed. A person's `cortex dev up`
# leaves it unset, so the cluster keeps running after the command returns.
DIE_WITH_PARENT_ENV = "CORTEX_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


@dataclass
class DevNode:
    id: str
    role: str
    grpc_address: str
    raft_address: str
    dir: str
    pid: int = 0

    @property
    def config_path(self) -> Path:
        return Path(self.dir) / "config.yaml"

    @property
    def log_path(self) -> Path:
        return Path(self.dir) / "agent.log"

    @property
    def admin_socket(self) -> Path:
        return Path(self.dir) / "data" / "admin.sock"


@dataclass
class DevCluster:
    dir: str
    nodes: list[DevNode]

    @property
    def servers(self) -> list[DevNode]:
        return [n for n in self.nodes if n.role == "server"]

    @property
    def workers(self) -> list[DevNode]:
        return [n for n in self.nodes if n.role == "worker"]

    def node(self, node_id: str) -> DevNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no node {node_id!r} in {self.dir}; nodes: {', '.join(n.id for n in self.nodes)}")

    def save(self) -> None:
        path = Path(self.dir) / STATE_FILE
        path.write_text(json.dumps({"dir": self.dir, "nodes": [asdict(n) for n in self.nodes]}, indent=2))


def load(directory: Path) -> DevCluster | None:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return DevCluster(dir=doc["dir"], nodes=[DevNode(**n) for n in doc["nodes"]])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agents do: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def node_config(node: DevNode, join_address: str = "", token_file: str = "", raft: dict | None = None,
                plugins: dict | None = None) -> str:
    lines = [
        f"node:\n  id: {node.id}\n  role: {node.role}",
        "data_dir: data",
        f"listen:\n  grpc: {node.grpc_address}" + (f"\n  raft: {node.raft_address}" if node.raft_address else ""),
        "log:\n  level: info\n  format: json",
    ]
    if raft:
        lines.append("raft:\n" + "\n".join(f"  {k}: {v}" for k, v in raft.items()))
    if plugins:  # {name: {option: value}}, the same on every node
        lines.append(yaml.safe_dump({"plugins": plugins}, sort_keys=True).rstrip())
    if join_address:
        lines.append(f"bootstrap:\n  join:\n    address: {join_address}\n    token_file: {token_file}")
    else:
        lines.append("bootstrap:\n  init: true")
    return "\n".join(lines) + "\n"


def plan(directory: Path, servers: int, workers: int, base_port: int) -> DevCluster:
    if servers not in (1, 3, 5):
        raise ValueError("a cluster has 1, 3 or 5 voting servers")
    if workers < 0 or workers > 50:
        raise ValueError("workers must be between 0 and 50")
    nodes, port = [], base_port
    for i in range(1, servers + 1):
        nodes.append(DevNode(f"n{i}", "server", f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}",
                             str(directory / f"n{i}")))
        port += 3  # gRPC, Raft, enrollment (gRPC + 2)
    for i in range(1, workers + 1):
        nodes.append(DevNode(f"w{i}", "worker", f"127.0.0.1:{port}", "", str(directory / f"w{i}")))
        port += 1
    return DevCluster(dir=str(directory), nodes=nodes)


def _arm_death_signal() -> Callable[[], None]:
    """The child's last step before exec: SIGKILL when the forking thread ends (PR_SET_PDEATHSIG). The kernel
    does not send it when that thread ended before the call, hence the parent check."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn_dying_with_parent(args: list[str], kwargs: dict) -> subprocess.Popen:
    """PR_SET_PDEATHSIG set by setpriv, which then execs `args` (same pid, the signal survives exec): the spawn
    stays a plain fork+exec. A preexec_fn runs Python in the child, and with it the fork handlers gRPC
    registers, which abort the child now and then in a process with live channels (as bench/etcd.py found);
    prctl through preexec_fn is only the fallback for a system without setpriv."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return subprocess.Popen([setpriv, "--pdeathsig", "KILL", "--", *args], **kwargs)
    return subprocess.Popen(args, preexec_fn=_arm_death_signal(), **kwargs)


def popen_dying_with_parent(args: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen whose child is SIGKILLed when this process dies, however it dies. The kernel ties the
    signal to the forking thread, not the process, so every such child is forked from one thread that lives
    until the interpreter exits: a child started from a short-lived worker thread would otherwise die with it."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="die-with-parent")
    return _spawner.submit(_spawn_dying_with_parent, list(args), kwargs).result()


def start_node(node: DevNode, env: dict | None = None) -> int:
    """Start (or restart) one agent process; returns its pid."""
    log = open(node.log_path, "ab")
    popen = popen_dying_with_parent if os.environ.get(DIE_WITH_PARENT_ENV) == "1" else subprocess.Popen
    proc = popen(
        [sys.executable, "-m", "cortex", "agent", "--config", str(node.config_path)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=node.dir,
        start_new_session=True, env={**os.environ, **(env or {})},
    )
    log.close()
    node.pid = proc.pid
    return proc.pid


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of someone else's still answers kill(0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def up(directory: Path, servers: int = 3, workers: int = 2, base_port: int = 7400, timeout: float = 60.0,
       progress: Callable[[str], None] = lambda s: None, raft: dict | None = None,
       plugins: dict | None = None, extra_config: Callable[[DevNode], str] | None = None,
       env: dict | None = None) -> DevCluster:
    """Start a cluster. `plugins` ({name: {option: value}}) goes into every node's YAML; `extra_config(node)` is
    appended to each node's YAML (per-node sections, say), and `env` is added to the agents' environment
    (PYTHONPATH with a test plugin, say)."""
    directory = Path(directory).resolve()
    existing = load(directory)
    if existing and any(alive(n.pid) for n in existing.nodes):
        raise RuntimeError(f"a dev cluster is already running in {directory}; run `cortex dev down` first")
    cluster = plan(directory, servers, workers, base_port)
    if existing and [(n.id, n.grpc_address) for n in existing.nodes] != [(n.id, n.grpc_address) for n in cluster.nodes]:
        raise RuntimeError(f"{directory} holds a cluster of another shape ({len(existing.servers)} servers, "
                           f"{len(existing.workers)} workers); `cortex dev down --purge` removes it")
    busy = [p for n in cluster.nodes for p in _ports(n) if not port_free(p)]
    if busy:
        raise RuntimeError(f"ports in use: {', '.join(map(str, busy))}; stop what uses them or pass --base-port")
    first = cluster.nodes[0]
    token_file = Path(first.dir) / "data" / "join-token"
    for node in cluster.nodes:
        Path(node.dir).mkdir(parents=True, exist_ok=True)
        if node is first:
            text = node_config(node, raft=raft, plugins=plugins)
        else:
            text = node_config(node, first.grpc_address, str(token_file), raft=raft, plugins=plugins)
        node.config_path.write_text(text + (extra_config(node) if extra_config else ""))
    cluster.save()
    progress(f"starting {first.id} (creates the cluster)")
    start_node(first, env)
    cluster.save()
    deadline = time.monotonic() + timeout
    while not token_file.exists():
        _check_started(first, deadline)
        time.sleep(0.05)
    trust(cluster)
    progress(f"starting {', '.join(n.id for n in cluster.nodes[1:]) or 'no other nodes'}")
    for node in cluster.nodes[1:]:
        start_node(node, env)
    cluster.save()
    wait_healthy(cluster, deadline, progress)
    return cluster


def tls_dir(cluster: DevCluster) -> Path:
    """The admin client credentials of the cluster (`export CORTEX_TLS_DIR=...`; the CLI also finds
    ./.cortex-dev/tls by itself)."""
    return Path(cluster.dir) / "tls"


def trust(cluster: DevCluster) -> tls.ClientFiles | None:
    """Copy the first server's admin certificate to <cluster>/tls and use it in this process for every node
    address of the cluster (what an operator does by hand: take the credentials from a server). This process
    and the dev-trust note read the server's own files, so they follow its renewals (a replaced certificate
    is revoked); the copy is for `export CORTEX_TLS_DIR` and is refreshed by running this again."""
    source = Path(cluster.nodes[0].dir) / "data" / tls.TLS_DIR
    files = tls.client_files(source, ("admin",))
    if files is None:
        return None
    target = tls_dir(cluster)
    tls.write_file(target / "ca.crt", files.ca, 0o644)
    tls.write_file(target / "admin.key", files.key)
    tls.write_file(target / "admin.crt", files.cert, 0o644)
    register_credentials([n.grpc_address for n in cluster.nodes], files, source)
    return files


def _ports(node: DevNode) -> list[int]:
    ports = [int(a.rsplit(":", 1)[1]) for a in (node.grpc_address, node.raft_address) if a]
    return ports + [ports[0] + 2] if node.role == "server" else ports


def _check_started(node: DevNode, deadline: float) -> None:
    if not alive(node.pid):
        raise RuntimeError(f"{node.id} exited during start; its log {node.log_path} ends:\n{tail(node.log_path)}")
    if time.monotonic() > deadline:
        raise RuntimeError(f"{node.id} did not start in time; its log {node.log_path} ends:\n{tail(node.log_path)}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(cluster: DevCluster, deadline: float, progress: Callable[[str], None] = lambda s: None) -> None:
    """Until every node is registered and alive in the leader's view, and all servers agree on a leader."""
    last = ""
    while True:
        for node in cluster.nodes:
            _check_started(node, deadline)
        message = health_problem(cluster)
        if not message:
            return
        if message != last:
            progress(message)
            last = message
        time.sleep(0.1)


def health_problem(cluster: DevCluster) -> str:
    """'' when healthy, otherwise what is still missing."""
    leader_ids = set()
    status = None
    for node in cluster.servers:
        try:
            with Client(node.grpc_address, timeout=2) as c:
                s = c.status()
        except CortexError as exc:
            return f"waiting for {node.id}: {exc.code.name}"
        if not s.leader_id:
            return f"waiting for {node.id} to see a leader"
        leader_ids.add(s.leader_id)
        if s.state == "leader":
            status = s
    if len(leader_ids) != 1 or status is None:
        return "waiting for the servers to agree on a leader"
    seen = {n.id: n for n in status.nodes}
    missing = [n.id for n in cluster.nodes if n.id not in seen]
    if missing:
        return f"waiting for {', '.join(missing)} to join"
    down = [n.id for n in cluster.nodes if seen[n.id].liveness != "alive"]
    if down:
        return f"waiting for {', '.join(down)} to report alive"
    for node in cluster.workers:  # a worker serves mTLS once it holds its certificate
        try:
            with Client(node.grpc_address, timeout=2) as c:
                if c.status().state != "worker":
                    return f"waiting for {node.id} to serve as a member"
        except CortexError as exc:
            return f"waiting for {node.id}: {exc.code.name}"
    return ""


def stop_node(node: DevNode, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    if not alive(node.pid):
        return
    try:
        os.killpg(node.pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while alive(node.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(node.pid):
        os.killpg(node.pid, signal.SIGKILL)
        while alive(node.pid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)


def down(directory: Path, purge: bool = False) -> list[str]:
    """Stop every node; with purge, also delete the cluster's folder (all its data)."""
    directory = Path(directory).resolve()
    cluster = load(directory)
    if cluster is None:
        return []
    register_credentials([n.grpc_address for n in cluster.nodes], None)
    stopped = []
    for node in cluster.nodes:
        if alive(node.pid):
            stop_node(node)
            stopped.append(node.id)
        node.pid = 0
    cluster.save()
    if purge:
        shutil.rmtree(directory)
    return stopped
