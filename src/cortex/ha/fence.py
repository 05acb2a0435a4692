"""Fencing: powering a node off from outside it before its services start elsewhere, so a node that only
looked dead cannot keep writing to what its successor now owns.

Fence agents are plugins: a class registered by name in the entry-point group `cortex.fence_agents`
(`redfish` is built in, cortex.ha.redfish), built with the node id and that node's `FenceTarget` from the
fencing node's config (`fence: {NODE: {...}}`, config.py). A fence agent class provides

    __init__(self, node: str, target: FenceTarget)
    power_off(self) -> None     # returns once the node is confirmed off; already off is success
    power_on(self) -> None      # returns once the node is confirmed on; already on is success
    power_state(self) -> str    # "On", "Off", or what the agent's device says

and raises FenceError (or a subclass) with a message that says what to do. `Fencing` routes the
`FenceAgent` calls (by node) to the right one; every call is safe to repeat.
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import entry_points
from typing import Protocol

from cortex.config import Config, FenceTarget

ENTRY_POINT_GROUP = "cortex.fence_agents"
log = logging.getLogger("cortex.ha")


class FenceError(Exception):
    """A node that could not be powered off or on; the message says why and what to do."""


class FenceDriver(Protocol):
    def power_off(self) -> None: ...
    def power_on(self) -> None: ...
    def power_state(self) -> str: ...


_registered: dict[str, type] = {}
_lock = threading.Lock()


def register(name: str, cls: type) -> None:
    """Register a fence agent class in this process (an entry point does the same for an installed package)."""
    with _lock:
        _registered[name] = cls


def available() -> dict[str, str]:
    """Fence agents by name: {name: "module:Class"}."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update({name: f"{cls.__module__}:{cls.__qualname__}" for name, cls in _registered.items()})
    return found


def agent_class(name: str) -> type:
    with _lock:
        if name in _registered:
            return _registered[name]
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise FenceError(f"no fence agent named {name!r} is installed (installed: "
                         f"{', '.join(sorted(available())) or 'none'}); fix fence.NODE.agent in the config")
    cls = matches[0].load()
    for method in ("power_off", "power_on", "power_state"):
        if not callable(getattr(cls, method, None)):
            raise FenceError(f"fence agent {name!r} ({matches[0].value}) has no {method}(); it is not a fence agent")
    return cls


class Fencing:
    """The FenceAgent port: power_off(node) / power_on(node) through the agent configured for that node."""

    def __init__(self, targets: dict[str, FenceTarget]):
        self.targets = dict(targets)

    @classmethod
    def from_config(cls, config: Config) -> Fencing:
        return cls(config.fence)

    def driver(self, node: str) -> FenceDriver:
        target = self.targets.get(node)
        if target is None:
            raise FenceError(f"no fence settings for node {node!r} on this node: add a `fence: {{{node}: "
                             "{address, credentials_file}}` section to its config (docs/operations/ha.md)")
        return agent_class(target.agent)(node, target)

    def power_off(self, node: str) -> None:
        log.warning("fencing: powering %s off", node)
        self.driver(node).power_off()
        log.warning("fencing: %s is off", node)

    def power_on(self, node: str) -> None:
        log.info("fencing: powering %s on", node)
        self.driver(node).power_on()

    def power_state(self, node: str) -> str:
        return self.driver(node).power_state()
