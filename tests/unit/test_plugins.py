"""The plugin host: entry-point discovery, option schemas, failure isolation, tools, events.

Plugins here are real installed distributions: each test writes a module and a `.dist-info` with an
`entry_points.txt` onto sys.path, which is exactly what `pip install` leaves behind.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from cortex import config
from cortex.core.events import Event, EventBus
from cortex.plugins import Caller, PluginConfigError, PluginHost, ToolError, check_config, discover

PLUGIN_SOURCE = '''
import threading

from cortex.plugins import Plugin, Tool

class Greeter(Plugin):
    name = "greeter"
    options_schema = {"type": "object", "additionalProperties": False,
                      "properties": {"greeting": {"type": "string", "default": "hello"},
                                     "times": {"type": "integer", "minimum": 1}}}

    def init(self):
        self.seen = []
        self.gate = threading.Event()

    def subscriptions(self):
        return {"node.*": self.seen.append, "boom.*": self.explode, "slow.*": self.slow}

    def slow(self, event):
        self.gate.wait(10)  # a handler that blocks, say on a cluster write

    def explode(self, event):
        raise RuntimeError("handler bug")

    def tools(self):
        return [
            Tool("greet", "Greet someone by name.", lambda args, caller: f"{self.ctx.options['greeting']} {args['who']}",
                 input_schema={"type": "object", "required": ["who"], "additionalProperties": False,
                               "properties": {"who": {"type": "string", "maxLength": 20}}}),
            Tool("greet_loudly", "Greet, mutating.", lambda args, caller: "HI", role="operator", read_only=False),
            Tool("crash", "A tool with a bug.", lambda args, caller: 1 / 0),
        ]

class FailsAtInit(Plugin):
    name = "fails-init"
    def init(self):
        raise RuntimeError("cannot open its database")

class FailsAtStart(Plugin):
    name = "fails-start"
    def start(self):
        raise OSError("port in use")
    def tools(self):
        return [Tool("never", "never listed", lambda a, c: None)]

class OffByDefault(Plugin):
    name = "off-by-default"
    enabled_by_default = False
'''


@pytest.fixture
def installed(tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    module = f"greeter_plugin_{abs(hash(tmp_path)) % 10**8}"
    (site / f"{module}.py").write_text(PLUGIN_SOURCE)
    dist = site / "greeter_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: greeter-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [cortex.plugins]
        greeter = {module}:Greeter
        fails-init = {module}:FailsAtInit
        fails-start = {module}:FailsAtStart
        off-by-default = {module}:OffByDefault
        """))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield module
    sys.modules.pop(module, None)


def host_for(yaml_text: str, tmp_path: Path) -> tuple[PluginHost, EventBus]:
    """A host for the test's plugins only: the built-ins (which need a live agent) are switched off."""
    cfg = config.parse("node:\n  id: n1\n" + yaml_text, source="node.yaml")
    for name, origin in discover().items():
        if origin.startswith("cortex."):  # a built-in
            cfg.plugins.setdefault(name, config.PluginSettings(enabled=False))
    bus = EventBus()
    return PluginHost(cfg.plugins, cluster=None, events=bus, data_dir=tmp_path, source=cfg.source), bus


def test_plugins_are_discovered_through_entry_points(installed):
    found = discover()
    assert found["greeter"] == f"{installed}:Greeter"
    assert {"fails-init", "fails-start", "off-by-default"} <= set(found)


def test_failures_are_isolated_and_reported(installed, tmp_path: Path):
    host, bus = host_for("", tmp_path)
    host.load()
    host.start()
    states = {p["name"]: p for p in host.status()}
    assert states["greeter"]["state"] == "running" and states["greeter"]["tools"] == 3
    assert states["fails-init"]["state"] == "failed"
    assert "init: RuntimeError: cannot open its database" in states["fails-init"]["error"]
    assert states["fails-start"]["state"] == "failed" and "start: OSError: port in use" in states["fails-start"]["error"]
    assert states["off-by-default"]["state"] == "disabled"
    assert "never" not in host.tools()  # a failed plugin's tools are not offered
    assert [e.data["plugin"] for e in bus.recent("plugin.failed")] == ["fails-init", "fails-start"]
    host.stop()
    assert {p["name"]: p["state"] for p in host.status()}["greeter"] == "stopped"


def test_tools_validate_arguments_check_roles_and_turn_crashes_into_tool_errors(installed, tmp_path: Path):
    host, _ = host_for("plugins:\n  greeter:\n    greeting: ahoy\n", tmp_path)
    host.load()
    host.start()
    reader = Caller(role="reader")
    assert host.call_tool("greet", {"who": "ada"}, reader) == "ahoy ada"
    with pytest.raises(ToolError, match="invalid arguments at who: 5 is not of type 'string'"):
        host.call_tool("greet", {"who": 5}, reader)
    with pytest.raises(ToolError, match="'who' is a required property"):
        host.call_tool("greet", {}, reader)
    with pytest.raises(ToolError, match="needs the 'operator' role; this caller has 'reader'"):
        host.call_tool("greet_loudly", {}, reader)
    assert host.call_tool("greet_loudly", {}, Caller(role="admin")) == "HI"
    with pytest.raises(ToolError, match="crash failed: division by zero"):
        host.call_tool("crash", {}, reader)
    with pytest.raises(ToolError, match="unknown tool 'nope'"):
        host.call_tool("nope", {}, reader)
    with pytest.raises(ToolError, match="arguments must be a JSON object"):
        host.call_tool("greet", ["ada"], reader)
    with pytest.raises(ToolError, match="exceed"):
        host.call_tool("greet", {"who": "x" * 2_000_000}, reader)


def test_event_subscriptions_are_delivered_and_a_failing_handler_is_contained(installed, tmp_path: Path):
    host, bus = host_for("", tmp_path)
    host.load()
    host.start()
    bus.publish(Event("boom.now"))
    bus.publish(Event("node.offline", {"node_id": "w1"}))
    bus.publish(Event("node.alive", {"node_id": "w1"}))
    host.drain_events()  # delivered on the plugin's own thread, in order, past the failing handler
    greeter = host.plugins["greeter"].plugin
    assert [e.type for e in greeter.seen] == ["node.offline", "node.alive"]
    host.stop_plugin("greeter")
    bus.publish(Event("node.suspect"))
    host.drain_events()
    assert len(greeter.seen) == 2  # unsubscribed on stop


def test_a_blocking_handler_never_blocks_the_publisher(installed, tmp_path: Path):
    host, bus = host_for("", tmp_path)
    host.load()
    host.start()
    greeter = host.plugins["greeter"].plugin
    done = threading.Event()

    def publish():  # as Raft's apply thread does: it must never wait for a plugin
        for _ in range(100):
            bus.publish(Event("slow.one"))
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    assert done.wait(5), "publishing blocked on a plugin's handler"
    greeter.gate.set()
    host.drain_events()


def test_tools_changed_listeners_fire_on_start_and_stop(installed, tmp_path: Path):
    # only the greeter runs: built-in plugins that are on by default are switched off here
    off = [n for n in discover() if n not in ("greeter", "off-by-default")]
    host, _ = host_for("plugins:\n" + "".join(f"  {n}:\n    enabled: false\n" for n in off), tmp_path)
    changes = []
    host.on_tools_changed(lambda: changes.append(sorted(host.tools())))
    host.load()
    host.start()
    host.stop_plugin("greeter")
    assert changes == [["crash", "greet", "greet_loudly"], []]


def test_plugin_options_are_checked_against_the_schema_with_file_and_line(installed):
    bad = config.parse("node:\n  id: n1\nplugins:\n  greeter:\n    greeting: hi\n    times: 0\n", source="node.yaml")
    with pytest.raises(PluginConfigError, match=r"node.yaml:6: plugins.greeter.times: 0 is less than the minimum of 1"):
        check_config(bad.plugins, bad.source)
    typo = config.parse("node:\n  id: n1\nplugins:\n  greeter:\n    greting: hi\n", source="node.yaml")
    with pytest.raises(PluginConfigError, match=r"node.yaml:5: plugins.greeter.greting: Additional properties"):
        check_config(typo.plugins, typo.source)
    unknown = config.parse("node:\n  id: n1\nplugins:\n  gretter: {}\n", source="node.yaml")
    with pytest.raises(PluginConfigError, match=r"node.yaml:4: plugins.gretter: no such plugin installed"):
        check_config(unknown.plugins, unknown.source)
    with pytest.raises(config.ConfigError, match=r"node.yaml:5: plugins.greeter.enabled: must be a bool"):
        config.parse("node:\n  id: n1\nplugins:\n  greeter:\n    enabled: maybe\n", source="node.yaml")


def test_the_cluster_api_is_what_the_agent_offers_and_a_missing_replica_is_a_declared_error():
    import inspect
    import re

    import grpc

    from cortex.node import agent
    from cortex.plugins.api import ClusterAPI, holds_no_replica

    declared = {name for name in vars(ClusterAPI) if not name.startswith("_")} | set(ClusterAPI.__annotations__)
    bridge = agent.PluginBridge
    offered = {name for name in vars(bridge) if not name.startswith("_")}
    offered |= set(re.findall(r"self\.(\w+) = ", inspect.getsource(bridge.__init__)))  # instance attributes
    assert declared == {"LEVELS", "node_id", "role", "grpc_address", "rpc", "write", "propose", "read", "read_local",
                        "is_leader", "snapshot", "create_token", "revoke_token", "remove_node", "status",
                        "config", "node_credentials"}
    assert declared <= offered
    for name in declared & set(vars(ClusterAPI)):
        if callable(getattr(ClusterAPI, name)):
            assert list(inspect.signature(getattr(ClusterAPI, name)).parameters) == \
                list(inspect.signature(getattr(bridge, name)).parameters), name

    # what the bridge raises on a node without a replica, and what it raises when there is no leader
    assert holds_no_replica(agent.AgentError(grpc.StatusCode.FAILED_PRECONDITION, "only servers hold a copy"))
    assert not holds_no_replica(agent.AgentError(grpc.StatusCode.UNAVAILABLE, "no leader"))
    assert not holds_no_replica(ValueError("not a cluster failure"))
