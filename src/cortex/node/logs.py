"""Structured logging: one JSON object per line (or `key=value` text), with fields passed as extra."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str):
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": self.node_id,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, node_id: str):
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in (getattr(record, "fields", {}) or {}).items())
        line = f"{record.levelname.lower():7} {self.node_id} {record.name}: {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class RepeatLimit(logging.Filter):
    """pysyncobj retries a failing tick every 50 ms and logs every failure with its traceback (a full disk
    would write twenty a second): of each kind of line from loggers under `prefix`, the first is logged,
    repeats within `window` seconds are only counted, and the first one after the window carries that count
    as `repeated`. A kind is the logger, the level, the message and the exception's type and text."""

    MAX_KINDS = 256

    def __init__(self, prefix: str = "pysyncobj", window: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.prefix, self.window, self.clock = prefix, window, clock
        self._kinds: dict[tuple, list] = {}  # kind -> [when last logged, repeats left out since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        kind = (record.name, record.levelno, str(record.msg), type(exc).__name__ if exc else "", str(exc or ""))
        now = self.clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                return False
            repeated = seen[1] if seen else 0
            self._kinds.pop(kind, None)
            self._kinds[kind] = [now, 0]
            if len(self._kinds) > self.MAX_KINDS:  # the oldest logged kind goes first
                self._kinds.pop(next(iter(self._kinds)))
        if repeated:
            record.fields = {**(getattr(record, "fields", None) or {}), "repeated": repeated}
        return True


def setup(node_id: str, level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node_id) if fmt == "json" else TextFormatter(node_id))
    # pysyncobj's own lines (a tick that raises, a snapshot it cannot store) say why Raft misbehaves: they
    # are logged at their level like every other line, a line it repeats every tick once a minute.
    handler.addFilter(RepeatLimit("pysyncobj"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pysyncobj").setLevel(logging.NOTSET)


def fields(**kw) -> dict:
    """logging extra= helper: log.info("joined", extra=fields(node="n2"))."""
    return {"fields": kw}
