"""A client that talks TLS keeps talking TLS: a server without its trust, or credentials that vanish before a
re-lookup, end in an error that says where to point the client, never in a plaintext connection (a plaintext
HTTP/2 preface to a TLS port is what a member logs as WRONG_VERSION_NUMBER every second)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cortex import client as client_mod
from cortex.client import Client, CortexError
from cortex.security import tls
from tests.support import procs as test_procs
from tests.support.cluster import free_base_port

TLS_RECORD_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello; an HTTP/2 preface starts with b"P"


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class RecordingListener:
    """A plain TCP port that notes the first bytes of every connection and hangs up: whatever a client
    sends first shows whether it spoke TLS or plaintext. Opened late, it is a member that was restarting
    (connection refused, UNAVAILABLE) when the client first called."""

    def __init__(self, port: int):
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.first_bytes: list[bytes] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    data = conn.recv(64)
                except OSError:
                    data = b""
                if data:
                    self.first_bytes.append(data)

    def close(self) -> None:
        self._done.set()
        self._thread.join(10)
        self.sock.close()


@pytest.fixture
def port():
    """A loopback port nothing listens on yet; `listen(port)` opens a recording listener there."""
    opened: list[RecordingListener] = []

    class Port(int):
        address = ""

        def listen(self) -> RecordingListener:
            opened.append(RecordingListener(self))
            return opened[-1]

    p = Port(closed_port())
    p.address = f"127.0.0.1:{p}"
    yield p
    for rec in opened:
        rec.close()


@pytest.fixture
def no_credentials_anywhere(tmp_path: Path, monkeypatch):
    """Nothing for find_credentials to find: no registry entry, no $CORTEX_TLS_DIR, an empty dev-trust
    directory, no process default, and a default directory that does not exist."""
    monkeypatch.delenv(client_mod.TLS_DIR_ENV, raising=False)
    monkeypatch.setenv("CORTEX_DEV_TRUST_DIR", str(tmp_path / "dev-trust"))
    monkeypatch.setattr(client_mod, "DEFAULT_TLS_DIRS", (tmp_path / "absent",))
    monkeypatch.setattr(client_mod, "_process_default", None)
    return tmp_path


def cluster_files(directory: Path) -> tls.ClientFiles:
    """A CA and an admin certificate of it, written where find_credentials reads a directory."""
    ca_cert, ca_key = tls.new_ca("c-test")
    cert, key = tls.issue(ca_cert, ca_key, "admin", "admin", "c-test")
    directory.mkdir(parents=True, exist_ok=True)
    tls.write_file(directory / "ca.crt", ca_cert, 0o644)
    tls.write_file(directory / "admin.crt", cert, 0o644)
    tls.write_file(directory / "admin.key", key)
    return tls.ClientFiles(ca=ca_cert, cert=cert, key=key)


def call_until_connected(c: Client, rec: RecordingListener, timeout: float = 60.0) -> None:
    """Calls fail fast while the channel backs off after the refused connection: call until one reaches
    the listener (each fails, as the listener hangs up)."""
    deadline = time.monotonic() + timeout
    while not rec.first_bytes and time.monotonic() < deadline:
        with pytest.raises(CortexError):
            c.status()
        time.sleep(0.1)


def assert_only_tls(rec: RecordingListener) -> None:
    assert rec.first_bytes, "the client never connected"
    plaintext = [b[:24] for b in rec.first_bytes if b[0] != TLS_RECORD_HANDSHAKE]
    assert not plaintext, f"plaintext reached a TLS port: {plaintext}"


def test_given_tls_files_never_fall_back_to_plaintext(port, no_credentials_anywhere):
    files = cluster_files(no_credentials_anywhere / "given")
    with Client(port.address, timeout=3, tls_files=files) as c:
        with pytest.raises(CortexError) as refused:  # nobody listens: UNAVAILABLE, then a re-lookup
            c.status()
        assert refused.value.code.name == "UNAVAILABLE"
        listener = port.listen()  # a TLS port now, which this client has no trust for
        call_until_connected(c, listener)
        assert_only_tls(listener)
        assert c.tls_files == files and not c.plaintext


def test_re_lookup_after_unavailable_never_yields_plaintext(port, no_credentials_anywhere, monkeypatch):
    directory = no_credentials_anywhere / "found"
    files = cluster_files(directory)
    monkeypatch.setenv(client_mod.TLS_DIR_ENV, str(directory))
    with Client(port.address, timeout=3) as c:
        assert c.tls_files == files  # found through $CORTEX_TLS_DIR
        monkeypatch.delenv(client_mod.TLS_DIR_ENV)  # the re-lookup after UNAVAILABLE finds nothing
        with pytest.raises(CortexError) as refused:
            c.status()
        listener = port.listen()
        call_until_connected(c, listener)
        assert_only_tls(listener)
        assert c.tls_files == files and not c.plaintext
    # a client that had credentials and lost them says where they are looked for
    assert client_mod.TLS_DIR_ENV in refused.value.details and "dev-trust" in refused.value.details


def test_plaintext_until_credentials_appear_then_tls(port, no_credentials_anywhere, monkeypatch):
    """A node not in a cluster serves plaintext: a client that found no credentials talks plaintext to it
    (that is the first-contact mode, chosen when the client is made), and takes TLS as soon as a re-lookup
    finds credentials (the node joined)."""
    listener = port.listen()
    with Client(port.address, timeout=3) as c:
        assert c.plaintext
        call_until_connected(c, listener)
        assert listener.first_bytes[0].startswith(b"PRI * HTTP/2.0")
        listener.first_bytes.clear()
        directory = no_credentials_anywhere / "joined"
        files = cluster_files(directory)
        monkeypatch.setenv(client_mod.TLS_DIR_ENV, str(directory))
        with pytest.raises(CortexError):
            c.status()
        assert c.tls_files == files and not c.plaintext
        listener.first_bytes.clear()
        call_until_connected(c, listener)
    assert_only_tls(listener)


@pytest.fixture
def late_agent(tmp_path: Path):
    """A real agent, not in a cluster (so it serves plaintext), started when the test says so."""
    port = free_base_port()
    config = tmp_path / "agent" / "config.yaml"
    config.parent.mkdir()
    config.write_text(f"node:\n  id: late\n  role: server\ndata_dir: data\nlisten:\n  grpc: 127.0.0.1:{port}\n"
                      f"  raft: 127.0.0.1:{port + 1}\nlog:\n  format: json\n")
    procs: list[subprocess.Popen] = []

    def start() -> None:
        with open(config.parent / "agent.log", "ab") as log:
            procs.append(test_procs.popen([sys.executable, "-m", "cortex", "agent", "--config", str(config)],
                                          stdout=log, stderr=subprocess.STDOUT, cwd=config.parent))

    yield f"127.0.0.1:{port}", start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)


def test_tls_client_never_reaches_a_plaintext_server_after_unavailable(late_agent, no_credentials_anywhere):
    """The node was down when the client first called (UNAVAILABLE, a re-lookup that finds nothing) and
    comes back serving plaintext: a client given TLS files gets errors, never that node's answer."""
    address, start = late_agent
    files = cluster_files(no_credentials_anywhere / "given")
    with Client(address, timeout=3, tls_files=files) as c:
        with pytest.raises(CortexError) as refused:
            c.status()
        assert refused.value.code.name == "UNAVAILABLE"
        start()
        deadline = time.monotonic() + 60
        answered = None
        while time.monotonic() < deadline:  # until the node answers a plaintext client
            try:
                with Client(address, timeout=3) as plain:
                    answered = plain.status()
                break
            except CortexError:
                time.sleep(0.2)
        assert answered is not None and answered.state == "uninitialized"
        for _ in range(3):
            with pytest.raises(CortexError):
                c.status()
        assert c.tls_files == files
