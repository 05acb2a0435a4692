"""What a service spec may say: checked before anything is proposed, normalized so every replica stores the same.

A spec (YAML or JSON) is::

    name: web                       # [a-z0-9-], at most 63
    kind: shell                     # or container
    command: "python3 -m http.server 8080"   # shell: required; container: optional (the image's own)
    image: localhost/web:1          # container only
    ports: [8080]
    env: {MODE: prod}
    resources: {memory_mb: 256, cpu_seconds: 0, max_files: 1024, cpus: 1, pids: 512}
    health: {http: 8080, path: /, interval: 5, timeout: 2, threshold: 3, grace: 10}
            # or {tcp: 8080, ...} or {exec: "test -f ready", ...}, or a string: "http://:8080/", "tcp:8080",
            # "exec:test -f ready"
    restart: {policy: always, backoff: 1, backoff_max: 60}   # always | on-failure | never
    volume: {mount: /data}          # or true; the data lives at <data_dir>/services/<name>/volume
    replicate_interval: 30          # seconds between the partners' pulls of the volume (the most a takeover loses)
    vip: 192.168.1.50/24            # a floating address, claimed where the service runs
    placement: {home: n1, partner: n2}   # or partners: [n2, n3], and/or partner_labels: {zone: b}
    auto_giveback: true
    giveback_after: 120

Everything here is pure (no clocks, no I/O) so the node that received the write and the leader agree; what
needs the cluster's state (unknown nodes, a VIP outside every node's networks, port clashes) is checked by
the `service.deploy` handler (state.py), which deploys nothing when a check fails.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from urllib.parse import urlsplit

from cortex.core.args import NODE_ID_RE, CommandError
from cortex.tasks.executor import TaskSpecError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
KINDS = ("shell", "container")
POLICIES = ("always", "on-failure", "never")
DEFAULT_GRACE = 15.0  # seconds a fresh start may fail health checks
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
FIELDS = {"name", "kind", "command", "image", "ports", "env", "resources", "health", "restart", "volume", "vip",
          "placement", "auto_giveback", "giveback_after", "network", "replicate_interval"}
DEFAULT_REPLICATE_INTERVAL = 30.0  # seconds between a partner's pulls of a running service's volume
RESOURCE_FIELDS = {"shell": {"memory_mb", "cpu_seconds", "max_files"}, "container": {"memory_mb", "cpus", "pids"}}


class SpecError(CommandError):
    """The service spec is malformed; nothing was deployed. The message names the field and what to write."""


def _only(doc: dict, allowed: set[str], where: str) -> None:
    extra = set(doc) - allowed
    if extra:
        raise SpecError(f"{where}: unknown field(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")


def _num(value, where: str, lo: float, hi: float, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise SpecError(f"{where} must be {'an integer' if integer else 'a number'} between {lo:g} and {hi:g}")
    if not lo <= value <= hi:
        raise SpecError(f"{where} must be between {lo:g} and {hi:g}, not {value}")
    return value


def _port(value, where: str) -> int:
    return int(_num(value, where, 1, 65535, integer=True))


def parse_health(value) -> dict | None:
    """A health check as {type, target..., interval, timeout, threshold, grace}; None when there is none."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _health_string(value)
    if not isinstance(value, dict):
        raise SpecError("health must be a mapping such as {http: 8080, path: /} or a string such as "
                        "'http://:8080/', 'tcp:8080' or 'exec:test -f ready'")
    _only(value, {"http", "tcp", "exec", "path", "interval", "timeout", "threshold", "grace"}, "health")
    types = [t for t in ("http", "tcp", "exec") if t in value]
    if len(types) != 1:
        raise SpecError("health needs exactly one of http (a port), tcp (a port) or exec (a command)")
    kind = types[0]
    out: dict = {"type": kind}
    if kind == "exec":
        command = value["exec"]
        if not (isinstance(command, str) and command.strip()) and not (
                isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
            raise SpecError("health.exec must be a shell string or a list of strings")
        out["command"] = command
    else:
        out["port"] = _port(value[kind], f"health.{kind}")
    if kind == "http":
        path = value.get("path", "/")
        if not isinstance(path, str) or not path.startswith("/") or len(path) > 1024 or any(c.isspace() for c in path):
            raise SpecError("health.path must be an absolute URL path such as /healthz")
        out["path"] = path
    elif "path" in value:
        raise SpecError("health.path applies only to an http check")
    out["interval"] = float(_num(value.get("interval", 5), "health.interval", 0.2, 3600))
    out["timeout"] = float(_num(value.get("timeout", 2), "health.timeout", 0.1, 600))
    out["threshold"] = int(_num(value.get("threshold", 3), "health.threshold", 1, 100, integer=True))
    # a fresh start's failed checks count only after the grace (checks run from the start, so a quick
    # starter is seen healthy at once; a slow one is not killed for not listening yet)
    out["grace"] = float(_num(value.get("grace", DEFAULT_GRACE), "health.grace", 0, 3600))
    return out


def _health_string(text: str) -> dict:
    text = text.strip()
    if text.startswith("exec:"):
        return {"exec": text[5:].strip()}
    if text.startswith("tcp:"):
        port = text[4:].strip().rsplit(":", 1)[-1]
        if not port.isdigit():
            raise SpecError(f"health {text!r}: a tcp check is 'tcp:PORT'")
        return {"tcp": int(port)}
    if text.startswith("http://"):
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise SpecError(f"health {text!r} is not a URL: {exc}") from None
        if port is None or parts.hostname not in (None, "", "localhost", "127.0.0.1"):
            raise SpecError(f"health {text!r}: write http://:PORT/PATH (the service's own port on its node)")
        return {"http": port, "path": parts.path or "/"}
    raise SpecError(f"health {text!r} is not understood; write 'http://:8080/healthz', 'tcp:8080' or "
                    "'exec:COMMAND'")


def _restart(value) -> dict:
    value = {} if value is None else value
    if isinstance(value, str):
        value = {"policy": value}
    if not isinstance(value, dict):
        raise SpecError("restart must be a mapping {policy, backoff, backoff_max} or a policy name")
    _only(value, {"policy", "backoff", "backoff_max"}, "restart")
    policy = value.get("policy", "always")
    if policy not in POLICIES:
        raise SpecError(f"restart.policy must be one of {', '.join(POLICIES)}")
    backoff = float(_num(value.get("backoff", 1.0), "restart.backoff", 0.1, 3600))
    backoff_max = float(_num(value.get("backoff_max", 60.0), "restart.backoff_max", backoff, 86400))
    return {"policy": policy, "backoff": backoff, "backoff_max": backoff_max}


def _volume(value, name: str) -> dict | None:
    if value in (None, False):
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise SpecError("volume must be true or a mapping {mount, path}")
    _only(value, {"mount", "path"}, "volume")
    default = f"services/{name}/volume"
    path = value.get("path", default)
    if not isinstance(path, str) or path.startswith("/") or posixpath.normpath(path).startswith("..") \
            or posixpath.normpath(path) != default:
        raise SpecError(f"volume.path {path!r} is outside the data dir's place for this service: a service's "
                        f"volume is <data_dir>/{default} (leave volume.path out)")
    mount = value.get("mount", "/data")
    if not isinstance(mount, str) or not mount.startswith("/") or posixpath.normpath(mount) in ("/", "/proc", "/dev"):
        raise SpecError("volume.mount must be an absolute path inside the container such as /data")
    return {"path": default, "mount": posixpath.normpath(mount)}


def _placement(value) -> dict:
    if not isinstance(value, dict):
        raise SpecError("placement must be a mapping such as {home: n1, partner: n2}")
    _only(value, {"home", "partner", "partners", "partner_labels"}, "placement")
    home = value.get("home")
    if not isinstance(home, str) or not NODE_ID_RE.match(home):
        raise SpecError("placement.home must be a node id (see `cortex nodes`)")
    partners = value.get("partners", [])
    if "partner" in value:
        if "partners" in value:
            raise SpecError("placement: give partner or partners, not both")
        partners = [value["partner"]]
    if not isinstance(partners, list) or not all(isinstance(p, str) and NODE_ID_RE.match(p) for p in partners):
        raise SpecError("placement.partners must be a list of node ids, in the order they take over")
    if home in partners:
        raise SpecError(f"placement: the partner {home!r} is the home node itself; name another node as partner")
    if len(set(partners)) != len(partners):
        raise SpecError("placement.partners names a node twice")
    labels = value.get("partner_labels", {})
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and _LABEL_RE.match(k) and isinstance(v, str) for k, v in labels.items()):
        raise SpecError("placement.partner_labels must map label names to strings (the tasks plugin's labels)")
    return {"home": home, "partners": partners, "partner_labels": dict(sorted(labels.items()))}


def validate(doc) -> dict:
    """A normalized spec, or SpecError saying what to fix."""
    if not isinstance(doc, dict):
        raise SpecError("a service spec is a mapping with at least name, kind, command or image, and placement")
    _only(doc, FIELDS, "spec")
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError("name must be 1-63 lowercase letters, digits and '-', starting with a letter or digit")
    kind = doc.get("kind", "shell")
    if kind not in KINDS:
        raise SpecError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    resources = doc.get("resources", {}) or {}
    if not isinstance(resources, dict):
        raise SpecError("resources must be a mapping")
    _only(resources, RESOURCE_FIELDS[kind], f"resources of a {kind} service")
    run: dict = {"env": doc.get("env") or {}, "network": True, **resources}
    if kind == "shell":
        if doc.get("image") is not None:
            raise SpecError("image applies to kind container; a shell service runs its command")
        run["command"] = doc.get("command")
    else:
        run["image"] = doc.get("image")
        if doc.get("command") is not None:
            run["command"] = doc["command"]
    try:  # the task executors' own checks: the same rules for a command or an image as a task's
        from cortex.tasks import executors

        run = executors.create(kind).validate(run)
    except TaskSpecError as exc:
        raise SpecError(f"{kind} service: {exc}") from None
    ports = doc.get("ports", [])
    if not isinstance(ports, list) or len(ports) > 64:
        raise SpecError("ports must be a list of at most 64 port numbers")
    ports = sorted({_port(p, "ports[]") for p in ports})
    health = parse_health(doc.get("health"))
    vip = doc.get("vip")
    if vip is not None:
        try:
            iface = ipaddress.ip_interface(vip)
        except ValueError:
            raise SpecError(f"vip {vip!r} is not an address with a prefix length such as 192.168.1.50/24") from None
        if "/" not in str(vip) or iface.ip == iface.network.network_address and iface.network.prefixlen < iface.max_prefixlen:
            raise SpecError(f"vip {vip!r}: give the address and its network's prefix length, e.g. 192.168.1.50/24")
        vip = str(iface)
    auto = doc.get("auto_giveback", True)
    if not isinstance(auto, bool):
        raise SpecError("auto_giveback must be true or false")
    volume = _volume(doc.get("volume"), name)
    out = {"name": name, "kind": kind, "run": run, "ports": ports, "health": health,
           "restart": _restart(doc.get("restart")), "volume": volume, "vip": vip,
           "placement": _placement(doc.get("placement")), "auto_giveback": auto,
           "giveback_after": float(_num(doc.get("giveback_after", 120), "giveback_after", 0, 7 * 86400))}
    if "replicate_interval" in doc and not volume:
        raise SpecError("replicate_interval applies to a service with a volume; add volume: true or leave it out")
    if volume:  # a spec without a volume stays as it was: nothing to replicate
        out["replicate_interval"] = float(_num(doc.get("replicate_interval", DEFAULT_REPLICATE_INTERVAL),
                                               "replicate_interval", 1, 86400))
    return out


def replicate_interval(spec: dict) -> float:
    """Seconds between pulls of the volume (specs stored before the field existed get the default)."""
    return float(spec.get("replicate_interval", DEFAULT_REPLICATE_INTERVAL))


def vip_fits(vip: str, networks: list[str]) -> bool:
    """Whether the floating address lies in one of the networks a node reported (CIDRs of its interfaces)."""
    address = ipaddress.ip_interface(vip).ip
    for cidr in networks:
        try:
            if address in ipaddress.ip_interface(cidr).network:
                return True
        except ValueError:
            continue
    return False


def nodes_of(spec: dict) -> list[str]:
    """The nodes named in a spec's placement, home first (label-matched partners are resolved later)."""
    return [spec["placement"]["home"], *spec["placement"]["partners"]]


def port_clash(spec: dict, others: list[dict]) -> str:
    """Why `spec` cannot share nodes with the other services' ports ('' when it can)."""
    mine = set(nodes_of(spec))
    for other in others:
        if other["name"] == spec["name"]:
            continue
        shared_ports = set(spec["ports"]) & set(other["ports"])
        shared_nodes = mine & set(nodes_of(other))
        if shared_ports and shared_nodes:
            return (f"port {min(shared_ports)} is already used by service {other['name']!r}, which may run on "
                    f"{', '.join(sorted(shared_nodes))}; pick another port or other nodes")
    return ""
