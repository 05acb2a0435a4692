"""Caller-supplied SQL, made safe by SQLite itself rather than by reading the statement's text.

Two guards, both enforced through the authorizer SQLite calls while it compiles a statement (so tricks like
`WITH x AS (...) DELETE ...`, `EXPLAIN`, trigger bodies or table-valued pragmas are seen for what they do):

- `run_query`: read-only SQL on a connection that is itself read-only. Only SELECT, reads of memory tables
  and harmless functions compile; a progress handler bounds the run time and a row limit the result.
- `check_write` / `run_write`: one INSERT, UPDATE or DELETE on the memory content tables, for the
  replicated state machine. Functions whose result differs between replicas (`random()`,
  `changes()`, `last_insert_rowid()`, `sqlite_version()`, ...) are refused when the statement compiles,
  which the leader does before proposing. Date and time functions are kept but bound: on the applying
  connection `'now'` (and `CURRENT_TIMESTAMP` & co.) means the envelope's timestamp, and the time-zone
  dependent `localtime`/`utc` modifiers are refused, so every replica computes the same value.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cortex.memory.schema import CONTENT_TABLES, FTS_TABLE, MAX_SQL_BYTES

# Functions whose value depends on the connection, the binary or chance: never in replicated SQL.
NONDETERMINISTIC = frozenset({
    "random", "randomblob", "changes", "total_changes", "last_insert_rowid", "sqlite_version",
    "sqlite_source_id", "sqlite_compileoption_get", "sqlite_compileoption_used", "load_extension",
    "sqlite_offset", "fts3_tokenizer",
})
# Never callable from caller SQL, even in read-only queries.
FORBIDDEN_ANYWHERE = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})
TIME_FUNCTIONS = ("date", "time", "datetime", "julianday", "unixepoch", "strftime")
TIME_KEYWORDS = ("current_timestamp", "current_date", "current_time")
TZ_MODIFIERS = ("localtime", "utc")

# The authorizer's action codes by name. Only these: the sqlite3 module's other SQLITE_* constants (result
# codes, SQLITE_LIMIT_*) reuse the same small numbers, and a DELETE must not be named limit_variable_number.
_ACTIONS = ("CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER CREATE_TEMP_VIEW "
            "CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE DROP_TEMP_INDEX DROP_TEMP_TABLE "
            "DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW INSERT PRAGMA READ SELECT TRANSACTION UPDATE "
            "ATTACH DETACH ALTER_TABLE REINDEX ANALYZE CREATE_VTABLE DROP_VTABLE FUNCTION SAVEPOINT RECURSIVE")
_ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{name}"): f"SQLITE_{name}" for name in _ACTIONS.split()
                 if hasattr(sqlite3, f"SQLITE_{name}")}
_CHANGES = {sqlite3.SQLITE_INSERT: "an INSERT into", sqlite3.SQLITE_UPDATE: "an UPDATE of",
            sqlite3.SQLITE_DELETE: "a DELETE from"}


class SQLRefused(ValueError):
    """The statement is not allowed here; the message says why and what to use instead."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[list]
    truncated: bool


_SCHEMA_COLUMNS = ("type", "name", "tbl_name", "rootpage", "sql")


def _readable(table: str | None) -> bool:
    # FTS5 reads its own shadow tables (memory_fts_data, ...) through the same connection.
    return bool(table) and (table.startswith("memory_") or table in ("sqlite_master", "sqlite_schema"))


class _Authorizer:
    """Records the first refusal, so the error names what was refused instead of 'not authorized'."""

    def __init__(self, decide: Callable[[int, str | None, str | None, str | None], str]):
        self._decide = decide
        self.refusal = ""
        self.writes = 0  # INSERT/UPDATE/DELETE actions outside triggers

    def __call__(self, action: int, arg1, arg2, db_name, trigger) -> int:
        if action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE) and not trigger:
            self.writes += 1
        if action == sqlite3.SQLITE_READ and db_name is None:
            return sqlite3.SQLITE_OK  # a common table expression's rows, not a table (its body is checked)
        problem = self._decide(action, arg1, arg2, trigger)
        if problem:
            self.refusal = self.refusal or problem
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK


def _loading_schema(action: int, arg1, arg2) -> bool:
    return action == sqlite3.SQLITE_UPDATE and arg1 in ("sqlite_master", "sqlite_schema") and arg2 in _SCHEMA_COLUMNS


def _read_decision(action: int, arg1, arg2, trigger) -> str:
    if action == sqlite3.SQLITE_SELECT or action == sqlite3.SQLITE_RECURSIVE:
        return ""
    if action == sqlite3.SQLITE_READ:
        return "" if _readable(arg1) else f"reading {arg1!r} (memory_query reads only the memory_* tables)"
    if action == sqlite3.SQLITE_FUNCTION:
        return f"the function {arg2}()" if arg2 in FORBIDDEN_ANYWHERE else ""
    if action == sqlite3.SQLITE_PRAGMA and arg1 == "data_version" and arg2 is None:
        return ""  # FTS5 asks this itself before a MATCH
    if _loading_schema(action, arg1, arg2):
        return ""  # SQLite loading the schema into a fresh connection (which is read-only anyway)
    if action in _CHANGES:
        return (f"{_CHANGES[action]} {arg1}: memory_query runs read-only queries only (SELECT or WITH ... "
                "SELECT); change memory with memory_write or the typed tools (memory_log_thought, ...)")
    what = _ACTION_NAMES.get(action, str(action)).removeprefix("SQLITE_").lower()
    target = f" {arg1}" if arg1 else ""
    return f"{what}{target} (memory_query is read-only: use memory_write or the typed tools to change memory)"


def _write_decision(action: int, arg1, arg2, trigger, applying: bool = False) -> str:
    if _loading_schema(action, arg1, arg2):
        # SQLite re-reads the schema after another domain's migration (ALTER TABLE ... ADD COLUMN) changed it;
        # a statement of the caller's cannot write sqlite_master (SQLite refuses without writable_schema, and
        # PRAGMA is refused here)
        return ""
    if action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE):
        if arg1 in CONTENT_TABLES:
            return ""
        if trigger and arg1 == FTS_TABLE:
            return ""  # the search index, maintained by our own triggers
        if applying and (arg1 or "").startswith(FTS_TABLE + "_"):
            # FTS5 updates its shadow tables with statements of its own while the (already checked) statement
            # runs; a caller's statement naming them was refused when it was checked.
            return ""
        return f"writing {arg1!r} (raw SQL may change only {', '.join(CONTENT_TABLES)})"
    if action == sqlite3.SQLITE_READ:
        return "" if _readable(arg1) else f"reading {arg1!r} (raw SQL sees only the memory_* tables)"
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
        return ""
    if action == sqlite3.SQLITE_FUNCTION:
        if arg2 in NONDETERMINISTIC:
            return (f"the function {arg2}() (its value differs between replicas; compute the value before "
                    f"writing and pass it as a parameter)")
        return ""
    if action == sqlite3.SQLITE_PRAGMA and arg1 == "data_version" and arg2 is None and trigger is None:
        return ""
    what = _ACTION_NAMES.get(action, str(action)).removeprefix("SQLITE_").lower()
    return f"{what}{' ' + arg1 if arg1 else ''} (raw SQL in memory_write is one INSERT, UPDATE or DELETE)"


def _check_text(sql: str) -> str:
    if not isinstance(sql, str) or not sql.strip():
        raise SQLRefused("sql must be a non-empty string")
    if len(sql.encode()) > MAX_SQL_BYTES:
        raise SQLRefused(f"sql is {len(sql.encode())} bytes; the limit is {MAX_SQL_BYTES}")
    return sql


def _params(params: Sequence | dict | None) -> Sequence | dict:
    if params is None:
        return ()
    if isinstance(params, dict):
        values = params.values()
    elif isinstance(params, list | tuple):
        values = params
    else:
        raise SQLRefused("params must be a list (for ?) or an object (for :name)")
    for value in values:
        if not (value is None or isinstance(value, str | int | float)) or isinstance(value, bool):
            raise SQLRefused(f"parameter {value!r} must be a string, number or null")
    return params


def _sqlite_error(exc: sqlite3.Error, guard: _Authorizer) -> SQLRefused:
    if guard.refusal:
        return SQLRefused(f"refused: {guard.refusal}")
    if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in str(exc):
        return SQLRefused("send one statement at a time (no ';'-separated scripts)")
    return SQLRefused(f"SQL error: {exc}")


# --- read-only queries ------------------------------------------------------------------------------------

def run_query(db: sqlite3.Connection, sql: str, params=None, limit: int = 200, seconds: float = 2.0,
              max_bytes: int = 1024 * 1024) -> QueryResult:
    """Run one read-only statement under the read authorizer; at most `limit` rows, `seconds` of work."""
    _check_text(sql)
    params = _params(params)
    guard = _Authorizer(_read_decision)
    deadline = time.monotonic() + seconds
    db.set_authorizer(guard)
    db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
    try:
        cursor = db.execute(sql, params)
        columns = [d[0] for d in cursor.description or ()]
        rows, size = [], 0
        for row in cursor:
            if len(rows) >= limit:
                return QueryResult(columns, rows, truncated=True)
            size += sum(len(v) if isinstance(v, str | bytes) else 8 for v in row)
            if size > max_bytes:
                return QueryResult(columns, rows, truncated=True)
            rows.append([v.hex() if isinstance(v, bytes) else v for v in row])
        return QueryResult(columns, rows, truncated=False)
    except sqlite3.OperationalError as exc:
        if str(exc) == "interrupted":
            raise SQLRefused(f"the query ran longer than {seconds:g}s; add a LIMIT or a narrower WHERE") from None
        raise _sqlite_error(exc, guard) from None
    except sqlite3.Error as exc:
        raise _sqlite_error(exc, guard) from None
    finally:
        db.set_progress_handler(None, 0)
        db.set_authorizer(None)


# --- deterministic writes -----------------------------------------------------------------------------------

_bound = threading.local()  # .ts: the envelope timestamp while a raw write runs on this thread
_reference = threading.local()  # .db: a plain in-memory connection with SQLite's own date functions


def _builtin(name: str, args: tuple):
    db = getattr(_reference, "db", None)
    if db is None:
        db = _reference.db = sqlite3.connect(":memory:", check_same_thread=False)
    marks = ", ".join("?" for _ in args)
    return db.execute(f"SELECT {name}({marks})", args).fetchone()[0]


def _now() -> float:
    ts = getattr(_bound, "ts", None)
    if ts is None:
        raise sqlite3.OperationalError("'now' has no deterministic value outside a replicated write")
    return ts


def _bind_time_value(value_index: int, args: tuple) -> tuple:
    """Replace a 'now' time value by the envelope timestamp; refuse time-zone dependent modifiers."""
    args = list(args)
    for modifier in args[value_index + 1:]:
        if isinstance(modifier, str) and modifier.strip().lower() in TZ_MODIFIERS:
            raise sqlite3.OperationalError(f"the {modifier.strip()!r} modifier depends on the node's time zone")
    if len(args) <= value_index:
        args.append("now")
    value = args[value_index]
    if isinstance(value, str) and value.strip().lower() == "now":
        args[value_index:value_index + 1] = [_now(), "unixepoch"]
    return tuple(args)


def _time_function(name: str) -> Callable:
    value_index = 1 if name == "strftime" else 0

    def bound(*args):
        try:
            if name == "strftime" and not args:
                raise sqlite3.OperationalError("strftime() needs a format")
            return _builtin(name, _bind_time_value(value_index, args))
        except sqlite3.Error as exc:
            _bound.problem = f"{name}(): {exc}"  # SQLite reports only "user-defined function raised exception"
            raise
    return bound


_KEYWORD_FORMATS = {"current_timestamp": "datetime", "current_date": "date", "current_time": "time"}


def _install_time_binding(db: sqlite3.Connection) -> None:
    # Registered on the applying connection; outside a raw write they behave as SQLite's own functions except
    # that 'now' is an error, which no deterministic apply may use anyway.
    for name in TIME_FUNCTIONS:
        db.create_function(name, -1, _time_function(name), deterministic=True)
    for keyword, function in _KEYWORD_FORMATS.items():
        db.create_function(keyword, 0, _time_function(function), deterministic=True)


_checker = threading.local()


def _checker_db(migrations: Sequence[str]) -> sqlite3.Connection:
    """An empty in-memory copy of the memory schema: statements compile against it before replication."""
    db = getattr(_checker, "db", None)
    if db is None:
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        for script in migrations:
            db.executescript(script)
        _install_time_binding(db)
        _checker.db = db
    return db


def check_write(sql: str, params, migrations: Sequence[str]) -> None:
    """Compile the statement against the schema under the write authorizer; raise SQLRefused if refused."""
    _check_text(sql)
    params = _params(params)
    db = _checker_db(migrations)
    guard = _Authorizer(_write_decision)
    db.set_authorizer(guard)
    try:
        # EXPLAIN compiles the statement (and so runs the authorizer over everything it would do) without
        # executing it; the checker's database is empty anyway.
        db.execute("EXPLAIN " + sql, params).fetchall()
    except sqlite3.Error as exc:
        raise _sqlite_error(exc, guard) from None
    finally:
        db.set_authorizer(None)
    if not guard.writes:
        raise SQLRefused("raw SQL in memory_write must INSERT, UPDATE or DELETE; read with memory_query")


def run_write(db: sqlite3.Connection, sql: str, params, ts: float) -> int:
    """Execute a checked statement inside the caller's transaction with 'now' bound to `ts`; rows changed."""
    params = _params(params)
    _install_time_binding(db)
    guard = _Authorizer(lambda action, arg1, arg2, trigger: _write_decision(action, arg1, arg2, trigger, True))
    _bound.ts, _bound.problem = ts, ""
    db.set_authorizer(guard)
    try:
        return db.execute(sql, params).rowcount
    except sqlite3.Error as exc:
        if _bound.problem:
            raise SQLRefused(f"refused: {_bound.problem}") from None
        raise _sqlite_error(exc, guard) from None
    finally:
        db.set_authorizer(None)
        _bound.ts = None
