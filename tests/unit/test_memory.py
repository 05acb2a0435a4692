"""The memory domain and tools on a real StateStore: authorizers, determinism, search, bad input, whereami,
backups to a directory. The multi-process cluster tests are in test_memory_cluster.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cortex.core.commands import CommandError, Envelope, validate
from cortex.core.state import StateStore
from cortex.memory import backup, sqlguard
from cortex.memory.schema import SHARED_MIGRATIONS
from cortex.plugins import ToolError
from tests.support.memory_harness import OPERATOR, READER, start_host
from tests.support.wait import wait_until


@pytest.fixture
def host(tmp_path: Path):
    host, cluster = start_host(tmp_path)
    yield host
    host.stop()


def call(host, tool: str, **args):
    return host.call_tool(tool, args, OPERATOR)


def digest(host) -> str:
    return host.plugins["memory"].plugin.ctx.cluster.read("memory.digest")["digest"]


def test_threads_thoughts_chain_and_context_round_trip(host):
    first = call(host, "memory_log_thought", new_thread="Raft snapshots", project="cortex", type="idea",
                 content="compress snapshots with zstd", metadata={"files": ["state.py"]})
    thread = first["thread_id"]
    second = call(host, "memory_log_thought", thread_id=thread, type="decision", content="use gzip: stdlib")
    assert first["started_thread"] and first["seq"] == 1 and first["parent_id"] is None
    assert second["seq"] == 2 and second["parent_id"] == first["thought_id"]
    threads = call(host, "memory_list_threads", status="active")
    assert [(t["id"], t["title"], t["thoughts"], t["project"]) for t in threads] == [(thread, "Raft snapshots", 2, "cortex")]
    assert threads[0]["last_thought"]["content"] == "use gzip: stdlib"
    call(host, "memory_set_context", key="pr/42", value={"url": "https://example.test/pr/42", "state": "open"},
         category="pr", label="snapshot PR", pinned=True)
    call(host, "memory_set_context", key="pr/42", value_json='{"state": "merged"}', category="pr")
    (entry,) = call(host, "memory_get_context", key="pr/42")
    assert entry["value"] == {"state": "merged"} and entry["version"] == 2 and entry["category"] == "pr"
    stats = call(host, "memory_stats")["cluster"]
    assert stats["tables"]["memory_thoughts"]["rows"] == 2 and stats["tables"]["memory_threads"]["rows"] == 1
    assert stats["tables"]["memory_context"] == {"rows": 1, "by_tier": {"internal": 1}}
    assert stats["search_index_rows"] == 4  # one thread, two thoughts, one context entry


def test_local_tier_never_reaches_the_replicated_store(host):
    call(host, "memory_set_context", key="home-wifi", value="on the fridge", category="machine", tier="local")
    local = call(host, "memory_log_thought", new_thread="private notes", content="only here", tier="local")
    call(host, "memory_log_thought", thread_id=local["thread_id"], content="still only here")
    cluster = host.plugins["memory"].plugin.ctx.cluster
    assert cluster.writes == 0  # nothing was replicated
    assert cluster.read("memory.stats")["tables"]["memory_context"]["rows"] == 0
    assert [e["tier"] for e in call(host, "memory_get_context", key="home-wifi")] == ["local"]
    assert call(host, "memory_list_threads")[0]["thoughts"] == 2
    assert call(host, "memory_search", query="fridge")[0]["ref"] == "home-wifi"
    with pytest.raises(CommandError, match="tier 'local' rows never leave their node"):
        validate("memory.context_set", {"key": "k", "value": "1", "tier": "local"})


def test_search_is_ranked(host):
    thread = call(host, "memory_log_thought", new_thread="misc", content="lunch was good")["thread_id"]
    call(host, "memory_log_thought", thread_id=thread, content="the raft leader stepped down; raft logs show "
         "a raft term change after the raft election timeout")
    call(host, "memory_log_thought", thread_id=thread, content="looked at raft once")
    call(host, "memory_log_thought", thread_id=thread, content="a long note about many other things: gardening, "
         "cooking, cycling, reading, music, films, travel and finally a single mention of raft at the end")
    hits = call(host, "memory_search", query="raft")
    assert [h["kind"] for h in hits] == ["thought"] * 3
    assert hits[0]["snippet"].count("[raft]") >= 3
    assert hits[1]["snippet"].startswith("looked at [raft]")
    assert hits[0]["score"] > hits[1]["score"] > hits[2]["score"]
    assert hits[0]["thread_title"] == "misc"
    # not FTS syntax: taken as plain words instead of failing
    assert "stepped" in call(host, "memory_search", query='raft "leader')[0]["snippet"]  # unbalanced quote
    assert call(host, "memory_search", query="raft-leader")[0]["snippet"].startswith("the [raft leader]")


@pytest.mark.parametrize("sql", [
    "DELETE FROM memory_threads",
    "WITH doomed AS (SELECT id FROM memory_threads) DELETE FROM memory_threads WHERE id IN doomed",
    "UPDATE memory_context SET value = '1'",
    "INSERT INTO memory_context (key) VALUES ('x')",
    "PRAGMA writable_schema = 1",
    "PRAGMA query_only = 0",
    "ATTACH DATABASE '/tmp/evil.db' AS evil",
    "VACUUM INTO '/tmp/copy.db'",
    "SELECT load_extension('/tmp/evil.so')",
    "DROP TABLE memory_threads",
    "CREATE TABLE memory_extra (x)",
    "SELECT * FROM kv",
    "SELECT token_hash FROM join_tokens",
    "SELECT 1; DELETE FROM memory_threads",
    "REPLACE INTO memory_network (name, tier, created_at, updated_at) VALUES ('x', 'public', 0, 0)",
    "EXPLAIN DELETE FROM memory_thoughts",
    "SELECT * FROM pragma_table_info('memory_threads')",
])
def test_memory_query_refuses_everything_but_reading_memory(host, sql):
    call(host, "memory_log_thought", new_thread="keep me", content="precious")
    before = digest(host)
    with pytest.raises(ToolError, match="refused|one statement|cannot VACUUM"):
        host.call_tool("memory_query", {"sql": sql}, READER)
    assert digest(host) == before
    assert not Path("/tmp/evil.db").exists() and not Path("/tmp/copy.db").exists()


def test_memory_query_reads_with_a_row_limit_and_a_time_limit(host):
    for n in range(5):
        call(host, "memory_set_context", key=f"k{n}", value=n)
    result = host.call_tool("memory_query", {"sql": "SELECT key, json_extract(value, '$') AS v FROM memory_context "
                                             "WHERE key LIKE ? ORDER BY key", "params": ["k%"], "limit": 3}, READER)
    assert result["columns"] == ["key", "v"] and result["rows"] == [["k0", 0], ["k1", 1], ["k2", 2]]
    assert result["truncated"]
    fts = host.call_tool("memory_query", {"sql": "SELECT ref FROM memory_fts WHERE memory_fts MATCH 'k3'"}, READER)
    assert fts["rows"] == [["k3"]]
    with pytest.raises(ToolError, match="ran longer than"):
        host.call_tool("memory_query", {"sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                                               "SELECT count(*) FROM c"}, READER)
    with pytest.raises(ToolError, match='SQL error: near "SELEC": syntax error'):
        host.call_tool("memory_query", {"sql": "SELEC 1"}, READER)


@pytest.mark.parametrize("sql, reason", [
    ("INSERT INTO memory_network (name, notes, tier, created_at, updated_at) VALUES ('a', random(), 'public', 0, 0)",
     "random()"),
    ("UPDATE memory_context SET value = hex(randomblob(8))", "randomblob()"),
    ("UPDATE memory_threads SET thoughts = changes()", "changes()"),
    ("UPDATE memory_threads SET thoughts = last_insert_rowid()", "last_insert_rowid()"),
    ("UPDATE memory_projects SET description = sqlite_version()", "sqlite_version()"),
    ("DELETE FROM kv", "no such table: kv"),  # checked against the memory schema alone
    ("UPDATE memory_threads SET title = (SELECT value FROM kv LIMIT 1)", "no such table: kv"),
    ("INSERT INTO memory_fts_data VALUES (99, x'00')", "writing 'memory_fts_data'"),
    ("INSERT INTO memory_fts (kind, ref, title, body) VALUES ('x', 'y', 'z', 'w')", "writing 'memory_fts'"),
    ("PRAGMA foreign_keys = OFF", "pragma"),
    ("ATTACH DATABASE ':memory:' AS other", "attach"),
    ("SELECT * FROM memory_threads", "must INSERT, UPDATE or DELETE"),
    ("DELETE FROM memory_threads; DELETE FROM memory_context", "one statement"),
    ("DELET FROM memory_threads", "syntax error"),
])
def test_raw_writes_refuse_nondeterminism_before_replication(host, sql, reason):
    call(host, "memory_log_thought", new_thread="keep me", content="precious")
    cluster = host.plugins["memory"].plugin.ctx.cluster
    before, writes = digest(host), cluster.writes
    with pytest.raises(ToolError) as caught:
        call(host, "memory_write", kind="sql", sql=sql)
    assert reason in str(caught.value)
    assert cluster.writes == writes  # refused at validation: nothing was proposed
    assert digest(host) == before


def test_time_functions_are_bound_to_the_envelope_timestamp_on_every_replica(tmp_path: Path):
    sql = ("INSERT INTO memory_network (name, notes, tier, created_at, updated_at) VALUES "
           "('box', datetime('now') || ' ' || strftime('%s', 'now') || ' ' || CURRENT_TIMESTAMP || ' ' || "
           "date('now', '+1 day'), 'internal', julianday('now'), unixepoch())")
    env = Envelope(type="memory.sql", args=validate("memory.sql", {"sql": sql}), id="a" * 32, ts=1700000000.0,
                   term=1, idem="x")
    replicas = [StateStore(tmp_path / f"r{i}.db") for i in range(2)]
    for n, replica in enumerate(replicas):
        time.sleep(1.1 * n)  # the replicas apply at different wall-clock times
        assert replica.apply(1, env.encode())["changed"] == 1
    row = replicas[0].reader().execute("SELECT notes, created_at, updated_at FROM memory_network").fetchone()
    assert row == ("2023-11-14 22:13:20 1700000000 2023-11-14 22:13:20 2023-11-15", 2460263.425925926, 1700000000)
    assert replicas[0].digest() == replicas[1].digest()
    localtime = Envelope(type="memory.sql", args=validate("memory.sql", {
        "sql": "UPDATE memory_network SET notes = datetime('now', 'localtime')"}), id="b" * 32, ts=1.0, term=1, idem="y")
    assert "depends on the node's time zone" in replicas[0].apply(2, localtime.encode())["error"]
    # outside a replicated write the time functions still work, and 'now' is refused rather than guessed
    db = replicas[0].reader()
    assert db.execute("SELECT datetime(0, 'unixepoch')").fetchone()[0] == "1970-01-01 00:00:00"


def test_write_sql_checker_compiles_against_the_memory_schema():
    sqlguard.check_write("UPDATE memory_threads SET status = 'paused' WHERE id = :id", {"id": "th-1"},
                         SHARED_MIGRATIONS)
    with pytest.raises(sqlguard.SQLRefused, match="no such table: memory_nope"):
        sqlguard.check_write("DELETE FROM memory_nope", None, SHARED_MIGRATIONS)


def test_bad_input_gets_clear_errors_and_changes_nothing(host):
    thread = call(host, "memory_log_thought", new_thread="t", content="c")["thread_id"]
    before = digest(host)
    cases = [
        ("memory_set_context", {"key": "k", "value_json": "{not json"}, "value_json is not valid JSON"),
        ("memory_set_context", {"key": "k", "value": "x" * 70_000}, "the limit is 65536"),
        ("memory_set_context", {"key": "k"}, "exactly one of value"),
        ("memory_log_thought", {"thread_id": "th-nope", "content": "c"}, "no thread 'th-nope'"),
        ("memory_handoff", {"thread_id": "th-nope", "summary": "s"}, "no thread 'th-nope'"),
        ("memory_log_thought", {"thread_id": thread, "content": "c", "type": "musing"}, "is not one of"),
        ("memory_log_thought", {"thread_id": thread, "content": "y" * 70_000}, "the limit is 65536"),
        ("memory_log_thought", {"content": "orphan"}, "give thread_id, or new_thread"),
        ("memory_write", {"kind": "thought", "data": {"thread_id": thread, "content": "c", "metadata": "{bad"}},
         "argument 'metadata' is not valid JSON"),
        ("memory_write", {"kind": "thread_update", "data": {"thread_id": thread, "status": "done"}},
         "status' must be one of active, paused, completed, abandoned"),
        ("memory_write", {"kind": "sql", "sql": "UPDATE memory_threads SET nope = 1"}, "no such column: nope"),
        ("memory_write", {"kind": "sql", "sql": "UPDATE memory_threads SET status = 'weird'"},
         "CHECK constraint failed"),
        ("memory_write", {"kind": "context_delete", "data": {"key": "absent"}}, "no context entry 'absent'"),
        ("memory_write", {"kind": "sql", "sql": "DELETE FROM memory_threads WHERE id = ?", "params": [{"a": 1}]},
         "must be a string, number or null"),
    ]
    for tool, args, message in cases:
        with pytest.raises(ToolError, match=message.replace("(", r"\(")):
            host.call_tool(tool, args, OPERATOR)
    assert digest(host) == before


def test_credentials_are_flagged(host):
    warned = call(host, "memory_set_context", key="aws", value="AKIAIOSFODNN7EXAMPLE")
    assert "an AWS access key id" in warned["warnings"][0]
    assert call(host, "memory_set_context", key="db", value={"host": "db1", "password": "hunter2hunter2"})["warnings"]
    assert call(host, "memory_set_context", key="note", value="the deploy runs at nine")["warnings"] == []


def test_whereami_after_a_handoff(host, tmp_path: Path):
    plugin = host.plugins["memory"].plugin
    thread = call(host, "memory_log_thought", new_thread="Backups to S3", project="cortex", type="progress",
                  content="wrote the S3 target")["thread_id"]
    call(host, "memory_log_thought", new_thread="Fix flaky test", content="seen twice on CI")
    call(host, "memory_set_context", key="machine/laptop", value="on battery", category="machine", pinned=True)
    result = call(host, "memory_handoff", thread_id=thread, summary="S3 target done; restore is next",
                  next_steps=["write the restore command", "test against moto"], to="desktop")
    assert result["status"] == "paused"
    text = plugin.whereami_path.read_text()
    active, paused = text.split("## Paused threads (handed off)")
    assert "### Fix flaky test" in active and "seen twice on CI" in active and "Backups to S3" not in active
    assert f"### Backups to S3 (`{thread}`)" in paused
    assert "Handed off to desktop" in paused and "S3 target done; restore is next" in paused
    assert "- [ ] write the restore command\n- [ ] test against moto" in paused
    assert "## Pinned context\n\n- `machine/laptop` (machine): on battery" in text
    assert call(host, "memory_whereami")["markdown"] == text


def test_whereami_is_regenerated_after_changes_debounced(host):
    plugin = host.plugins["memory"].plugin
    for n in range(5):
        call(host, "memory_set_context", key=f"burst/{n}", value=n)
    wait_until(lambda: plugin.whereami_path.exists() and "burst/4" in plugin.whereami_path.read_text(), 5,
               "whereami.md regenerated after the burst", interval=0.02)
    assert "`burst/4` (fact" in plugin.whereami_path.read_text()


def test_backup_wipe_restore_gives_identical_content(tmp_path: Path):
    host, cluster = start_host(tmp_path, {"backup": {"enabled": False}})
    try:
        thread = call(host, "memory_log_thought", new_thread="t", content="first", tier="public")["thread_id"]
        for n in range(40):
            call(host, "memory_log_thought", thread_id=thread, content=f"thought {n} " + "x" * 2000)
        call(host, "memory_set_context", key="secret-ish", value={"k": 1}, tier="internal")
        call(host, "memory_write", kind="network", data=dict(name="nas", ip="10.0.0.5", mac="AA:BB:CC:00:11:22"))
        call(host, "memory_write", kind="project", data={"name": "cortex", "description": "the cluster"})
        call(host, "memory_set_context", key="here-only", value=1, tier="local")
        original = digest(host)
        target = backup.DirTarget(tmp_path / "backups")
        made = backup.make_backup(cluster, target)
        assert made["content_digest"] == original and made["rows"]["memory_thoughts"] == 41
        assert backup.make_backup(cluster, target) is None  # unchanged: skipped
        public = backup.make_backup(cluster, target, public_only=True)
        assert public["rows"]["memory_context"] == 0 and public["tiers"] == ["public"]
        for table in ("memory_thoughts", "memory_threads", "memory_context", "memory_network", "memory_projects"):
            call(host, "memory_write", kind="sql", sql=f"DELETE FROM {table}")
        assert digest(host) != original
        path, manifest = backup.fetch(target, made["name"], tmp_path)
        assert len(list(backup.chunks(path, limit=16_000))) > 3  # several chunks: staging is exercised
        result = backup.restore(lambda t, a, k: cluster.write(t, a, k), path, manifest)
        assert digest(host) == original and result["rows"]["memory_thoughts"] == 41
        assert cluster.read("memory.stats")["search_index_rows"] == 45  # the search index follows the rows
        assert call(host, "memory_search", query="nas")[0]["ref"] == "nas"
        assert [e["key"] for e in call(host, "memory_get_context", key="here-only")] == ["here-only"]
        staged = cluster.store.reader().execute("SELECT count(*) FROM memory_restore_chunks").fetchone()[0]
        assert staged == 0  # the commit cleared its staging rows
        # a damaged file is refused before anything is sent
        data = bytearray((tmp_path / "backups" / made["name"]).read_bytes())
        data[-20] ^= 0xFF
        (tmp_path / "backups" / made["name"]).write_bytes(bytes(data))
        with pytest.raises(backup.BackupError, match="checksum .* the file is damaged"):
            backup.fetch(target, made["name"], tmp_path)
        # a commit whose chunks do not add up changes nothing
        before = digest(host)
        with pytest.raises(Exception, match="digest"):
            cluster.write("memory.restore_commit", {"restore_id": "r1", "chunks": 0, "digest": "0" * 64})
        assert digest(host) == before
    finally:
        host.stop()


def test_retried_writes_with_an_idempotency_key_apply_once(host):
    thread = call(host, "memory_log_thought", new_thread="t", content="c")["thread_id"]
    first = call(host, "memory_log_thought", thread_id=thread, content="once", idempotency_key="k-1")
    again = call(host, "memory_log_thought", thread_id=thread, content="once", idempotency_key="k-1")
    assert again["thought_id"] == first["thought_id"]
    assert call(host, "memory_list_threads")[0]["thoughts"] == 2


@pytest.mark.parametrize(("sql", "words"), [
    ("DELETE FROM memory_threads", "a DELETE from memory_threads: memory_query runs read-only queries only"),
    ("UPDATE memory_threads SET status = 'x'", "an UPDATE of memory_threads: memory_query runs read-only"),
    ("INSERT INTO memory_threads (id) VALUES ('x')", "an INSERT into memory_threads: memory_query runs read-only"),
])
def test_memory_query_names_a_change_in_words(host, sql, words):
    """A change sent to memory_query is named as what it is (SQLite's authorizer codes overlap the sqlite3
    module's SQLITE_LIMIT_* numbers: a DELETE was once reported as limit_variable_number)."""
    with pytest.raises(ToolError) as refused:
        host.call_tool("memory_query", {"sql": sql}, READER)
    assert words in str(refused.value) and "limit_" not in str(refused.value)
    assert "memory_write" in str(refused.value)
