"""Messaging: an inbox between nodes and agents, kept in the replicated state.

Anyone (a person, an assistant over MCP, a plugin on any node) sends a message to an address: a node id
(`w1`), an agent (`agent:reviewer`) or a group (`ops`). Messages live in the `message` state domain, so every
node reads the same inbox and a message survives any single machine; a send is forwarded to the leader like
every write and is idempotent under retries (the caller's key). Applying a send publishes `message.received`
on every node, so a plugin can wake up the recipient.
"""

from __future__ import annotations

import re
import sqlite3
import uuid

from cortex.core import domain
from cortex.core.commands import CommandError, Envelope
from cortex.plugins import Caller, Plugin, Resource, Tool, ToolError, returns, returns_list, write_with_retry

MAX_SUBJECT = 200
MAX_BODY = 64 * 1024
MAX_LIST = 500
ADDRESS_RE = re.compile(r"^[a-z0-9][a-z0-9._:@/-]{0,127}$")
ADDRESS_SCHEMA = {"type": "string", "pattern": ADDRESS_RE.pattern,
                  "description": "a node id (w1), an agent (agent:reviewer) or a group (ops)"}
COLUMNS = ("id", "sender", "recipient", "subject", "body", "reply_to", "created_at", "read_at")


def _address(args: dict, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not ADDRESS_RE.match(value):
        raise CommandError(f"{name} must be an address of 1-128 characters: lowercase letters, digits and . _ : @ / - "
                           "(a node id, agent:NAME or a group)")
    return value


def _v_send(args: dict) -> dict:
    extra = set(args) - {"sender", "recipient", "subject", "body", "reply_to"}
    if extra:
        raise CommandError(f"unknown argument(s) {', '.join(sorted(extra))}")
    subject, body, reply_to = args.get("subject", ""), args.get("body"), args.get("reply_to", "")
    if not isinstance(subject, str) or len(subject) > MAX_SUBJECT:
        raise CommandError(f"subject must be a string of at most {MAX_SUBJECT} characters")
    if not isinstance(body, str) or not body or len(body.encode()) > MAX_BODY:
        raise CommandError(f"body must be a non-empty string of at most {MAX_BODY} bytes")
    if not isinstance(reply_to, str) or len(reply_to) > 64:
        raise CommandError("reply_to must be a message id")
    return {"sender": _address(args, "sender"), "recipient": _address(args, "recipient"), "subject": subject,
            "body": body, "reply_to": reply_to}


def _v_mark_read(args: dict) -> dict:
    ids = args.get("ids")
    if set(args) != {"ids"} or not isinstance(ids, list) or not 1 <= len(ids) <= MAX_LIST \
            or not all(isinstance(i, str) and 1 <= len(i) <= 64 for i in ids):
        raise CommandError(f"message.mark_read takes 'ids': a list of 1-{MAX_LIST} message ids")
    return {"ids": ids}


def _h_send(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    a = env.args
    message_id = env.id  # unique: chosen by the leader
    db.execute("INSERT INTO messages (id, sender, recipient, subject, body, reply_to, created_at, log_index) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (message_id, a["sender"], a["recipient"], a["subject"], a["body"], a["reply_to"], env.ts, index))
    return {"id": message_id, "recipient": a["recipient"], "created_at": env.ts}


def _h_mark_read(db: sqlite3.Connection, index: int, env: Envelope) -> dict:
    marked = []
    for message_id in env.args["ids"]:
        if db.execute("UPDATE messages SET read_at=? WHERE id=? AND read_at IS NULL", (env.ts, message_id)).rowcount:
            marked.append(message_id)
    known = {r[0] for r in db.execute(f"SELECT id FROM messages WHERE id IN ({','.join('?' * len(env.args['ids']))})",
                                      env.args["ids"])}
    return {"marked": marked, "unknown": [i for i in env.args["ids"] if i not in known]}


def _row(r) -> dict:
    doc = dict(zip(COLUMNS, r))
    doc["read"] = doc["read_at"] is not None
    return doc


def _q_list(db: sqlite3.Connection, args: dict) -> list[dict]:
    where, params = [], []
    for key in ("recipient", "sender"):
        if args.get(key):
            where.append(f"{key} = ?")
            params.append(str(args[key]))
    if args.get("unread_only"):
        where.append("read_at IS NULL")
    limit = args.get("limit", 50)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
        raise ValueError(f"limit must be 1..{MAX_LIST}")
    sql = (f"SELECT {', '.join(COLUMNS)} FROM messages" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY log_index DESC LIMIT ?")
    return [_row(r) for r in db.execute(sql, (*params, limit))]


def _q_get(db: sqlite3.Connection, args: dict) -> dict | None:
    r = db.execute(f"SELECT {', '.join(COLUMNS)} FROM messages WHERE id=?", (str(args.get("id", "")),)).fetchone()
    return _row(r) if r else None


def _q_unread(db: sqlite3.Connection, args: dict) -> dict:
    rows = db.execute("SELECT recipient, count(*) FROM messages WHERE read_at IS NULL GROUP BY recipient").fetchall()
    return dict(rows)


DOMAIN = domain.Domain(
    name="message",
    migrations=("""CREATE TABLE messages (
        id TEXT PRIMARY KEY, sender TEXT NOT NULL, recipient TEXT NOT NULL, subject TEXT NOT NULL,
        body TEXT NOT NULL, reply_to TEXT NOT NULL, created_at REAL NOT NULL, read_at REAL,
        log_index INTEGER NOT NULL);
        CREATE INDEX messages_by_recipient ON messages (recipient, read_at);""",),
    tables=("messages",),
    commands={"message.send": domain.Command(_v_send, _h_send),
              "message.mark_read": domain.Command(_v_mark_read, _h_mark_read)},
    queries={"message.list": _q_list, "message.get": _q_get, "message.unread": _q_unread},
    events=lambda env, result: [("message.received", {"id": result["id"], "recipient": env.args["recipient"],
                                                      "sender": env.args["sender"]})]
    if env.type == "message.send" else [],
)

MESSAGE = {"id": "string", "sender": "string", "recipient": "string", "subject": "string", "body": "string",
           "reply_to": "string", "created_at": "number", "read_at": ["number", "null"], "read": "boolean"}
_KEY = {"idempotency_key": {"type": "string", "maxLength": 128,
                            "description": "retrying with the same key sends once"}}


# What each tool answers: its MCP output schema (structuredContent).
_OUT_SEND_MESSAGE = returns({"id": "string", "recipient": "string", "created_at": "number"})
_OUT_CHECK_MESSAGES = returns(
    {
        "recipient": "string",
        "unread": "integer",
        "messages": {"type": "array", "items": returns(MESSAGE)},
        "hint": "string",
    }
)
_OUT_LIST_MESSAGES = returns_list(MESSAGE)
_OUT_GET_MESSAGE = returns(MESSAGE)
_OUT_MARK_MESSAGE_READ = returns(
    {
        "marked": {"type": "array", "items": {"type": "string"}},
        "unknown": {"type": "array", "items": {"type": "string"}},
    }
)


class MessagingPlugin(Plugin):
    name = "messaging"

    def _read(self, query: str, args: dict):
        try:
            return self.ctx.cluster.read(query, args, level="leader")
        except Exception as exc:
            raise ToolError(f"reading messages failed: {exc}; retry, or check cluster_health") from exc

    def _sender(self, args: dict, caller: Caller) -> str:
        return args.get("sender") or f"{caller.identity.split(':')[0]}@{self.ctx.cluster.node_id}".lower()

    def send(self, args: dict, caller: Caller) -> dict:
        command = {"sender": self._sender(args, caller), "recipient": args["recipient"],
                   "subject": args.get("subject", ""), "body": args["body"], "reply_to": args.get("reply_to", "")}
        if command["reply_to"] and self._read("message.get", {"id": command["reply_to"]}) is None:
            raise ToolError(f"reply_to {command['reply_to']!r} is no message; list_messages shows the ids")
        return write_with_retry(self.ctx.cluster, "message.send", command,
                                args.get("idempotency_key") or uuid.uuid4().hex)

    def check(self, args: dict, caller: Caller) -> dict:
        recipient = args.get("recipient") or self.ctx.cluster.node_id
        unread = self._read("message.list", {"recipient": recipient, "unread_only": True,
                                             "limit": args.get("limit", 20)})
        return {"recipient": recipient, "unread": len(unread), "messages": unread,
                "hint": "get_message reads one; mark_message_read clears them" if unread else "inbox is clear"}

    def list(self, args: dict, caller: Caller) -> list[dict]:
        rows = self._read("message.list", {k: args[k] for k in ("recipient", "sender", "unread_only", "limit")
                                           if k in args})
        preview = args.get("full_body", False)
        return rows if preview else [{**r, "body": r["body"][:200]} for r in rows]

    def get(self, args: dict, caller: Caller) -> dict:
        row = self._read("message.get", {"id": args["id"]})
        if row is None:
            raise ToolError(f"no message {args['id']!r}; list_messages or check_messages show the ids")
        return row

    def mark_read(self, args: dict, caller: Caller) -> dict:
        result = write_with_retry(self.ctx.cluster, "message.mark_read", {"ids": args["ids"]},
                                  args.get("idempotency_key") or uuid.uuid4().hex)
        if result.get("unknown") and not result.get("marked"):
            raise ToolError(f"no such message(s): {', '.join(result['unknown'])}; list_messages shows the ids")
        return result

    def tools(self) -> list[Tool]:
        obj = {"type": "object", "additionalProperties": False}
        return [
            Tool("send_message", "Send a message to a node, an agent (agent:NAME) or a group; it is kept in the "
                 "cluster's replicated inbox until read. Returns the message id.", self.send,
                 {**obj, "required": ["recipient", "body"], "properties": {
                     "recipient": ADDRESS_SCHEMA, "body": {"type": "string", "minLength": 1, "maxLength": MAX_BODY},
                     "subject": {"type": "string", "maxLength": MAX_SUBJECT},
                     "sender": {**ADDRESS_SCHEMA, "description": "who it is from (default: the caller @ this node)"},
                     "reply_to": {"type": "string", "maxLength": 64}, **_KEY}},
                 role="operator", read_only=False, idempotent=False, output_schema=_OUT_SEND_MESSAGE),
            Tool("check_messages", "Unread messages for a recipient (default: the node you are connected to), newest "
                 "first. Does not mark them read.", self.check,
                 {**obj, "properties": {"recipient": ADDRESS_SCHEMA,
                                        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST}}},
                 output_schema=_OUT_CHECK_MESSAGES),
            Tool("list_messages", "List messages, newest first, filtered by recipient, sender or unread; bodies are "
                 "cut to 200 characters unless full_body is true.", self.list,
                 {**obj, "properties": {"recipient": ADDRESS_SCHEMA, "sender": ADDRESS_SCHEMA,
                                        "unread_only": {"type": "boolean"}, "full_body": {"type": "boolean"},
                                        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST}}},
                 output_schema=_OUT_LIST_MESSAGES),
            Tool("get_message", "Read one message by id, body in full (mark_message_read marks it read).", self.get,
                 {**obj, "required": ["id"], "properties": {"id": {"type": "string", "minLength": 1, "maxLength": 64}}},
                 output_schema=_OUT_GET_MESSAGE),
            Tool("mark_message_read", "Mark messages read by id.", self.mark_read,
                 {**obj, "required": ["ids"], "properties": {
                     "ids": {"type": "array", "minItems": 1, "maxItems": MAX_LIST,
                             "items": {"type": "string", "minLength": 1, "maxLength": 64}}, **_KEY}},
                 role="operator", read_only=False, idempotent=True, output_schema=_OUT_MARK_MESSAGE_READ),
        ]

    def resources(self) -> list[Resource]:
        return [Resource("cluster://messages", "messages", "Unread message counts per recipient",
                         lambda: self._read("message.unread", {}))]
