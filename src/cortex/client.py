"""gRPC client for a Cortex node: deadlines on every call, idempotency keys on every write, bounded retries."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from cortex._proto.cortex.v1 import cortex_pb2 as pb
from cortex._proto.cortex.v1 import cortex_pb2_grpc as pb_grpc
from cortex.core.args import READ_LEVELS
from cortex.security import tls
from cortex.userdirs import user_home

LEVELS = {level: pb.ReadLevel.Value(level.upper()) for level in READ_LEVELS}  # proto names, upper case
DEFAULT_TIMEOUT = 10.0
# Errors after which a retry with the same idempotency key is safe and may succeed.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


CONNECT_TIMEOUT_MS = 1000


def channel_options(max_message_bytes: int = 4 * 1024 * 1024,
                    connect_timeout_ms: int = CONNECT_TIMEOUT_MS) -> list[tuple[str, Any]]:
    """Options of every channel. `connect_timeout_ms`: how long one connection attempt may take; the
    agent's own channels keep it short so a dead peer is given up quickly, a client that talks to one node
    gives it as long as its call may take."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Reconnect quickly after a peer restarts: the default backoff grows to 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # Despite its name, gRPC takes this as the time a connection attempt (TCP, mutual TLS, HTTP/2
        # settings) may take. At 100 ms, handshakes with a slow or loaded peer failed as 'Handshake read
        # failed' until the backoff had grown (first heartbeats after a wake, joins, in the VM tests). A
        # peer that does not answer at all still fails a call within this, sooner than its deadline. The
        # backoff never makes an attempt longer than max_reconnect_backoff_ms either, so a handshake slower
        # than both never completes, however often it is retried (an emulated appliance booting beside
        # others: `cortex status` on the node itself failed for minutes).
        ("grpc.min_reconnect_backoff_ms", connect_timeout_ms),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),  # retries are ours, keyed by idempotency keys
    ]


# --- which credentials a client presents ---------------------------------------------------------------------
# Members serve gRPC with mutual TLS: a client presents a certificate of the cluster CA. Where it comes from,
# first match wins: the `tls` argument; credentials registered for that address in this process (devcluster
# does it for the clusters it starts); $CORTEX_TLS_DIR; the dev-trust note of that address (`just up` writes
# them); /var/lib/cortex/tls (on a node: admin.* on servers, the node's own certificate on workers). None found
# when a Client is made: plaintext, which only a node that is not in a cluster yet answers (its first contact;
# the client takes TLS once a re-lookup finds credentials). A client that has TLS never goes back to plaintext.
TLS_DIR_ENV = "CORTEX_TLS_DIR"
DEFAULT_TLS_DIRS = (Path("/var/lib/cortex") / tls.TLS_DIR,)
_by_address: dict[str, tls.ClientFiles | Path] = {}  # files, or a directory read when needed
_registry_lock = threading.Lock()
_process_default = None  # the agent process: its own node certificate (for plugins calling other nodes)


def set_process_credentials(source) -> None:
    """`source()` -> ClientFiles | None, consulted after the registry and $CORTEX_TLS_DIR."""
    global _process_default
    _process_default = source


def dev_trust_dir() -> Path | None:
    """Where dev clusters on this machine note which credentials open which loopback address, so a `cortex`
    started in another shell or by a test finds them (like known_hosts, for `cortex dev up` only). None for
    a user without a home (the appliance's DynamicUser agent): no notes, rather than a client that raises."""
    if os.environ.get("CORTEX_DEV_TRUST_DIR"):  # tests keep their own
        return Path(os.environ["CORTEX_DEV_TRUST_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "cortex" / "dev-trust"
    home = user_home()
    return None if home is None else home / ".cache" / "cortex" / "dev-trust"


def _trust_file(address: str) -> Path | None:
    directory = dev_trust_dir()
    return None if directory is None else directory / address.replace(":", "_").replace("/", "_")


def register_credentials(addresses, files: tls.ClientFiles | None, directory: Path | None = None) -> None:
    """Use `files` for these addresses in this process (None forgets them); with `directory` (where the
    files are), other processes on this machine find them too. Files None and a directory: read the
    directory when a client needs them (a node that has not joined yet has none)."""
    if files is None and directory is not None:
        with _registry_lock:
            for address in addresses:
                _by_address[address] = Path(directory)
        return
    with _registry_lock:
        for address in addresses:
            path = _trust_file(address)
            if files is None:
                _by_address.pop(address, None)
                if path is not None:
                    path.unlink(missing_ok=True)
                continue
            # with a directory, read it at each use: a renewed certificate replaces a revoked one
            _by_address[address] = files if directory is None else Path(directory)
            if directory is not None and path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                tmp.write_text(str(Path(directory).resolve()))
                os.replace(tmp, path)


def find_credentials(address: str) -> tls.ClientFiles | None:
    if address.startswith("unix:"):
        return None
    with _registry_lock:
        known = _by_address.get(address)
    if isinstance(known, tls.ClientFiles):
        return known
    if isinstance(known, Path):
        return tls.client_files(known)
    configured = os.environ.get(TLS_DIR_ENV)
    if not configured and _process_default is not None:
        files = _process_default()
        if files is not None:
            return files
    candidates = [Path(configured)] if configured else list(DEFAULT_TLS_DIRS)
    note = None if configured else _trust_file(address)
    if note is not None:
        try:
            candidates.insert(0, Path(note.read_text().strip()))
        except OSError:
            pass
    for directory in candidates:
        try:
            files = tls.client_files(directory)
        except PermissionError:
            files = None
        if files is not None:
            return files
    return None


def secure_channel(address: str, files: tls.ClientFiles, options: list[tuple[str, Any]]) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                         certificate_chain=files.cert)
    # Certificates name the cluster, not an address: verify the name every cluster certificate carries.
    return grpc.secure_channel(address, creds, options=options + [("grpc.ssl_target_name_override",
                                                                   tls.SERVER_NAME)])


def attempt_ms(connect_timeout: float | None) -> int:
    """How long one connection attempt may take for a caller that allows `connect_timeout` seconds (never
    shorter than the agent's own limit)."""
    return max(CONNECT_TIMEOUT_MS, int((connect_timeout or 0) * 1000))


def open_channel(address: str, max_message_bytes: int = 4 * 1024 * 1024,
                 files: tls.ClientFiles | None = None, connect_timeout: float | None = None) -> grpc.Channel:
    """The admin socket (`unix:`) is plaintext by design: its file mode is its access control."""
    options = channel_options(max_message_bytes, connect_timeout_ms=attempt_ms(connect_timeout))
    if address.startswith("unix:"):
        return grpc.insecure_channel(address, options=options)
    files = files or find_credentials(address)
    if files is None:  # first contact with a node that is not in a cluster yet
        return grpc.insecure_channel(address, options=options)
    return secure_channel(address, files, options)


def where_credentials_are_looked_for(address: str) -> str:
    """The places find_credentials reads for this address, so an error names the one to fill."""
    configured = os.environ.get(TLS_DIR_ENV)
    if configured:  # then it is the only place
        return f"${TLS_DIR_ENV}={configured}"
    places = [f"${TLS_DIR_ENV} (unset)"]
    note = _trust_file(address)
    if note is not None:
        places.append(f"the dev-trust note {note} (`cortex dev up` writes it)")
    places.extend(str(d) for d in DEFAULT_TLS_DIRS)
    return ", ".join(places)


def no_credentials_hint(address: str) -> str:
    return (f" (no client certificate found in {where_credentials_are_looked_for(address)}: set {TLS_DIR_ENV} "
            "to a server's <data_dir>/tls, or run the CLI on a node)")


def refused(details: str) -> bool:
    """Nothing listens there (or the socket file is gone): no certificate would change that."""
    return any(m in details for m in ("Connection refused", "No such file or directory", "connection refused"))


def speaks_http(address: str, timeout: float = 3.0) -> bool:
    """Whether `address` answers HTTP/1 (a node's MCP port, a web server) instead of gRPC: one short request
    on loopback or the network, made only after a call there already failed. Patient for a few seconds: a
    node's MCP port loads its web stack on its first connection."""
    import socket

    if address.startswith("unix:"):
        return False
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout) as sock:
            sock.sendall(b"HEAD / HTTP/1.0\r\nHost: cortex\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except (OSError, ValueError):
        return False


def unreachable_hint(address: str, code: str, details: str, plaintext: bool) -> str:
    """What to do next after a failed call to `address`, from its actual cause ('' when there is no advice)."""
    if code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return ""
    if address.startswith("unix:"):
        return (f"no agent answers on the admin socket {address[5:]}: is `cortex agent` running on this machine? "
                "(or pass --socket PATH, or use --addr HOST:PORT)")
    if refused(details):
        return (f"nothing listens at {address}: start an agent there (`cortex agent`, or a local cluster with "
                "`cortex dev up`), or pass --addr HOST:PORT of a running node")
    if speaks_http(address):
        return (f"{address} answers HTTP, not gRPC: that is a web port (a node's MCP HTTP port is its gRPC port + "
                "80); pass the node's gRPC address with --addr")
    if plaintext:
        if "no client certificate" in details:  # the message says so already
            return ""
        return (f"no client certificate was found for {address} (looked in "
                f"{where_credentials_are_looked_for(address)}), and a cluster member answers only mutual TLS: set "
                f"{TLS_DIR_ENV} to a server's <data_dir>/tls (`cortex dev up` prints it), or run the CLI on a node")
    if code == "DEADLINE_EXCEEDED":
        return "the node did not answer in time: the cluster may have lost quorum; check `cortex status` and retry"
    return f"is a node listening at {address}? check it with `cortex --addr {address} status`"


class CortexError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, details: str, address: str = "", plaintext: bool = False):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.address = address  # where the call went, so a hint can name the cause there
        self.plaintext = plaintext  # the call went without a client certificate


class Client:
    """Talks to one node (which forwards to the leader when needed)."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT, tls_files: tls.ClientFiles | None = None):
        self.address = address
        self.timeout = timeout
        self.tls_files = tls_files or find_credentials(address)
        self._given_files = tls_files is not None  # given credentials are never swapped for others
        # Plaintext is decided here, once: only a node not in a cluster yet answers it, and a member's TLS
        # port logs every plaintext connection as WRONG_VERSION_NUMBER. A client with TLS keeps it.
        self.plaintext = self.tls_files is None
        self._lost_credentials = False  # a re-lookup found none: the error says where they are looked for
        self.channel = open_channel(address, files=self.tls_files, connect_timeout=timeout)
        self.stub = pb_grpc.ClusterStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _refresh_credentials(self) -> bool:
        """After UNAVAILABLE (the node may have joined or renewed since): credentials found anew replace
        the ones in use. Given ones stay, and nothing found keeps TLS rather than falling to plaintext."""
        if self._given_files:
            return False
        fresh = find_credentials(self.address)
        self._lost_credentials = fresh is None and not self.plaintext
        if fresh is None or fresh == self.tls_files:
            return False
        old = self.channel
        self.tls_files = fresh
        self.plaintext = False
        self.channel = secure_channel(self.address, fresh,
                                      channel_options(connect_timeout_ms=attempt_ms(self.timeout)))
        self.stub = pb_grpc.ClusterStub(self.channel)
        old.close()
        return True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None = None):
        try:
            try:
                return method(request, timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                # The node answered TCP but the TLS handshake did not finish (a busy agent, a listener being
                # replaced after init or join): wait for the connection this once instead of failing fast.
                details = exc.details() or ""
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not any(
                        m in details for m in ("andshake", "SETTINGS frame")):
                    raise
                return method(request, timeout=timeout or self.timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            name = next((n for n, v in vars(self.stub).items() if v is method), None)
            revoked = (exc.code() == grpc.StatusCode.UNAUTHENTICATED and not self._given_files
                       and "was revoked" in (exc.details() or ""))
            if (exc.code() == grpc.StatusCode.UNAVAILABLE or revoked) and name and self._refresh_credentials():
                # the node joined (or renewed) since this client was made: once more with its certificate
                return self._call(getattr(self.stub, name), request, timeout)
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.UNAVAILABLE and self.plaintext and not refused(details):
                details += no_credentials_hint(self.address)
            elif exc.code() == grpc.StatusCode.UNAVAILABLE and self._lost_credentials:
                details += (" (kept the client certificate in use, which is no longer found in "
                            f"{where_credentials_are_looked_for(self.address)}: set {TLS_DIR_ENV} to a "
                            "server's <data_dir>/tls)")
            raise CortexError(exc.code(), details, self.address, self.plaintext) from None

    # --- writes ---------------------------------------------------------------------------------------
    def write(self, command_type: str, args: dict, idempotency_key: str | None = None,
              retry_for: float = 0.0) -> dict:
        """Apply a command; retry transient failures with the same key for up to `retry_for` seconds."""
        key = idempotency_key or uuid.uuid4().hex
        request = pb.WriteRequest(command=pb.Command(type=command_type, args_json=json.dumps(args).encode(),
                                                     idempotency_key=key))
        deadline = time.monotonic() + retry_for
        while True:
            try:
                response = self._call(self.stub.Write, request)
                return {**json.loads(response.result_json), "_index": response.index,
                        "_duplicate": response.duplicate}
            except CortexError as exc:
                if exc.code not in RETRYABLE or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def put(self, key: str, value: str, **kw) -> dict:
        return self.write("kv.put", {"key": key, "value": value}, **kw)

    def remove_node(self, node_id: str) -> bool:
        """Remove a member (a dead server from the Raft configuration too); False if it was not a member."""
        return self._call(self.stub.Leave, pb.LeaveRequest(node_id=node_id)).removed

    def write_batch(self, commands: list[tuple[str, dict]]) -> pb.WriteBatchResponse:
        request = pb.WriteBatchRequest(commands=[
            pb.Command(type=t, args_json=json.dumps(a).encode(), idempotency_key=uuid.uuid4().hex)
            for t, a in commands
        ])
        return self._call(self.stub.WriteBatch, request)

    # --- reads ----------------------------------------------------------------------------------------
    def read(self, query: str, args: dict | None = None, level: str = "leader") -> Any:
        response = self._call(self.stub.Read, pb.ReadRequest(
            query=query, args_json=json.dumps(args or {}).encode(), level=LEVELS[level]))
        return json.loads(response.result_json)

    def get(self, key: str, level: str = "linearizable") -> str | None:
        row = self.read("kv.get", {"key": key}, level=level)
        return row["value"] if row else None

    def status(self) -> pb.StatusResponse:
        return self._call(self.stub.Status, pb.StatusRequest())

    def promote_node(self, node_id: str, raft_address: str = "") -> pb.PromoteNodeResponse:
        """Make a worker a voting server; returns once it has caught up and is recorded as one."""
        return self._call(self.stub.PromoteNode, pb.PromoteNodeRequest(node_id=node_id, raft_address=raft_address),
                          timeout=max(self.timeout, 90))

    def transfer_leadership(self, target: str = "") -> pb.TransferLeadershipResponse:
        return self._call(self.stub.TransferLeadership, pb.TransferLeadershipRequest(target_node_id=target),
                          timeout=max(self.timeout, 15))


    def create_token(self, role: str = "worker", ttl_seconds: float = 3600, uses: int = 0) -> pb.CreateTokenResponse:
        return self._call(self.stub.CreateToken, pb.CreateTokenRequest(role=role, ttl_seconds=ttl_seconds, uses=uses))

    def revoke_token(self, token_id: str) -> pb.RevokeTokenResponse:
        return self._call(self.stub.RevokeToken, pb.RevokeTokenRequest(token_id=token_id))


class AdminClient:
    """The local node's admin API over its unix socket."""

    def __init__(self, socket_path: str, timeout: float = 30.0):
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = pb_grpc.AdminStub(self.channel)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise CortexError(exc.code(), exc.details() or "") from None

    def init(self, token_ttl: float = 0.0) -> pb.InitResponse:
        """`token_ttl`: the join token's lifetime in seconds (0: the agent's membership.init_token_ttl)."""
        return self._call(self.stub.Init, pb.InitRequest(token_ttl_seconds=token_ttl))

    def join(self, address: str, token: str, insecure_skip_ca_pin: bool = False) -> pb.JoinClusterResponse:
        return self._call(self.stub.JoinCluster, pb.JoinClusterRequest(address=address, token=token,
                                                                       insecure_skip_ca_pin=insecure_skip_ca_pin))

    def leave(self) -> pb.LeaveClusterResponse:
        return self._call(self.stub.LeaveCluster, pb.LeaveClusterRequest())
