"""The Raft transport: pysyncobj's TCPTransport with Cortex's own connections and listener.

pysyncobj's connection buffers whatever length header a peer sends (0x7fffffff then a trickle stalled its
one thread for seconds, by re-copying the growing buffer), unpickles frames, and its listener closes for
good after one failed accept (EMFILE). This keeps pysyncobj's node bookkeeping (TCPTransport: who dials
whom, reconnects, the message callbacks) and replaces what is on the socket:

- `mtls` (new clusters; `raft.transport`, see resolve_mode): TLS 1.2+ with the node certificates the cluster signs (the files
  in <data_dir>/tls, reloaded when renewed); both ends must present a server certificate of this cluster,
  not revoked (checked again every second on open connections). Frames are a 4-byte big-endian length and
  the typed encoding of raft/frames.py; nothing from the network is unpickled.
- `password` (servers whose Raft state predates mtls, until switched): pysyncobj's own wire format (Fernet with the Raft secret, pickles through the
  restricted unpickler), so a server can still talk to servers of earlier versions during a rolling update
  (docs/operations/raft-transport.md).

In both, a length header over `raft.max_frame_bytes` or a frame that does not decode closes that connection
before anything more is read, logged at most every few seconds per kind; Raft state is not touched. The
TLS handshake is non-blocking, driven by pysyncobj's poller on its tick thread like every other read.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pysyncobj.pickle as syncobj_pickle
from pysyncobj.dns_resolver import globalDnsResolver
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, _getAddrType
from pysyncobj.transport import TCPTransport

from cortex.core import durable
from cortex.raft import frames
from cortex.raft.listener import Listener, throttled
from cortex.security import tls

log = logging.getLogger("cortex.raft.transport")

MODES = ("mtls", "password")
MARKER = "raft-transport"  # in the data dir: the transport this server's Raft log was started with
HANDSHAKE_SECONDS = 5.0  # a connection not past the TLS handshake and its first message by then is closed
RECHECK_SECONDS = 1.0  # how often open connections' certificates are checked against revocations
_READ, _WRITE, _ERROR = POLL_EVENT_TYPE.READ, POLL_EVENT_TYPE.WRITE, POLL_EVENT_TYPE.ERROR
_SEND_CHUNK = 1 << 16
_TLS_RECORD_HANDSHAKE = 0x16


def resolve_mode(configured: str, data_dir: Path) -> str:
    """The transport to run. `auto` (the default) keeps what this data dir ran before: mtls for a server
    whose Raft state began on this version, password for one whose state predates it (its peers may still
    run a version without mtls: a rolling update must not cut it off). An explicit choice is recorded, so
    returning to `auto` later keeps it (docs/operations/raft-transport.md)."""
    marker = Path(data_dir) / MARKER
    try:
        recorded = marker.read_text().strip()
    except OSError:
        recorded = ""
    if configured == "auto":
        if recorded in MODES:
            return recorded
        configured = "password" if (Path(data_dir) / "raft.journal").exists() else "mtls"
    if recorded != configured:
        durable.write_atomic(marker, f"{configured}\n".encode())
    return configured


@dataclass(frozen=True)
class Settings:
    mode: str
    max_frame_bytes: int
    max_inbound: int
    tls_dir: Path | None = None
    # certificate PEM -> why it may not speak Raft (None: a current server certificate of this cluster)
    refusal: Callable[[bytes], str | None] = lambda pem: None
    # Raft address -> the node id registered for it (None: not known yet, as during a join)
    owner_of: Callable[[str], str | None] = lambda address: None


class _Contexts:
    """Server and client TLS contexts from <data_dir>/tls, rebuilt when the files change (renewal)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._stamp: tuple = ()
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None

    def _files_stamp(self) -> tuple:
        return tls.files_stamp(self.directory, ("ca.crt", "node.crt", "node.key"))

    def current(self) -> None:
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return
        ca, cert, key = (tls.read(self.directory, n) for n in ("ca.crt", "node.crt", "node.key"))
        if not (ca and cert and key) or not tls.key_matches(cert, key):
            return  # between writing a renewed key and its certificate: keep the pair in use
        contexts = []
        for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
            ctx = ssl.SSLContext(purpose)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(self.directory / "node.crt", self.directory / "node.key")
            ctx.load_verify_locations(cadata=ca.decode())  # a bundle while the CA rotates: both are trusted
            ctx.verify_mode = ssl.CERT_REQUIRED
            contexts.append(ctx)
        self.server, self.client = contexts
        self.client.check_hostname = True  # every certificate of the cluster names DNS:cortex
        self._stamp = stamp


class Connection:
    """What TCPTransport expects of pysyncobj's TcpConnection, with bounded frames and optional TLS."""

    def __init__(self, poller, settings: Settings, contexts: _Contexts | None, timeout: float,
                 sock: socket.socket | None = None, peer: str = ""):
        self.sendRandKey = None
        self.recvRandKey = None
        self.recvLastTimestamp = 0
        self.encryptor = None
        self.peer_cert: bytes | None = None  # after a TLS handshake: the peer's certificate (PEM)
        self.peer = peer
        self.dialed = ""  # outgoing: the Raft address dialed
        self.opened = time.monotonic()
        self.on_closed: Callable[[Connection], None] | None = None
        self._poller = poller
        self._settings = settings
        self._contexts = contexts
        self._timeout = timeout
        self._on_message = self._on_connected = self._on_disconnected = None
        self._sock = sock
        self._fileno = None
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self._last_read = time.monotonic()
        self._header = struct.Struct(">I" if contexts is not None else "<i")
        self._phase = ""  # connecting | sniff | handshake | open
        self.state = CONNECTION_STATE.DISCONNECTED
        if sock is not None:
            self._fileno = sock.fileno()
            self.state = CONNECTION_STATE.CONNECTING if contexts is not None else CONNECTION_STATE.CONNECTED
            self._phase = "sniff" if contexts is not None else "open"
            self._poller.subscribe(self._fileno, self._process, _READ | _ERROR)

    # --- TcpConnection's interface, as TCPTransport uses it ----------------------------------------------
    def setOnConnectedCallback(self, callback) -> None:
        self._on_connected = callback

    def setOnMessageReceivedCallback(self, callback) -> None:
        self._on_message = callback

    def setOnDisconnectedCallback(self, callback) -> None:
        self._on_disconnected = callback

    def fileno(self):
        return self._fileno

    def getSendBufferSize(self) -> int:
        return len(self._wbuf)

    def connect(self, host, port) -> bool:
        if host is None:
            return False
        self.disconnect()
        self.dialed = self.dialed or f"{host}:{port}"
        try:
            self._sock = socket.socket(_getAddrType(host), socket.SOCK_STREAM)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.setblocking(False)
        except OSError as exc:  # EMFILE: try again at the next reconnect, do not end the tick thread
            throttled.warning("connect", "cannot open a Raft connection", peer=self.dialed, error=str(exc))
            self._sock = None
            return False
        self._rbuf, self._wbuf = bytearray(), bytearray()
        self._last_read = self.opened = time.monotonic()
        try:
            self._sock.connect((host, port))
        except OSError as exc:
            if exc.errno not in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                self._sock.close()
                self._sock = None
                return False
        self._fileno = self._sock.fileno()
        self.state, self._phase = CONNECTION_STATE.CONNECTING, "connecting"
        self._poller.subscribe(self._fileno, self._process, _READ | _WRITE | _ERROR)
        return True

    def send(self, message) -> None:
        if self._contexts is not None:
            data = frames.encode(message)
        else:  # pysyncobj's own format (password transport)
            if self.sendRandKey:
                message = (self.sendRandKey, message)
            data = zlib.compress(syncobj_pickle.dumps(message), 3)
            if self.encryptor:
                data = self.encryptor.encrypt_at_time(data, int(time.monotonic()))
        self._wbuf += self._header.pack(len(data))
        self._wbuf += data
        self._flush()

    def disconnect(self) -> None:
        notify = self._on_disconnected is not None and self.state != CONNECTION_STATE.DISCONNECTED
        self.sendRandKey = self.recvRandKey = None
        self.recvLastTimestamp = 0
        self.peer_cert = None
        if self._fileno is not None:
            self._poller.unsubscribe(self._fileno)
            self._fileno = None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        self._rbuf, self._wbuf = bytearray(), bytearray()
        was_open = self.state != CONNECTION_STATE.DISCONNECTED
        self.state, self._phase = CONNECTION_STATE.DISCONNECTED, ""
        if was_open and self.on_closed is not None:
            self.on_closed(self)
        if notify:
            self._on_disconnected()

    # --- what Cortex adds --------------------------------------------------------------------------------
    def refuse(self, kind: str, message: str, **fields) -> None:
        throttled.warning(kind, message, peer=self.peer or self.dialed, **fields)
        self.disconnect()

    def stuck_opening(self, now: float) -> bool:
        return self._phase in ("connecting", "handshake", "sniff") and now - self.opened > HANDSHAKE_SECONDS

    @property
    def identified_name(self) -> str | None:
        peer = tls.peer_of(self.peer_cert) if self.peer_cert else None
        return peer.name if peer else None

    # --- the poller callback ------------------------------------------------------------------------------
    def _process(self, fd, event) -> None:
        if fd != self._fileno:
            self._poller.unsubscribe(fd)
            return
        if event & _ERROR:
            self.disconnect()
            return
        if time.monotonic() - self._last_read > self._timeout:
            self.disconnect()
            return
        if self._phase == "connecting":
            if self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.disconnect()
                return
            self._last_read = time.monotonic()
            if self._contexts is None:
                self._opened()
                return
            self._contexts.current()
            self._sock = self._contexts.client.wrap_socket(self._sock, server_hostname=tls.SERVER_NAME,
                                                           do_handshake_on_connect=False)
            self._phase = "handshake"
        if self._phase == "sniff":
            self._sniff()
            if self._phase != "handshake":
                return
        if self._phase == "handshake":
            self._handshake()
            if self._phase != "open":
                return
            event |= _READ  # the peer's first frame may have come with the handshake's last flight
        if event & _WRITE:
            self._flush()
        if event & _READ and self.state != CONNECTION_STATE.DISCONNECTED:
            self._read()

    def _opened(self) -> None:
        self._phase = "open"
        self.state = CONNECTION_STATE.CONNECTED
        self._subscribe()
        if self.dialed and self._on_connected is not None:
            self._on_connected()

    def _subscribe(self) -> None:
        if self._fileno is not None:
            self._poller.subscribe(self._fileno, self._process, _READ | _ERROR | (_WRITE if self._wbuf else 0))

    def _sniff(self) -> None:
        # Before TLS: a peer on the password transport sends a pysyncobj frame, not a TLS record. Say so
        # (a rolling update half done) instead of a bare handshake error.
        try:
            first = self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self.disconnect()
            return
        if not first:
            self.disconnect()
            return
        if first[0] != _TLS_RECORD_HANDSHAKE:
            self.refuse("not-tls", "refused a Raft connection that does not speak TLS: this server has "
                        "raft.transport=mtls; a server still on raft.transport=password (or a stranger) "
                        "cannot join in. Set the same raft.transport on every server "
                        "(docs/operations/raft-transport.md)")
            return
        self._contexts.current()
        self._sock = self._contexts.server.wrap_socket(self._sock, server_side=True, do_handshake_on_connect=False)
        self._phase = "handshake"

    def _handshake(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._poller.subscribe(self._fileno, self._process, _READ | _ERROR)
            return
        except ssl.SSLWantWriteError:
            self._poller.subscribe(self._fileno, self._process, _READ | _WRITE | _ERROR)
            return
        except (ssl.SSLError, OSError) as exc:
            self.refuse("handshake", "Raft TLS handshake failed: the peer holds no certificate of this cluster's "
                        "CA, or speaks raft.transport=password (set the same raft.transport on every server)",
                        error=str(exc))
            return
        der = self._sock.getpeercert(binary_form=True)
        pem = ssl.DER_cert_to_PEM_cert(der).encode() if der else b""
        reason = self._settings.refusal(pem) if pem else "no client certificate"
        name = tls.peer_of(pem).name if pem and tls.peer_of(pem) else None
        owner = self._settings.owner_of(self.dialed) if self.dialed else None
        if reason is None and owner is not None and owner != name:
            reason = f"{self.dialed} belongs to {owner}, but the certificate there names {name}"
        if reason is not None:
            self.refuse("certificate", "refused a Raft peer's certificate", reason=reason)
            return
        self.peer_cert = pem
        self._last_read = time.monotonic()
        self._opened()

    def _flush(self) -> None:
        if self._phase != "open" or self._sock is None:
            return
        if time.monotonic() - self._last_read > self._timeout:
            self.disconnect()
            return
        while self._wbuf:
            try:
                sent = self._sock.send(memoryview(self._wbuf)[:_SEND_CHUNK])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
            except OSError:
                self.disconnect()
                return
            if sent <= 0:
                break
            del self._wbuf[:sent]
        self._subscribe()

    def _read(self) -> None:
        while self._sock is not None:
            try:
                chunk = self._sock.recv(_SEND_CHUNK)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError:
                self.disconnect()
                return
            if not chunk:
                self.disconnect()
                return
            self._last_read = time.monotonic()
            self._rbuf += chunk
            if not self._parse():
                return

    def _parse(self) -> bool:
        """Deliver every complete frame; False when the connection was closed meanwhile."""
        limit = self._settings.max_frame_bytes
        while len(self._rbuf) >= 4:
            (size,) = self._header.unpack_from(self._rbuf)
            if not 0 <= size <= limit:
                self.refuse("oversize", "refused a Raft frame over raft.max_frame_bytes; closed the connection",
                            size=size, limit=limit)
                return False
            if len(self._rbuf) < 4 + size:
                return True
            body = bytes(self._rbuf[4:4 + size])
            del self._rbuf[:4 + size]
            try:
                message = self._decode(body)
            except Exception as exc:  # noqa: BLE001 - whatever a hostile frame raises, the answer is the same
                self.refuse("malformed", "refused a Raft frame that does not decode; closed the connection",
                            error=f"{type(exc).__name__}: {exc}"[:200])
                return False
            if self._on_message is not None:
                self._on_message(message)
            if self.state == CONNECTION_STATE.DISCONNECTED:
                return False
        return True

    def _decode(self, body: bytes):
        if self._contexts is not None:
            return frames.decode(body)
        if self.encryptor:
            stamp = self.encryptor.extract_timestamp(body)
            if stamp < self.recvLastTimestamp:
                raise ValueError("a frame older than the previous one (replayed?)")
            self.recvLastTimestamp = stamp
            body = self.encryptor.decrypt(body)
        inflate = zlib.decompressobj()
        data = inflate.decompress(body, self._settings.max_frame_bytes * 4)
        if inflate.unconsumed_tail:
            raise ValueError("a frame that inflates beyond four times raft.max_frame_bytes")
        message = syncobj_pickle.loads(data)  # the restricted unpickler (raft/consensus.py)
        if self.recvRandKey:
            key, message = message
            if key != self.recvRandKey:
                raise ValueError("a frame for another connection")
        return message


class CortexTransport(TCPTransport):
    """TCPTransport with Cortex's connections and listener (see the module docstring)."""

    def __init__(self, syncObj, selfNode, otherNodes, settings: Settings):
        self._settings = settings
        self._contexts = _Contexts(settings.tls_dir) if settings.mode == "mtls" else None
        if self._contexts is not None:
            self._contexts.current()
            if self._contexts.server is None:
                raise tls.TLSError(f"{settings.tls_dir}: ca.crt, node.crt and node.key are needed for "
                                   "raft.transport=mtls; join the cluster first, or set raft.transport=password")
        self._inbound: set[Connection] = set()
        self._next_recheck = 0.0
        super().__init__(syncObj, selfNode, otherNodes)

    def _connection(self, sock=None, peer="") -> Connection:
        return Connection(self._syncObj._poller, self._settings, self._contexts,
                          timeout=self._syncObj.conf.connectionTimeout, sock=sock, peer=peer)

    def _createServer(self):
        host, port = (self._syncObj.conf.bindAddress or self._selfNode.address).rsplit(":", 1)
        if host not in ("0.0.0.0", "::"):
            host = globalDnsResolver().resolve(host)
        self._server = Listener(self._syncObj._poller, host, port, self._accepted)

    def _accepted(self, sock: socket.socket, peer: str) -> None:
        if len(self._inbound) >= self._settings.max_inbound:
            throttled.warning("inbound", "refused a Raft connection: raft.max_inbound_connections reached",
                              peer=peer, limit=self._settings.max_inbound)
            sock.close()
            return
        conn = self._connection(sock, peer)
        conn.on_closed = self._inbound.discard
        self._inbound.add(conn)
        self._onNewIncomingConnection(conn)

    def addNode(self, node):
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conn = self._connection()
            conn.dialed = node.address
            conn.encryptor = self._syncObj.encryptor
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    def _onIncomingMessageReceived(self, conn, message):
        if self._syncObj.encryptor and not conn.sendRandKey:
            super()._onIncomingMessageReceived(conn, message)  # the password transport's key exchange
            return
        # The first message names the sending server. pysyncobj also takes 'readonly' and admin commands
        # here; Cortex uses neither, so only a member's address is accepted.
        if not isinstance(message, str) or message not in self._nodeAddrToNode:
            conn.refuse("stranger", "refused a Raft connection from an address that is not a member",
                        claimed=str(message)[:100])
            self._unknownConnections.discard(conn)
            return
        owner = self._settings.owner_of(message)
        if conn.peer_cert is not None and owner is not None and owner != conn.identified_name:
            conn.refuse("impostor", "refused a Raft connection: the certificate names another node",
                        claimed=message, owner=owner, certificate=conn.identified_name)
            self._unknownConnections.discard(conn)
            return
        super()._onIncomingMessageReceived(conn, message)

    def _onTick(self):
        if self._server is not None:
            self._server.tick()
        super()._onTick()
        now = time.monotonic()
        for conn in list(self._unknownConnections):
            if now - conn.opened > HANDSHAKE_SECONDS:
                conn.refuse("slow", "closed a Raft connection that did not introduce itself in time",
                            seconds=HANDSHAKE_SECONDS)
                self._unknownConnections.discard(conn)
        for conn in list(self._connections.values()):
            if conn.stuck_opening(now):  # a peer that never finishes the handshake (password transport?)
                conn.refuse("slow", "gave up a Raft connection whose handshake did not finish in time",
                            seconds=HANDSHAKE_SECONDS)
        if self._contexts is not None and now >= self._next_recheck:
            self._next_recheck = now + RECHECK_SECONDS
            self._contexts.current()
            for conn in list(self._inbound) + list(self._connections.values()):
                if conn.peer_cert is not None:
                    reason = self._settings.refusal(conn.peer_cert)
                    if reason is not None:
                        conn.refuse("certificate", "closed a Raft connection: its certificate is no longer "
                                    "accepted", reason=reason)
