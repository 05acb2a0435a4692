"""The Redfish fence agent: a node's BMC powers it off and on (DMTF Redfish, DSP0266).

    GET  /redfish/v1/Systems/{id}                               -> PowerState, Actions
    POST {Actions["#ComputerSystem.Reset"].target}              {"ResetType": "ForceOff" | "On"}
    POST /redfish/v1/SessionService/Sessions                    (auth: session) -> X-Auth-Token, Location
    DELETE {Location}                                           the session, when the operation is done

An operation first reads the power state and does nothing when the node is already there (a retried fence
changes nothing), then posts the reset and polls until the BMC reports the state asked for: `power_off`
returns only once the node is off, which is what makes taking its services over safe.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from cortex.config import FenceTarget
from cortex.ha.fence import FenceError

log = logging.getLogger("cortex.ha")

SYSTEMS = "/redfish/v1/Systems"
SESSIONS = "/redfish/v1/SessionService/Sessions"
RESET = "#ComputerSystem.Reset"
POLL, POLL_MAX = 0.2, 2.0  # seconds between power-state reads while waiting: growing by half each time


class RedfishError(FenceError):
    """A BMC that refused or could not be reached."""


def load_credentials(path: str) -> tuple[str, str]:
    try:
        if Path(path).stat().st_mode & 0o077:
            log.warning("the BMC credentials file %s is readable by others than its owner; chmod 600 it", path)
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise RedfishError(f"cannot read the BMC credentials file {path}: {exc.strerror}; create it with "
                           "`username:` and `password:`, readable by the agent alone") from None
    except yaml.YAMLError:
        raise RedfishError(f"{path}: not YAML or JSON; write `username: ...` and `password: ...`") from None
    if not isinstance(data, dict) or not data.get("username") or "password" not in data:
        raise RedfishError(f"{path}: needs `username` and `password`")
    return str(data["username"]), str(data["password"])


class RedfishFenceAgent:
    def __init__(self, node: str, target: FenceTarget):
        self.node = node
        self.target = target
        parts = urlsplit(target.address)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise RedfishError(f"fence.{node}.address {target.address!r}: give the BMC's base URL, https://HOST")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._token = ""
        self._session = ""
        self._ssl: ssl.SSLContext | None = None
        if self._scheme == "https" and not target.verify_tls:
            log.warning("fencing %s: the BMC's certificate is not verified (fence.%s.verify_tls: false)", node, node)
        elif self._scheme == "http":
            log.warning("fencing %s: the BMC is reached over plain HTTP; its credentials cross the network in "
                        "clear (use https)", node)

    # --- HTTP ----------------------------------------------------------------------------------------------
    def _context(self) -> ssl.SSLContext | None:
        if self._scheme != "https":
            return None
        if self._ssl is not None:
            return self._ssl
        if not self.target.verify_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            try:
                context = ssl.create_default_context(cafile=self.target.ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise RedfishError(f"fence.{self.node}.ca_file {self.target.ca_file}: cannot be loaded ({exc})") \
                    from None
        self._ssl = context
        return context

    def _request(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> tuple[int, dict, dict]:
        import http.client  # only nodes that fence need it

        where = f"{self.target.address.rstrip('/')}{path}"
        conn_cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        kwargs = {"context": self._context()} if self._scheme == "https" else {}
        conn = conn_cls(self._host, self._port, timeout=self.target.timeout, **kwargs)
        headers = {"Accept": "application/json", "OData-Version": "4.0"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers.update(self._auth_headers())
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status, reply_headers = response.status, {k.lower(): v for k, v in response.getheaders()}
        except ssl.SSLCertVerificationError as exc:
            raise RedfishError(f"{where}: the BMC's certificate is not trusted ({exc.verify_message}); set "
                               f"fence.{self.node}.ca_file to its CA, or verify_tls: false to accept any") from None
        except (OSError, http.client.HTTPException) as exc:
            raise RedfishError(f"{where}: cannot reach the BMC of {self.node} ({exc or type(exc).__name__}); "
                               f"check fence.{self.node}.address and that the BMC answers") from None
        finally:
            conn.close()
        try:
            document = json.loads(raw) if raw.strip() else {}
        except ValueError:
            document = {}
        if status == 401:
            raise RedfishError(f"{where}: the BMC refused the credentials in {self.target.credentials_file} "
                               "(401); check the user name and password there")
        if status == 403:
            raise RedfishError(f"{where}: the BMC user in {self.target.credentials_file} may not do this (403); "
                               "give it a role with power control (Operator or Administrator)")
        if status == 404:
            raise RedfishError(f"{where}: not found (404)")
        if status >= 400:
            raise RedfishError(f"{where}: {method} answered {status}: {_message(document) or raw[:200]!r}")
        return status, reply_headers, document if isinstance(document, dict) else {}

    def _auth_headers(self) -> dict[str, str]:
        if self._token:
            return {"X-Auth-Token": self._token}
        user, password = load_credentials(self.target.credentials_file)
        if self.target.auth == "basic":
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        _, headers, _ = self._request("POST", SESSIONS, {"UserName": user, "Password": password}, auth=False)
        self._token = headers.get("x-auth-token", "")
        self._session = urlsplit(headers.get("location", "")).path
        if not self._token:
            raise RedfishError(f"{self.target.address}: the BMC made a session without an X-Auth-Token; use "
                               f"fence.{self.node}.auth: basic")
        return {"X-Auth-Token": self._token}

    def _end_session(self) -> None:
        if self._session:
            try:
                self._request("DELETE", self._session)
            except RedfishError as exc:  # the BMC expires it anyway
                log.info("fencing %s: session not deleted: %s", self.node, exc)
        self._token = self._session = ""

    # --- the system ----------------------------------------------------------------------------------------
    def _system_path(self) -> str:
        if self.target.system_id:
            return f"{SYSTEMS}/{self.target.system_id}"
        _, _, collection = self._request("GET", SYSTEMS)
        members = [m.get("@odata.id", "") for m in collection.get("Members", [])]
        if len(members) != 1:
            raise RedfishError(f"{self.target.address} manages {len(members)} systems ({', '.join(members)}); "
                               f"name one with fence.{self.node}.system_id")
        return members[0]

    def _system(self, path: str) -> dict:
        try:
            return self._request("GET", path)[2]
        except RedfishError as exc:
            if "(404)" in str(exc):
                raise RedfishError(f"{self.target.address} has no system {path}; check fence.{self.node}.system_id "
                                   f"(GET {SYSTEMS} lists them)") from None
            raise

    def power_state(self) -> str:
        try:
            return str(self._system(self._system_path()).get("PowerState", ""))
        finally:
            self._end_session()

    def power_off(self) -> None:
        self._power("ForceOff", "Off")

    def power_on(self) -> None:
        self._power("On", "On")

    def _power(self, reset_type: str, wanted: str) -> None:
        try:
            path = self._system_path()
            system = self._system(path)
            if system.get("PowerState") == wanted:
                return  # already there: a repeated fence changes nothing
            action = system.get("Actions", {}).get(RESET, {})
            allowed = action.get("ResetType@Redfish.AllowableValues")
            if allowed is not None and reset_type not in allowed:
                raise RedfishError(f"{self.target.address}{path} does not offer ResetType {reset_type} "
                                   f"(it offers {', '.join(allowed)})")
            target = action.get("target") or f"{path}/Actions/ComputerSystem.Reset"
            self._request("POST", target, {"ResetType": reset_type})
            deadline = time.monotonic() + self.target.power_timeout
            state, pause = "", POLL
            while time.monotonic() < deadline:
                state = self._system(path).get("PowerState", "")
                if state == wanted:
                    return
                time.sleep(pause)
                pause = min(POLL_MAX, pause * 1.5)
            raise RedfishError(f"{self.node} still reports PowerState {state!r} {self.target.power_timeout:g} s after "
                               f"{reset_type}; check the machine, or raise fence.{self.node}.power_timeout")
        finally:
            self._end_session()


def _message(document: dict) -> str:
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return ""
    extended = [m.get("Message", "") for m in error.get("@Message.ExtendedInfo", []) if isinstance(m, dict)]
    return "; ".join(x for x in [error.get("message", ""), *extended] if x)
