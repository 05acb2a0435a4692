"""`cortex node install` / `uninstall`: run the agent on a laptop or desktop that is not an appliance.

The machine keeps its own OS; Cortex adds what the appliance image has for its agent, from the same files:
the agent's systemd unit is the image's `cortex-agent.service` (its hardening unchanged, only the paths of
a host install put in) and the sleep hook is the image's `system-sleep/cortex`. The wheel carries both
(pyproject's force-include); a source checkout reads them from `image/tree`. So a change to the
appliance's sandbox reaches every host install with the next `cortex node install`.

Files (all under `root`, `/` outside tests): the unit in /etc/systemd/system, the hook in
/usr/lib/systemd/system-sleep, the config and the join token (0600) in /etc/cortex. The agent's state
is systemd's `StateDirectory=` (/var/lib/private/cortex with DynamicUser=): removed only by `--purge`.
Every step compares before it writes, so a second run changes nothing and a retried run finishes the
first one's work.
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from cortex.config import ADDRESS_RE, NODE_ID_RE

SERVICE = "cortex-agent"
UNIT_PATH = f"etc/systemd/system/{SERVICE}.service"
HOOK_PATH = "usr/lib/systemd/system-sleep/cortex"
CONFIG_DIR = "etc/cortex"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
TOKEN_PATH = f"{CONFIG_DIR}/join-token"
STATE_DIRS = ("var/lib/private/cortex", "var/lib/cortex")  # DynamicUser=: the real one and its link
DATA_DIR = "/var/lib/cortex"
TOKEN_CREDENTIAL = f"/run/credentials/{SERVICE}.service/join-token"
_PACKAGED = Path(__file__).with_name("files")
_CHECKOUT = Path(__file__).resolve().parents[3] / "image/tree/usr/lib/systemd"
SOURCES = {"unit": ("cortex-agent.service", "system/cortex-agent.service"),
           "hook": ("cortex-sleep-hook", "system-sleep/cortex")}
HEADER = ("# Written by `cortex node install` from the appliance's unit (image/tree/usr/lib/systemd/system/"
          "cortex-agent.service);\n# `cortex node uninstall` removes it. Run `cortex node install` again rather "
          "than editing it.\n")


class InstallError(Exception):
    """Something the user has to change first; the message says what."""


def shipped(kind: str) -> str:
    """The image's file of this kind: from the wheel, else from the source checkout."""
    packaged, in_tree = SOURCES[kind]
    for path in (_PACKAGED / packaged, _CHECKOUT / in_tree):
        if path.is_file():
            return path.read_text()
    raise InstallError(f"the appliance's {in_tree} is neither in this install ({_PACKAGED}) nor in a source "
                       f"checkout ({_CHECKOUT}): reinstall Cortex from its wheel")


def _replace_once(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, count=0, flags=re.M)
    if count != 1:
        raise InstallError(f"the appliance's agent unit changed shape ({pattern!r} matched {count} times): "
                           "this Cortex cannot adapt it; update Cortex")
    return new


def host_unit(appliance_unit: str, cli: str) -> str:
    """The appliance's unit for a host install: no cortex-config.service (a host has no credentials to
    render), the config and token from /etc/cortex, the agent from this install. The [Service] sandbox
    is left exactly as the image has it."""
    text = _replace_once(appliance_unit, r"^Requires=cortex-config\.service\n", "")
    text = _replace_once(text, r"^(After=.*?)cortex-config\.service ?", r"\1")
    text = _replace_once(text, r"^ExecStart=\S+ agent --config \S+$", f"ExecStart={cli} agent --config /{CONFIG_PATH}")
    text = _replace_once(text, r"^LoadCredential=join-token:\S+$", f"LoadCredential=join-token:/{TOKEN_PATH}")
    return HEADER + text


@dataclass(frozen=True)
class Options:
    join: str
    token: str
    name: str
    role: str = "worker"
    address: str = ""  # HOST or HOST:PORT this node listens on, as the others reach it
    log_level: str = "info"


def default_name(hostname: str | None = None) -> str:
    """The machine's host name as a node id (lowercase, other characters become '-')."""
    name = re.sub(r"[^a-z0-9-]+", "-", (hostname or socket.gethostname()).split(".")[0].lower()).strip("-")[:63]
    return name.strip("-") or "node"


def check(options: Options) -> list[str]:
    """Everything wrong with the options, each saying what to pass instead (empty: fine)."""
    problems = []
    match = ADDRESS_RE.match(options.join)
    if not match or not 0 < int(match.group(2)) < 65536:
        problems.append(f"--join {options.join!r}: expected HOST:PORT of a member (e.g. 192.168.1.5:7400)")
    if not re.fullmatch(r"[A-Za-z0-9._~+/=-]{8,512}", options.token):
        problems.append("--token: expected the single-word token `cortex token create` printed")
    if not NODE_ID_RE.match(options.name):
        problems.append(f"--name {options.name!r}: 1-63 of a-z 0-9 '-', starting alphanumeric")
    if options.role not in ("worker", "server"):
        problems.append(f"--role {options.role!r}: worker or server")
    if options.address and not re.fullmatch(r"\[?[A-Za-z0-9.:-]+\]?(:\d{1,5})?", options.address):
        problems.append(f"--address {options.address!r}: an IP address or host name, optionally :PORT")
    return problems


def render_config(options: Options, detected_address: str) -> str:
    host_port = options.address or detected_address
    if not host_port:
        raise InstallError("no network address found to listen on: pass --address (this machine's address as "
                           "the cluster reaches it)")
    host, port = host_port, 7400
    m = re.fullmatch(r"(.+):(\d{1,5})", host_port)
    if m and (host_port.count(":") == 1 or host_port.startswith("[")):
        host, port = m.group(1), int(m.group(2))
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    listen = {"grpc": f"{host}:{port}"}
    if options.role == "server":
        listen["raft"] = f"{host}:{port + 1}"
    doc = {"node": {"id": options.name, "role": options.role}, "data_dir": DATA_DIR, "listen": listen,
           "log": {"level": options.log_level, "format": "json"},
           "bootstrap": {"join": {"address": options.join, "token_file": TOKEN_CREDENTIAL}}}
    return ("# Written by `cortex node install`; run it again to change this node (it rewrites this file).\n"
            + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


PROTECTED_HOME = ("/home", "/root", "/run/user")  # what the unit's ProtectHome=yes hides from the agent


def cli_path(for_systemd: bool = True, executable: str | None = None, hidden: tuple[str, ...] = PROTECTED_HOME) -> str:
    """The `cortex` of this install, which the unit starts. Refused under a home directory when systemd is
    to start it: the unit's ProtectHome= hides them from the agent (a `pipx install` by a user lands there)."""
    beside = Path(executable or sys.executable).with_name("cortex")
    found = str(beside) if beside.exists() else shutil.which("cortex") or ""
    if not found:
        raise InstallError("cannot find the `cortex` command of this install")
    if for_systemd and any(p.is_relative_to(h) for p in (Path(found), Path(found).resolve()) for h in hidden):
        raise InstallError(f"Cortex is installed in a home directory ({found}), which the agent's sandbox hides "
                           "(ProtectHome=yes). Install it system-wide first: sudo PIPX_HOME=/opt/pipx "
                           "PIPX_BIN_DIR=/usr/local/bin pipx install cortex-*.whl  (or: sudo python3 -m venv "
                           "/opt/cortex && sudo /opt/cortex/bin/pip install cortex-*.whl)")
    return found


def files(options: Options, cli: str, detected_address: str) -> dict[str, tuple[str, int]]:
    """Path below the root -> (content, mode) of everything `install` writes."""
    return {
        UNIT_PATH: (host_unit(shipped("unit"), cli), 0o644),
        HOOK_PATH: (shipped("hook"), 0o755),
        CONFIG_PATH: (render_config(options, detected_address), 0o644),
        TOKEN_PATH: (options.token + "\n", 0o600),
    }


def write(root: Path, wanted: dict[str, tuple[str, int]]) -> list[str]:
    """Write what differs (atomically, with its mode from the start); returns the paths that changed."""
    changed = []
    for rel, (text, mode) in wanted.items():
        path = root / rel
        try:
            same = path.read_text() == text and path.stat().st_mode & 0o7777 == mode
        except OSError:
            same = False
        if same:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.cortex-tmp")
        tmp.unlink(missing_ok=True)
        with open(tmp, "x") as f:
            tmp.chmod(mode)
            f.write(text)
        tmp.replace(path)
        changed.append(rel)
    return changed


def remove(root: Path, purge: bool) -> list[str]:
    """Delete what `install` wrote (and with `purge` the agent's state); returns what was there. Other files
    in /etc/cortex (a dnsmasq config from `cortex netboot dnsmasq --write`, say) are kept, and so is the
    directory then."""
    removed = []
    for rel in (UNIT_PATH, HOOK_PATH, CONFIG_PATH, TOKEN_PATH, *(STATE_DIRS if purge else ())):
        path = root / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(rel)
    config_dir = root / CONFIG_DIR
    if config_dir.is_dir() and not any(config_dir.iterdir()):
        config_dir.rmdir()
    return removed
