"""Who may call what over gRPC, and the TLS credentials the agent serves and calls with.

The member port requires a client certificate of the cluster CA (refused at the TLS handshake otherwise);
`RoleCheck` then reads the certificate's role and cluster and refuses an RPC the role may not call, with a
PERMISSION_DENIED that says which roles may. Plugin tools check their own roles against the Caller the
certificate maps to (plugin_service.network_caller).

The enrollment port (grpc port + 2, servers only) serves Join alone with server-side TLS: a node that has
no certificate yet sends its token and CSR there and gets its certificate back. That port presents a
certificate of the cluster CA with the CA in its chain; the joiner compares the CA with the pin its token
carries and verifies the server against it before the token leaves the node (`open_enrollment`).
"""

from __future__ import annotations

import contextvars
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from cortex.node.logs import fields
from cortex.security import tls

log = logging.getLogger("cortex.authz")

NODES = frozenset({"server", "worker"})
SERVER = frozenset({"server"})
ADMIN = frozenset({"server", "admin"})
OPERATOR = frozenset({"server", "admin", "operator"})
WRITERS = frozenset({"server", "worker", "admin", "operator"})
EVERYONE = frozenset({"server", "worker", "admin", "operator", "reader"})

# Every Cluster RPC names the roles that may call it; an RPC missing here is refused (fail closed).
CLUSTER_RPC_ROLES: dict[str, frozenset[str]] = {
    "Write": WRITERS,
    "WriteBatch": WRITERS,
    "Read": EVERYONE,
    "Status": EVERYONE,
    "Join": SERVER,  # on this port only forwarded by a server; joiners use the enrollment port
    "Leave": ADMIN | {"worker"},  # a worker may leave (remove itself) only: checked in ClusterService.Leave
    "Heartbeat": NODES,
    "TransferLeadership": OPERATOR | {"worker"},  # graceful, so a worker may forward its operator's request
    # Workers mint worker tokens only (the netboot service provisions workers): checked in ClusterService.
    "CreateToken": ADMIN | {"worker"},
    "RevokeToken": ADMIN,
    "RenewCertificate": EVERYONE,  # renews the caller's own certificate, same name and role
    "PromoteNode": ADMIN,  # a worker becomes a voting server (membership.py, agent.handle_promote)
    "BecomeServer": SERVER,  # the leader hands the promoted node its server material
}
# A certificate's role as a plugin tool caller (plugins.CALLER_ROLES: reader < operator < admin).
CALLER_ROLE_OF = {"admin": "admin", "server": "admin", "operator": "operator", "worker": "operator",
                  "reader": "reader"}
# Whole services open to every certificate of the cluster (plugin tools check their own roles).
OPEN_SERVICES = ("/cortex.v1.Plugins/", "/grpc.health.v1.Health/", "/grpc.reflection.")
# Whole services only node certificates may call: a service's volume is its data (cortex.ha.volume_service).
NODE_SERVICES = ("/cortex.v1.Volumes/",)
CLUSTER_SERVICE = "/cortex.v1.Cluster/"
ENROLL_PORT_OFFSET = 2

# The peer of the RPC being served (set by RoleCheck, read by handlers in the same thread).
current_peer: contextvars.ContextVar[tls.Peer | None] = contextvars.ContextVar("current_peer", default=None)


def enroll_address(grpc_address: str) -> str:
    host, _, port = grpc_address.rpartition(":")
    return f"{host}:{int(port) + ENROLL_PORT_OFFSET}"


def peer_from_context(context: grpc.ServicerContext) -> tls.Peer | None:
    certs = (context.auth_context() or {}).get("x509_pem_cert") or []
    return tls.peer_of(certs[0]) if certs else None


def allowed_roles(method: str) -> frozenset[str] | None:
    if method.startswith(OPEN_SERVICES):
        return EVERYONE
    if method.startswith(NODE_SERVICES):
        return NODES
    if method.startswith(CLUSTER_SERVICE):
        return CLUSTER_RPC_ROLES.get(method[len(CLUSTER_SERVICE):], frozenset())
    return frozenset()


def refusal(method: str, peer: tls.Peer | None, cluster_id: str) -> tuple[grpc.StatusCode, str] | None:
    """Why `peer` may not call `method` in `cluster_id` (None: it may). Pure, so it is tested directly."""
    if peer is None:
        return (grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate names no cortex identity; use one issued by this cluster")
    if peer.cluster_id != cluster_id:
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"certificate of cluster {peer.cluster_id}, this is {cluster_id}; use this cluster's credentials")
    roles = allowed_roles(method)
    if peer.role not in roles:
        short = method.rsplit("/", 1)[-1]
        who = "a server, or the CLI on a server node (admin certificate in <data_dir>/tls)"
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"{short} may be called by {', '.join(sorted(roles)) or 'no one'}; {peer.name} is a {peer.role}: "
                f"call it from {who}")
    return None


class RoleCheck(grpc.ServerInterceptor):
    """Refuse an RPC the caller's certificate role may not make, or made with a revoked certificate; log
    every refusal with its reason."""

    def __init__(self, cluster_id, revoked=None):
        self._cluster_id = cluster_id  # callable: the id can change when the node leaves and joins again
        self._revoked = revoked  # (name, certificate PEM) -> why it is revoked, or None (revocation.py)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def guard(behavior):
            def checked(request_or_iterator, context):
                certs = (context.auth_context() or {}).get("x509_pem_cert") or []
                peer = tls.peer_of(certs[0]) if certs else None
                problem = refusal(method, peer, self._cluster_id())
                if problem is None and peer is not None and self._revoked is not None:
                    revoked = self._revoked(peer.name, certs[0])
                    if revoked:
                        problem = (grpc.StatusCode.UNAUTHENTICATED, revoked)
                if problem is not None:
                    log.warning("rpc refused", extra=fields(method=method, peer=context.peer(),
                                                           name=peer.name if peer else "", reason=problem[1]))
                    context.abort(*problem)
                token = current_peer.set(peer)
                try:
                    return behavior(request_or_iterator, context)
                finally:
                    current_peer.reset(token)
            return checked

        return _wrap(handler, guard)


class OnlyJoin(grpc.ServerInterceptor):
    """The enrollment port answers Join and nothing else."""

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method == CLUSTER_SERVICE + "Join":
            return continuation(handler_call_details)
        method = handler_call_details.method

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{method}: the enrollment port serves Join only; members call the gRPC port with "
                          "their certificate")
        return grpc.unary_unary_rpc_method_handler(refuse)


class SocketReadsOnly(grpc.ServerInterceptor):
    """The admin socket also answers the Cluster service's Status and Read, so `cortex --socket PATH status`
    works on a node without a client certificate; every other Cluster RPC goes to the gRPC port, where the
    caller's certificate decides (Admin and Plugins on the socket pass untouched)."""

    ALLOWED = (CLUSTER_SERVICE + "Status", CLUSTER_SERVICE + "Read")

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(CLUSTER_SERVICE) or method in self.ALLOWED:
            return continuation(handler_call_details)

        def refuse(request, context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{method}: the admin socket answers Status and Read of the Cluster service only; "
                          "call the node's gRPC port (--addr) for the rest")
        return grpc.unary_unary_rpc_method_handler(refuse)


def _wrap(handler: grpc.RpcMethodHandler, guard) -> grpc.RpcMethodHandler:
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attr, make in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(guard(behavior), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


class ServerCredentials:
    """mTLS server credentials that follow the files in <data_dir>/tls: a renewed certificate is served from
    the next handshake on, without a restart (grpc calls the fetcher at each new connection)."""

    FILES = ("ca.crt", "node.crt", "node.key")
    CLIENT_AUTH = True

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._stamp: tuple = ()
        self._lock = threading.Lock()

    def _files_stamp(self) -> tuple:
        return tls.files_stamp(self.directory, self.FILES)

    def _config(self):
        ca, cert, key = (tls.read(self.directory, n) for n in ("ca.crt", "node.crt", "node.key"))
        if not (ca and cert and key):
            raise tls.TLSError(f"{self.directory}: ca.crt, node.crt and node.key are needed to serve mTLS")
        if not tls.key_matches(cert, key):
            return None  # caught between writing the key and the certificate: keep the current pair
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _loaded(self) -> None:
        log.info("serving certificate loaded", extra=fields(
            not_after=str(tls.not_after(tls.read(self.directory, "node.crt")))))

    def fetch(self):
        stamp = self._files_stamp()
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                config = self._config()
            except (tls.TLSError, ValueError, IndexError) as exc:
                log.warning("cannot load the renewed certificate; serving the previous one", extra=fields(error=str(exc)))
                return None
            if config is not None:
                self._stamp = stamp
                self._loaded()
            return config

    def credentials(self) -> grpc.ServerCredentials:
        initial = self._config()
        if initial is None:
            raise tls.TLSError(f"{self.directory}: a key does not match its certificate")
        self._stamp = self._files_stamp()
        return grpc.dynamic_ssl_server_credentials(initial, self.fetch,
                                                   require_client_authentication=self.CLIENT_AUTH)


class EnrollCredentials(ServerCredentials):
    """The enrollment port's TLS: a certificate signed by the cluster CA (enroll.crt), served with the CA
    bundle as its chain so a joiner can read the CA, check it against the pin in its token, and only then
    trust it. Follows ca.crt: after a CA rotation the next handshake presents a certificate of the new CA."""

    FILES = ("ca.crt", "ca.key")
    CLIENT_AUTH = False

    def _config(self):
        ca_bundle, ca_key = tls.read(self.directory, "ca.crt"), tls.read(self.directory, "ca.key")
        if not (ca_bundle and ca_key):
            raise tls.TLSError(f"{self.directory}: ca.crt and ca.key are needed to serve the enrollment port")
        signing_ca = tls.split_pems(ca_bundle)[0]
        if not tls.key_matches(signing_ca, ca_key):
            return None  # caught between writing the CA key and certificate: keep serving the current pair
        cert, key = tls.read(self.directory, "enroll.crt"), tls.read(self.directory, "enroll.key")
        if not (cert and key and tls.key_matches(cert, key) and tls.issued_by(cert, signing_ca)
                and not tls.needs_renewal(cert)):
            cert, key = tls.issue_enrollment(signing_ca, ca_key)
            tls.write_file(self.directory / "enroll.key", key)
            tls.write_file(self.directory / "enroll.crt", cert, 0o644)
        return grpc.ssl_server_certificate_configuration([(key, cert + ca_bundle)])

    def _loaded(self) -> None:
        log.info("enrollment certificate loaded", extra=fields(ca_pin=tls.ca_pin(tls.read(self.directory, "ca.crt"))))


def enroll_server_credentials(directory: Path) -> grpc.ServerCredentials:
    return EnrollCredentials(directory).credentials()


class PinMismatch(Exception):
    """The enrollment port presented no CA with the pinned hash: another cluster, or a man in the middle."""


@dataclass(frozen=True)
class Enrollment:
    channel: grpc.Channel
    ca_pem: bytes  # the CA the channel trusts (the pinned one, or the one presented when nothing was pinned)
    pin: str  # its tls.ca_pin


def _presented_chain(host: str, port: int, timeout: float) -> list[bytes]:
    """The certificates the enrollment port presents, unverified: only to find the CA the pin names (the
    gRPC channel that carries the token then verifies the server against that CA alone)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw) as conn:
        # public in Python 3.13 (SSLSocket.get_unverified_chain); the same method on the C object before
        chain = conn.get_unverified_chain() if hasattr(conn, "get_unverified_chain") else \
            conn._sslobj.get_unverified_chain()
        return [c.public_bytes(ssl._ssl.ENCODING_PEM).encode() for c in chain or []]


def choose_ca(chain: list[bytes], pin: str, where: str) -> bytes:
    """The CA of `chain` to trust: the one whose key hashes to `pin`; without a pin (trust on first use) the
    CAs presented (an old server's self-signed certificate is its own CA). Raises PinMismatch."""
    leaf, rest = (chain[0], chain[1:]) if chain else (b"", [])
    cas = [c for c in rest if tls.is_ca(c)] or ([leaf] if leaf and tls.is_ca(leaf) else [])
    if not pin:
        if not cas:
            raise PinMismatch(f"{where} presents no CA certificate; is it a cortex server's enrollment port?")
        return b"".join(cas)
    for ca in cas:
        if tls.ca_pin(ca) == pin:
            if not tls.issued_by(leaf, ca):
                raise PinMismatch(f"{where}: its certificate is not signed by the pinned CA {pin[:16]}…; "
                                  "refusing to send the join token")
            return ca
    seen = ", ".join(tls.ca_pin(c)[:16] + "…" for c in cas) or "none"
    raise PinMismatch(f"{where} presents CA {seen}, but the join token pins CA {pin[:16]}…: this is not a server "
                      "of the cluster that made the token (or something in between intercepts the connection); "
                      "the token was NOT sent. Check the address, or make a new token on a member "
                      "(`cortex token create`: it ends in the CA's pin; `cortex secrets ca` shows it)")


def open_enrollment(address: str, options: list, timeout: float = 5.0, pin: str = "") -> Enrollment:
    """A TLS channel to a server's enrollment port that trusts the cluster CA named by `pin` only. Nothing
    is sent before the server is checked: the CA is read from the handshake, compared with the pin, and the
    channel then verifies the server's certificate against that CA (a MITM cannot present one). Without a
    pin (an operator-approved join) the presented CA is trusted and returned, so its pin can be shown."""
    host, _, port = enroll_address(address).rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            chain = _presented_chain(host, int(port), 2.0)
            break
        except (OSError, ssl.SSLError) as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"no enrollment port at {host}:{port} ({exc}); give the gRPC address of a "
                                      "server (the enrollment port is its gRPC port + 2)") from None
            time.sleep(0.2)
    ca = choose_ca(chain, pin, f"{host}:{port}")
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    channel = grpc.secure_channel(target, creds, options=options + [("grpc.ssl_target_name_override",
                                                                     tls.ENROLL_NAME)])
    return Enrollment(channel=channel, ca_pem=ca, pin=tls.ca_pin(tls.split_pems(ca)[0]))


def enroll_channel(address: str, options: list, timeout: float = 5.0, pin: str = "") -> grpc.Channel:
    """open_enrollment's channel (tests probing the port; joins use open_enrollment)."""
    return open_enrollment(address, options, timeout, pin).channel
