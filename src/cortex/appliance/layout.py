"""The smallest disk the appliance's partition layout fits on, computed from its systemd-repart definitions.

The image file is only the build-time part of the layout (ESP, `/usr` slot A and its verity); on first
boot systemd-repart adds slot B, its verity and the state partition from `image/tree/usr/lib/repart.d`.
A device that holds the image but not that layout boots once and then fails in systemd-repart, so
`image/flash.sh` refuses it up front with this number, and the image README quotes it from here.

Standard library only: `flash.sh` runs this file with the host's `python3`, outside any virtualenv:

    python3 src/cortex/appliance/layout.py image/tree/usr/lib/repart.d      # prints bytes
    python3 src/cortex/appliance/layout.py --human image/tree/usr/lib/repart.d
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# systemd-repart places partitions on 4 KiB boundaries (its default grain) after the primary GPT, which
# with the usual 1 MiB alignment of the first partition costs up to 1 MiB at the start; the backup GPT
# (33 sectors, up to 132 KiB with 4 KiB sectors) sits at the end. One MiB each side covers both.
GRAIN = 4 * KiB
GPT_OVERHEAD = 2 * MiB
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTE]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB, "E": 1024 ** 6}


class LayoutError(ValueError):
    """A repart definition this calculation cannot read; says which file and key."""


@dataclass(frozen=True)
class Part:
    file: str
    type: str
    min_bytes: int
    padding_bytes: int = 0

    @property
    def footprint(self) -> int:
        return _round_up(self.min_bytes, GRAIN) + _round_up(self.padding_bytes, GRAIN)


def parse_size(value: str, where: str) -> int:
    """repart's sizes: a number with an optional K/M/G/T suffix, base 1024 (`512M`, `1G`)."""
    match = _SIZE_RE.match(value)
    if not match:
        raise LayoutError(f"{where}: {value!r} is not a size like 512M or 1G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def read_definition(path: Path) -> Part:
    """One repart.d file: its [Partition] Type, SizeMinBytes and PaddingMinBytes (later keys win, as in repart)."""
    values: dict[str, str] = {}
    section = ""
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise LayoutError(f"{path}:{number}: not key=value: {line!r}")
        if section == "Partition":
            values[key.strip()] = value.strip()
    if "Type" not in values:
        raise LayoutError(f"{path}: no [Partition] Type=")
    # Without SizeMinBytes repart gives a partition at least one grain (10 MiB for a formatted one).
    low = parse_size(values["SizeMinBytes"], f"{path}: SizeMinBytes") if "SizeMinBytes" in values else GRAIN
    padding = parse_size(values["PaddingMinBytes"], f"{path}: PaddingMinBytes") if "PaddingMinBytes" in values else 0
    return Part(file=path.name, type=values["Type"], min_bytes=low, padding_bytes=padding)


def read_layout(directory: str | Path) -> list[Part]:
    """Every `*.conf` in a repart.d directory, in repart's (file name) order."""
    folder = Path(directory)
    files = sorted(folder.glob("*.conf"))
    if not files:
        raise LayoutError(f"no repart definitions (*.conf) in {folder}")
    return [read_definition(f) for f in files]


def minimum_disk_bytes(parts: list[Part]) -> int:
    """The smallest device on which systemd-repart can complete the layout, rounded up to a MiB."""
    return _round_up(GPT_OVERHEAD + sum(p.footprint for p in parts), MiB)


def human(n: int) -> str:
    """`3650 MiB (3.56 GiB)`: MiB exactly, GiB for people comparing with a stick's label."""
    return f"{n / MiB:.0f} MiB ({n / GiB:.2f} GiB)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layout.py", description="Smallest disk for a repart.d layout.")
    parser.add_argument("directory", help="a repart.d directory, e.g. image/tree/usr/lib/repart.d")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--human", action="store_true", help="MiB and GiB instead of bytes")
    form.add_argument("--json", action="store_true", help="the partitions and the total as JSON")
    args = parser.parse_args(argv)
    try:
        parts = read_layout(args.directory)
    except (LayoutError, OSError) as exc:
        print(f"layout: {exc}", file=sys.stderr)
        return 2
    total = minimum_disk_bytes(parts)
    if args.json:
        print(json.dumps({"minimum_bytes": total, "gpt_overhead_bytes": GPT_OVERHEAD,
                          "partitions": [{"file": p.file, "type": p.type, "min_bytes": p.min_bytes,
                                          "padding_bytes": p.padding_bytes} for p in parts]}, indent=2))
    else:
        print(human(total) if args.human else total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
