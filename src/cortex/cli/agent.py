"""`cortex agent` (the node daemon) and `cortex config check`: the commands that read a node's config file."""

from __future__ import annotations

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


def cmd_agent(args) -> int:
    from cortex.node import agent, logs

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
