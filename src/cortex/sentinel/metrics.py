"""Prometheus /metrics for the sentinel: every raw signal, the score, the predictions.

The text exposition format (version 0.0.4) is written here and served by a small `socketserver` handler:
every agent serves it from start, and prometheus_client with `http.server` (its import pulls in urllib, email,
wsgiref and asyncio) held about 3 MB of each idle server for what is a few lines of text. Values are read at
scrape time from what the plugin last collected and assessed; nothing is kept twice. A signal
`group.metric:target` becomes `cortex_sentinel_group_metric{target="..."}`; absent signals are not exported.
"""

from __future__ import annotations

import math
import re
import socket
import socketserver
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cortex.sentinel.plugin import SentinelPlugin

LEVELS = {"healthy": 0, "degraded": 1, "critical": 2}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATHS = ("/metrics", "/")
MAX_LINE = 8192  # request line or one header: a scraper's are far shorter
MAX_HEADERS = 100
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request: a stalled one does not hold a thread


def metric_name(signal: str) -> str:
    return "cortex_sentinel_" + re.sub(r"[^a-zA-Z0-9_]", "_", signal)


def _value(v: float) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _label(v: str) -> str:
    return str(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class Gauge:
    """One gauge family: its samples, each with the values of its labels in order."""

    def __init__(self, name: str, help: str, labels: list[str]):
        self.name, self.help, self.labels = name, help, labels
        self.samples: list[tuple[list[str], float]] = []

    def add(self, values: list[str], value: float) -> None:
        self.samples.append((values, value))

    def render(self) -> str:
        help_text = self.help.replace("\\", r"\\").replace("\n", r"\n")
        lines = [f"# HELP {self.name} {help_text}",
                 f"# TYPE {self.name} gauge"]
        for values, value in self.samples:
            labels = ",".join(f'{k}="{_label(v)}"' for k, v in zip(self.labels, values, strict=True))
            lines.append(f"{self.name}{{{labels}}} {_value(value)}")
        return "\n".join(lines) + "\n"


def families(p: SentinelPlugin) -> list[Gauge]:
    out: dict[str, Gauge] = {}
    for signal, value in sorted(p.latest.items()):
        if value is None:
            continue
        base, _, target = signal.partition(":")
        name = metric_name(base)
        family = out.get(name)
        if family is None:
            family = out[name] = Gauge(name, f"sentinel signal {base}", ["node", "target"])
        family.add([p.node_id, target], float(value))
    result = list(out.values())
    a = p.assessment
    score = Gauge("cortex_sentinel_score", "node health score, 0-100 (100: nothing lowers it)", ["node"])
    score.add([p.node_id], float(a["score"]))
    level = Gauge("cortex_sentinel_level", "0 healthy, 1 degraded, 2 critical", ["node"])
    level.add([p.node_id], LEVELS.get(a["level"], 0))
    labels = ["node", "key", "kind", "target", "severity"]
    eta = Gauge("cortex_sentinel_prediction_eta_seconds", "seconds until the predicted failure", labels)
    conf = Gauge("cortex_sentinel_prediction_confidence", "confidence of a prediction, 0-1", labels)
    for pred in a["predictions"]:
        values = [p.node_id, pred["key"], pred["kind"], pred["target"], pred["severity"]]
        if pred.get("eta_s") is not None:
            eta.add(values, float(pred["eta_s"]))
        conf.add(values, float(pred["confidence"]))
    own = Gauge("cortex_sentinel_collect_cpu_percent", "share of one core the collection used", ["node"])
    own.add([p.node_id], p.collect_cpu_pct())
    hooks = Gauge("cortex_sentinel_webhook_failures", "webhook deliveries that failed", ["node"])
    hooks.add([p.node_id], float(p.webhooks.failures))
    return result + [score, level, eta, conf, own, hooks]


def render(p: SentinelPlugin) -> bytes:
    return "".join(f.render() for f in families(p)).encode()


class _Handler(socketserver.StreamRequestHandler):
    """HTTP/1.0, one request per connection: GET or HEAD of /metrics (or /), nothing else."""

    timeout = REQUEST_TIMEOUT

    def handle(self) -> None:
        try:
            request = self.rfile.readline(MAX_LINE + 1)
            for _ in range(MAX_HEADERS):  # the headers say nothing this server uses
                line = self.rfile.readline(MAX_LINE + 1)
                if line in (b"\r\n", b"\n", b""):
                    break
            else:
                return self._reply(431, b"too many headers\n")
        except OSError:  # TimeoutError included
            return None
        parts = request.decode("latin-1").split()
        if len(request) > MAX_LINE or len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return self._reply(400, b"bad request\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return self._reply(405, b"only GET\n", head=False, allow=True)
        if target not in PATHS:
            return self._reply(404, b"not found: /metrics\n")
        try:
            body = render(self.server.plugin)
        except Exception as exc:  # an assessment being replaced mid-read, say: the scrape fails, not the agent
            return self._reply(500, f"{type(exc).__name__}: {exc}\n".encode())
        return self._reply(200, body, head=method == "HEAD", content_type=CONTENT_TYPE)

    def _reply(self, status: int, body: bytes, head: bool = False, allow: bool = False,
               content_type: str = "text/plain; charset=utf-8") -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 500: "Internal Server Error"}[status]
        header = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                  + ("Allow: GET, HEAD\r\n" if allow else "") + "Connection: close\r\n\r\n")
        try:
            self.wfile.write(header.encode() + (b"" if head else body))
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, plugin: SentinelPlugin):
        # IPv6 when the host is one (or a name that only resolves to one), as prometheus_client chose
        self.address_family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0][0]
        self.plugin = plugin
        super().__init__((host, port), _Handler)


class MetricsServer:
    """/metrics on host:port; a port already taken falls back to any free one (the record says which)."""

    def __init__(self, plugin: SentinelPlugin, host: str, port: int):
        try:
            self.server = _Server(host, port, plugin)
        except OSError:
            if port == 0:
                raise
            self.server = _Server(host, 0, plugin)
        self.thread = threading.Thread(target=self.server.serve_forever, name="sentinel-metrics", daemon=True)
        self.thread.start()
        bound = self.server.server_address
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
