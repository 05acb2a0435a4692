"""The `access` domain (plugin policies, the audit log) applied to a real StateStore, and the checks a node's
plugin host makes with it (plugins/audit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.core.commands import CommandError, Envelope, validate
from cortex.core.state import StateStore
from cortex.plugins import Caller
from cortex.plugins import access as access_domain
from cortex.plugins.audit import digest, rule_refusal


def apply(store: StateStore, index: int, command_type: str, args: dict, ts: float = 1000.0) -> dict:
    env = Envelope(type=command_type, args=validate(command_type, args), id=f"{index:032x}", ts=ts, term=1,
                   idem=f"k{index}")
    return store.apply(index, env.encode())


RECORD = {"ts": 5.0, "node": "n1", "caller": "admin-socket", "role": "admin", "tool": "kv_put",
          "plugin": "cluster-tools", "digest": "ab12", "outcome": "ok"}


def test_policies_and_the_audit_log_are_replicated_state(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    rule = {"roles": ["admin", "operator", "admin"], "callers": ["mcp-http-token"]}
    set_ = apply(store, 1, "access.policy_set", {"plugin": "cluster-tools", "change": rule, "by": "cli:me"})
    assert set_ == {"plugin": "cluster-tools", "read": None, "changed": True,
                    "change": {"roles": ["operator", "admin"], "callers": ["mcp-http-token"]}}
    again = apply(store, 2, "access.policy_set", {"plugin": "cluster-tools", "change": rule, "by": "cli:me"})
    assert again["changed"] is False
    (policy,) = store.query("access.policies", {})
    assert policy["change"]["callers"] == ["mcp-http-token"] and policy["updated_by"] == "cli:me"
    assert apply(store, 3, "access.record", {"records": [RECORD, {**RECORD, "outcome": "refused"}]}) == {"recorded": 2}
    log = store.query("access.log", {})
    assert [r["kind"] for r in log] == ["tool", "tool", "policy", "policy"]  # newest first
    assert [r["outcome"] for r in store.query("access.log", {"outcome": "refused"})] == ["refused"]
    assert apply(store, 4, "access.policy_clear", {"plugin": "cluster-tools", "by": "x"})["cleared"] is True
    assert apply(store, 5, "access.policy_clear", {"plugin": "cluster-tools", "by": "x"})["cleared"] is False
    assert store.query("access.policies", {}) == []


def test_the_audit_log_keeps_the_newest_rows(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(access_domain, "AUDIT_KEPT", 3)
    store = StateStore(tmp_path / "s.db")
    for i in range(1, 6):
        apply(store, i, "access.record", {"records": [{**RECORD, "tool": f"t{i}"}]})
    assert [r["tool"] for r in store.query("access.log", {})] == ["t5", "t4", "t3"]


@pytest.mark.parametrize("command_type, args, words", [
    ("access.policy_set", {"plugin": "Bad Name", "read": None, "change": {"roles": []}}, "plugin must be"),
    ("access.policy_set", {"plugin": "kv"}, "give a read or a change rule"),
    ("access.policy_set", {"plugin": "kv", "read": {"roles": ["root"]}}, "read.roles must list caller roles"),
    ("access.policy_set", {"plugin": "kv", "read": {"who": []}}, "read must be null or an object"),
    ("access.policy_set", {"plugin": "kv", "change": {"callers": [""]}}, "change.callers must list"),
    ("access.record", {"records": []}, "a list of 1..256"),
    ("access.record", {"records": [{**RECORD, "outcome": "maybe"}]}, "record.outcome must be one of"),
    ("access.record", {"records": [{**RECORD, "ts": "now"}]}, "record.ts must be a number"),
])
def test_bad_commands_are_refused_with_what_to_do(command_type, args, words):
    with pytest.raises(CommandError, match=words):
        validate(command_type, args)


def test_a_policy_narrows_and_says_how_to_change_it():
    rule = {"roles": ["admin"], "callers": ["mcp-http-token"]}
    assert rule_refusal(None, Caller("reader", "x"), "read", "p") == ""
    assert rule_refusal(rule, Caller("admin", "admin-socket"), "change anything", "p") == ""
    assert rule_refusal(rule, Caller("operator", "mcp-http-token"), "change anything", "p") == ""
    why = rule_refusal(rule, Caller("operator", "grpc:operator:w1"), "change anything", "kv")
    assert "lets only role admin, mcp-http-token change anything" in why and "cortex audit set kv" in why
    assert "no one" in rule_refusal({"roles": [], "callers": []}, Caller("admin", "a"), "read", "p")


def test_the_argument_digest_leaves_the_idempotency_key_out():
    assert digest({"key": "a", "idempotency_key": "1"}) == digest({"key": "a", "idempotency_key": "2"})
    assert digest({"key": "a"}) != digest({"key": "b"}) and len(digest({})) == 16


def test_only_admins_and_nodes_change_policies():
    from cortex.security.tls import Peer

    refuse = access_domain.write_refusal
    assert refuse("access.policy_set", {}, None) is None
    assert refuse("access.policy_set", {}, Peer("a", "admin", "c")) is None
    assert "changed by admins" in refuse("access.policy_set", {}, Peer("o", "operator", "c"))
    assert "written by the nodes" in refuse("access.record", {}, Peer("a", "admin", "c"))
    assert refuse("access.record", {}, Peer("w1", "worker", "c")) is None


def test_the_cli_refuses_a_bad_policy_before_reaching_any_node(capsys):
    from cortex.cli.main import main

    assert main(["--addr", "127.0.0.1:1", "audit", "set", "kv", "--change-roles", "root"]) == 2
    assert "unknown role(s) root; use reader, operator, admin" in capsys.readouterr().err
    assert main(["--addr", "127.0.0.1:1", "audit", "set", "kv"]) == 2
    assert "give --read-roles/--read-callers" in capsys.readouterr().err
