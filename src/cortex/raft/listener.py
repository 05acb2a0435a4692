"""The Raft port's listening socket, and the rate-limited log lines of the Raft transport.

pysyncobj's TcpServer closes its socket after any failed accept and the transport never binds it again, so
a brief shortage of file descriptors (EMFILE on accept) left a server that could no longer be dialed by
half its peers until it restarted. This listener pauses accepting with a backoff instead and resumes.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable

from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import _getAddrType

log = logging.getLogger("cortex.raft.transport")

_READ, _ERROR = POLL_EVENT_TYPE.READ, POLL_EVENT_TYPE.ERROR
_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Throttled:
    """Log a kind of refusal at most once per `every` seconds, with how many were not logged."""

    def __init__(self, every: float = 10.0):
        self._every = every
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, **fields) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self._every) < self._every:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                return
            self._last[kind] = now
            fields["not_logged_since"] = self._quiet.pop(kind, 0)
        log.warning(message, extra={"fields": fields})


throttled = _Throttled()


class Listener:
    """The Raft port. A failed accept (EMFILE, ENFILE: descriptors run out) pauses accepting with a
    backoff instead of closing the port for good as pysyncobj's TcpServer does; any other listener error
    closes it and binds it again with the same backoff, keeping pysyncobj's transport ready meanwhile."""

    def __init__(self, poller, host: str, port: int, on_socket: Callable[[socket.socket, str], None]):
        self._poller = poller
        self._host, self._port = host, int(port)
        self._on_socket = on_socket
        self._sock: socket.socket | None = None
        self._paused_until = 0.0
        self._rebind_at = 0.0
        self._backoff = 0.0
        self.bound = False

    def bind(self) -> None:
        sock = socket.socket(_getAddrType(self._host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((self._host, self._port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._poller.subscribe(sock.fileno(), self._accept, _READ | _ERROR)
        self.bound = True

    def unbind(self) -> None:
        self.bound = False
        if self._sock is not None:
            self._poller.unsubscribe(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _retry_later(self) -> float:
        self._backoff = min(max(self._backoff * 2, 0.1), 5.0)
        return time.monotonic() + self._backoff

    def _failed(self, **fields) -> None:
        # Bound again from tick(), here rather than by pysyncobj: its transport counts as not ready while
        # unbound, and pysyncobj then runs no Raft at all (no heartbeats, no outgoing connections).
        self.unbind()
        self._rebind_at = self._retry_later()
        throttled.warning("listener", "Raft listener failed; binding it again", port=self._port,
                          retry_in=self._backoff, **fields)

    def tick(self) -> None:
        if not self.bound and self._rebind_at and time.monotonic() >= self._rebind_at:
            try:
                self.bind()
            except OSError as exc:
                self._rebind_at = self._retry_later()
                throttled.warning("bind", "Raft listener: binding failed; retrying", port=self._port,
                                  error=str(exc), retry_in=self._backoff)
                return
            self._rebind_at = self._backoff = 0.0
            log.info("Raft listener bound again", extra={"fields": {"port": self._port}})
        if self._paused_until and time.monotonic() >= self._paused_until and self._sock is not None:
            self._paused_until = 0.0
            self._poller.subscribe(self._sock.fileno(), self._accept, _READ | _ERROR)
            log.info("Raft listener accepting again", extra={"fields": {"port": self._port}})

    def _accept(self, fd, event) -> None:
        if event & _ERROR:
            self._failed()
            return
        for _ in range(32):
            try:
                sock, addr = self._sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:
                    # The pending connection stays in the backlog and poll keeps reporting it: leave it
                    # until the backoff has passed, then try again (the shortage may be over).
                    self._paused_until = self._retry_later()
                    self._poller.unsubscribe(self._sock.fileno())
                    throttled.warning("accept", "Raft listener: accept failed; retrying after a pause",
                                      error=str(exc), retry_in=self._backoff)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR):
                    continue  # that client gave up before it was accepted
                self._failed(error=str(exc))
                return
            self._backoff = 0.0
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self._on_socket(sock, f"{addr[0]}:{addr[1]}")
