"""`cortex agent` (the node daemon) and `cortex config check`: the commands that read a node's config file."""

from __future__ import annotations

import os
import sys

from cortex.cli.output import emit
from cortex.cli.registry import CommandRegistry


def _checked_config(path: str, prefix: str):
    """The config at `path` with its plugin options checked, or None after printing why (prefixed)."""
    from cortex import config, plugins

    try:
        cfg = config.load(path)
        plugins.check_config(cfg.plugins, cfg.source)
    except (config.ConfigError, plugins.PluginConfigError) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return None
    return cfg


# glibc gives each thread that allocates its own malloc arena (up to 8 per core), each keeping its freed memory
# for itself: with ~40 threads (gRPC pools, Raft, plugins) an idle agent held a MB or two more than with two
# arenas. Two, not one: with one, the leader spent about a third more CPU per write (python -m bench.writepath),
# most threads allocating under the GIL but gRPC's core threads beside them. Set here, in the agent, rather than in
# each launcher (systemd units, `cortex node install`, ansible, `cortex dev up`, tests): one place, every way the
# agent runs. An operator's own MALLOC_ARENA_MAX (or glibc tunable) wins.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter, malloc.h


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for the threads this process starts from now on; True when the cap is set.
    A no-op off glibc and when the environment chose a value already."""
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no arenas to cap)
        return False
    return mallopt(_M_ARENA_MAX, arenas) == 1


def cmd_agent(args) -> int:
    limit_malloc_arenas()  # first, before the agent starts any thread
    from cortex.node import agent, logs
    from cortex.security import tls

    # Issuance runs in-process by default (cryptography imported on the first one): a fresh interpreter per
    # issuance costs seconds on a slow machine (emulated, or four VMs on two cores), and a joiner whose
    # answer comes after its deadline is left a member without its certificate. A node short of memory may
    # opt in to the short-lived issuer process, which keeps cryptography out of the agent (tls.py).
    tls.ISSUE_IN_SUBPROCESS = os.environ.get("CORTEX_ISSUE_IN_SUBPROCESS", "") == "1"

    cfg = _checked_config(args.config, "cortex agent")
    if cfg is None:
        return 2
    logs.setup(cfg.node_id, cfg.log.level, cfg.log.format)
    return agent.run(cfg)


def cmd_config_check(args) -> int:
    cfg = _checked_config(args.file, "error")
    if cfg is None:
        return 2
    emit(args, {"ok": True, "node_id": cfg.node_id, "role": cfg.role}, f"{args.file}: ok ({cfg.node_id}, {cfg.role})")
    return 0


def register(commands: CommandRegistry) -> None:
    sp = commands.add("agent", cmd_agent, "run the node agent (the daemon)")
    sp.add_argument("--config", required=True, help="YAML config file")
    group = commands.group("config", "config tools")
    sp = commands.add("check", cmd_config_check, "validate a config file", group)
    sp.add_argument("file")
