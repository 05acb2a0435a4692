"""Proactive alerts: raise and clear with hysteresis, then deliver (event bus, inbox, webhooks).

`Alerter` is pure bookkeeping with the clock passed in: a condition must hold for `raise_after` seconds
before it is raised (one odd reading raises nothing), a raised alert stays at least `min_hold` seconds, and it
clears only after its condition has been gone for `clear_after` seconds. The clear thresholds themselves are
looser than the raise ones (predict.py judges a raised key against them), so nothing flaps at a boundary.
A raised alert that turns from warning to critical is raised again (a new transition), once.

`WebhookSender` posts one JSON document per transition to each configured URL on its own thread: `text`
(what Slack-style receivers show) and `message`/`title`/`priority`/`tags` (ntfy's JSON publishing), plus
the structured fields. A receiver that times out or answers an error is logged once, naming it, and the
document is retried with a doubling backoff (up to BACKOFF_MAX) while collection goes on; each receiver
gets its documents in order (a raise before its clear); the queue is bounded, and what it drops is counted.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("cortex.sentinel")

BACKOFF_MAX = 300.0
QUEUE_MAX = 200
SEVERITY_RANK = {"warning": 1, "critical": 2}


@dataclass
class _State:
    severity: str = ""
    pending_since: float | None = None
    raised_at: float | None = None
    absent_since: float | None = None
    doc: dict | None = None


class Alerter:
    def __init__(self, raise_after: float = 30.0, clear_after: float = 120.0, min_hold: float = 600.0):
        self.raise_after, self.clear_after, self.min_hold = raise_after, clear_after, min_hold
        self.states: dict[str, _State] = {}

    def raised(self) -> dict[str, dict]:
        return {k: s.doc for k, s in self.states.items() if s.raised_at is not None and s.doc is not None}

    def update(self, now: float, predictions: list[dict]) -> list[dict]:
        """Feed the current predictions; returns the transitions: {"state": "raised"|"cleared", **prediction}."""
        out = []
        current = {p["key"]: p for p in predictions}
        for key, p in current.items():
            s = self.states.setdefault(key, _State())
            s.absent_since = None
            if s.raised_at is None:
                if s.pending_since is None:
                    s.pending_since = now
                if now - s.pending_since >= self.raise_after:
                    s.raised_at, s.severity, s.doc = now, p["severity"], p
                    out.append({**p, "state": "raised"})
                continue
            s.doc = p
            if SEVERITY_RANK[p["severity"]] > SEVERITY_RANK.get(s.severity, 0):
                s.severity = p["severity"]
                out.append({**p, "state": "raised"})
        for key in list(self.states):
            if key in current:
                continue
            s = self.states[key]
            if s.raised_at is None:
                del self.states[key]  # a pending condition that went away raised nothing
                continue
            if s.absent_since is None:
                s.absent_since = now
            if now - s.absent_since >= self.clear_after and now - s.raised_at >= self.min_hold:
                out.append({**(s.doc or {"key": key}), "state": "cleared"})
                del self.states[key]
        return out


def webhook_document(node_id: str, t: dict, topic: str = "") -> dict:
    """The JSON body for one transition: readable as `text`, structured for whoever parses it."""
    verb = "cleared" if t["state"] == "cleared" else t["severity"].upper()
    text = f"[{verb}] {node_id}: {t.get('message', t['key'])}"
    doc = {"text": text, "message": text, "title": f"Cortex sentinel: {node_id} {t.get('kind', '')}".strip(),
           "priority": 5 if t.get("severity") == "critical" and t["state"] == "raised" else 3,
           "tags": ["cortex", t.get("severity", "")], "node": node_id, "key": t["key"], "state": t["state"],
           "severity": t.get("severity", ""), "kind": t.get("kind", ""), "target": t.get("target", ""),
           "eta_s": t.get("eta_s"), "confidence": t.get("confidence"), "ts": t.get("ts", time.time())}
    if topic:
        doc["topic"] = topic
    return doc


class WebhookSender:
    def __init__(self, urls: list[str], timeout: float = 5.0, topic: str = "", first_backoff: float = 1.0):
        self.urls, self.timeout, self.topic, self.first_backoff = list(urls), timeout, topic, first_backoff
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._failing: set[str] = set()
        self.dropped = 0
        self.delivered = 0
        self.failures = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.urls and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sentinel-webhooks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)

    def send(self, doc: dict) -> None:
        with self._cv:
            for url in self.urls:
                if len(self._queue) >= QUEUE_MAX:
                    self._queue.popleft()
                    self.dropped += 1
                self._queue.append((url, doc, 0.0, self.first_backoff))  # (url, body, not before, next backoff)
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def _post(self, url: str, doc: dict) -> None:
        import urllib.request  # only nodes with a webhook configured pay for it

        request = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "cortex-sentinel"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            response.read(4096)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._queue:
                    self._cv.wait()
                if self._stop:
                    return
                now = time.monotonic()
                heads, seen = [], set()  # each receiver gets its documents in order: only its first is due
                for i, item in enumerate(self._queue):
                    if item[0] not in seen:
                        seen.add(item[0])
                        heads.append(i)
                ready = next((i for i in heads if self._queue[i][2] <= now), None)
                if ready is None:
                    self._cv.wait(timeout=max(0.05, min(self._queue[i][2] for i in heads) - now))
                    continue
                url, doc, _, backoff = self._queue[ready]
                del self._queue[ready]
            try:
                self._post(url, doc)
            except Exception as exc:
                self.failures += 1
                if url not in self._failing:
                    self._failing.add(url)
                    log.warning("sentinel webhook failed; retrying with backoff",
                                extra={"fields": {"receiver": url, "error": f"{type(exc).__name__}: {exc}"}})
                with self._cv:  # back at the front: it stays its receiver's next document
                    self._queue.appendleft((url, doc, time.monotonic() + backoff, min(BACKOFF_MAX, backoff * 2)))
                    if len(self._queue) > QUEUE_MAX:
                        self._queue.pop()
                        self.dropped += 1
                continue
            self.delivered += 1
            if url in self._failing:
                self._failing.discard(url)
                log.info("sentinel webhook delivers again", extra={"fields": {"receiver": url}})
