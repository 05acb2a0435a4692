"""`cortex`: the command line for humans. Tables by default, `--json` everywhere, errors say what to do next."""

from __future__ import annotations

import os

# Before gRPC loads: its C core prints a line per failed TLS handshake (WRONG_VERSION_NUMBER while a node turns
# on mutual TLS, or when --addr names a web port), which says in C++ terms what the error and hint below say
# in words. GRPC_VERBOSITY=INFO in the environment brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # noqa: E402
import sys  # noqa: E402
from importlib.metadata import entry_points

from cortex.cli import agent, dev, kv, lifecycle, nodes, status, token
from cortex.cli.output import UsageError, common_options
from cortex.cli.registry import ENTRY_POINT_GROUP, CommandRegistry

# The core commands, in the order `cortex --help` lists them; everything else comes from entry points.
CORE = (agent, lifecycle, status, nodes, kv, token, dev)


def build_parser(builtin_only: bool = False, core_only: bool = False) -> argparse.ArgumentParser:
    """The whole `cortex` parser; `builtin_only` leaves out commands of other installed packages (the
    generated reference documents Cortex's own), `core_only` every command from an entry point."""
    parser = argparse.ArgumentParser(prog="cortex", description=__doc__, parents=[common_options(defaults=True)])
    commands = CommandRegistry(parser.add_subparsers(dest="command", required=True), common_options(defaults=False))
    for module in CORE:
        module.register(commands)
    if core_only:
        return parser
    # by name, so the tree (and the generated reference) is the same whatever order packages were installed in
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        if builtin_only and not entry.value.startswith("cortex."):
            continue
        try:
            entry.load()(commands)
        except Exception as exc:  # one broken extension must not take the whole CLI down
            print(f"cortex: commands from {entry.name} ({entry.value}) not loaded: {exc}", file=sys.stderr)
    return parser


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """`cortex agent` needs none of the entry points' commands: loading them (each plugin's CLI module and its
    parsers) would keep about 1.5 MB in the daemon for its whole life."""
    return build_parser(core_only=argv[:1] == ["agent"])


def error_hint(exc, args) -> str:
    """The next step for a failed call, from its cause: a node waiting to join, nothing listening, a web port
    given as --addr, a missing client certificate, a cluster without quorum. An answer the node gave about
    the request itself (no such task, bad arguments) needs no hint: its message says it."""
    from cortex.client import unreachable_hint

    if exc.code.name == "FAILED_PRECONDITION":
        return "see `cortex status` for what the node is waiting for" if "not in a cluster" in exc.details else ""
    return unreachable_hint(exc.address or getattr(args, "addr", ""), exc.code.name, exc.details, exc.plaintext)


def main(argv: list[str] | None = None) -> int:
    from cortex.client import CortexError

    argv = sys.argv[1:] if argv is None else argv
    args = parser_for(argv).parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 2
    except CortexError as exc:
        hint = error_hint(exc, args)
        print(f"cortex: {exc.details or exc.code.name}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
