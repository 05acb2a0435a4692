"""State domains plug into the core state machine: migrations, commands, queries, events, digests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cortex.core import domain
from cortex.core.commands import CommandError, Envelope, is_internal, validate
from cortex.core.state import StateStore, state_tables
from cortex.security.tls import Peer


def _v_add(args: dict) -> dict:
    if set(args) != {"name"} or not isinstance(args["name"], str):
        raise CommandError("counter.add takes exactly a string 'name'")
    return {"name": args["name"]}


def _h_add(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    db.execute("INSERT INTO counters VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET n = n + 1", (env.args["name"],))
    return {"n": db.execute("SELECT n FROM counters WHERE name=?", (env.args["name"],)).fetchone()[0]}


DOMAIN = domain.Domain(
    name="counter",
    migrations=(
        "CREATE TABLE counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL);",
        # a trigger body has semicolons of its own: the migration runner must keep it whole
        """CREATE TABLE counter_log (name TEXT NOT NULL, n INTEGER NOT NULL);
           CREATE TRIGGER counters_logged AFTER UPDATE ON counters BEGIN
             INSERT INTO counter_log VALUES (new.name, new.n);
           END;""",
    ),
    tables=("counters", "counter_log"),
    commands={"counter.add": domain.Command(_v_add, _h_add),
              "counter.reset": domain.Command(lambda a: {}, lambda db, i, e: {"reset": True}, internal=True)},
    queries={"counter.get": lambda db, args: dict(db.execute("SELECT name, n FROM counters").fetchall())},
    events=lambda env, result: [("counter.bumped", {"name": env.args["name"], "n": result["n"]})]
    if env.type == "counter.add" else [],
    # only the counter's owner may bump it: the certificate's name must equal the counter's
    refuse=lambda command_type, args, peer: (
        f"{peer.name} may bump its own counter only"
        if command_type == "counter.add" and peer is not None and args.get("name") != peer.name else ""),
)


@pytest.fixture
def counter_domain(monkeypatch):
    monkeypatch.setattr(domain, "BUILTIN", (__name__,))
    for fn in (domain.domains, domain.commands, domain.queries):
        fn.cache_clear()
    yield
    for fn in (domain.domains, domain.commands, domain.queries):
        fn.cache_clear()


def stamped(command_type: str, args: dict, idem: str) -> bytes:
    return Envelope(type=command_type, args=validate(command_type, args), id=idem, ts=1.0, term=1,
                    idem=idem).encode()


def test_a_domain_adds_tables_commands_queries_and_events(counter_domain, tmp_path: Path):
    events = []
    store = StateStore(tmp_path / "s.db", listener=lambda t, d, i: events.append((t, d, i)))
    assert store.apply(1, stamped("counter.add", {"name": "a"}, "x1")) == {"n": 1}
    assert store.apply(2, stamped("counter.add", {"name": "a"}, "x2")) == {"n": 2}
    assert store.apply(3, stamped("counter.add", {"name": "a"}, "x2"))["duplicate"] is True  # idempotent
    assert store.query("counter.get", {}) == {"a": 2}
    assert events == [("counter.bumped", {"name": "a", "n": 1}, 1), ("counter.bumped", {"name": "a", "n": 2}, 2)]
    assert store.reader().execute("SELECT count(*) FROM counter_log").fetchone()[0] == 1  # the trigger ran
    assert {"counters", "counter_log", "schema_versions"} <= set(state_tables())
    assert is_internal("counter.reset") and not is_internal("counter.add")


def test_domain_commands_are_validated_like_core_ones(counter_domain):
    with pytest.raises(CommandError, match="exactly a string 'name'"):
        validate("counter.add", {"name": 3})
    with pytest.raises(CommandError, match="unknown command type 'counter.nope'.*counter.add"):
        validate("counter.nope", {})


def test_domain_migrations_run_once_and_a_newer_schema_is_refused(counter_domain, tmp_path: Path):
    StateStore(tmp_path / "s.db").close()
    again = StateStore(tmp_path / "s.db")  # reopening runs nothing twice (CREATE TABLE would fail)
    version = again.reader().execute("SELECT version FROM schema_versions WHERE domain='counter'").fetchone()[0]
    assert version == 2
    again._db.execute("UPDATE schema_versions SET version=9 WHERE domain='counter'")
    again.close()
    with pytest.raises(RuntimeError, match="counter schema is at version 9, newer than this Cortex knows"):
        StateStore(tmp_path / "s.db")


def test_digest_covers_domain_tables(counter_domain, tmp_path: Path):
    a, b = StateStore(tmp_path / "a.db"), StateStore(tmp_path / "b.db")
    a.apply(1, stamped("counter.add", {"name": "a"}, "x"))
    assert a.digest() != b.digest()
    b.apply(1, stamped("counter.add", {"name": "a"}, "x"))
    assert a.digest() == b.digest()


def test_domain_names_must_prefix_their_commands():
    with pytest.raises(ValueError, match="must start with 'counter.'"):
        domain.Domain(name="counter", commands={"other.add": domain.Command(_v_add, _h_add)})


def test_a_failing_event_listener_never_fails_apply(counter_domain, tmp_path: Path):
    def broken(event_type, data, index):
        raise TypeError("listener bug")

    store = StateStore(tmp_path / "s.db", listener=broken)
    assert store.apply(1, stamped("counter.add", {"name": "a"}, "x")) == {"n": 1}
    assert store.last_applied == 1 and store.query("counter.get", {}) == {"a": 1}


def test_a_domains_refusal_hook_decides_who_may_propose_its_commands(counter_domain):
    owner, other = Peer("a", "worker", "c"), Peer("b", "worker", "c")
    assert domain.refusal("counter.add", {"name": "a"}, owner, internal=False) == ""
    assert domain.refusal("counter.add", {"name": "a"}, other, internal=False) == "b may bump its own counter only"
    assert domain.refusal("counter.add", {"name": "a"}, None, internal=False) == ""  # in-process caller
    # the hook is asked about its own domain's commands only
    assert domain.refusal("kv.put", {"key": "k", "name": "a"}, other, internal=False) == ""


def test_internal_commands_are_refused_to_clients_only(counter_domain):
    admin = Peer("admin@n1", "admin", "c")
    assert domain.refusal("counter.reset", {}, admin, internal=False) == (
        "counter.reset is decided by the cluster itself; use the cortex CLI")
    assert domain.refusal("counter.reset", {}, None, internal=True) == ""
    for core_internal in ("node.register", "node.liveness", "token.add", "token.revoke", "cluster.init"):
        assert domain.refusal(core_internal, {}, admin, internal=False).startswith(core_internal + " is decided")
    for client_command in ("node.approve", "node.reject", "kv.put", "noop"):
        assert domain.refusal(client_command, {"key": "k"}, admin, internal=False) == ""


def test_the_core_domains_refuse_what_the_write_path_always_refused():
    worker, admin, server = Peer("w1", "worker", "c"), Peer("admin@n1", "admin", "c"), Peer("n1", "server", "c")
    reserved = {"key": "_cortex/tls/rotation", "value": "9"}
    for command_type in ("kv.put", "kv.delete", "kv.cas"):
        assert "is one of the cluster's own keys (_cortex/*: credential rotation), changed by admins and servers " \
               "only, not a worker (w1)" in domain.refusal(command_type, reserved, worker, internal=False)
        assert domain.refusal(command_type, reserved, admin, internal=False) == ""
        assert domain.refusal(command_type, reserved, server, internal=False) == ""
    assert domain.refusal("kv.put", {"key": "app/x", "value": "1"}, worker, internal=False) == ""
    assert "only an admin starts a CA rotation" in domain.refusal("ca.request", {"rot_id": "r"}, worker, internal=False)
    assert domain.refusal("ca.ack", {"node": "n1"}, worker, internal=False) == "w1 may acknowledge for itself only"
    assert domain.refusal("ca.ack", {"node": "w1"}, worker, internal=False) == ""
    assert "may revoke only its own certificates" in domain.refusal("cert.revoke", {"name": "n1"}, worker,
                                                                    internal=False)
    assert domain.refusal("cert.revoke", {"name": "n1"}, admin, internal=False) == ""
    assert domain.refusal("ca.advance", {}, admin, internal=False) == (
        "ca.advance is decided by the cluster itself; use the cortex CLI")


def test_the_core_is_registered_first_whatever_else_is(counter_domain):
    names = [d.name for d in domain.domains()]
    assert names[:4] == ["cluster", "kv", "node", "token"] and names[4:] == ["counter"]
    assert [d.name for d in domain.domains() if d.version_in_user_version] == ["cluster"]
    owners = [name for d in domain.domains() for name in d.commands]
    assert len(owners) == len(set(owners))  # every command type has exactly one domain


def test_names_from_before_the_prefix_rule_are_declared_not_assumed():
    query = {"nodes": lambda db, args: []}
    with pytest.raises(ValueError, match="must start with 'node.'"):
        domain.Domain(name="node", queries=query)
    assert domain.Domain(name="node", queries=query, unprefixed=frozenset({"nodes"})).queries == query
