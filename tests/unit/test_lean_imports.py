"""The agent's idle footprint: libraries only some nodes need are imported when first used.

Loading the agent and every installed plugin class with its options checked (what a server with every default plugin does at
start) must not pull in the heavy optional libraries; each one costs megabytes of resident memory on
every node, most of which never render a netboot menu or talk to Kubernetes.
"""

from __future__ import annotations

import json
import subprocess
import sys

# imported by a plugin only when its feature is used
LAZY = ("jsonschema", "jinja2", "kubernetes", "mcp", "starlette", "uvicorn", "pydantic",
        # issuing and signing only (tls.py runs them in a subprocess in the agent)
        "cryptography")
# standard-library modules only downloads (updates) and the netboot HTTP service use
LAZY_MODULES = ("urllib.request", "http.server", "cortex.netboot.service",
                # protobuf's JSON, for the status tools and the CLI's --json only
                "google.protobuf.json_format",
                # the commands of plugins (entry points): `cortex agent` parses its arguments without them
                "cortex.tasks.cli", "cortex.kube.cli", "cortex.builtin.access_cli")

PROBE = """
import json, sys
import cortex.cli.main, cortex.node.agent, cortex.update.releases
import cortex.security.rotation_driver
from cortex.cli.main import parser_for
assert parser_for(["agent", "--config", "c.yaml"]).parse_args(["agent", "--config", "c.yaml"]).config == "c.yaml"
from cortex.config import PluginSettings
from cortex.plugins import host
from cortex.raft.keys import RotatingEncryptor
from cortex.security import tls
for name in sorted(host.discover()):
    cls = host._load_class(name)
    host.validate_options(name, cls.options_schema, PluginSettings(), "probe")
# what a server does at start and on every RPC with certificates, then an issuance as the agent runs it
ca, ca_key = (bytes.fromhex(x) for x in sys.stdin.read().split())
RotatingEncryptor("raft secret", ca_key, 0)
assert tls.key_matches(ca, ca_key) and tls.is_ca(ca) and tls.ca_pin(ca) and tls.needs_renewal(ca) is False
tls.ISSUE_IN_SUBPROCESS = True
cert, key = tls.issue(ca, ca_key, "n1", "server", "c1")
assert tls.key_matches(cert, key) and not tls.key_matches(cert, ca_key) and tls.issued_by(cert, ca)
print(json.dumps({"peer": tls.peer_of(cert).__dict__, "issued_at": tls.issued_at(cert), "cert": cert.decode(),
                  "not_after": tls.not_after(cert).isoformat(), "pin": tls.ca_pin(ca)}))
print(json.dumps(sorted(sys.modules)))
"""


def test_agent_and_plugins_load_without_optional_libraries():
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cortex.security import tls

    ca, ca_key = tls.new_ca("c1")
    out = subprocess.run([sys.executable, "-c", PROBE], input=f"{ca.hex()} {ca_key.hex()}", capture_output=True,
                         text=True, timeout=120, check=True)
    read, modules = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    modules = set(modules)
    # what the probe read without cryptography is what cryptography reads
    cert = x509.load_pem_x509_certificate(read["cert"].encode())
    assert read["peer"] == {"name": "n1", "role": "server", "cluster_id": "c1"}
    assert read["issued_at"] == (cert.not_valid_before_utc + tls.BACKDATE).timestamp()
    assert read["not_after"] == cert.not_valid_after_utc.isoformat()
    spki = x509.load_pem_x509_certificate(ca).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert read["pin"] == tls.hashes_sha256(spki)
    loaded = {m.split(".")[0] for m in modules}
    assert "cortex.node.agent" in modules and "grpc" in loaded  # the probe really loaded the agent
    assert sorted(loaded & set(LAZY)) == []
    assert sorted(modules & set(LAZY_MODULES)) == []


def test_certificate_fields_read_without_cryptography_match_it():
    """der.py beside cryptography on the certificates tls.py makes: a bundle, an enrollment certificate that
    names no holder, and input that is no certificate (refused the same way)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from cortex.security import der, tls

    ca, ca_key = tls.new_ca("c1")
    enroll, _ = tls.issue_enrollment(ca, ca_key)
    node, node_key = tls.issue(ca, ca_key, "w7", "worker", "c1", days=0.001)
    bundle = ca + b"\n" + enroll
    assert tls.split_pems(bundle) == [c.public_bytes(serialization.Encoding.PEM)
                                      for c in x509.load_pem_x509_certificates(bundle)]
    assert tls.peer_of(enroll) is None and tls.peer_of(node).name == "w7" and not tls.is_ca(node)
    assert tls.fingerprint(node) == x509.load_pem_x509_certificate(node).fingerprint(
        __import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()).hex()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=2)
    assert tls.needs_renewal(node, later) and not tls.needs_renewal(ca, later)
    assert tls.key_matches(node, node_key) and not tls.key_matches(node, b"not a key")
    for junk in (b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", node[:200]):
        assert tls.peer_of(junk) is None and tls.split_pems(junk) == [] and not tls.is_ca(junk)
        try:
            der.load_pem(junk)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{junk[:40]!r} read as a certificate")
