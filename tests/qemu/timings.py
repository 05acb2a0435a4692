"""Timings the VM tests measure: printed as they happen, appended to <artifacts>/timings.jsonl, and shown
as one table at the end of the session (conftest's terminal summary; `just qemu-test`)."""

from __future__ import annotations

import json
from pathlib import Path

_file: Path | None = None


def use(path: Path) -> None:
    global _file
    _file = path
    path.write_text("")


def record(test: str, what: str, value: float, note: str = "", unit: str = "s") -> None:
    row = {"test": test, "what": what, "value": round(value, 2), "unit": unit, "note": note}
    print(f"TIMING {test}: {what}: {value:.1f} {unit} {note}".rstrip(), flush=True)
    if _file is not None:
        with _file.open("a") as f:
            f.write(json.dumps(row) + "\n")


def rows(path: Path | None = None) -> list[dict]:
    path = path or _file
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(entries: list[dict]) -> str:
    if not entries:
        return ""
    width_test = max(len("test"), *(len(e["test"]) for e in entries))
    width_what = max(len("measurement"), *(len(e["what"]) for e in entries))
    lines = [f"{'test':<{width_test}}  {'measurement':<{width_what}}  {'value':>9}  note",
             f"{'-' * width_test}  {'-' * width_what}  {'-' * 9}  ----"]
    for e in entries:
        value = f"{e['value']:.1f} {e['unit']}"
        lines.append(f"{e['test']:<{width_test}}  {e['what']:<{width_what}}  {value:>9}  {e['note']}".rstrip())
    return "\n".join(lines)
