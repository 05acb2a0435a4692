"""Kubeconfig `exec` credentials (gke-gcloud-auth-plugin, `aws eks get-token`, kubelogin), run when a job needs
them, the way kubectl runs them.

The plugin is started with the kubeconfig's command, args and env (on top of the node's environment), no
stdin, and `KUBERNETES_EXEC_INFO` describing the request (`interactive: false`, and the cluster when
`provideClusterInfo` asks for it). Its stdout must be an `ExecCredential` of the configured apiVersion
(`client.authentication.k8s.io/v1` or `v1beta1`) whose status holds a bearer token or a client certificate
and key, optionally with an `expirationTimestamp`. The credential is cached per (file, user, exec entry) until
it is within EXPIRY_SKEW of expiring, or, without an expiry, until the API server refuses it (401): the
plugin is not run for every call, as a job makes many.

The client library can run exec plugins itself, but it logs a failing one and carries on without
credentials (the job then fails later with a bare 401), never caches, and has no word for a plugin that is
not installed. Here each failure is an error naming the context, the plugin and what to do (its installHint
when it is missing). Discovery (kubeconfig.py) never runs a plugin.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
PLUGIN_TIMEOUT = 60.0  # seconds; a cloud CLI refreshing a token may take a while, a hung one must not hang the job
EXPIRY_SKEW = 30.0  # a credential this close to its expiry is fetched anew


class ExecCredentialError(Exception):
    """The plugin could not give a credential; the message says which context, which plugin and what to do.
    Not retryable when only a change on the node helps (a plugin not installed, a kubeconfig to fix)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Credential:
    token: str = ""
    client_certificate: str = ""  # PEM
    client_key: str = ""  # PEM
    expires_at: float | None = None  # epoch seconds; None: until refused

    def fresh(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at - EXPIRY_SKEW


@dataclass(frozen=True)
class Entries:
    """A context's own kubeconfig entries (first file wins, as in discovery), with the files they came from."""

    context: dict
    cluster: dict
    cluster_source: str
    user: dict
    user_source: str


_cache: dict[str, Credential] = {}
_key_of: dict[str, str] = {}  # context name -> its cache key, so a 401 on that context can drop it
_lock = threading.Lock()  # one plugin run at a time: concurrent jobs wait for the first one's credential


def entries(files: list[str] | tuple[str, ...], context: str) -> Entries:
    found: dict[str, dict[str, tuple[str, dict]]] = {"contexts": {}, "clusters": {}, "users": {}}
    inner = {"contexts": "context", "clusters": "cluster", "users": "user"}
    for source in files:
        try:
            doc = yaml.safe_load(Path(source).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # discovery reported it
        for key, table in found.items():
            for entry in (doc.get(key) or []) if isinstance(doc, dict) else []:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    body = entry.get(inner[key])
                    table.setdefault(entry["name"], (source, body if isinstance(body, dict) else {}))
    _, ctx = found["contexts"].get(context, ("", {}))
    cluster_source, cluster = found["clusters"].get(str(ctx.get("cluster") or ""), ("", {}))
    user_source, user = found["users"].get(str(ctx.get("user") or ""), ("", {}))
    return Entries(ctx, cluster, cluster_source, user, user_source)


def credential(found: Entries, context: str) -> Credential:
    """The cached credential of this context's exec entry, or a new one from running the plugin."""
    spec = found.user.get("exec") or {}
    key = json.dumps([found.user_source, found.context.get("user"), spec], sort_keys=True, default=str)
    with _lock:
        _key_of[context] = key
        cached = _cache.get(key)
        if cached is not None and cached.fresh(time.time()):
            return cached
        fresh = run_plugin(spec, found, context)
        _cache[key] = fresh
        return fresh


def forget(context: str) -> None:
    """The API server refused the context's credential (401): the next request runs the plugin again."""
    with _lock:
        _cache.pop(_key_of.get(context, ""), None)


def run_plugin(spec: dict, found: Entries, context: str) -> Credential:
    user = found.context.get("user") or "?"
    where = f"context {context!r} (user {user!r} in {found.user_source})"
    command = str(spec.get("command") or "")
    api_version = str(spec.get("apiVersion") or "")
    hint = str(spec.get("installHint") or "").strip()
    if not command:
        raise ExecCredentialError(f"{where}: its exec entry names no command; fix the kubeconfig", retryable=False)
    if api_version not in API_VERSIONS:
        raise ExecCredentialError(f"{where}: exec apiVersion {api_version or '(none)'!r} is not supported; use "
                                  f"{' or '.join(API_VERSIONS)}", retryable=False)
    if spec.get("interactiveMode") == "Always":
        raise ExecCredentialError(f"{where}: {command} wants a terminal (interactiveMode: Always), and jobs run "
                                  "without one; log in once by hand on this node or use a non-interactive "
                                  "credential", retryable=False)
    executable = _resolve(command, found.user_source)
    if executable is None:
        raise ExecCredentialError(f"{where}: the credential plugin {command!r} is not installed on this node "
                                  f"(not found on PATH)" + (f": {hint}" if hint else "; install it or fix the "
                                                            "kubeconfig's exec command"), retryable=False)
    env = dict(os.environ)
    for item in spec.get("env") or []:
        if isinstance(item, dict) and "name" in item:
            env[str(item["name"])] = str(item.get("value", ""))
    info: dict = {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
    if spec.get("provideClusterInfo"):
        info["spec"]["cluster"] = _cluster_info(found)
    env["KUBERNETES_EXEC_INFO"] = json.dumps(info)
    argv = [executable, *[str(a) for a in spec.get("args") or []]]
    try:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=PLUGIN_TIMEOUT, cwd=str(Path(found.user_source).parent or "."))
    except subprocess.TimeoutExpired:
        raise ExecCredentialError(f"{where}: {command} gave no credential within {PLUGIN_TIMEOUT:.0f}s; run it by "
                                  "hand on this node to see why") from None
    except OSError as exc:
        raise ExecCredentialError(f"{where}: cannot run {command}: {exc}") from None
    if done.returncode != 0:
        said = " | ".join(done.stderr.strip().splitlines()[-3:])[:500] or "(nothing on stderr)"
        raise ExecCredentialError(f"{where}: {command} exited with {done.returncode}: {said}"
                                  + (f"; {hint}" if hint and done.returncode == 127 else "")
                                  + "; run it by hand on this node (the login may have expired)")
    return parse(done.stdout, api_version, f"{where}: {command}")


def parse(stdout: str, api_version: str, who: str) -> Credential:
    """An ExecCredential document as the Kubernetes API defines it, checked field by field."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        raise ExecCredentialError(f"{who} printed no JSON ExecCredential: {stdout.strip()[:200]!r}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "ExecCredential":
        raise ExecCredentialError(f"{who} printed something other than an ExecCredential (kind "
                                  f"{doc.get('kind') if isinstance(doc, dict) else type(doc).__name__!r})")
    if doc.get("apiVersion") != api_version:
        raise ExecCredentialError(f"{who} answered apiVersion {doc.get('apiVersion')!r}; the kubeconfig asks for "
                                  f"{api_version!r}")
    status = doc.get("status") if isinstance(doc.get("status"), dict) else {}
    token = str(status.get("token") or "")
    cert, key = str(status.get("clientCertificateData") or ""), str(status.get("clientKeyData") or "")
    if not token and not (cert and key):
        what = "a client certificate without its key" if cert or key else "neither a token nor a client certificate"
        raise ExecCredentialError(f"{who} gave {what}")
    expires = status.get("expirationTimestamp")
    return Credential(token=token, client_certificate=cert, client_key=key,
                      expires_at=_rfc3339(expires, who) if expires else None)


def kubeconfig_with(found: Entries, context: str, cluster: str, user: str, cred: Credential) -> dict:
    """A one-context kubeconfig in which the exec entry is replaced by the credential it gave, for the client
    library (files the cluster names are made absolute: relative paths count from their own kubeconfig)."""
    body = dict(found.cluster)
    for field in ("certificate-authority",):
        if body.get(field) and not os.path.isabs(str(body[field])):
            body[field] = str(Path(found.cluster_source).parent / str(body[field]))
    auth: dict = {}
    if cred.token:
        auth["token"] = cred.token
    else:
        auth["client-certificate-data"] = base64.b64encode(cred.client_certificate.encode()).decode()
        auth["client-key-data"] = base64.b64encode(cred.client_key.encode()).decode()
    return {"apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": cluster, "cluster": body}], "users": [{"name": user, "user": auth}],
            "contexts": [{"name": context, "context": found.context}]}


def _resolve(command: str, source: str) -> str | None:
    """kubectl's rule: a command with a slash is a path (relative: to its kubeconfig's folder), else on PATH."""
    if "/" in command:
        path = Path(command) if os.path.isabs(command) else Path(source).parent / command
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(command)


def _cluster_info(found: Entries) -> dict:
    cluster = found.cluster
    info = {k: cluster[k] for k in ("server", "tls-server-name", "insecure-skip-tls-verify", "proxy-url",
                                    "disable-compression") if k in cluster}
    if cluster.get("certificate-authority-data"):
        info["certificate-authority-data"] = cluster["certificate-authority-data"]
    elif cluster.get("certificate-authority"):
        path = Path(str(cluster["certificate-authority"]))
        path = path if path.is_absolute() else Path(found.cluster_source).parent / path
        try:
            info["certificate-authority-data"] = base64.b64encode(path.read_bytes()).decode()
        except OSError:
            pass
    for extension in cluster.get("extensions") or []:
        if isinstance(extension, dict) and extension.get("name") == "client.authentication.k8s.io/exec":
            info["config"] = extension.get("extension")
    return info


def _rfc3339(text, who: str) -> float:
    value = str(text).strip()
    try:
        stamp = datetime.fromisoformat(value)  # 3.11 reads RFC 3339, "Z" and fractions included
    except ValueError:
        raise ExecCredentialError(f"{who} gave expirationTimestamp {value!r}, which is not RFC 3339") from None
    if stamp.tzinfo is None:
        raise ExecCredentialError(f"{who} gave expirationTimestamp {value!r} without a time zone")
    return stamp.timestamp()
