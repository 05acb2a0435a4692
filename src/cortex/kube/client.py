"""API clients for one kubeconfig context, and client errors turned into ones a person can act on.

The official `kubernetes` client does the talking: it loads the context from the same files discovery read
(its merge keeps the first definition of a name, like kubectl; the context is always named explicitly, so
which file sets current-context does not matter here), runs auth-provider plugins when a request needs
credentials, and never writes the files back (`persist_config=False`). `exec` credentials are run and cached
by execauth.py, which hands the library the token or certificate they gave.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass

import urllib3
from kubernetes import client as k8s
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.kube_config import load_kube_config, load_kube_config_from_dict

from cortex.kube import execauth
from cortex.kube.capacity import ContextCapacity, summarize
from cortex.kube.kubeconfig import Discovery, KubeContext

ACTIVE_PODS = "status.phase!=Succeeded,status.phase!=Failed"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0


class KubeError(Exception):
    """A Kubernetes call failed; the message says which context, what happened and what to do next."""

    def __init__(self, message: str, retryable: bool = True, status: int | None = None, reason: str = ""):
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.reason = reason


@dataclass
class Kube:
    """Typed API groups bound to one context. Close it (or use `with`) to release its connections."""

    context: KubeContext
    api: k8s.ApiClient

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api)

    @property
    def batch(self) -> k8s.BatchV1Api:
        return k8s.BatchV1Api(self.api)

    @property
    def apps(self) -> k8s.AppsV1Api:
        return k8s.AppsV1Api(self.api)

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve(discovery: Discovery, name: str) -> KubeContext:
    """The named context, or the current one for "", or KubeError listing what this node has."""
    name = name or discovery.current
    ctx = discovery.get(name) if name else None
    if ctx is None:
        have = ", ".join(c.name for c in discovery.contexts) or "none"
        what = f"kubeconfig context {name!r}" if name else "a current-context (and the task names no context)"
        raise KubeError(f"this node has no {what}; contexts here: {have} "
                        f"(files: {', '.join(discovery.files) or 'none found'})", retryable=False, reason="NoContext")
    return ctx


def connect(discovery: Discovery, name: str) -> Kube:
    """A client for context `name` ("" = current-context), loaded from the files discovery read."""
    ctx = resolve(discovery, name)
    configuration = type.__call__(k8s.Configuration)  # a fresh one, not a copy of the process default
    try:
        if ctx.auth == "exec":  # the plugin runs here, at job time, with its credential cached (execauth.py)
            found = execauth.entries(discovery.files, ctx.name)
            credential = execauth.credential(found, ctx.name)
            load_kube_config_from_dict(execauth.kubeconfig_with(found, ctx.name, ctx.cluster, ctx.user or "exec",
                                                                credential),
                                       context=ctx.name, client_configuration=configuration, persist_config=False)
        else:
            load_kube_config(config_file=discovery.paths, context=ctx.name, client_configuration=configuration,
                             persist_config=False)
    except execauth.ExecCredentialError as exc:
        raise KubeError(f"cannot get credentials for {exc}", retryable=exc.retryable, reason="Credentials") from None
    except (ConfigException, OSError, ValueError) as exc:
        raise KubeError(f"cannot load credentials of context {ctx.name!r} from {ctx.source}: {exc}; "
                        f"fix the kubeconfig (or the {ctx.auth_plugin or 'auth'} plugin it runs) on this node",
                        retryable=True, reason="Credentials") from None
    # Connection failures mean the request never left: retrying those is safe even for a POST. Anything
    # read back is never retried here, so a create is not sent twice behind the engine's back.
    configuration.retries = urllib3.Retry(total=2, connect=2, read=0, status=0, other=0, backoff_factor=0.2,
                                          raise_on_status=False)
    return Kube(ctx, k8s.ApiClient(configuration))


def status_message(exc: k8s.ApiException) -> tuple[str, str]:
    """(message, reason) from the Status object the API server sends with an error."""
    try:
        body = json.loads(exc.body or "")
        return str(body.get("message") or exc.reason or ""), str(body.get("reason") or "")
    except (ValueError, AttributeError):
        return str(exc.reason or exc.body or ""), ""


def explain(exc: BaseException, ctx: KubeContext, doing: str) -> KubeError:
    """Any error from the client library as a KubeError: which context, what, retryable or not, what next."""
    where = f"context {ctx.name!r} ({ctx.server})"
    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, k8s.ApiException):
        message, reason = status_message(exc)
        status = exc.status or 0
        if status in (401, 403):
            hint = ("the credentials were refused; refresh them in " + ctx.source if status == 401
                    else "the user lacks RBAC permission for this; grant it or use another context")
            if status == 401 and ctx.auth == "exec":  # the next request runs the plugin again
                execauth.forget(ctx.name)
                hint = f"the credential {ctx.auth_plugin} gave was refused; the next attempt asks it again"
            return KubeError(f"{doing} on {where}: HTTP {status} {message}; {hint}", retryable=False,
                             status=status, reason=reason)
        if status in (400, 404, 409, 422):
            return KubeError(f"{doing} on {where}: {message or reason} (HTTP {status})", retryable=False,
                             status=status, reason=reason)
        return KubeError(f"{doing} on {where}: HTTP {status} {message}; the API server is in trouble, "
                         f"the task is retried per its policy", retryable=True, status=status, reason=reason)
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        exc = exc.reason or exc
    if isinstance(exc, ssl.SSLError | urllib3.exceptions.SSLError):
        return KubeError(f"{doing}: TLS with {where} failed: {exc}; check the cluster's certificate-authority "
                         f"in {ctx.source}", retryable=False, reason="TLS")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return KubeError(f"{doing}: cannot reach {where}: {_short(exc)}; check that the API server is up and "
                         f"reachable from this node (the task is retried per its policy)", retryable=True,
                         reason="Unreachable")
    return KubeError(f"{doing} on {where}: {type(exc).__name__}: {exc}", retryable=True)


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if marker in text:
            return marker.lower()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def measure(discovery: Discovery, context: str) -> ContextCapacity:
    """Capacity of one context, live; an unreachable cluster yields a ContextCapacity with `error` set."""
    try:
        with connect(discovery, context) as kube:
            timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)
            nodes = kube.core.list_node(_preload_content=False, _request_timeout=timeout)
            pods = kube.core.list_pod_for_all_namespaces(field_selector=ACTIVE_PODS, _preload_content=False,
                                                         _request_timeout=timeout)
            return summarize(context, json.loads(nodes.data)["items"], json.loads(pods.data)["items"])
    except KubeError as exc:
        return ContextCapacity(context, error=str(exc))
    except Exception as exc:
        ctx = discovery.get(context)
        return ContextCapacity(context, error=str(explain(exc, ctx, "measuring capacity")) if ctx else str(exc))
