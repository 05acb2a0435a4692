"""The MCP front end's node policy beyond profiles: read-only servers, the destructive-call confirmation
setting, and the RFC 9728 metadata document (pure functions; the cluster tier runs them end to end)."""

from __future__ import annotations

from cortex.mcp.http import _origin, resource_metadata
from cortex.mcp.toolsets import Policy, ToolSpec, View, select
from cortex.plugins import returns, returns_list, structured

TOOLS = [ToolSpec("kv_get", "", {}, "reader"), ToolSpec("kv_put", "", {}, "operator", read_only=False),
         ToolSpec("kv_delete", "", {}, "operator", read_only=False, destructive=True)]


def test_a_read_only_node_hides_every_tool_that_changes_state_whatever_the_profile():
    policy = Policy.from_options({"read_only": True, "allow_destructive": True}, "n1")
    chosen = select(TOOLS, View(caller_role="admin", profile="admin"), policy)
    assert [t.name for t in chosen.visible] == ["kv_get"]
    assert "node n1 serves read-only tools only" in chosen.hidden["kv_put"]
    assert "serves read-only tools only" in chosen.hidden["kv_delete"]
    assert Policy.from_options({}).read_only is False and Policy.from_options({}).confirm_destructive == "elicit"
    assert Policy.from_options({"confirm_destructive": "require"}).confirm_destructive == "require"


def test_output_schemas_are_built_from_type_names():
    schema = returns({"a": "string", "b": ["integer", "null"], "c": {"type": "array"}}, "c")
    assert schema == {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "string"}, "b": {"type": ["integer", "null"]}, "c": {"type": "array"}}}
    assert returns_list({"id": "string"})["properties"]["result"]["items"]["required"] == ["id"]
    assert structured([1]) == {"result": [1]} and structured({"x": 1}) == {"x": 1}


def test_protected_resource_metadata():
    doc = resource_metadata("http://127.0.0.1:7480", "n1", ["https://auth.example.invalid"])
    assert doc["resource"] == "http://127.0.0.1:7480/mcp" and doc["bearer_methods_supported"] == ["header"]
    assert doc["authorization_servers"] == ["https://auth.example.invalid"]
    assert "authorization_servers" not in resource_metadata("http://h:1", "", [])
    fallback = "http://127.0.0.1:7480"
    assert _origin({"scheme": "http"}, {"host": "10.0.0.1:7480"}, fallback) == "http://10.0.0.1:7480"
    assert _origin({"scheme": "http"}, {"host": 'evil" x'}, fallback) == fallback  # never echoed into a header
    assert _origin({"scheme": "http"}, {}, fallback) == fallback


def test_every_builtin_tool_declares_a_real_output_schema_and_destructive_ones_a_plan():
    """Every registered built-in tool, as a node loads it: a valid JSON Schema naming its top-level fields.
    (tests/cluster/test_mcp_protocol.py checks real answers against these.)"""
    import jsonschema

    from cortex.dev.reference import builtin_plugins

    tools = [tool for _, _, _, plugin_tools in builtin_plugins() for tool in plugin_tools]
    assert len(tools) >= 60
    for tool in tools:
        schema = tool.output_schema
        assert schema is not None, f"{tool.name} declares no output schema"
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object" and (schema.get("properties") or schema.get("anyOf")), tool.name
        if tool.destructive:
            assert tool.plan is not None, f"{tool.name} is destructive and says nothing of what it will do"


def test_plans_say_what_a_call_will_do_and_refuse_what_the_call_would(tmp_path):
    import pytest

    from cortex.plugins import Caller, ToolError
    from tests.support.memory_harness import start_host

    host, _ = start_host(tmp_path)
    try:
        operator = Caller("operator", "test")
        plan = host.plan_tool("memory_write", {"kind": "sql", "sql": "DELETE FROM memory_context"}, operator)
        assert plan == "run this statement on the cluster's memory store: DELETE FROM memory_context"
        with pytest.raises(ToolError, match="needs the 'operator' role"):
            host.plan_tool("memory_write", {"kind": "sql"}, Caller("reader", "test"))
        with pytest.raises(ToolError, match="invalid arguments"):
            host.plan_tool("memory_write", {"kind": "nonsense"}, operator)
    finally:
        host.stop()
