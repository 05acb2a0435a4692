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


def record(test: str, what: str, seconds: float, note: str = "") -> None:
    row = {"test": test, "what": what, "seconds": round(seconds, 2), "note": note}
    print(f"TIMING {test}: {what}: {seconds:.1f} s {note}".rstrip(), flush=True)
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
    lines = [f"{'test':<{width_test}}  {'measurement':<{width_what}}  {'seconds':>8}  note",
             f"{'-' * width_test}  {'-' * width_what}  {'-' * 8}  ----"]
    for e in entries:
        lines.append(f"{e['test']:<{width_test}}  {e['what']:<{width_what}}  {e['seconds']:>8.1f}  {e['note']}")
    return "\n".join(lines)
