"""etcd side of the Cortex benchmark.

Starts a real, local etcd v3.4 cluster (Debian ``etcd-server``) and talks to it
over etcd's own gRPC API, through stubs compiled at import time from the
minimal wire-compatible subset in ``bench/etcd_kv.proto``.  The client exposes
the same small interface the benchmark patterns in ``bench/measure.py`` expect
from any client (Cortex or etcd)::

    client.put(key: str, value: bytes) -> None      # acknowledged == committed
    client.get(key: str, linearizable=True) -> bytes | None
    client.put_many_pipelined(items, concurrency) -> int

and the cluster exposes the surface ``measure.failover_time`` and the idle
measurements use::

    cluster.endpoints(), cluster.leader_endpoint(), cluster.follower_endpoint(),
    cluster.kill_leader(), cluster.rss_bytes(member), cluster.pids(), cluster.stop()

Everything listens on and connects to 127.0.0.1 only.  Every RPC carries a
deadline, every wait loop is bounded, and processes are always reaped
(context manager + atexit + PR_SET_PDEATHSIG on Linux).

etcd settings: the etcd defaults, spelled out explicitly so they are visible in
results -- ``--heartbeat-interval 100`` ms and ``--election-timeout 1000`` ms;
fsync stays on (etcd 3.4 has no switch to disable it).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from bench import measure

LOOPBACK = "127.0.0.1"
DEFAULT_ETCD_BIN = "/usr/bin/etcd"
DEFAULT_TIMEOUT = 5.0  # seconds, per RPC
HEARTBEAT_MS = 100  # etcd default
ELECTION_MS = 1000  # etcd default

_PROTO = Path(__file__).resolve().with_name("etcd_kv.proto")


# --------------------------------------------------------------------------- #
# Stub generation (at import time, into a private temp dir)
# --------------------------------------------------------------------------- #
def _compile_stubs():
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="cortex-bench-etcdpb-")
    atexit.register(shutil.rmtree, out, True)
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{_PROTO.parent}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(_PROTO),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed (rc={rc}) compiling {_PROTO}")
    # The generated *_pb2_grpc module does `import etcd_kv_pb2`, so the output
    # dir must be importable while loading; remove it from sys.path afterwards.
    sys.path.insert(0, out)
    try:
        pb2 = importlib.import_module("etcd_kv_pb2")
        pb2_grpc = importlib.import_module("etcd_kv_pb2_grpc")
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(out)
    return pb2, pb2_grpc


pb, pb_grpc = _compile_stubs()


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _check_loopback(endpoint: str) -> None:
    host, sep, port = endpoint.rpartition(":")
    if not sep or host != LOOPBACK or not port.isdigit():
        raise ValueError(f"endpoint must be '{LOOPBACK}:<port>', got {endpoint!r}")


def _free_loopback_ports(count: int) -> list[int]:
    """Ask the kernel for `count` distinct free TCP ports on 127.0.0.1."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig KILL`: members die with the benchmark. A preexec_fn would do the same, but
    it forces a plain fork() of a process running gRPC threads, whose fork handlers then abort the child
    now and then (seen here: rc=-6 before exec). setpriv keeps the spawn path fork-safe."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv and sys.platform.startswith("linux") else []


_CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # never route 127.0.0.1 via an env proxy
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


# --------------------------------------------------------------------------- #
# Client
# --------------------------------------------------------------------------- #
class EtcdClient:
    """Tiny etcd v3 client over gRPC, bound to a single member endpoint.

    `put` is acknowledged only after the write is committed by a Raft majority
    (etcd's normal Put semantics); a follower endpoint forwards to the leader.
    """

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT):
        _check_loopback(endpoint)
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self._channel = grpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        self._kv = pb_grpc.KVStub(self._channel)
        self._maint = pb_grpc.MaintenanceStub(self._channel)

    # -- basic ops -------------------------------------------------------- #
    def put(self, key: str, value: bytes, timeout: float | None = None) -> int:
        """Put key=value; returns the store revision of the write."""
        req = pb.PutRequest(key=key.encode(), value=bytes(value))
        resp = self._kv.Put(req, timeout=self.timeout if timeout is None else timeout)
        return resp.header.revision

    def get(self, key: str, linearizable: bool = True, timeout: float | None = None) -> bytes | None:
        """Read one key. linearizable=False issues a serializable (member-local,
        possibly stale) read."""
        req = pb.RangeRequest(key=key.encode(), serializable=not linearizable)
        resp = self._kv.Range(req, timeout=self.timeout if timeout is None else timeout)
        return resp.kvs[0].value if resp.kvs else None

    def status(self, timeout: float | None = None):
        """Maintenance.Status of the member this client is connected to."""
        return self._maint.Status(pb.StatusRequest(), timeout=self.timeout if timeout is None else timeout)

    # -- pipelining ------------------------------------------------------- #
    def put_many_pipelined(self, items, concurrency: int = 64, timeout: float | None = None) -> int:
        """Puts for (key, value) pairs, at most `concurrency` in flight (grpc futures over one HTTP/2
        channel). Returns the number acknowledged; raises the first RPC error (after draining)."""
        per_call = self.timeout if timeout is None else timeout
        return measure.windowed(
            items, lambda kv: self._kv.Put.future(pb.PutRequest(key=kv[0].encode(), value=bytes(kv[1])),
                                                  timeout=per_call),
            concurrency, slot_wait=per_call + 5.0)  # a slot frees at the latest when a deadline fires

    # -- lifecycle -------------------------------------------------------- #
    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"EtcdClient({self.endpoint!r})"


# --------------------------------------------------------------------------- #
# Cluster
# --------------------------------------------------------------------------- #
class EtcdCluster:
    """A local N-member etcd cluster on 127.0.0.1 (static bootstrap).

    Member i listens for clients on ``client_ports[i]`` and for peers on
    ``peer_ports[i]``; with ``base_port`` given those are ``base_port + 2*i``
    and ``base_port + 2*i + 1``, otherwise free ports are picked by the kernel.
    Data dirs (fresh each start) and logs live in ``workdir``.
    """

    def __init__(
        self,
        workdir,
        members: int = 3,
        base_port: int | None = None,
        etcd_bin: str = DEFAULT_ETCD_BIN,
        heartbeat_ms: int = HEARTBEAT_MS,
        election_ms: int = ELECTION_MS,
        startup_timeout: float = 30.0,
        log_level: str = "info",
    ):
        if members < 1:
            raise ValueError("members must be >= 1")
        self.workdir = Path(workdir).resolve()
        self.n = members
        self.etcd_bin = etcd_bin
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.names = [f"etcd{i}" for i in range(members)]
        if base_port is None:
            ports = _free_loopback_ports(2 * members)
        else:
            ports = [base_port + k for k in range(2 * members)]
        self.client_ports = ports[0::2]
        self.peer_ports = ports[1::2]
        self._procs: list[subprocess.Popen | None] = [None] * members
        self._logs: list = [None] * members
        self._clients: dict[int, EtcdClient] = {}
        self._member_ids: dict[int, int] = {}  # etcd member_id -> index
        self._atexit_registered = False

    # -- lifecycle -------------------------------------------------------- #
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> EtcdCluster:
        if not os.path.exists(self.etcd_bin):
            raise FileNotFoundError(f"etcd binary not found at {self.etcd_bin}")
        for p in self.client_ports + self.peer_ports:
            if not _port_is_free(p):
                raise RuntimeError(f"port {LOOPBACK}:{p} is already in use")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True

        token = f"cortex-bench-{uuid.uuid4().hex[:12]}"
        initial = ",".join(
            f"{name}=http://{LOOPBACK}:{pp}" for name, pp in zip(self.names, self.peer_ports, strict=True)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        try:
            for i, name in enumerate(self.names):
                data_dir = self.workdir / f"{name}.etcd"
                if data_dir.exists():
                    shutil.rmtree(data_dir)
                cu = f"http://{LOOPBACK}:{self.client_ports[i]}"
                pu = f"http://{LOOPBACK}:{self.peer_ports[i]}"
                cmd = [
                    self.etcd_bin,
                    "--name", name,
                    "--data-dir", str(data_dir),
                    "--listen-client-urls", cu,
                    "--advertise-client-urls", cu,
                    "--listen-peer-urls", pu,
                    "--initial-advertise-peer-urls", pu,
                    "--initial-cluster", initial,
                    "--initial-cluster-token", token,
                    "--initial-cluster-state", "new",
                    "--heartbeat-interval", str(self.heartbeat_ms),
                    "--election-timeout", str(self.election_ms),
                    "--logger", "zap",
                    "--log-outputs", "stderr",
                    "--log-level", self.log_level,
                ]  # fmt: skip
                log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop)
                self._logs[i] = log
                self._procs[i] = subprocess.Popen(
                    _pdeathsig_prefix() + cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.workdir,
                )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_alive(self) -> None:
        for i, p in enumerate(self._procs):
            if p is not None and p.poll() is not None:
                raise RuntimeError(
                    f"etcd member {self.names[i]} exited with rc={p.returncode}; log tail:\n{self.log_tail(i)}"
                )

    def _wait_ready(self) -> None:
        """Bounded: until a Put is acknowledged and every member reports the
        same leader (so follower endpoints are usable right away)."""
        deadline = time.monotonic() + self.startup_timeout
        last_err: BaseException | None = None
        put_ok = False
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if not put_ok:
                    for i in range(self.n):
                        try:
                            self._client(i).put("__bench_ready__", b"1", timeout=1.0)
                            put_ok = True
                            break
                        except grpc.RpcError as e:
                            last_err = e
                if put_ok:
                    leaders = set()
                    for i in range(self.n):
                        st = self._client(i).status(timeout=1.0)
                        self._member_ids[st.header.member_id] = i
                        leaders.add(st.leader)
                    if len(leaders) == 1 and 0 not in leaders and len(self._member_ids) == self.n:
                        return
            except grpc.RpcError as e:
                last_err = e
            time.sleep(0.1)
        raise TimeoutError(
            f"etcd cluster not ready within {self.startup_timeout:.0f}s (last error: {last_err!r}); "
            f"member 0 log tail:\n{self.log_tail(0)}"
        )

    def stop(self) -> None:
        """Terminate all members (SIGTERM, then SIGKILL after 5 s) and reap them."""
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        for p in self._procs:
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5.0)
        for i, log in enumerate(self._logs):
            if log is not None:
                with contextlib.suppress(Exception):
                    log.close()
                self._logs[i] = None

    # -- introspection ---------------------------------------------------- #
    def _client(self, i: int) -> EtcdClient:
        c = self._clients.get(i)
        if c is None:
            c = self._clients[i] = EtcdClient(self.endpoint(i))
        return c

    def endpoint(self, i: int) -> str:
        return f"{LOOPBACK}:{self.client_ports[i]}"

    def endpoints(self, alive_only: bool = False) -> list[str]:
        return [self.endpoint(i) for i in range(self.n) if not alive_only or self.is_alive(i)]

    def is_alive(self, i: int) -> bool:
        p = self._procs[i]
        return p is not None and p.poll() is None

    def alive_members(self) -> list[int]:
        return [i for i in range(self.n) if self.is_alive(i)]

    def pids(self, alive_only: bool = True) -> list[int]:
        return [
            p.pid for i, p in enumerate(self._procs) if p is not None and (not alive_only or self.is_alive(i))
        ]

    def pid(self, member: int) -> int:
        return self._procs[member].pid

    def leader_index(self, timeout: float = 10.0) -> int:
        """Index of the member that currently reports itself as leader (bounded poll)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in self.alive_members():
                try:
                    st = self._client(i).status(timeout=1.0)
                except grpc.RpcError:
                    continue
                self._member_ids[st.header.member_id] = i
                if st.leader and st.leader == st.header.member_id:
                    return i
            time.sleep(0.05)
        raise TimeoutError(f"no etcd leader found within {timeout:.1f}s")

    def leader_endpoint(self) -> str:
        return self.endpoint(self.leader_index())

    def follower_index(self) -> int:
        leader = self.leader_index()
        for i in self.alive_members():
            if i != leader:
                return i
        raise RuntimeError("no live follower")

    def follower_endpoint(self) -> str:
        return self.endpoint(self.follower_index())

    def kill(self, member: int) -> None:
        """SIGKILL one member and reap it."""
        p = self._procs[member]
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=5.0)
        c = self._clients.pop(member, None)
        if c is not None:
            c.close()

    def kill_leader(self) -> int:
        """SIGKILL the current leader; returns its member index."""
        i = self.leader_index()
        self.kill(i)
        return i

    def rss_bytes(self, member: int) -> int:
        import psutil

        return psutil.Process(self._procs[member].pid).memory_info().rss

    def log_tail(self, member: int, n_bytes: int = 3000) -> str:
        path = self.workdir / f"{self.names[member]}.log"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n_bytes))
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"<no log: {e}>"

    def client(self, member: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> EtcdClient:
        """A new client (caller closes it) to `member`, or to the leader if None."""
        ep = self.leader_endpoint() if member is None else self.endpoint(member)
        return EtcdClient(ep, timeout=timeout)
