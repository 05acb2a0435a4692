"""The deterministic state machine, driven directly: no sockets, no Raft, no sleeps."""

import random
import sqlite3
from pathlib import Path

from cortex.core.state import StateStore
from cortex.membership import identity
from tests.support.envelopes import env


def test_apply_put_get_and_index_recorded_in_same_transaction(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    result = store.apply(2, env("kv.put", {"key": "a", "value": "1"}))
    assert result == {"key": "a", "version": 1, "index": 2}
    assert store.query("kv.get", {"key": "a"})["value"] == "1"
    store.close()
    reopened = StateStore(tmp_path / "s.db")
    assert reopened.last_applied == 2
    assert reopened.query("cluster", {})["last_applied_index"] == 2


def test_replayed_entries_are_skipped_after_restart(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    put = env("kv.put", {"key": "a", "value": "1"})
    store.apply(5, put)
    store.close()
    store = StateStore(tmp_path / "s.db")
    # pysyncobj replays its journal from the start after a restart: nothing may apply twice.
    assert store.apply(5, put)["skipped"] is True
    assert store.apply(3, env("kv.put", {"key": "a", "value": "old"}))["skipped"] is True
    assert store.query("kv.get", {"key": "a"}) == {"key": "a", "value": "1", "version": 1, "create_index": 5,
                                                   "mod_index": 5}


def test_idempotency_key_applies_once_and_returns_first_result(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    first = store.apply(2, env("kv.put", {"key": "a", "value": "1"}, idem="retry-me"))
    again = store.apply(3, env("kv.put", {"key": "a", "value": "2"}, idem="retry-me"))
    assert again == {**first, "duplicate": True}
    assert store.query("kv.get", {"key": "a"})["value"] == "1"


def test_commands_from_a_deposed_leader_are_fenced_by_term(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    store.apply(2, env("kv.put", {"key": "a", "value": "new"}, term=5))
    stale = store.apply(3, env("kv.put", {"key": "a", "value": "stale"}, term=4, idem="k"))
    assert "stale term 4 < 5" in stale["error"]
    assert store.query("kv.get", {"key": "a"})["value"] == "new"
    # not remembered under its key: the client's retry through the new leader goes through
    assert store.apply(4, env("kv.put", {"key": "a", "value": "retried"}, term=5, idem="k"))["version"] == 2


def test_cas_semantics(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    assert store.apply(2, env("kv.cas", {"key": "c", "expected": None, "value": "1"}))["succeeded"] is True
    assert store.apply(3, env("kv.cas", {"key": "c", "expected": "0", "value": "2"})) == {
        "key": "c", "succeeded": False, "current": "1"}
    assert store.apply(4, env("kv.cas", {"key": "c", "expected": "1", "value": "2"}))["succeeded"] is True
    assert store.query("kv.get", {"key": "c"})["value"] == "2"


def test_same_log_gives_same_digest_on_every_replica(tmp_path: Path):
    rng = random.Random(7)
    log = []
    for i in range(300):
        key = f"k{rng.randrange(20)}"
        op = rng.choice(["put", "put", "delete", "cas"])
        if op == "put":
            log.append(env("kv.put", {"key": key, "value": str(rng.random())}, ts=float(i)))
        elif op == "delete":
            log.append(env("kv.delete", {"key": key}, ts=float(i)))
        else:
            log.append(env("kv.cas", {"key": key, "expected": None, "value": "x"}, ts=float(i)))
    a, b = StateStore(tmp_path / "a.db"), StateStore(tmp_path / "b.db")
    for index, data in enumerate(log, start=2):
        a.apply(index, data)
    for index, data in enumerate(log, start=2):  # b also sees a replay of its first half, as after a restart
        b.apply(index, data)
        if index == 150:
            for replay_index, replay in enumerate(log[:149], start=2):
                b.apply(replay_index, replay)
    assert a.digest() == b.digest()
    c = StateStore(tmp_path / "c.db")
    for index, data in enumerate(log[:-1], start=2):
        c.apply(index, data)
    assert c.digest() != a.digest() or log[-1] == log[-2]


def test_snapshot_backup_and_restore(tmp_path: Path):
    a = StateStore(tmp_path / "a.db")
    for i in range(2, 50):
        a.apply(i, env("kv.put", {"key": f"k{i}", "value": "v"}))
    snap = tmp_path / "snap.db"
    assert a.backup_to(snap) == 49
    b = StateStore(tmp_path / "b.db")
    assert b.restore_from(snap) is True
    assert b.last_applied == 49 and b.digest() == a.digest()
    # a node whose own state is newer keeps it (the entries after the snapshot are already applied)
    a.apply(50, env("kv.put", {"key": "later", "value": "v"}))
    assert a.restore_from(snap) is False
    assert a.query("kv.get", {"key": "later"}) is not None


def test_join_tokens_expire_and_run_out(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    token = identity.new_join_token()
    h = identity.token_hash(token)
    store.apply(2, env("token.add", {"token_hash": h, "role": "worker", "expires_at": 2000.0, "uses": 1}))
    register = {"node_id": "w1", "role": "worker", "grpc_address": "127.0.0.1:1", "token_hash": h}
    too_strong = store.apply(3, env("node.register", {**register, "role": "server"}))
    assert too_strong["error"] == "this join token admits workers only"
    late = store.apply(4, env("node.register", register, ts=2500.0))
    assert "expired" in late["error"]
    assert store.apply(5, env("node.register", register, ts=1500.0))["registered"] is True
    again = store.apply(6, env("node.register", {**register, "node_id": "w2"}, ts=1500.0))
    assert "used up" in again["error"]
    assert [n["id"] for n in store.query("nodes", {})] == ["w1"]


def test_readers_are_read_only(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    db = store.reader()
    try:
        db.execute("INSERT INTO kv VALUES ('x', 'y', 1, 1, 1, 0)")
        raise AssertionError("a reader connection must not write")
    except sqlite3.OperationalError as exc:
        assert "readonly" in str(exc) or "read-only" in str(exc) or "query_only" in str(exc)


def test_command_appended_in_another_term_than_stamped_is_fenced(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    result = store.apply(2, env("kv.put", {"key": "a", "value": "x"}, term=3), entry_term=4)
    assert result["error"].startswith("stale term 3 != log term 4")
    assert store.query("kv.get", {"key": "a"}) is None and store.last_applied == 2
    assert store.apply(3, env("kv.put", {"key": "a", "value": "y"}, term=4), entry_term=4)["version"] == 1


def test_group_committed_batch_applies_in_one_transaction_with_per_command_results(tmp_path: Path):
    from cortex.core.commands import encode_batch

    store = StateStore(tmp_path / "s.db")
    batch = encode_batch([env("kv.put", {"key": "b", "value": "1"}, idem="one"),
                          env("kv.put", {"key": "b", "value": "2"}),
                          env("kv.put", {"key": "c", "value": "3"}, idem="one")])  # a retry inside the batch
    results = store.apply(2, batch)
    assert [r.get("version") for r in results] == [1, 2, 1]
    assert results[2]["duplicate"] is True and store.query("kv.get", {"key": "c"}) is None
    assert store.apply(3, b"\xff not json")["error"].startswith("undecodable log entry")
    assert store.last_applied == 3


def test_join_requests_pending_approved_rejected(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    secret, other = "a" * 64, "b" * 64
    request = {"node_id": "w1", "role": "worker", "grpc_address": "127.0.0.1:9", "secret_hash": secret}
    assert store.apply(1, env("node.request", request))["state"] == "pending"
    assert store.apply(2, env("node.request", request))["unchanged"] is True  # the same node asking again
    hijack = store.apply(3, env("node.request", {**request, "secret_hash": other}))
    assert "another join request for node 'w1' is pending" in hijack["error"]
    assert store.apply(4, env("node.reject", {"node_id": "w1"}))["state"] == "rejected"
    assert "already rejected" in store.apply(5, env("node.approve", {"node_id": "w1"}))["error"]
    # after a rejection a fresh request (new secret) may queue again, and be approved
    assert store.apply(6, env("node.request", {**request, "secret_hash": other}))["state"] == "pending"
    assert store.apply(7, env("node.approve", {"node_id": "w1"}))["changed"] is True
    assert store.query("join_requests", {"node_id": "w1"})[0]["state"] == "approved"
    register = {"node_id": "w1", "role": "worker", "grpc_address": "127.0.0.1:9"}
    store.apply(8, env("node.register", register))
    assert store.query("join_requests", {}) == []  # consumed by the registration
    assert store.apply(9, env("node.approve", {"node_id": "w1"}))["state"] == "member"


def test_the_roster_follows_node_commands_and_snapshot_restores(tmp_path: Path):
    from cortex.membership.roster import Roster

    def register(node_id: str, role: str = "worker") -> bytes:
        return env("node.register", {"node_id": node_id, "role": role, "grpc_address": f"{node_id}:1",
                                     "raft_address": "", "token_hash": ""})

    a, b = StateStore(tmp_path / "a.db"), StateStore(tmp_path / "b.db")
    roster = Roster(b)
    b.apply(1, register("s1", "server"))
    assert roster.server_grpc_addresses() == ["s1:1"] and roster.node("w1") is None
    before = b.generation("node", "member")
    b.apply(2, env("kv.put", {"key": "k", "value": "v"}))  # other families leave the roster as it is
    assert b.generation("node", "member") == before
    b.apply(3, register("w1"))
    assert roster.node("w1")["role"] == "worker"
    b.apply(4, env("member.leave", {"node_id": "w1", "reason": "test"}))
    assert roster.node("w1") is None  # left: on record, but no member
    for index, node_id in enumerate(["s1", "s2", "w9"], start=1):
        a.apply(index, register(node_id, "server" if node_id != "w9" else "worker"))
    a.apply(10, env("kv.put", {"key": "k", "value": "v"}))
    snap = tmp_path / "snap.db"
    a.backup_to(snap)
    assert b.restore_from(snap) is True
    assert roster.server_grpc_addresses() == ["s1:1", "s2:1"] and roster.node("w9")["grpc_address"] == "w9:1"
    assert [n["id"] for n in b.query("nodes", {})] == sorted(roster._current().by_id)


def test_the_roster_names_the_member_behind_a_raft_address(tmp_path: Path):
    """The router looks the leader's gRPC address up by its Raft address on every forwarded write."""
    from cortex.membership.roster import LIVENESS_COLUMNS, Roster

    store = StateStore(tmp_path / "s.db")
    roster = Roster(store)
    for index, node_id in enumerate(["s1", "s2"], start=1):
        store.apply(index, env("node.register", {"node_id": node_id, "role": "server", "grpc_address": f"{node_id}:1",
                                                 "raft_address": f"{node_id}:2", "token_hash": ""}))
    assert roster.node_by_raft("s2:2")["grpc_address"] == "s2:1"
    assert roster.node_by_raft("s9:2") is None and roster.node_by_raft("") is None
    store.apply(3, env("member.leave", {"node_id": "s2", "reason": "test"}))
    assert roster.node_by_raft("s2:2") is None  # as the nodes query, which leaves out who left
    rows = {n["raft_address"]: n for n in store.query("nodes", {})}
    # the nodes query's row, but for liveness, which the roster leaves out (it changes no membership)
    assert roster.node_by_raft("s1:2") == {k: v for k, v in rows["s1:2"].items() if k not in LIVENESS_COLUMNS}


def test_many_reading_threads_share_a_few_connections(tmp_path: Path):
    """Each read connection holds its own schema and page cache: a server's dozens of long-lived threads
    (gRPC workers) that read now and then must not keep one each. Counted as open file descriptors of the
    database, the kernel's view."""
    import os
    import threading

    store = StateStore(tmp_path / "s.db")
    store.apply(2, env("kv.put", {"key": "a", "value": "1"}))
    path = str((tmp_path / "s.db").resolve())

    def open_db_files() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == path)

    before = open_db_files()
    results, release = [], threading.Event()
    threads = []
    for _ in range(20):  # one read after another, each from another thread that stays alive
        done = threading.Event()

        def work(done=done):
            results.append(store.query("kv.get", {"key": "a"})["value"])
            done.set()
            release.wait(30)

        threads.append(threading.Thread(target=work, daemon=True))
        threads[-1].start()
        assert done.wait(30)
    try:
        assert results == ["1"] * 20
        assert open_db_files() - before <= 1
    finally:
        release.set()
        for t in threads:
            t.join(30)
    store.close()
    assert open_db_files() == before - 1  # the writer and the idle readers are closed with the store


def test_read_connections_beyond_a_few_are_closed_once_unused(tmp_path: Path, monkeypatch):
    """After a burst of concurrent reads the pool shrinks back to KEEP_READERS: the connections unused for
    READER_IDLE_SECONDS (here: any age) are closed as a later read ends; each held schema and page cache.
    (Counted as closed connections: SQLite keeps a closed connection's file descriptor until the writer's
    lock on the file goes, so the descriptors say nothing here.)"""
    import contextlib
    import sqlite3

    from cortex.core import state

    def closed(db) -> bool:
        try:
            db.execute("SELECT 1")
            return False
        except sqlite3.ProgrammingError:
            return True

    store = StateStore(tmp_path / "s.db")
    store.apply(2, env("kv.put", {"key": "a", "value": "1"}))
    with contextlib.ExitStack() as burst:  # six reads at once: six connections
        opened = [burst.enter_context(store.reading()) for _ in range(6)]
    assert len(set(map(id, opened))) == 6 and not any(map(closed, opened))  # kept: they may be wanted soon
    monkeypatch.setattr(state, "READER_IDLE_SECONDS", -1.0)
    assert store.query("kv.get", {"key": "a"})["value"] == "1"
    assert sum(map(closed, opened)) == 6 - state.KEEP_READERS
    store.close()
    assert all(map(closed, opened))
