"""The MCP layer's pure parts and built-in plugins without a cluster: tool selection (profiles, toolsets, the
node's policy), skills (front matter, hot reload), alerts and messaging as state domains on a real SQLite
store, bearer-token checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex import config
from cortex.builtin import alerts
from cortex.builtin.skills import parse_skill, scan
from cortex.core.commands import CommandError, Envelope, validate
from cortex.core.events import EventBus
from cortex.core.state import StateStore
from cortex.mcp.http import BearerTokens
from cortex.mcp.toolsets import Policy, ToolSpec, View, select
from cortex.plugins import Caller, PluginHost, ToolError
from tests.support.wait import wait_until


def spec(name, toolset, *, read_only=True, destructive=False, role="reader"):
    return ToolSpec(name, f"{name} does things", {"type": "object"}, role, read_only, destructive, True, toolset,
                    toolset)


TOOLS = [spec("status", "cluster"), spec("transfer", "cluster", read_only=False, role="operator"),
         spec("remove", "cluster", read_only=False, destructive=True, role="admin"),
         spec("get", "kv"), spec("put", "kv", read_only=False, role="operator")] + \
        [spec(f"t{i}", f"extra{i // 10}") for i in range(60)]


def names(selection):
    return {t.name for t in selection.visible}


def test_default_profile_is_read_only_and_within_the_tool_limit():
    selection = select(TOOLS, View(caller_role="admin"), Policy())
    assert len(selection.visible) <= 40 and selection.profile == "read-only"
    assert {"status", "get"} <= names(selection) and not {"transfer", "put", "remove"} & names(selection)
    assert selection.skipped_toolsets  # 62 read-only tools do not fit in 40: whole toolsets are left out
    assert "--toolsets extra" in selection.hidden["t59"] and "tool limit 40" in selection.hidden["t59"]
    assert "connect with the 'operator' profile" in selection.hidden["put"]


def test_profiles_roles_and_the_destructive_switch():
    operator = select(TOOLS, View("operator", "operator", ("cluster", "kv")), Policy())
    assert names(operator) == {"status", "transfer", "get", "put"}
    assert "needs the 'admin' role" in operator.hidden["remove"]
    admin_off = select(TOOLS, View("admin", "admin", ("cluster",)), Policy(node_id="n3"))
    assert "remove" not in names(admin_off) and "node n3 does not offer" in admin_off.hidden["remove"]
    admin_on = select(TOOLS, View("admin", "admin", ("cluster",)), Policy(allow_destructive=True))
    assert names(admin_on) == {"status", "transfer", "remove"}
    reader = select(TOOLS, View("reader", "admin", ("cluster",)), Policy(allow_destructive=True))
    assert names(reader) == {"status"} and "needs the 'operator' role" in reader.hidden["transfer"]
    everything = select(TOOLS, View("admin", "admin", ("all",)), Policy(allow_destructive=True))
    assert len(everything.visible) == len(TOOLS)
    node_default = select(TOOLS, View("reader"), Policy(default_toolsets=("kv",)))
    assert names(node_default) == {"get"}
    with pytest.raises(ValueError, match="unknown toolset.*nope.*available: cluster, kv"):
        select(TOOLS, View(toolsets=("nope",)), Policy())
    with pytest.raises(ValueError, match="unknown profile 'root'"):
        select(TOOLS, View(profile="root"), Policy())


def test_bearer_tokens():
    auth = BearerTokens({"s3cret": Caller("operator", "token")})
    assert auth.authenticate({"authorization": "Bearer s3cret"}).role == "operator"
    assert auth.authenticate({"authorization": "bearer s3cret "}) is not None
    for header in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"},
                   {"authorization": "Bearer "}):
        assert auth.authenticate(header) is None


# --- skills -------------------------------------------------------------------------------------------------

def write_skill(root: Path, folder: str, text: str) -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    path = root / folder / "SKILL.md"
    path.write_text(text)
    return path


def test_skill_front_matter_is_checked(tmp_path: Path):
    good = write_skill(tmp_path, "a", "---\nname: backup\ndescription: Back up a node\nversion: 2\n---\nSteps\n")
    skill = parse_skill(good)
    assert (skill.name, skill.description, skill.body, skill.metadata) == ("backup", "Back up a node", "Steps\n",
                                                                           {"version": 2})
    cases = {
        "no-front": ("just text", "no YAML front matter"),
        "bad-yaml": ("---\nname: [x\n---\n", "front matter is not valid YAML"),
        "bad-name": ("---\nname: Bad Name\ndescription: d\n---\n", "front matter needs name"),
        "no-desc": ("---\nname: ok\n---\n", "needs a description"),
    }
    for folder, (text, problem) in cases.items():
        with pytest.raises(ValueError, match=problem):
            parse_skill(write_skill(tmp_path / "bad", folder, text))
    write_skill(tmp_path, "dup", "---\nname: backup\ndescription: again\n---\n")
    skills, problems = scan([tmp_path])
    assert list(skills) == ["backup"]
    assert len(problems) == 5 and any("duplicate skill name 'backup'" in p["problem"] for p in problems)


def skills_host(tmp_path: Path, roots: Path) -> PluginHost:
    text = (f"node:\n  id: n1\nplugins:\n  skills:\n    paths: [{roots}]\n    reload_seconds: 0.1\n"
            "  cluster-tools: {enabled: false}\n  mcp: {enabled: false}\n  messaging: {enabled: false}\n")
    cfg = config.parse(text, source="node.yaml")
    host = PluginHost(cfg.plugins, cluster=None, events=EventBus(), data_dir=tmp_path / "data", source=cfg.source)
    host.load()
    host.start()
    return host


def test_skills_hot_reload(tmp_path: Path):
    roots = tmp_path / "skills"
    roots.mkdir()
    host = skills_host(tmp_path, roots)
    try:
        listed = lambda: [s["name"] for s in host.call_tool("list_skills", {}, Caller("reader"))["skills"]]  # noqa: E731
        assert listed() == []
        path = write_skill(roots, "deploy", "---\nname: deploy\ndescription: Ship it\n---\nv1\n")
        wait_until(lambda: listed() == ["deploy"], 5, "the new skill listed")
        path.write_text("---\nname: deploy\ndescription: Ship it\n---\nv2, longer\n")
        wait_until(lambda: host.call_tool("get_skill", {"name": "deploy"}, Caller())["instructions"] == "v2, longer\n", 5,
                   "the edited skill reloaded")
        path.unlink()
        wait_until(lambda: listed() == [], 5, "the removed skill gone")
        with pytest.raises(ToolError, match="no skill 'deploy' on this node"):
            host.call_tool("get_skill", {"name": "deploy"}, Caller())
        host.stop_plugin("skills")
        write_skill(roots, "late", "---\nname: late\ndescription: after a restart\n---\n")
        host.start_plugin("skills")  # a plugin can be stopped and started at run time
        wait_until(lambda: "late" in [s["name"] for s in host.plugins["skills"].plugin.list_skills({}, Caller())["skills"]],
                   5, "the late skill listed")
    finally:
        host.stop()


# --- alerts and messaging: state domains on a real store ------------------------------------------------

def apply(store: StateStore, index: int, command_type: str, args: dict, ts: float = 1000.0) -> dict:
    env = Envelope(type=command_type, args=validate(command_type, args), id=f"{index:032x}", ts=ts, term=1,
                   idem=f"k{index}")
    return store.apply(index, env.encode())


def test_squelches_are_replicated_state_and_expire(tmp_path: Path):
    store = StateStore(tmp_path / "s.db")
    squelch = apply(store, 1, "alert.squelch", {"pattern": "node.offline:*", "seconds": 60, "reason": "maint"})
    assert squelch["until"] == 1060.0
    assert [s["id"] for s in store.query("alert.squelches", {"now": 1030.0})] == [squelch["id"]]
    assert store.query("alert.squelches", {"now": 1061.0}) == []
    with pytest.raises(CommandError, match="seconds must be a number"):
        validate("alert.squelch", {"pattern": "x", "seconds": -1})
    with pytest.raises(CommandError, match="pattern must be"):
        validate("alert.squelch", {"pattern": "a b", "seconds": 1})
    found = alerts.active_alerts(
        {"state": "leader", "has_quorum": True, "leader_id": "n1",
         "nodes": [{"id": "w1", "role": "worker", "liveness": "offline"},
                   {"id": "n2", "role": "server", "liveness": "alive", "replication_lag": 5000}]},
        [{"name": "skills", "state": "failed", "error": "boom"}], "n1")
    assert [a["key"] for a in found] == ["node.offline:w1", "node.lagging:n2", "plugin.failed:skills@n1"]
    shown, hidden = alerts.split_squelched(found, store.query("alert.squelches", {"now": 1030.0}))
    assert [a["key"] for a in hidden] == ["node.offline:w1"] and len(shown) == 2
    assert apply(store, 2, "alert.unsquelch", {"id": squelch["id"]})["removed"] is True


def test_messages_are_replicated_state(tmp_path: Path):
    events = []
    store = StateStore(tmp_path / "s.db", listener=lambda t, d, i: events.append((t, d["recipient"])))
    sent = apply(store, 1, "message.send", {"sender": "n1", "recipient": "agent:a", "subject": "s", "body": "b",
                                            "reply_to": ""})
    apply(store, 2, "message.send", {"sender": "n2", "recipient": "agent:a", "subject": "", "body": "c",
                                     "reply_to": sent["id"]})
    assert events == [("message.received", "agent:a")] * 2
    assert [m["body"] for m in store.query("message.list", {"recipient": "agent:a"})] == ["c", "b"]
    assert store.query("message.unread", {}) == {"agent:a": 2}
    marked = apply(store, 3, "message.mark_read", {"ids": [sent["id"], "nope"]})
    assert marked == {"marked": [sent["id"]], "unknown": ["nope"]}
    assert store.query("message.get", {"id": sent["id"]})["read"] is True
    assert [m["body"] for m in store.query("message.list", {"recipient": "agent:a", "unread_only": True})] == ["c"]
    for args, problem in (({"sender": "n1", "recipient": "BAD", "body": "x"}, "recipient must be an address"),
                          ({"sender": "n1", "recipient": "a", "body": ""}, "body must be a non-empty string"),
                          ({"sender": "n1", "recipient": "a", "body": "x", "extra": 1}, "unknown argument")):
        with pytest.raises(CommandError, match=problem):
            validate("message.send", args)
    with pytest.raises(CommandError, match="a list of 1-500 message ids"):
        validate("message.mark_read", {"ids": []})


# --- templates, oversize HTTP bodies, capped profiles, JSON wording ---------------------------------------------

def test_resource_templates_match_their_uris_and_follow_the_served_tools():
    from cortex.mcp import templates

    template, arguments = templates.match("cluster://tasks/t-123")
    assert (template.tool, arguments) == ("tasks_get", {"task_id": "t-123"})
    assert templates.match("cluster://kv/a%2Fb")[1] == {"key": "a/b"}
    assert templates.match("cluster://kv/a/b")[1] == {"key": "a/b"}
    assert templates.match("cluster://tasks") is None and templates.match("cluster://tasks/") is None
    assert templates.match("cluster://nope/x") is None
    offered = {t.uri_template for t in templates.offered({"get_node", "kv_get"})}
    assert offered == {"cluster://nodes/{node_id}", "cluster://kv/{key}"}  # no task engine: no task template


def test_an_oversize_request_is_answered_in_json_rpc_in_either_key_order():
    from cortex.mcp.http import oversize_answer

    arguments = '{"key": "k", "value": "' + "x" * 5000 + '", "nested": {"id": 99}}'
    python = f'{{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {{"name": "kv_put", "arguments": {arguments}}}}}'
    typescript = f'{{"method":"tools/call","params":{{"name":"kv_put","arguments":{arguments}}},"jsonrpc":"2.0","id":"a-1"}}'
    for body, request_id in ((python, 7), (typescript, "a-1")):
        data = body.encode()
        answer = oversize_answer(data[:4096], data[-4096:], 3_000_000, 2_097_152)
        assert answer["id"] == request_id and answer["result"]["isError"] is True
        assert answer["result"]["content"][0]["text"].startswith("kv_put: the request is 3000000 bytes")
    other = b'{"jsonrpc":"2.0","id":3,"method":"resources/read","params":{"uri":"' + b"x" * 5000 + b'"}}'
    answer = oversize_answer(other[:4096], other[-4096:], 3_000_000, 2_097_152)
    assert answer["id"] == 3 and answer["error"]["code"] == -32600 and "the limit is 2097152" in \
        answer["error"]["message"]


def test_an_admin_profile_beyond_the_credential_is_said():
    capped = select(TOOLS, View("operator", "admin", ("cluster",)), Policy(allow_destructive=True))
    assert "'admin' profile was asked for, but this connection's credential has the 'operator' role" in capped.notice
    assert "plugins.mcp.grpc_role" in capped.notice and "--via socket" in capped.notice
    assert select(TOOLS, View("admin", "admin", ("cluster",)), Policy(allow_destructive=True)).notice == ""
    assert select(TOOLS, View("operator", "operator", ("cluster",)), Policy()).notice == ""


def test_the_key_value_tools_load_before_the_big_toolsets():
    """The README's first MCP steps use kv_put/kv_get: with the default toolsets (up to 40 tools) an operator
    session sees them even where the task engine, memory and Kubernetes fill the rest."""
    big = [spec(f"{name}_{i}", name, read_only=False, role="operator") for name, count in
           (("tasks", 16), ("workflows", 4), ("messaging", 5), ("memory", 12), ("kubernetes", 8)) for i in range(count)]
    operator = select(TOOLS[:5] + big, View("operator", "operator"), Policy())
    assert {"get", "put"} <= names(operator) and operator.loaded_toolsets[:2] == ["cluster", "kv"]


def test_schema_errors_speak_json():
    from cortex.plugins.host import _schema_errors, json_wording

    def worded(schema, value):
        return json_wording(_schema_errors(schema, value)[0])

    assert worded({"type": "array"}, True) == "true is not of type 'array'"
    assert worded({"type": "string"}, None) == "null is not of type 'string'"
    assert worded({"enum": ["worker", "server"]}, "king") == '"king" is not one of ["worker", "server"]'
    assert worded({"type": "integer"}, {"a": False}) == '{"a": false} is not of type \'integer\''
    assert worded({"type": "string"}, 5) == "5 is not of type 'string'"
