"""A stand-in BMC speaking DMTF Redfish over HTTPS on 127.0.0.1, for the fence agent's tests: no BMC can run
here. Its documents follow the DMTF Redfish mockups (public-rackmount1: ServiceRoot, the ComputerSystem
collection, ComputerSystem 437XR1138R2 with its `#ComputerSystem.Reset` action, `target` and
`ResetType@Redfish.AllowableValues`), and it behaves as BMCs do where the fence agent depends on it: basic
auth or sessions (`POST /redfish/v1/SessionService/Sessions` -> 201, X-Auth-Token and Location; DELETE
ends it), 401 with a Redfish error body without credentials, 400 for a ResetType not offered, 204 for an
accepted reset, and a power change that takes a while (PoweringOff/PoweringOn first)."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SYSTEM_ID = "437XR1138R2"
RESET_VALUES = ["On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "Nmi", "ForceOn",
                "PushPowerButton"]


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 it signed: (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake BMC CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bmc")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message,
                      "@Message.ExtendedInfo": [{"@odata.type": "#Message.v1_0_0.Message", "MessageId": code,
                                                 "Message": message, "Severity": "Critical"}]}}


class FakeBMC:
    """One ComputerSystem whose power a fence agent switches. `requests` records (method, path) in order."""

    def __init__(self, directory: Path, username: str = "fence", password: str = "s3cret",
                 transition: float = 0.6):
        self.username, self.password = username, password
        self.transition = transition  # seconds a power change takes
        self.power = "On"
        self.pending: tuple[str, float] | None = None  # (state to reach, when)
        self.sessions: dict[str, str] = {}  # token -> session id
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.ca, cert, key = make_ca_and_server_cert(directory)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.address = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeBMC:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def state(self) -> str:
        with self.lock:
            if self.pending and time.monotonic() >= self.pending[1]:
                self.power, self.pending = self.pending[0], None
            if self.pending:
                return "PoweringOff" if self.pending[0] == "Off" else "PoweringOn"
            return self.power

    def system(self) -> dict:
        path = f"/redfish/v1/Systems/{SYSTEM_ID}"
        return {"@odata.type": "#ComputerSystem.v1_5_0.ComputerSystem", "@odata.id": path, "Id": SYSTEM_ID,
                "Name": "WebFrontEnd483", "SystemType": "Physical", "Manufacturer": "Contoso",
                "Model": "3500RX", "PowerState": self.state(), "Status": {"State": "Enabled", "Health": "OK"},
                "Actions": {"#ComputerSystem.Reset": {"target": f"{path}/Actions/ComputerSystem.Reset",
                                                      "ResetType@Redfish.AllowableValues": RESET_VALUES}}}

    def reset(self, reset_type: str) -> tuple[int, dict | None]:
        if reset_type not in RESET_VALUES:
            return 400, error("Base.1.0.ActionParameterNotSupported",
                              f"The parameter ResetType with value {reset_type} is not supported")
        state = self.state()
        with self.lock:
            if reset_type in ("ForceOff", "GracefulShutdown") and state != "Off":
                self.pending = ("Off", time.monotonic() + self.transition)
            elif reset_type in ("On", "ForceOn") and state != "On":
                self.pending = ("On", time.monotonic() + self.transition)
        return 204, None

    def _handler(self):
        bmc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, document: dict | None, headers: dict | None = None) -> None:
                body = json.dumps(document).encode() if document is not None else b""
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if body:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("OData-Version", "4.0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                token = self.headers.get("X-Auth-Token")
                if token and token in bmc.sessions:
                    return True
                basic = self.headers.get("Authorization", "")
                expected = base64.b64encode(f"{bmc.username}:{bmc.password}".encode()).decode()
                return basic == f"Basic {expected}"

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    return json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return {}

            def _route(self, method: str) -> None:
                path = self.path.rstrip("/") or "/"
                bmc.requests.append((method, path))
                if method == "GET" and path == "/redfish/v1":
                    return self._send(200, {"@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
                                            "@odata.id": "/redfish/v1/", "Id": "RootService",
                                            "RedfishVersion": "1.6.0", "Systems": {"@odata.id": "/redfish/v1/Systems"},
                                            "SessionService": {"@odata.id": "/redfish/v1/SessionService"}})
                if method == "POST" and path == "/redfish/v1/SessionService/Sessions":
                    body = self._body()
                    if (body.get("UserName"), body.get("Password")) != (bmc.username, bmc.password):
                        return self._send(401, error("Base.1.0.NoValidSession", "Invalid user name or password"))
                    token, sid = secrets.token_hex(16), str(len(bmc.sessions) + 1)
                    bmc.sessions[token] = sid
                    location = f"/redfish/v1/SessionService/Sessions/{sid}"
                    return self._send(201, {"@odata.id": location, "Id": sid, "UserName": bmc.username},
                                      {"X-Auth-Token": token, "Location": location})
                if not self._authorized():
                    return self._send(401, error("Base.1.0.NoValidSession",
                                                 "There is no valid session established with the implementation"))
                if method == "DELETE" and path.startswith("/redfish/v1/SessionService/Sessions/"):
                    sid = path.rsplit("/", 1)[1]
                    for token, known in list(bmc.sessions.items()):
                        if known == sid:
                            del bmc.sessions[token]
                            return self._send(204, None)
                    return self._send(404, error("Base.1.0.ResourceMissingAtURI", f"{path} not found"))
                if method == "GET" and path == "/redfish/v1/Systems":
                    return self._send(200, {"@odata.type": "#ComputerSystemCollection.ComputerSystemCollection",
                                            "@odata.id": "/redfish/v1/Systems", "Name": "Computer System Collection",
                                            "Members@odata.count": 1,
                                            "Members": [{"@odata.id": f"/redfish/v1/Systems/{SYSTEM_ID}"}]})
                if method == "GET" and path == f"/redfish/v1/Systems/{SYSTEM_ID}":
                    return self._send(200, bmc.system())
                if method == "POST" and path == f"/redfish/v1/Systems/{SYSTEM_ID}/Actions/ComputerSystem.Reset":
                    status, document = bmc.reset(str(self._body().get("ResetType")))
                    return self._send(status, document)
                return self._send(404, error("Base.1.0.ResourceMissingAtURI", f"{path} not found"))

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler
