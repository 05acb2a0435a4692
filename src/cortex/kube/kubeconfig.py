"""Which Kubernetes contexts this node has: kubeconfig files read and merged the way kubectl does.

Files come from KUBECONFIG (os.pathsep-separated; empty entries skipped, duplicates read once) or, when it
is unset, ~/.kube/config; the plugin's `extra_paths` (k3s writes /etc/rancher/k3s/k3s.yaml) come last.
kubectl's merge rules apply: for a cluster, user or context name present in several files the first file
wins, and `current-context` comes from the first file that sets it.

Nothing here runs an exec or auth-provider plugin (gke-gcloud-auth-plugin, aws, kubelogin): discovery only
names them. Credentials stay in the files; a `KubeContext` holds no secret by construction (no tokens,
certificates, passwords, exec arguments or environment), so its `public()` form is safe to replicate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class KubeContext:
    name: str
    cluster: str
    server: str  # https://host:port, userinfo and query removed
    namespace: str
    user: str
    auth: str  # token, token-file, client-cert, basic, exec, auth-provider, none
    auth_plugin: str  # the exec command's file name or the auth-provider's name; "" otherwise
    flavor: str  # gke, eks, aks, k3s, kind, minikube or kubernetes: a hint for people, never used for auth
    source: str  # the file the context came from

    def public(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Discovery:
    contexts: tuple[KubeContext, ...] = ()
    current: str = ""
    files: tuple[str, ...] = ()  # files read, in precedence order
    problems: tuple[str, ...] = ()  # unreadable files, dangling references: shown, never fatal

    def get(self, name: str) -> KubeContext | None:
        return next((c for c in self.contexts if c.name == name), None)

    @property
    def paths(self) -> str:
        """The files joined like KUBECONFIG, for the client library (which merges with the same rules)."""
        return os.pathsep.join(self.files)

    def public(self) -> dict:
        return {"current": self.current, "contexts": [c.public() for c in self.contexts],
                "files": list(self.files), "problems": list(self.problems)}


def kubeconfig_paths(environ: Mapping[str, str], home: Path | None, extra: Sequence[str] = ()) -> list[Path]:
    """The kubeconfig files to read, in precedence order, each once."""
    raw = environ.get("KUBECONFIG", "")
    if raw:
        paths = [p for p in raw.split(os.pathsep) if p]
    else:
        paths = [str(home / ".kube" / "config")] if home is not None else []
    out: list[Path] = []
    for p in [*paths, *extra]:
        path = Path(os.path.expanduser(p))
        if path not in out:
            out.append(path)
    return out


def discover(paths: Sequence[Path]) -> Discovery:
    """Read and merge the files that exist; a broken file is a problem to report, not an exception."""
    docs: list[tuple[str, dict]] = []
    problems: list[str] = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            problems.append(f"{path}: cannot read: {str(exc).splitlines()[0]}")
            continue
        if doc is None:
            continue  # an empty file is legal and contributes nothing
        if not isinstance(doc, dict):
            problems.append(f"{path}: not a kubeconfig (expected a mapping at the top)")
            continue
        docs.append((str(path), doc))
    return merge(docs, problems)


def merge(docs: Sequence[tuple[str, dict]], problems: Sequence[str] = ()) -> Discovery:
    """kubectl's merge of parsed kubeconfig documents (source, document), first file winning."""
    problems = list(problems)
    clusters: dict[str, dict] = {}
    users: dict[str, dict] = {}
    contexts: dict[str, tuple[str, dict]] = {}
    current = ""
    for source, doc in docs:
        for key, table in (("clusters", clusters), ("users", users)):
            for entry in _named_entries(doc, key, source, problems):
                table.setdefault(entry[0], entry[1])
        for name, body in _named_entries(doc, "contexts", source, problems):
            contexts.setdefault(name, (source, body))
        if not current and isinstance(doc.get("current-context"), str):
            current = doc["current-context"]
    found = []
    for name, (source, ctx) in contexts.items():
        cluster_name, user_name = str(ctx.get("cluster") or ""), str(ctx.get("user") or "")
        cluster = clusters.get(cluster_name)
        if cluster is None:
            problems.append(f"{source}: context {name!r} refers to cluster {cluster_name!r}, which no file defines")
            continue
        user = users.get(user_name, {}) if user_name else {}
        if user_name and user_name not in users:
            problems.append(f"{source}: context {name!r} refers to user {user_name!r}, which no file defines")
        auth, plugin = _auth_kind(user)
        server = _public_url(str(cluster.get("server") or ""))
        found.append(KubeContext(name=name, cluster=cluster_name, server=server,
                                 namespace=str(ctx.get("namespace") or DEFAULT_NAMESPACE), user=user_name,
                                 auth=auth, auth_plugin=plugin,
                                 flavor=_flavor(name, cluster_name, user_name, server, plugin, source),
                                 source=source))
    if current and current not in contexts:
        problems.append(f"current-context {current!r} is not defined in any file")
    return Discovery(tuple(found), current, tuple(s for s, _ in docs), tuple(problems))


def _named_entries(doc: dict, key: str, source: str, problems: list[str]) -> list[tuple[str, dict]]:
    """[(name, body)] of a clusters/users/contexts list; malformed entries are reported and skipped."""
    inner = {"clusters": "cluster", "users": "user", "contexts": "context"}[key]
    out = []
    for i, entry in enumerate(doc.get(key) or []):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]):
            problems.append(f"{source}: {key}[{i}] has no name; skipped")
            continue
        body = entry.get(inner) or {}
        out.append((entry["name"], body if isinstance(body, dict) else {}))
    return out


def _auth_kind(user: dict) -> tuple[str, str]:
    if isinstance(user.get("exec"), dict):
        return "exec", os.path.basename(str(user["exec"].get("command") or ""))
    if isinstance(user.get("auth-provider"), dict):
        return "auth-provider", str(user["auth-provider"].get("name") or "")
    if user.get("token"):
        return "token", ""
    if user.get("tokenFile"):
        return "token-file", ""
    if user.get("client-certificate") or user.get("client-certificate-data"):
        return "client-cert", ""
    if user.get("username"):
        return "basic", ""
    return "none", ""


def _public_url(server: str) -> str:
    """The server URL without userinfo or query: the parts that could carry a credential."""
    try:
        parts = urlsplit(server)
    except ValueError:
        return ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _flavor(name: str, cluster: str, user: str, server: str, plugin: str, source: str) -> str:
    if plugin in ("gke-gcloud-auth-plugin", "gcp") or cluster.startswith("gke_"):
        return "gke"
    if plugin in ("aws", "aws-iam-authenticator") or cluster.startswith("arn:aws:eks:"):
        return "eks"
    if plugin in ("kubelogin", "azure") or ".azmk8s.io" in server:
        return "aks"
    if "k3s" in os.path.basename(source) or "rancher/k3s" in source or (
            name == cluster == user == "default" and server.endswith(":6443")):
        return "k3s"
    if cluster.startswith("kind-"):
        return "kind"
    if cluster == "minikube":
        return "minikube"
    return "kubernetes"
