"""A VM's serial console: QEMU writes it to a file (kept as a test artifact); a thread reads it as it
grows and stamps every line with the host's monotonic clock, so boot milestones can be timed."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

# Lines that mean the boot is lost: the harness fails at once instead of waiting for its deadline.
FATAL = re.compile(
    r"Kernel panic - not syncing"
    r"|You are in emergency mode"
    r"|Cannot open access to console, the root account is locked"
    r"|Give root password for maintenance"
    r"|Starting (emergency|rescue)\.service"
    r"|No bootable option or device was found"
    r"|No bootable device\."        # SeaBIOS: nothing left to try (a PXE node's network boot failed too)
    # the disk is the first boot option: the firmware moving on to another one means the disk did not boot
    r"|BdsDxe: failed to load Boot\d+"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean(raw: str) -> str:
    """A console line without colour codes and carriage returns."""
    return ANSI.sub("", raw).replace("\r", "")


class SerialConsole:
    def __init__(self, path: Path, poll: float = 0.05):
        self.path = path
        self.poll = poll
        self.lines: list[tuple[float, str]] = []  # (host monotonic time first seen, cleaned line)
        self._partial = ""        # the line being written: a prompt ("login: ") may never be finished
        self._partial_seen = 0.0  # when its first bytes arrived
        self._offset = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name=f"console-{self.path.parent.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        self._read_new()  # whatever QEMU wrote last

    def _follow(self) -> None:
        while not self._stop.is_set():
            self._read_new()
            time.sleep(self.poll)

    def _read_new(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._offset += len(data)
        now = time.monotonic()
        text = self._partial + data.decode("utf-8", errors="replace")
        *complete, partial = text.split("\n")
        with self._cond:
            if complete:
                first, *rest = complete
                self.lines.append((self._partial_seen if self._partial else now, clean(first)))
                self.lines.extend((now, clean(line)) for line in rest)
            if partial and (complete or not self._partial):
                self._partial_seen = now
            self._partial = partial
            self._cond.notify_all()

    def mark(self) -> int:
        """A position: later searches can start from here (e.g. the lines of the next boot). An unfinished
        line belongs to before the mark."""
        with self._cond:
            return len(self.lines) + (1 if self._partial else 0)

    def find(self, pattern: re.Pattern, start: int = 0) -> tuple[int, float, re.Match] | None:
        """(index, time seen, match) of the first line from `start` that matches, or None. The unfinished
        last line counts too: a prompt is not followed by a newline."""
        with self._cond:
            for i in range(start, len(self.lines)):
                m = pattern.search(self.lines[i][1])
                if m:
                    return i, self.lines[i][0], m
            m = pattern.search(clean(self._partial)) if self._partial and start <= len(self.lines) else None
            if m:
                return len(self.lines), self._partial_seen, m
        return None

    def fatal(self, start: int = 0) -> str | None:
        found = self.find(FATAL, start)
        return found[2].group(0) if found else None

    def wait(self, timeout: float) -> None:
        """Sleep until new lines arrive or `timeout` passes."""
        with self._cond:
            self._cond.wait(timeout)

    def tail(self, n: int = 40) -> str:
        with self._cond:
            partial = [clean(self._partial)] if self._partial else []
            return "\n".join([line for _, line in self.lines[-n:]] + partial)
