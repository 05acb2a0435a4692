"""The Raft listener (raft/listener.py) on real loopback sockets: a descriptor shortage pauses accepting
and the port accepts again once it is over (pysyncobj's TcpServer closed the port for good)."""

from __future__ import annotations

import os
import resource
import socket
import time

from pysyncobj.poller import createPoller

from cortex.raft.listener import Listener


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failed_accept_pauses_the_listener_and_it_accepts_again():
    poller = createPoller("auto")
    accepted: list[socket.socket] = []
    port = _free_port()
    listener = Listener(poller, "127.0.0.1", port, lambda sock, peer: accepted.append(sock))
    listener.bind()
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowest_free = os.dup(0)  # the descriptor accept() would get next
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        poller.poll(1.0)  # accept() fails with EMFILE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not accepted and listener.bound
    deadline = time.monotonic() + 10
    while not accepted and time.monotonic() < deadline:
        listener.tick()  # resumes once the backoff has passed
        poller.poll(0.05)
    assert accepted, "the listener did not accept again after the shortage"
    late = socket.create_connection(("127.0.0.1", port), timeout=5)  # and keeps accepting
    deadline = time.monotonic() + 10
    while len(accepted) < 2 and time.monotonic() < deadline:
        listener.tick()
        poller.poll(0.05)
    assert len(accepted) == 2
    for sock in (client, late, *accepted):
        sock.close()
    listener.unbind()
