"""A data directory written before the core commands (kv, node, token, cluster, noop) became domains.

The fixture under fixtures/state-before-core-domains was written by that older code from the entries below,
together with what it answered: the results, the events, the queries, the schema, the schema_versions rows,
the digest and a hash of the whole database. Replicas of both ages must agree on every byte of it, so the
test opens the old database with today's code and also replays the entries on a fresh one.

The fixture was written once by the older code (commit 3358862) with `build` and `summary` as below.
`python -m tests.unit.test_state_compat DIR` writes the same into DIR from today's code, for comparing by hand.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import sys
from pathlib import Path

from cortex.core import cluster, domain
from cortex.core.commands import Envelope, encode_batch, validate
from cortex.core.state import StateStore

FIXTURE = Path(__file__).parent / "fixtures" / "state-before-core-domains"
TOKEN_A, TOKEN_B, SECRET_4, SECRET_5 = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def _env(index: int, command_type: str, args: dict, term: int = 1, idem: str = "", checked: bool = True) -> bytes:
    return Envelope(type=command_type, args=validate(command_type, args) if checked else args, id=f"id-{index}",
                    ts=1000.0 + index, term=term, idem=idem or f"id-{index}").encode()


def _node(node_id: str, role: str, token: str = "") -> dict:
    return {"node_id": node_id, "role": role, "grpc_address": f"10.0.0.{node_id[1:]}:7000",
            "raft_address": f"10.0.0.{node_id[1:]}:7001" if role == "server" else "", "token_hash": token}


def entries() -> list[tuple[int, bytes, int | None]]:
    """(log index, entry, term of the log entry) covering every core command and its refusals."""
    def request(node_id: str, secret: str) -> dict:
        args = {**_node(node_id, "worker"), "secret_hash": secret}
        del args["token_hash"]
        return args

    plain = [
        ("cluster.init", {"cluster_id": "c-compat"}),
        ("noop", {}),
        ("token.add", {"token_hash": TOKEN_A, "role": "worker", "expires_at": 5000.0, "uses": 2}),
        ("token.add", {"token_hash": TOKEN_B, "role": "server"}),
        ("node.register", _node("n1", "server")),
        ("node.register", _node("n2", "worker", TOKEN_A)),
        ("node.register", _node("n3", "server", TOKEN_A)),
        ("node.register", _node("n2", "worker", TOKEN_A)),
        ("node.request", request("n4", SECRET_4)),
        ("node.request", request("n5", SECRET_5)),
        ("node.request", request("n5", SECRET_4)),
        ("node.approve", {"node_id": "n4"}),
        ("node.reject", {"node_id": "n5"}),
        ("node.approve", {"node_id": "n5"}),
        ("node.approve", {"node_id": "n1"}),
        ("node.register", _node("n4", "worker")),
        ("node.liveness", {"node_id": "n2", "state": "suspect"}),
        ("node.liveness", {"node_id": "n2", "state": "suspect"}),
        ("kv.put", {"key": "a", "value": "1"}),
        ("kv.cas", {"key": "a", "expected": "1", "value": "2"}),
        ("kv.cas", {"key": "a", "expected": "1", "value": "3"}),
        ("kv.cas", {"key": "fresh", "expected": None, "value": "x"}),
        ("kv.delete", {"key": "missing"}),
        ("kv.put", {"key": "_cortex/generation", "value": "7"}),
        ("token.revoke", {"token_id": TOKEN_B[:8]}),
        ("token.revoke", {"token_id": "0123abcd"}),
        ("member.leave", {"node_id": "n2", "reason": "test"}),
        ("node.register", _node("n2", "worker", TOKEN_A)),
        ("node.remove", {"node_id": "n4"}),
        ("node.remove", {"node_id": "n9"}),
        ("ca.request", {"rot_id": "r1"}),
        ("cluster.init", {"cluster_id": "c-other"}),
    ]
    out: list[tuple[int, bytes, int | None]] = []
    for i, (command_type, args) in enumerate(plain, start=2):
        out.append((i, _env(i, command_type, args), 1))
    n = len(plain) + 2
    out += [
        (n, _env(n, "kv.put", {"key": "b", "value": "once"}, idem="retry"), 1),
        (n + 1, _env(n + 1, "kv.put", {"key": "b", "value": "twice"}, idem="retry"), 1),
        (n + 2, _env(n + 2, "kv.put", {"key": "c", "value": "term 2"}, term=2), 2),
        (n + 3, _env(n + 3, "kv.put", {"key": "c", "value": "deposed"}, term=1), None),
        (n + 4, _env(n + 4, "kv.put", {"key": "c", "value": "forwarded"}, term=2), 3),
        (n + 5, _env(n + 5, "nope.nothing", {}, term=2, checked=False), 2),
        (n + 6, b"not json at all", 2),
        (n + 7, encode_batch([_env(n + 7, "kv.put", {"key": "d", "value": "batched"}, term=2, idem="b1"),
                              _env(n + 7, "kv.delete", {"key": "a"}, term=2, idem="b2"),
                              _env(n + 7, "noop", {}, term=2, idem="b3")]), 2),
        (1000, _env(1000, "kv.put", {"key": "e", "value": "at a thousand"}, term=2), 2),
    ]
    return out


QUERIES = [
    ("kv.get", {"key": "c"}), ("kv.list", {"prefix": ""}), ("nodes", {}), ("tokens", {}), ("cluster", {}),
    ("join_requests", {}), ("join_request.secret", {"node_id": "n5"}),
    ("token.check", {"token_hash": TOKEN_A, "role": "worker", "now": 1100.0}),
    ("token.check", {"token_hash": TOKEN_B, "role": "server", "now": 1100.0}),
    ("digest", {}), ("digest", {"tables": ["kv", "nodes"]}), ("member.list", {}), ("ca.rotation", {}),
]


def build(path: Path) -> dict:
    """Apply `entries` to a new store at `path`; what the store answered, as recorded in the fixture."""
    events: list = []
    store = StateStore(path, listener=lambda kind, data, index: events.append([kind, data, index]))
    results = [store.apply(index, data, term) for index, data, term in entries()]
    answers = [store.query(name, args) for name, args in QUERIES]
    store.close()
    return {"results": results, "events": events, "queries": answers}


def summary(path: Path) -> dict:
    """What a replica's database holds, byte for byte: schema, bookkeeping, digest and the whole content."""
    db = sqlite3.connect(path)
    try:
        dump = "\n".join(db.iterdump())
        return {
            "user_version": db.execute("PRAGMA user_version").fetchone()[0],
            "schema_versions": db.execute("SELECT domain, version FROM schema_versions ORDER BY rowid").fetchall(),
            "schema": db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid").fetchall(),
            "state_tables": list(domain.tables()),
            "digest": cluster.digest(db),
            "dump_sha256": hashlib.sha256(dump.encode()).hexdigest(),
        }
    finally:
        db.close()


def _json(value) -> object:
    return json.loads(json.dumps(value))


def expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


def test_an_old_database_opens_unchanged(tmp_path: Path):
    shutil.copy(FIXTURE / "state.db", tmp_path / "state.db")
    store = StateStore(tmp_path / "state.db")
    want = expected()
    assert store.digest() == want["summary"]["digest"]
    assert [store.query(name, args) for name, args in QUERIES] == want["build"]["queries"]
    store.close()
    assert _json(summary(tmp_path / "state.db")) == want["summary"]


def test_replaying_the_log_gives_the_same_results_events_and_bytes(tmp_path: Path):
    want = expected()
    assert _json(build(tmp_path / "state.db")) == want["build"]
    assert _json(summary(tmp_path / "state.db")) == want["summary"]


def test_old_and_new_replicas_agree_after_more_entries_and_through_snapshots(tmp_path: Path):
    shutil.copy(FIXTURE / "state.db", tmp_path / "old.db")
    build(tmp_path / "new.db")
    old, new = StateStore(tmp_path / "old.db"), StateStore(tmp_path / "new.db")
    more = _env(1001, "kv.put", {"key": "after", "value": "upgrade"}, term=2)
    assert old.apply(1001, more, 2) == new.apply(1001, more, 2)
    assert old.digest() == new.digest()
    old.backup_to(tmp_path / "snapshot.db")
    restored = StateStore(tmp_path / "restored.db")
    assert restored.restore_from(tmp_path / "snapshot.db")
    assert restored.digest() == new.digest()
    for store in (old, new, restored):
        store.close()
    assert summary(tmp_path / "snapshot.db")["dump_sha256"] == summary(tmp_path / "new.db")["dump_sha256"]


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    (target / "state.db").unlink(missing_ok=True)
    built = build(target / "state.db")
    checkpoint = sqlite3.connect(target / "state.db")
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{target / 'state.db'}{suffix}").unlink(missing_ok=True)
    doc = {"build": built, "summary": summary(target / "state.db")}
    (target / "expected.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
