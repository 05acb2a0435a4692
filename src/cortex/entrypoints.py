"""Entry points of the installed distributions (plugins, commands, fence agents, executors) without
importlib.metadata.

The agent reads its entry points once at start. importlib.metadata brings email, zipfile, csv and their
kin along (about 1.4 MB of an idle agent's memory, never given back) to parse distribution metadata the agent
never looks at. This reads what it reads for entry points: `entry_points.txt` of each `*.dist-info` and
`*.egg-info` directory on sys.path, in sys.path order, the first distribution of a name winning. Where
importlib.metadata would look further (a zip file on sys.path, a finder on sys.meta_path with distributions
of its own), it is asked instead, so the answer is always the one it gives.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass
from importlib import import_module

_VALUE = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")


@dataclass(frozen=True)
class EntryPoint:
    name: str
    value: str
    group: str

    def load(self):
        """The object the value names (`module:attr.attr`), as importlib.metadata.EntryPoint.load."""
        match = _VALUE.match(self.value)
        if match is None:
            raise ValueError(f"entry point {self.name!r}: malformed value {self.value!r}")
        module = import_module(match.group("module"))
        attrs = filter(None, (match.group("attr") or "").split("."))
        return functools.reduce(getattr, attrs, module)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _parse(text: str, group: str) -> list[tuple[str, str]]:
    out, section = [], None
    for line in filter(None, map(str.strip, text.splitlines())):
        if line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == group and "=" in line:
            name, value = line.split("=", 1)
            out.append((name.strip(), value.strip()))
    return out


def _needs_importlib_metadata() -> bool:
    if any(os.path.isfile(p) for p in sys.path if p):
        return True  # a zip on sys.path: importlib.metadata reads distributions inside it
    standard = ("PathFinder", "BuiltinImporter", "FrozenImporter")
    return any(getattr(finder, "find_distributions", None) is not None
               and getattr(finder, "__name__", type(finder).__name__) not in standard for finder in sys.meta_path)


def entry_points(group: str) -> list[EntryPoint]:
    """The entry points of `group` of every installed distribution (importlib.metadata.entry_points(group=))."""
    if _needs_importlib_metadata():
        from importlib.metadata import entry_points as metadata_entry_points

        return [EntryPoint(ep.name, ep.value, group) for ep in metadata_entry_points(group=group)]
    seen: set[str] = set()
    out: list[EntryPoint] = []
    for path in sys.path:
        try:
            children = os.listdir(path or ".")
        except OSError:
            continue
        for child in children:
            low = child.lower()
            if not low.endswith((".dist-info", ".egg-info")):
                continue
            name = _normalize(low.rpartition(".")[0].partition("-")[0])
            if name in seen:
                continue
            seen.add(name)
            try:
                with open(os.path.join(path or ".", child, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:  # no entry points, or an egg-info file rather than a directory
                continue
            out.extend(EntryPoint(n, v, group) for n, v in _parse(text, group))
    return out
