"""The one way commands join `cortex`: a callable `register(commands: CommandRegistry) -> None`, listed in the
`cortex.cli` entry-point group (pyproject.toml), so a package adds commands by being installed. The built-in
sub-CLIs register the same way. Shared printing and connection code is in cortex.cli.output."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

ENTRY_POINT_GROUP = "cortex.cli"

Command = Callable[[argparse.Namespace], int]


class CommandRegistry:
    """Builds the argparse tree. Commands and groups are named by their path below `cortex`, e.g. "nodes" or
    "netboot profiles"; `parent` is such a path ("" for the top level)."""

    def __init__(self, root: argparse._SubParsersAction, common: argparse.ArgumentParser):
        self.common = common  # the global options (--json, --addr, --socket, --timeout), without defaults
        self._groups: dict[str, argparse._SubParsersAction] = {"": root}
        self._parsers: dict[str, argparse.ArgumentParser] = {}

    def group(self, name: str, help: str, parent: str = "", fn: Command | None = None, **defaults) -> str:
        """A command with subcommands; with `fn` it also runs alone (`cortex nodes`), else a subcommand is
        required. Returns its path, the `parent` of what goes under it."""
        parents = [self.common] if fn else []
        parser = self._new(parent, name, help, parents)
        if fn:
            parser.set_defaults(fn=fn, **defaults)
        path = _join(parent, name)
        self._groups[path] = parser.add_subparsers(dest="sub2" if parent else "sub", required=fn is None)
        return path

    def add(self, name: str, fn: Command, help: str, parent: str = "",
            parents: Iterable[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        """A command; returns its parser for the command's own arguments (`parents`: shared option sets)."""
        parser = self._new(parent, name, help, [self.common, *parents])
        parser.set_defaults(fn=fn)
        return parser

    def parser(self, path: str) -> argparse.ArgumentParser:
        """A registered command's or group's parser, to add options to it."""
        try:
            return self._parsers[path]
        except KeyError:
            raise ValueError(f"no command `cortex {path}` is registered") from None

    def _new(self, parent: str, name: str, help: str, parents: list) -> argparse.ArgumentParser:
        if parent not in self._groups:
            raise ValueError(f"no command group `cortex {parent}` to add {name!r} to")
        path = _join(parent, name)
        if path in self._parsers:
            raise ValueError(f"`cortex {path}` is registered twice")
        self._parsers[path] = self._groups[parent].add_parser(name, help=help, parents=parents)
        return self._parsers[path]


def _join(parent: str, name: str) -> str:
    return f"{parent} {name}" if parent else name
