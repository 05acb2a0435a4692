"""Who a browser is: one-time login tokens exchanged for a session cookie (pure; the clock is injected).

A login token is what `cortex console url` puts in the URL (as Jupyter does): short-lived and good once, so a
URL left in a shell history or a proxy log is worthless a minute later. The browser trades it for a session
id held in an HttpOnly, SameSite=Strict cookie; the token never reaches the page's scripts. Sessions live in
the agent's memory: an agent that restarts forgets them, and the login page says to ask for a new URL.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cortex.plugins import CALLER_ROLES, Caller

COOKIE = "cortex_console"
# What a console session may be: operator at most; admin tools (removing nodes, join tokens) stay on the CLI.
SESSION_ROLES = ("reader", "operator")
MAX_PENDING = 256  # unused login tokens kept; the oldest are dropped first


@dataclass(frozen=True)
class Session:
    sid: str
    role: str
    identity: str
    expires: float

    def caller(self) -> Caller:
        return Caller(role=self.role, identity=self.identity)


class Refused(Exception):
    """Why a browser is not let in, in words the login page shows as they are."""


def cap_role(wanted: str, caller_role: str) -> str:
    """The session role a caller may hand out: never above its own, never above operator."""
    if wanted not in SESSION_ROLES:
        raise ValueError(f"role must be one of {', '.join(SESSION_ROLES)}, not {wanted!r}")
    if CALLER_ROLES.index(wanted) > CALLER_ROLES.index(caller_role):
        raise ValueError(f"a {caller_role} caller cannot open an {wanted} console; ask for role reader")
    return wanted


class Logins:
    """Pending login tokens and live sessions of one agent's console."""

    def __init__(self, login_ttl: float, session_ttl: float, clock: Callable[[], float] = time.time):
        self.login_ttl = login_ttl
        self.session_ttl = session_ttl
        self.clock = clock
        self._lock = threading.RLock()  # redeem opens the session under the same lock
        self._pending: dict[str, tuple[str, str, float]] = {}  # token -> (role, identity, expires)
        self._used: dict[str, float] = {}  # token -> when it expires: a second use says "used", not "wrong"
        self._sessions: dict[str, Session] = {}

    def grant(self, role: str, identity: str) -> tuple[str, float]:
        """A new login token for `role`; returns it and when it expires."""
        token = secrets.token_urlsafe(24)
        expires = self.clock() + self.login_ttl
        with self._lock:
            self._sweep()
            while len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[token] = (role, identity, expires)
        return token, expires

    def redeem(self, token: str) -> Session:
        """Trade a login token for a session; Refused says why not (expired, used, unknown)."""
        now = self.clock()
        with self._lock:
            found = next((t for t in self._pending if hmac.compare_digest(t.encode(), token.encode())), None)
            if found is None:
                used = next((t for t in self._used if hmac.compare_digest(t.encode(), token.encode())), None)
                self._sweep()
                if used is not None:
                    raise Refused("this login link was already used; run `cortex console url` for a new one")
                raise Refused("this login link is not valid here (wrong token, another node's, or the agent "
                              "restarted); run `cortex console url` on this node for a new one")
            role, identity, expires = self._pending.pop(found)
            if expires < now:
                raise Refused("this login link expired; run `cortex console url` for a new one (links last "
                              f"{int(self.login_ttl)} s)")
            self._used[found] = expires
            return self._open(role, identity, now)

    def open_with(self, caller: Caller) -> Session:
        """A session for a caller proven some other way (the node's MCP bearer token)."""
        return self._open(caller.role if caller.role in SESSION_ROLES else "operator", caller.identity, self.clock())

    def _open(self, role: str, identity: str, now: float) -> Session:
        session = Session(secrets.token_urlsafe(32), role, identity, now + self.session_ttl)
        with self._lock:
            self._sessions[session.sid] = session
        return session

    def session(self, sid: str) -> Session:
        """The live session a cookie names; Refused says why not."""
        if not sid:
            raise Refused("not signed in: open the URL `cortex console url` prints, or paste the node's "
                          "console token")
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None and session.expires < self.clock():
                del self._sessions[sid]
                raise Refused("the console session expired; run `cortex console url` for a new link")
        if session is None:
            raise Refused("this console session is unknown here (the agent restarted or you signed out); run "
                          "`cortex console url` for a new link")
        return session

    def close(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _sweep(self) -> None:
        now = self.clock()
        for token in [t for t, (_, _, exp) in self._pending.items() if exp < now - self.login_ttl]:
            del self._pending[token]
        for token in [t for t, exp in self._used.items() if exp < now - 3600]:
            del self._used[token]
        for sid in [s for s, v in self._sessions.items() if v.expires < now]:
            del self._sessions[sid]


def cookie_value(header: str, name: str = COOKIE) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def cookie_name(port: int) -> str:
    """Cookies are per host, not per port: each node's console on one machine (a dev cluster) keeps its own."""
    return f"{COOKIE}_{port}"


def set_cookie(session: Session, secure: bool, name: str = COOKIE) -> str:
    max_age = max(0, int(session.expires - time.time()))
    return (f"{name}={session.sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
            + ("; Secure" if secure else ""))


def clear_cookie(name: str = COOKIE) -> str:
    return f"{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
