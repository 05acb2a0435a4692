"""First-boot configuration of an appliance node from systemd credentials.

The appliance image has no per-node secret or setting baked in. Each boot, `cortex-config.service`
imports the credentials named `cortex.*` (from the kernel command line `systemd.set-credential=`, SMBIOS
type 11 strings in VMs, or `/efi/cortex/credentials.conf` on the ESP) and runs
`python -m cortex.appliance.credentials render`, which validates them and writes the agent's YAML config.

Credentials (one file each in the credentials directory, the value is the file's content):

    cortex.node_name    node id: 1-63 of a-z 0-9 '-'    default: the member's id, else node-<machine id[:8]>
    cortex.role         server | worker                                 default: server
    cortex.init         yes: create a new cluster with this node (a server) default: no
    cortex.join_address HOST:PORT of any member to join
    cortex.join_token   the join token printed by `cortex init` (goes to a 0600 file, never the config)
    cortex.address      this node's address as the others reach it      default: first global IPv4
    cortex.log_level    debug | info | warning | error                  default: info
    cortex.update_source  channel URL releases come from (plugins.updater.source), e.g. http://10.0.0.1:8470/stable
    cortex.update_keys    trusted publisher keys, ed25519:<base64>, whitespace-separated (plugins.updater.trusted_keys)
    ssh.authorized_keys.root   SSH public key(s) for root (debugging)

A missing or malformed credential never stops the agent from starting: the config is then rendered
without init or join, so the agent starts and waits, `bootstrap.wait_reason` names the problem (shown as
`waiting_for` in `cortex status`), and every problem is also printed with the credential's name. Everything here except `main` is a pure function of
its arguments, so it is tested without systemd.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cortex.appliance.addresses import global_addresses
from cortex.config import ADDRESS_RE, NODE_ID_RE, ROLES

PREFIX = "cortex."
NAMES = ("node_name", "role", "init", "join_address", "join_token", "address", "log_level", "update_source",
         "update_keys")
SSH_KEY_CREDENTIAL = "ssh.authorized_keys.root"
GRPC_PORT = 7400
RAFT_PORT = 7401
DATA_DIR = "/var/lib/cortex"
# Where the agent finds the token: cortex-agent.service has LoadCredential=join-token:<token file>.
AGENT_TOKEN_PATH = "/run/credentials/cortex-agent.service/join-token"

_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off", "")
_HOST_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[0-9a-fA-F:]*:[0-9a-fA-F:]+|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}))$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{8,512}$")
_SSH_KEY_RE = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)"
                         r"@openssh\.com)\s+[A-Za-z0-9+/=]+(\s+.*)?$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
NO_BOOTSTRAP_REASON = ("no bootstrap credentials: set cortex.init, or cortex.join_address and cortex.join_token, "
                       "and reboot; or run `cortex init` / `cortex join` on this node")
_MAX_CREDENTIAL_BYTES = 64 * 1024


@dataclass
class Rendered:
    """The outcome of one render: config text, the join token (if any) and what was wrong."""

    config_text: str
    node_id: str
    grpc_address: str
    token: str = ""
    authorized_keys: str = ""
    bootstrap: str = "none"  # "init", "join" or "none"
    problems: list[str] = field(default_factory=list)  # each names the credential; bootstrap was skipped
    notes: list[str] = field(default_factory=list)  # defaults taken, nothing wrong

    @property
    def waiting_for(self) -> str:
        """One line for `cortex status` when the agent waits because of a credential problem."""
        if not self.problems or self.bootstrap != "none":
            return ""
        return "credentials: " + "; ".join(self.problems)


# --- reading -----------------------------------------------------------------------------------------------

def read_directory(path: str | Path | None) -> dict[str, str]:
    """Credential name -> text for the cortex.* and SSH credentials in a credentials directory.

    A missing or unset directory is an empty set (no credentials were passed). Values are returned as
    read; `render` strips and validates them. Files that are not UTF-8 text are returned as a marker
    that validation reports.
    """
    if not path:
        return {}
    directory = Path(path)
    if not directory.is_dir():
        return {}
    creds: dict[str, str] = {}
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if not (name.startswith(PREFIX) or name == SSH_KEY_CREDENTIAL) or not entry.is_file():
            continue
        data = entry.read_bytes()[: _MAX_CREDENTIAL_BYTES + 1]
        try:
            creds[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            creds[name] = "\0binary"
    return creds


def parse_env_file(text: str) -> tuple[dict[str, str], list[str]]:
    """Parse the ESP file `cortex/credentials.conf`: `name=value` lines, `#` comments, blank lines.

    Names are credential names (`cortex.node_name=node1`, `ssh.authorized_keys.root=ssh-ed25519 ...`);
    values may be wrapped in single or double quotes. Returns (credentials, problems).
    """
    creds: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            problems.append(f"credentials.conf line {number}: expected name=value")
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if not (name.startswith(PREFIX) or name == SSH_KEY_CREDENTIAL):
            problems.append(f"credentials.conf line {number}: unknown credential {name!r} "
                            f"(names start with {PREFIX!r})")
            continue
        if name == SSH_KEY_CREDENTIAL and name in creds:
            creds[name] += "\n" + value  # several keys: one line each
        else:
            creds[name] = value
    return creds, problems


def merge(*sources: dict[str, str]) -> dict[str, str]:
    """The first source that has a credential wins (systemd credentials before the ESP file)."""
    merged: dict[str, str] = {}
    for source in sources:
        for name, value in source.items():
            merged.setdefault(name, value)
    return merged


# --- validation --------------------------------------------------------------------------------------------

def _boolean(value: str) -> bool | None:
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def _single_line(name: str, raw: str, problems: list[str]) -> str | None:
    if raw == "\0binary":
        problems.append(f"{name}: not UTF-8 text")
        return None
    if len(raw) > _MAX_CREDENTIAL_BYTES:
        problems.append(f"{name}: longer than {_MAX_CREDENTIAL_BYTES} bytes")
        return None
    value = raw.strip()
    if "\n" in value or "\r" in value:
        problems.append(f"{name}: must be a single line")
        return None
    return value


def valid_host(value: str) -> bool:
    return bool(_HOST_RE.match(value)) and ".." not in value


def _authorized_keys(raw: str, problems: list[str]) -> str:
    if raw == "\0binary":
        problems.append(f"{SSH_KEY_CREDENTIAL}: not UTF-8 text")
        return ""
    keys = []
    for number, line in enumerate(raw.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _SSH_KEY_RE.match(line):
            problems.append(f"{SSH_KEY_CREDENTIAL}: line {number} is not an SSH public key "
                            "(expected e.g. 'ssh-ed25519 AAAA... comment')")
            continue
        keys.append(line)
    return "\n".join(keys) + ("\n" if keys else "")


def render(creds: dict[str, str], *, fallback_node_id: str, detected_address: str = "",
           data_dir: str = DATA_DIR, token_path: str = AGENT_TOKEN_PATH) -> Rendered:
    """Validate credentials and render the agent config. Never raises for bad input.

    `fallback_node_id` is used when cortex.node_name is missing or bad; `detected_address` (the node's
    own address, found by the caller) when cortex.address is missing. Any problem with a credential
    that bootstrap depends on drops the bootstrap section: the agent then starts and waits.
    """
    problems: list[str] = []
    notes: list[str] = []
    get = {name: creds.get(PREFIX + name) for name in NAMES}
    for name in sorted(creds):
        if name.startswith(PREFIX) and name[len(PREFIX):] not in NAMES:
            problems.append(f"{name}: unknown credential (known: {', '.join(PREFIX + n for n in NAMES)})")

    # node.id
    node_id = fallback_node_id
    if get["node_name"] is None:
        notes.append(f"cortex.node_name not set: node id {fallback_node_id}")
    else:
        value = _single_line("cortex.node_name", get["node_name"], problems)
        if value is not None:
            if NODE_ID_RE.match(value):
                node_id = value
            else:
                problems.append(f"cortex.node_name: {value!r} is not a valid node id (1-63 lowercase letters, "
                                f"digits and '-', starting alphanumeric); using {fallback_node_id}")

    # node.role
    role = "server"
    if get["role"] is not None:
        value = _single_line("cortex.role", get["role"], problems)
        if value is not None:
            if value.lower() in ROLES:
                role = value.lower()
            else:
                problems.append(f"cortex.role: must be one of {', '.join(ROLES)}, got {value!r}")

    # the node's own address
    address = ""
    if get["address"] is not None:
        value = _single_line("cortex.address", get["address"], problems)
        if value is not None:
            if valid_host(value):
                address = value
            else:
                problems.append(f"cortex.address: {value!r} is not an IP address or host name")
    elif detected_address:
        address = detected_address
        notes.append(f"cortex.address not set: using {detected_address}")
    else:
        problems.append("cortex.address: not set and no network address was found; the agent listens on "
                        "127.0.0.1 only")
    host = address or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6

    # log level
    log_level = "info"
    if get["log_level"] is not None:
        value = _single_line("cortex.log_level", get["log_level"], problems)
        if value is not None:
            if value.lower() in _LOG_LEVELS:
                log_level = value.lower()
            else:
                problems.append(f"cortex.log_level: must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")

    # bootstrap: init XOR join (address + token)
    init = False
    if get["init"] is not None:
        value = _single_line("cortex.init", get["init"], problems)
        if value is not None:
            parsed = _boolean(value)
            if parsed is None:
                problems.append(f"cortex.init: must be yes or no, got {value!r}")
            else:
                init = parsed
    join_address = ""
    if get["join_address"] is not None:
        value = _single_line("cortex.join_address", get["join_address"], problems)
        if value is not None:
            match = ADDRESS_RE.match(value)
            if match and 0 < int(match.group(2)) < 65536:
                join_address = value
            elif value and ":" not in value and valid_host(value):
                join_address = f"{value}:{GRPC_PORT}"
                notes.append(f"cortex.join_address has no port: using {join_address}")
            else:
                problems.append(f"cortex.join_address: must be HOST:PORT (e.g. 10.0.0.11:{GRPC_PORT}), got {value!r}")
    token = ""
    if get["join_token"] is not None:
        value = _single_line("cortex.join_token", get["join_token"], problems)
        if value is not None:
            if _TOKEN_RE.match(value):
                token = value
            else:
                problems.append("cortex.join_token: malformed (expected the single-word token printed by "
                                "`cortex init`)")  # never echo a secret

    bootstrap_problems = [p for p in problems if not p.startswith("cortex.log_level")]
    if init and role == "worker":
        bootstrap_problems.append("cortex.init: a worker cannot create a cluster (cortex.role is worker)")
    if init and get["join_address"] is not None:
        bootstrap_problems.append("cortex.init and cortex.join_address exclude each other: set one")
    if get["join_address"] is not None and get["join_token"] is None:
        bootstrap_problems.append("cortex.join_token: missing (needed with cortex.join_address)")
    if get["join_token"] is not None and get["join_address"] is None and not init:
        bootstrap_problems.append("cortex.join_address: missing (needed with cortex.join_token)")
    problems = list(dict.fromkeys(problems + bootstrap_problems))

    mode = "none"
    if not bootstrap_problems:
        if init:
            mode = "init"
        elif join_address and token:
            mode = "join"
    wait_reason = ""
    if mode == "none" and not bootstrap_problems:
        notes.append("no bootstrap credentials: the agent waits for `cortex init` or `cortex join`")
        wait_reason = NO_BOOTSTRAP_REASON
    elif mode == "none":
        wait_reason = "credentials: " + "; ".join(problems)

    doc: dict = {
        "node": {"id": node_id, "role": role},
        "data_dir": data_dir,
        "listen": {"grpc": f"{host}:{GRPC_PORT}", "raft": f"{host}:{RAFT_PORT}"},
        "log": {"level": log_level, "format": "json"},
    }
    if mode == "init":
        doc["bootstrap"] = {"init": True}
    elif mode == "join":
        doc["bootstrap"] = {"join": {"address": join_address, "token_file": token_path}}
    else:
        # Shown as `waiting_for` in `cortex status` (config bootstrap.wait_reason).
        doc["bootstrap"] = {"wait_reason": wait_reason}

    updater = _updater_options(get["update_source"], get["update_keys"], problems)
    if updater:
        doc["plugins"] = {"updater": updater}

    authorized = ""
    if SSH_KEY_CREDENTIAL in creds:
        authorized = _authorized_keys(creds[SSH_KEY_CREDENTIAL], problems)

    header = ["# Rendered by cortex-config.service (python -m cortex.appliance.credentials) from systemd credentials.",
              "# Do not edit: it is rewritten at every boot. Change the credentials instead."]
    header += [f"# problem: {p}" for p in problems]
    text = "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return Rendered(config_text=text, node_id=node_id, grpc_address=doc["listen"]["grpc"],
                    token=token if mode == "join" else "", authorized_keys=authorized, bootstrap=mode,
                    problems=problems, notes=notes)


def _updater_options(source: str | None, keys: str | None, problems: list[str]) -> dict:
    """The updater plugin's source and trusted keys; a malformed one is left out (updates are refused, the
    agent still starts)."""
    out: dict = {}
    if source is not None:
        value = _single_line("cortex.update_source", source, problems)
        if value and re.match(r"^https?://[^\s]+$", value):
            out["source"] = value
        elif value:
            problems.append(f"cortex.update_source: {value!r} is not an http(s) URL")
    if keys is not None:
        good = [k for k in keys.split() if re.match(r"^ed25519:[A-Za-z0-9+/]{43}=$", k)]
        bad = [k for k in keys.split() if k not in good]
        if bad:
            problems.append(f"cortex.update_keys: {len(bad)} key(s) are not ed25519:<base64> (from "
                            "`cortex update keygen`); ignored")
        if good:
            out["trusted_keys"] = good
    return out


# --- writing -----------------------------------------------------------------------------------------------

def _write(path: Path, text: str, mode: int) -> None:
    """Atomically replace `path` with `text`, created with `mode` from the start (no window with wider bits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_outputs(rendered: Rendered, out: Path, token_file: Path | None = None,
                  env_file: Path | None = None) -> None:
    """Write the config (0644), the token file (0600, always present: empty when not joining, so the
    agent unit's LoadCredential= has a file to load), the environment file for `cortex` on the node and
    cortex-ready (CORTEX_ADDR), and the problems file (`bootstrap-problem`, empty when all is well)."""
    token_file = token_file or out.with_name("join-token")
    env_file = env_file or out.with_name("agent.env")
    _write(token_file, rendered.token + ("\n" if rendered.token else ""), 0o600)
    _write(out, rendered.config_text, 0o644)
    _write(env_file, f"CORTEX_ADDR={rendered.grpc_address}\n", 0o644)
    _write(out.with_name("bootstrap-problem"), rendered.waiting_for + ("\n" if rendered.waiting_for else ""),
           0o644)


# --- host facts (not pure: used by main only) ----------------------------------------------------------------

def member_node_id(data_dir: str | Path) -> str:
    """The node id in the agent's membership record (cluster.json), if this node already is a member."""
    try:
        node_id = json.loads((Path(data_dir) / "cluster.json").read_text()).get("node_id", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return node_id if isinstance(node_id, str) and NODE_ID_RE.match(node_id) else ""


def machine_node_id(machine_id_path: str = "/etc/machine-id") -> str:
    try:
        mid = Path(machine_id_path).read_text().strip()
    except OSError:
        mid = ""
    return f"node-{mid[:8]}" if re.fullmatch(r"[0-9a-f]{32}", mid) else "node"


def detect_address() -> str:
    """The first global IPv4 address (then IPv6) of this machine on a non-loopback interface; no traffic
    sent. Read over netlink rather than from `ip`, so a loaded first boot has no process start to wait for
    (at 5 s, `ip` once timed out and the node came up listening on 127.0.0.1 only)."""
    try:
        addresses = global_addresses()
    except OSError as exc:
        _console(f"cannot read this machine's addresses over netlink: {exc}")
        return ""
    for family in (socket.AF_INET, socket.AF_INET6):
        for addr in addresses:
            if addr.family == family and not addr.loopback:
                return addr.address
    return ""


def _console(message: str) -> None:
    """Print to the kernel log too, so it shows on every console (serial and screen) at boot."""
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"<4>cortex-config: {message}\n")
    except OSError:
        pass


def install_authorized_keys(keys: str, path: Path = Path("/root/.ssh/authorized_keys")) -> bool:
    """Append keys that are not there yet; returns True when the file changed."""
    if not keys:
        return False
    existing = path.read_text() if path.exists() else ""
    new = [k for k in keys.splitlines() if k and k not in existing.splitlines()]
    if not new:
        return False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = existing + ("" if not existing or existing.endswith("\n") else "\n") + "\n".join(new) + "\n"
    _write(path, text, 0o600)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cortex.appliance.credentials",
                                     description="Render the agent config from systemd credentials.")
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("render", help="read credentials, write the agent config and the token file")
    sp.add_argument("--credentials", default=os.environ.get("CREDENTIALS_DIRECTORY", ""),
                    help="credentials directory (default: $CREDENTIALS_DIRECTORY)")
    sp.add_argument("--esp-file", default="", help="optional name=value file, e.g. /efi/cortex/credentials.conf")
    sp.add_argument("--out", required=True, help="config file to write, e.g. /run/cortex/config.yaml")
    sp.add_argument("--token-file", default="", help="default: join-token beside --out")
    sp.add_argument("--address", default="auto", help="this node's address, or 'auto' (first global address)")
    sp.add_argument("--node-id-fallback", default="",
                    help="default: the id in DATA_DIR/cluster.json (a member keeps its name), else node-<machine id[:8]>")
    sp.add_argument("--data-dir", default=DATA_DIR)
    sp.add_argument("--token-path", default=AGENT_TOKEN_PATH, help="token_file path written into the config")
    sp.add_argument("--authorized-keys", default="/root/.ssh/authorized_keys",
                    help="where SSH keys from the ESP file go ('' to skip)")
    sp.add_argument("--console", action="store_true", help="also report problems on the kernel console")
    sp.add_argument("--credstore", default="", help="also read credentials from this directory, e.g. /etc/credstore "
                                                    "(where the netboot path puts the join token)")
    sp.add_argument("--hostname-file", default="",
                    help="name the machine after its node: this /etc/hostname (kept when chosen otherwise)")
    args = parser.parse_args(argv)

    creds = merge(read_directory(args.credentials), read_directory(args.credstore))
    esp_creds: dict[str, str] = {}
    esp_problems: list[str] = []
    # Only look at the ESP when it exists: touching the /efi automount without it waits for the device.
    if args.esp_file and (not args.esp_file.startswith("/efi/") or Path("/dev/disk/by-partlabel/cortex-esp").exists()):
        try:
            esp_creds, esp_problems = parse_env_file(Path(args.esp_file).read_text(errors="replace"))
        except OSError:
            pass
    merged = merge(creds, esp_creds)
    detected = ""
    if args.address == "auto":
        if PREFIX + "address" not in merged:
            detected = detect_address()
    else:
        merged.setdefault(PREFIX + "address", args.address)
    fallback = args.node_id_fallback or member_node_id(args.data_dir) or machine_node_id()
    rendered = render(merged, fallback_node_id=fallback, detected_address=detected,
                      data_dir=args.data_dir, token_path=args.token_path)
    rendered.problems[:0] = esp_problems
    out = Path(args.out)
    write_outputs(rendered, out, Path(args.token_file) if args.token_file else None)
    if args.authorized_keys and SSH_KEY_CREDENTIAL in esp_creds and SSH_KEY_CREDENTIAL not in creds:
        # systemd's own tmpfiles (provision.conf) installs the key when it came as a systemd credential.
        install_authorized_keys(rendered.authorized_keys, Path(args.authorized_keys))

    if args.hostname_file:
        from cortex.appliance import hostname

        credential = Path(args.credentials or "/nonexistent", "system.hostname")
        try:
            note = hostname.apply(rendered.node_id, Path(args.hostname_file),
                                  credential=credential.read_text() if credential.is_file() else "")
        except OSError as exc:
            note = f"could not set the host name: {exc}"
        if note:
            rendered.notes.append(note)
    sources = [s for s, c in (("systemd credentials", creds), (args.esp_file, esp_creds)) if c]
    summary = (f"node {rendered.node_id}, listen {rendered.grpc_address}, bootstrap {rendered.bootstrap} "
               f"(from {', '.join(sources) or 'no credentials'})")
    print(f"cortex-config: {summary}", flush=True)
    for note in rendered.notes:
        print(f"cortex-config: note: {note}", flush=True)
    for problem in rendered.problems:
        print(f"cortex-config: PROBLEM: {problem}", file=sys.stderr, flush=True)
        if args.console:
            _console(f"PROBLEM: {problem}")
    if args.console:
        _console(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
