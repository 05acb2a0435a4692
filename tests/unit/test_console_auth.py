"""Login links and sessions of the web console (cortex.console.auth): once, short-lived, with reasons."""

from __future__ import annotations

import pytest

from cortex.console.auth import Logins, Refused, cap_role, cookie_value, set_cookie
from cortex.plugins import Caller


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_login_token_opens_one_session_and_then_says_it_was_used():
    clock = Clock()
    logins = Logins(login_ttl=120, session_ttl=3600, clock=clock)
    token, expires = logins.grant("operator", "admin-socket")
    assert expires == 1120
    session = logins.redeem(token)
    assert (session.role, session.identity) == ("operator", "admin-socket")
    assert logins.session(session.sid) == session
    with pytest.raises(Refused, match="already used"):
        logins.redeem(token)


def test_expired_wrong_and_forgotten_tokens_are_refused_with_what_to_do():
    clock = Clock()
    logins = Logins(login_ttl=120, session_ttl=60, clock=clock)
    token, _ = logins.grant("reader", "x")
    clock.now += 121
    with pytest.raises(Refused, match="expired; run `cortex console url`"):
        logins.redeem(token)
    with pytest.raises(Refused, match="not valid here"):
        logins.redeem("made-up")
    with pytest.raises(Refused, match="not signed in"):
        logins.session("")
    session = logins.redeem(logins.grant("reader", "x")[0])
    clock.now += 61
    with pytest.raises(Refused, match="session expired"):
        logins.session(session.sid)
    with pytest.raises(Refused, match="unknown here"):
        logins.session(session.sid)  # and once swept, it is simply unknown


def test_a_session_role_never_exceeds_the_caller_nor_operator():
    assert cap_role("operator", "admin") == "operator"
    assert cap_role("reader", "reader") == "reader"
    with pytest.raises(ValueError, match="cannot open an operator console"):
        cap_role("operator", "reader")
    with pytest.raises(ValueError, match="role must be one of"):
        cap_role("admin", "admin")
    assert Logins(60, 60).open_with(Caller(role="admin", identity="t")).role == "operator"


def test_the_cookie_is_httponly_and_strict():
    logins = Logins(60, 3600)
    session = logins.redeem(logins.grant("reader", "x")[0])
    header = set_cookie(session, secure=False)
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Secure" not in header
    assert cookie_value(f"a=b; {header.split(';')[0]}; c=d") == session.sid
