"""The plugin host: discovers plugins through entry points, runs their hooks, isolates their failures.

A plugin is a class registered under the entry-point group `cortex.plugins` (the built-ins register the
same way in pyproject.toml, so a third party ships one with `pip install`); what it may define is in api.py.
A plugin that raises in a hook is marked failed with the reason (`cortex plugins`), a tool that raises
becomes a tool error, and the agent keeps running either way. Events reach each plugin on its own thread.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from cortex.config import PluginSettings
from cortex.core.events import Event, EventBus
from cortex.plugins import quickcheck
from cortex.plugins.api import (
    CALLER_ROLES,
    MAX_TOOL_ARGUMENT_BYTES,
    Caller,
    ClusterAPI,
    Placement,
    Plugin,
    PluginConfigError,
    PluginContext,
    Resource,
    Tool,
    ToolError,
)

log = logging.getLogger("cortex.plugins")

ENTRY_POINT_GROUP = "cortex.plugins"
EVENT_QUEUE_LIMIT = 10_000  # per plugin; beyond it events are dropped (and logged), never blocking Raft


@dataclass
class LoadedPlugin:
    name: str
    state: str  # running, failed, disabled, stopped
    plugin: Plugin | None = None
    error: str = ""
    origin: str = ""  # the entry point's value: module:Class
    unsubscribe: list[Callable[[], None]] = field(default_factory=list)
    inbox: queue.Queue | None = None  # events waiting for this plugin's handlers (delivered on its own thread)


def discover() -> dict[str, str]:
    """Installed plugins: {name: "module:Class"} from the entry-point group."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load_class(name: str) -> type[Plugin]:
    (ep,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"{ep.value} is not a cortex.plugins.Plugin subclass")
    if cls.name != name:
        raise TypeError(f"{ep.value} says its name is {cls.name!r} but is registered as {name!r}")
    return cls


def _schema_errors(schema: dict, value: Any) -> list:
    import jsonschema  # loaded with the first value the quick check cannot pass

    return sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=str)


def json_wording(error) -> str:
    """A jsonschema message in the words of the JSON the caller sent: jsonschema spells the offending value
    and an enum's choices as Python reprs (`True is not of type 'array'`, `'x' is not one of ['a']`), which
    a client writing JSON (true, "x", null) should not have to translate."""
    message = error.message
    try:
        shown = repr(error.instance)
        if message.startswith(shown) and len(shown) <= 200:
            message = json.dumps(error.instance, default=str) + message[len(shown):]
        if error.validator == "enum" and isinstance(error.validator_value, list):
            message = message.replace(repr(error.validator_value), json.dumps(error.validator_value, default=str))
    except (TypeError, ValueError):
        return error.message
    return message


def validate_options(name: str, schema: dict, settings: PluginSettings, source: str) -> dict:
    """The plugin's options checked against its schema with defaults filled in; errors name file:line: key."""
    options = dict(settings.options)
    for key, spec in schema.get("properties", {}).items():
        if key not in options and "default" in spec:
            options[key] = spec["default"]
    if quickcheck.plainly_valid(schema, options):
        return options
    import jsonschema  # only for options the quick check cannot pass: its verdict and wording

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(options), key=lambda e: list(e.path))
    if errors:
        error = errors[0]
        key = str(error.path[0]) if error.path else ""
        if not key and error.validator == "additionalProperties":
            key = next((k for k in settings.options if k not in schema.get("properties", {})), "")
        line = settings.lines.get(key, settings.line)
        dotted = f"plugins.{name}" + (f".{key}" if key else "")
        raise PluginConfigError(f"{source}:{line}: {dotted}: {error.message}")
    return options


def check_config(settings: dict[str, PluginSettings], source: str) -> None:
    """Raise PluginConfigError for an unknown plugin or options that do not match its schema."""
    installed = discover()
    for name, section in settings.items():
        if name not in installed:
            raise PluginConfigError(f"{source}:{section.line}: plugins.{name}: no such plugin installed "
                                    f"(installed: {', '.join(sorted(installed)) or 'none'})")
        validate_options(name, _load_class(name).options_schema, section, source)


def installed_placements() -> list[Placement]:
    """The placements every installed plugin declares (see api.Placement for why not only the enabled ones);
    a plugin that cannot be imported here declares none."""
    out = []
    for name, origin in sorted(discover().items()):
        try:
            placement = _load_class(name).placement
        except Exception as exc:
            log.warning("cannot load plugin for its placement", extra={"fields": {"plugin": origin, "error": str(exc)}})
            continue
        if placement is not None:
            out.append(placement)
    return out


class PluginHost:
    """Loads, starts, stops and calls plugins for one node, isolating each plugin's failures."""

    def __init__(self, settings: dict[str, PluginSettings], cluster: ClusterAPI, events: EventBus,
                 data_dir: Path, source: str = "<config>"):
        self._settings = settings
        self._cluster = cluster
        self._events = events
        self._data_dir = data_dir
        self._source = source
        self._lock = threading.RLock()
        self.plugins: dict[str, LoadedPlugin] = {}
        self._tool_listeners: list[Callable[[], None]] = []
        # Bumped whenever the offered tools/resources change, so watchers (WatchTools, MCP list-changed)
        # can wait for "anything after generation N" without missing a change between two waits.
        self.generation = 1
        self._changed = threading.Condition(self._lock)
        # The cluster's plugin policies and the audit log of mutating calls (audit.py); none without a cluster.
        self.access = None
        if cluster is not None:
            from cortex.plugins.audit import Access

            self.access = Access(cluster)
            events.subscribe("access.policy_changed", lambda event: self.access.invalidate())

    # --- lifecycle -----------------------------------------------------------------------------------
    def load(self) -> None:
        """Instantiate and init every enabled plugin; failures are recorded, never raised."""
        for name, origin in sorted(discover().items()):
            settings = self._settings.get(name, PluginSettings())
            try:
                cls = _load_class(name)
            except Exception as exc:
                self._record(LoadedPlugin(name, "failed", error=f"cannot import {origin}: {exc}", origin=origin))
                continue
            enabled = cls.enabled_by_default if settings.enabled is None else settings.enabled
            if not enabled:
                self._record(LoadedPlugin(name, "disabled", origin=origin))
                continue
            try:
                options = validate_options(name, cls.options_schema, settings, self._source)
                data_dir = self._data_dir / "plugins" / name
                ctx = PluginContext(name=name, options=options, cluster=self._cluster, events=self._events,
                                    data_dir=data_dir, log=logging.getLogger(f"cortex.plugin.{name}"), host=self)
                plugin = cls(ctx)
                plugin.init()
            except Exception as exc:
                self._fail(LoadedPlugin(name, "failed", origin=origin), "init", exc)
                continue
            self._record(LoadedPlugin(name, "loaded", plugin=plugin, origin=origin))

    def start(self) -> None:
        for entry in list(self.plugins.values()):
            if entry.state == "loaded":
                self.start_plugin(entry.name)

    def start_plugin(self, name: str) -> None:
        with self._lock:
            entry = self.plugins[name]
            try:
                entry.plugin.ctx.data_dir.mkdir(parents=True, exist_ok=True)
                entry.plugin.start()
                for pattern, callback in entry.plugin.subscriptions().items():
                    entry.unsubscribe.append(self._events.subscribe(pattern, self._guarded(entry, callback)))
                self._check_tool_names(entry)
            except Exception as exc:
                self._fail(entry, "start", exc)
                self._stop_quietly(entry)
                return
            entry.state = "running"
        log.info("plugin started", extra={"fields": {"plugin": name, "tools": len(self._tools_of(entry))}})
        self._tools_changed()

    def stop(self) -> None:
        for name in reversed(list(self.plugins)):
            self.stop_plugin(name)
        if self.access is not None:
            self.access.stop()

    def stop_plugin(self, name: str) -> None:
        with self._lock:
            entry = self.plugins[name]
            if entry.state != "running":
                return
            self._stop_quietly(entry)
            entry.state = "stopped"
        self._tools_changed()

    def _stop_quietly(self, entry: LoadedPlugin) -> None:
        for unsubscribe in entry.unsubscribe:
            unsubscribe()
        entry.unsubscribe.clear()
        if entry.inbox is not None:
            entry.inbox.put(None)  # the delivery thread ends after what is already queued
            entry.inbox = None
        try:
            entry.plugin.stop()
        except Exception as exc:
            log.warning("plugin failed to stop cleanly", extra={"fields": {"plugin": entry.name, "error": str(exc)}})

    def _record(self, entry: LoadedPlugin) -> None:
        with self._lock:
            self.plugins[entry.name] = entry

    def _fail(self, entry: LoadedPlugin, hook: str, exc: BaseException) -> None:
        entry.state = "failed"
        entry.error = f"{hook}: {type(exc).__name__}: {exc}"
        self._record(entry)
        log.error("plugin failed", extra={"fields": {"plugin": entry.name, "hook": hook, "error": str(exc),
                                                     "trace": traceback.format_exc(limit=5)}})
        self._events.publish(Event("plugin.failed", {"plugin": entry.name, "hook": hook, "error": str(exc)}))

    def _guarded(self, entry: LoadedPlugin, callback: Callable[[Event], None]) -> Callable[[Event], None]:
        """Deliver events to a plugin on its own thread, in order. Replicated events are published from
        Raft's apply path: a slow or blocking plugin handler (one that writes to the cluster, say) must
        never stall consensus, and a failing one is logged and contained."""
        if entry.inbox is None:
            entry.inbox = queue.Queue(maxsize=EVENT_QUEUE_LIMIT)
            threading.Thread(target=self._deliver, args=(entry, entry.inbox), name=f"plugin-{entry.name}-events",
                             daemon=True).start()
        inbox = entry.inbox

        def enqueue(event: Event) -> None:
            try:
                inbox.put_nowait((callback, event))
            except queue.Full:
                log.error("plugin event queue full; event dropped",
                          extra={"fields": {"plugin": entry.name, "event": event.type}})
        return enqueue

    def _deliver(self, entry: LoadedPlugin, inbox: queue.Queue) -> None:
        while True:
            item = inbox.get()
            if item is None:
                return
            callback, event = item
            try:
                callback(event)
            except Exception as exc:
                log.error("plugin event handler failed",
                          extra={"fields": {"plugin": entry.name, "event": event.type, "error": str(exc)}})
            finally:
                inbox.task_done()

    def drain_events(self, timeout: float = 5.0) -> None:
        """Wait until every plugin has handled the events published so far (tests, shutdown)."""
        for entry in list(self.plugins.values()):
            if entry.inbox is not None:
                waiter = threading.Thread(target=entry.inbox.join, daemon=True)
                waiter.start()
                waiter.join(timeout)

    # --- tools ---------------------------------------------------------------------------------------
    def _tools_of(self, entry: LoadedPlugin) -> list[Tool]:
        tools = []
        for tool in entry.plugin.tools():
            tools.append(tool if tool.toolset else Tool(**{**tool.__dict__, "toolset": entry.name}))
        return tools

    def _check_tool_names(self, entry: LoadedPlugin) -> None:
        taken = {t.name: e.name for e in self.plugins.values() if e.state == "running" for t in self._tools_of(e)}
        for tool in self._tools_of(entry):
            if tool.name in taken:
                raise ValueError(f"tool {tool.name!r} is already provided by plugin {taken[tool.name]!r}")
            if tool.role not in CALLER_ROLES:
                raise ValueError(f"tool {tool.name!r} needs unknown role {tool.role!r}")

    def tools(self) -> dict[str, Tool]:
        with self._lock:
            return {t.name: t for e in self.plugins.values() if e.state == "running" for t in self._tools_of(e)}

    def resources(self) -> dict[str, Resource]:
        with self._lock:
            return {r.uri: r for e in self.plugins.values() if e.state == "running" for r in e.plugin.resources()}

    def on_tools_changed(self, callback: Callable[[], None]) -> None:
        self._tool_listeners.append(callback)

    def wait_changed(self, known_generation: int, timeout: float) -> int:
        """The current generation once it differs from `known_generation`, or after `timeout` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self.generation != known_generation, timeout)
            return self.generation

    def tool_owners(self) -> dict[str, str]:
        """{tool name: plugin name} for the running plugins."""
        with self._lock:
            return {t.name: e.name for e in self.plugins.values() if e.state == "running" for t in self._tools_of(e)}

    def options_of(self, name: str) -> dict | None:
        """A running plugin's validated options (None when it is not running)."""
        with self._lock:
            entry = self.plugins.get(name)
            return dict(entry.plugin.ctx.options) if entry is not None and entry.state == "running" else None

    def _tools_changed(self) -> None:
        with self._changed:
            self.generation += 1
            self._changed.notify_all()
        for callback in list(self._tool_listeners):
            try:
                callback()
            except Exception:
                log.exception("tools-changed listener failed")

    def _find(self, name: str) -> tuple[Tool | None, str]:
        with self._lock:
            for entry in self.plugins.values():
                if entry.state == "running":
                    for tool in self._tools_of(entry):
                        if tool.name == name:
                            return tool, entry.name
        return None, ""

    def call_tool(self, name: str, arguments: Any, caller: Caller) -> Any:
        """Validate, authorize and run a tool; every failure is a ToolError with an actionable message.
        Calls of tools that change state are recorded in the cluster's audit log, refusals included."""
        tool, plugin = self._find(name)
        if tool is None:
            raise ToolError(f"unknown tool {name!r}; list the tools to see what this node offers")
        if not isinstance(arguments, dict):
            raise ToolError(f"{name}: arguments must be a JSON object")
        if len(repr(arguments)) > MAX_TOOL_ARGUMENT_BYTES:
            raise ToolError(f"{name}: arguments exceed {MAX_TOOL_ARGUMENT_BYTES} bytes; send less per call")
        if CALLER_ROLES.index(caller.role) < CALLER_ROLES.index(tool.role):
            raise ToolError(f"{name} needs the {tool.role!r} role; this caller has {caller.role!r}")
        valid = quickcheck.plainly_valid(tool.input_schema, arguments)
        errors = [] if valid else _schema_errors(tool.input_schema, arguments)
        if errors:
            where = "/".join(str(p) for p in errors[0].path)
            raise ToolError(f"{name}: invalid arguments{' at ' + where if where else ''}: {json_wording(errors[0])}")
        audit = self.access is not None and not tool.read_only
        refused = self.access.refusal(plugin, tool.read_only, caller) if self.access is not None else ""
        if refused:
            if audit:
                self.access.record(name, plugin, arguments, caller, "refused", refused)
            raise ToolError(f"{name}: {refused}")
        try:
            result = tool.handler(arguments, caller)
        except ToolError as exc:
            if audit:
                self.access.record(name, plugin, arguments, caller, "error", str(exc))
            raise
        except Exception as exc:
            log.error("tool failed", extra={"fields": {"tool": name, "error": f"{type(exc).__name__}: {exc}"}})
            if audit:
                self.access.record(name, plugin, arguments, caller, "error", f"{type(exc).__name__}: {exc}")
            raise ToolError(f"{name} failed: {exc}") from exc
        if audit:
            self.access.record(name, plugin, arguments, caller, "ok")
        return result

    def plan_tool(self, name: str, arguments: Any, caller: Caller) -> str:
        """What a call would do, said before it runs (a destructive tool's confirmation); changes nothing.
        The same checks as a call come first, so a plan is never shown for a call that would be refused."""
        tool = self.tools().get(name)
        if tool is None:
            raise ToolError(f"unknown tool {name!r}; list the tools to see what this node offers")
        if not isinstance(arguments, dict):
            raise ToolError(f"{name}: arguments must be a JSON object")
        if CALLER_ROLES.index(caller.role) < CALLER_ROLES.index(tool.role):
            raise ToolError(f"{name} needs the {tool.role!r} role; this caller has {caller.role!r}")
        errors = [] if quickcheck.plainly_valid(tool.input_schema, arguments) else _schema_errors(tool.input_schema,
                                                                                                    arguments)
        if errors:
            where = "/".join(str(p) for p in errors[0].path)
            raise ToolError(f"{name}: invalid arguments{' at ' + where if where else ''}: {errors[0].message}")
        owner = self._find(name)[1]
        refused = self.access.refusal(owner, tool.read_only, caller) if self.access is not None else ""
        if refused:
            raise ToolError(f"{name}: {refused}")
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(arguments.items()) if k != "idempotency_key")
        generic = f"run {name}({shown}): {tool.description}"
        if tool.plan is None:
            return generic
        try:
            return tool.plan(arguments, caller) or generic
        except ToolError:
            raise
        except Exception as exc:  # the plan is a courtesy: without it the user still sees what is asked
            log.warning("tool plan failed", extra={"fields": {"tool": name, "error": f"{type(exc).__name__}: {exc}"}})
            return generic

    def status(self) -> list[dict]:
        with self._lock:
            return [{"name": e.name, "state": e.state, "error": e.error, "origin": e.origin,
                     "tools": len(self._tools_of(e)) if e.state == "running" else 0}
                    for e in sorted(self.plugins.values(), key=lambda e: e.name)]
