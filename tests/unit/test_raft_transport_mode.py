"""Which Raft transport a server runs (raft/transport.py resolve_mode): a rolling update must not cut off a
server whose peers still speak the password transport, and a new cluster starts on mutual TLS."""

from __future__ import annotations

from cortex.raft.transport import MARKER, resolve_mode


def test_new_raft_state_starts_on_mtls_and_keeps_it(tmp_path):
    assert resolve_mode("auto", tmp_path) == "mtls"
    (tmp_path / "raft.journal").write_bytes(b"")  # the journal Raft writes next
    assert resolve_mode("auto", tmp_path) == "mtls"
    assert (tmp_path / MARKER).read_text().strip() == "mtls"


def test_state_from_before_mtls_stays_on_the_password_transport_until_switched(tmp_path):
    (tmp_path / "raft.journal").write_bytes(b"old")
    assert resolve_mode("auto", tmp_path) == "password"
    assert resolve_mode("mtls", tmp_path) == "mtls"  # the operator switched this server
    assert resolve_mode("auto", tmp_path) == "mtls"  # and taking the key out again keeps the switch


def test_an_explicit_password_choice_is_kept(tmp_path):
    assert resolve_mode("password", tmp_path) == "password"  # joining a cluster that has not switched yet
    assert resolve_mode("auto", tmp_path) == "password"
