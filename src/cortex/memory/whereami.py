"""whereami.md: a Markdown snapshot of active threads and recent context, regenerated after changes.

`render` is pure (state in, text out) so every node writes the same text for the same state; `Debouncer`
turns a burst of change events into one regeneration; `write_if_changed` replaces the file atomically and
leaves it untouched when nothing changed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else "-"


def _one_line(text: str, width: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _value(value) -> str:
    return _one_line(value if isinstance(value, str) else json.dumps(value, sort_keys=True), 120)


def render(shared: dict, local: dict, node_id: str) -> str:
    """The snapshot: active threads with their latest thoughts, paused threads with their handoff, context."""
    active = shared["active"] + local["active"]
    paused = shared["paused"] + local["paused"]
    out = ["# Where am I", "",
           f"Node `{node_id}` · shared memory at change {shared['change_index']}"
           + (f" · {len(local['active']) + len(local['pinned']) + len(local['recent_context'])} local item(s)"
              if local["active"] or local["pinned"] or local["recent_context"] else ""),
           ""]
    out += ["## Active threads", ""]
    if not active:
        out += ["_No active threads._", ""]
    for thread in sorted(active, key=lambda t: (-t["updated_at"], t["id"])):
        project = f" · project {thread['project']}" if thread["project"] else ""
        out.append(f"### {thread['title']} (`{thread['id']}`)")
        out.append(f"{thread['thoughts']} thought(s){project} · {thread['tier']} · updated {_when(thread['updated_at'])}")
        out.append("")
        for thought in thread.get("recent", []):
            out.append(f"- **{thought['type']}** ({_when(thought['created_at'])}): {_one_line(thought['content'])}")
        out.append("")
    if paused:
        out += ["## Paused threads (handed off)", ""]
        for thread in sorted(paused, key=lambda t: (-t["updated_at"], t["id"])):
            handoff = thread.get("handoff")
            out.append(f"### {thread['title']} (`{thread['id']}`)")
            if handoff:
                to = f" to {handoff['to']}" if handoff.get("to") else ""
                out.append(f"Handed off{to} {_when(handoff['created_at'])}: {_one_line(handoff['summary'])}")
                for step in handoff.get("next_steps", []):
                    out.append(f"- [ ] {_one_line(step)}")
            out.append("")
    pinned = shared["pinned"] + local["pinned"]
    if pinned:
        out += ["## Pinned context", ""]
        for entry in sorted(pinned, key=lambda e: e["key"]):
            label = f" — {entry['label']}" if entry["label"] else ""
            out.append(f"- `{entry['key']}` ({entry['category']}){label}: {_value(entry['value'])}")
        out.append("")
    recent = sorted(shared["recent_context"] + local["recent_context"], key=lambda e: (-e["updated_at"], e["key"]))
    if recent:
        out += ["## Recent context", ""]
        for entry in recent[:15]:
            label = f" — {entry['label']}" if entry["label"] else ""
            out.append(f"- `{entry['key']}` ({entry['category']}, {_when(entry['updated_at'])}){label}: "
                       f"{_value(entry['value'])}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    return True


class Debouncer:
    """Calls `action` once, `delay` seconds after the last `poke()` of a burst (at most every `delay`)."""

    def __init__(self, delay: float, action: Callable[[], None], on_error: Callable[[Exception], None]):
        self._delay = delay
        self._action = action
        self._on_error = on_error
        self._due: float | None = None
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="memory-whereami", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        with self._cond:
            self._due = time.monotonic() + self._delay
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (self._due is None or time.monotonic() < self._due):
                    self._cond.wait(None if self._due is None else max(0.0, self._due - time.monotonic()))
                if self._stopped:
                    return
                self._due = None
            try:
                self._action()
            except Exception as exc:
                self._on_error(exc)
