"""Netboot profiles and machine groups (the Matchbox pattern), loaded from YAML with file:line errors.

A *profile* says what a machine boots (kernel, initrd, extra kernel arguments) and how it lives in the
cluster (token lifetime, ephemeral, idle power-off, garbage collection). A *group* maps machines to a
profile by selectors (`mac`, `uuid`, `serial`; all given ones must match) and names the node. A group
without a selector is the default group: it takes every machine no other group matched. Without one,
unknown machines are refused.

    profiles:
      worker:
        kernel: cortex-netboot.vmlinuz          # artifact names in the artifacts directory
        initrd: cortex-netboot.cpio.zst
        args: [console=ttyS0, console=tty0]     # extra kernel arguments (credentials are added by Cortex)
        token_ttl: 15m                          # the single-use join token minted for each boot
        gc_offline_after: 10m                   # remove from membership after this long offline (null: never)
        idle_poweroff_after: 0                  # power off after this long without work (0: never)
    groups:
      - name: rack
        profile: worker
        selector: {mac: "52:54:00:12:34:56"}
        node_name: rack-1                       # a node id, or a template: {mac} {serial} {uuid} {hostname}
      - name: anyone
        profile: worker                         # no selector: the default group (node_name pxe-{mac})

Every value that ends up in an iPXE script or on a kernel command line is checked here against a strict
character set: a profile that would need escaping is refused with the file and line to fix.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cortex.netboot.domain import NODE_ID_RE

KERNEL_ARG_RE = re.compile(r"^[A-Za-z0-9._,:/=+@%-]{1,256}$")
ARTIFACT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SELECTOR_VALUE_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PLACEHOLDERS = ("mac", "serial", "uuid", "hostname")
RESERVED_ARGS = ("systemd.set_credential", "systemd.set-credential", "cortex.")
DEFAULT_NODE_NAME = "pxe-{mac}"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ProfileError(ValueError):
    """The profiles file is wrong; the message names file:line: key and what to write instead."""


class NoMatch(LookupError):
    """No group takes this machine (and there is no default group)."""


@dataclass(frozen=True)
class Profile:
    name: str
    kernel: str = "cortex-netboot.vmlinuz"
    initrd: str = "cortex-netboot.cpio.zst"
    args: tuple[str, ...] = ("console=ttyS0", "console=tty0")
    token_ttl: float = 900.0
    ephemeral: bool = True
    gc_offline_after: float | None = 600.0
    idle_poweroff_after: float = 0.0
    log_level: str = "info"


@dataclass(frozen=True)
class Group:
    name: str
    profile: str
    selector: dict[str, str] = field(default_factory=dict)
    node_name: str = DEFAULT_NODE_NAME
    line: int = 0

    @property
    def is_default(self) -> bool:
        return not self.selector


@dataclass(frozen=True)
class Machine:
    """What a booting machine told us (iPXE variables); every field is untrusted input."""

    mac: str = ""
    uuid: str = ""
    serial: str = ""
    hostname: str = ""

    @property
    def key(self) -> str:
        return self.mac or (f"uuid:{self.uuid}" if self.uuid else f"serial:{self.serial}")


@dataclass(frozen=True)
class Match:
    machine: Machine
    group: Group
    profile: Profile
    node_id: str


@dataclass(frozen=True)
class Profiles:
    profiles: dict[str, Profile]
    groups: tuple[Group, ...]
    source: str = "<defaults>"

    def match(self, machine: Machine) -> Match:
        """The most specific group whose selectors all match (file order breaks ties), else the default.

        Raises NoMatch when nothing takes the machine, ValueError when the node name it would get is not a
        valid node id (e.g. a hostile serial number substituted into a template)."""
        best: Group | None = None
        for group in self.groups:
            if group.is_default or not all(_selector_equal(k, v, machine) for k, v in group.selector.items()):
                continue
            if best is None or len(group.selector) > len(best.selector):
                best = group
        if best is None:
            best = next((g for g in self.groups if g.is_default), None)
        if best is None:
            raise NoMatch(f"no group matches machine mac={machine.mac or '-'} uuid={machine.uuid or '-'} "
                          f"serial={machine.serial or '-'} and there is no default group in {self.source}; "
                          "add a group with its selector, or a group without selector")
        return Match(machine, best, self.profiles[best.profile], node_name(best.node_name, machine))


def default_profiles() -> Profiles:
    """Used when no file is given: one worker profile, and a default group that takes every machine."""
    return Profiles({"worker": Profile("worker")}, (Group("default", "worker"),))


# --- machine facts ------------------------------------------------------------------------------------------

def normalize_mac(value: str) -> str:
    """aa:bb:cc:dd:ee:ff from 'AA-BB-CC-DD-EE-FF', 'aabb.ccdd.eeff' or 'aabbccddeeff'; '' if not a MAC."""
    digits = re.sub(r"[^0-9a-fA-F]", "", value or "")
    if len(digits) != 12 or re.sub(r"[0-9a-fA-F:.-]", "", value):
        return ""
    digits = digits.lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def _selector_equal(key: str, wanted: str, machine: Machine) -> bool:
    have = getattr(machine, key)
    if key == "mac":
        return normalize_mac(wanted) == have
    return wanted.lower() == have.lower() if key == "uuid" else wanted == have


def node_name(template: str, machine: Machine) -> str:
    values = {
        "mac": machine.mac.replace(":", ""),
        "serial": machine.serial.lower(),
        "uuid": machine.uuid.lower().replace("-", "")[:12],
        "hostname": machine.hostname.lower(),
    }
    missing = [name for _, name, _, _ in string.Formatter().parse(template) if name and not values.get(name)]
    if missing:
        raise ValueError(f"node name template {template!r} needs {', '.join(missing)}, which the machine did not send "
                         "(or sent in a form that is not a host name)")
    name = template.format(**values)
    if not NODE_ID_RE.match(name):
        raise ValueError(f"node name {name[:80]!r} (from {template!r}) is not a valid node id "
                         "(1-63 of a-z 0-9 '-'): refused")
    return name


# --- loading ------------------------------------------------------------------------------------------------

def parse_duration(value, where: str) -> float:
    if isinstance(value, bool):
        raise ProfileError(f"{where}: expected a duration like 90s, 15m, 1h, got {value!r}")
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", value.strip())
        if match:
            return float(match.group(1)) * _UNITS.get(match.group(2) or "s", 1)
    raise ProfileError(f"{where}: expected a duration like 90s, 15m, 1h, got {value!r}")


class _Reader:
    def __init__(self, source: str, text: str = ""):
        self.source = source
        self.text = text  # the file as written, for checks YAML's parse hides (how a list was separated)

    def fail(self, node: yaml.Node | None, key: str, message: str) -> ProfileError:
        line = node.start_mark.line + 1 if node is not None else 1
        return ProfileError(f"{self.source}:{line}: {key}: {message}")

    def mapping(self, node: yaml.Node, key: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, "must be a mapping")
        seen, out = set(), []
        for k, v in node.value:
            name = str(k.value)
            if name in seen:
                raise self.fail(k, f"{key}.{name}", "given twice")
            seen.add(name)
            out.append((name, k, v))
        return out

    def value(self, node: yaml.Node):
        return yaml.safe_load(yaml.serialize(node))


def load(path: str | Path) -> Profiles:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    return loads(text, str(path))


def loads(text: str, source: str = "<profiles>") -> Profiles:
    r = _Reader(source, text)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ProfileError(f"{source}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if root is None:
        raise ProfileError(f"{source}:1: empty file; it needs 'profiles:' and 'groups:'")
    top = {name: (k, v) for name, k, v in r.mapping(root, "(top)")}
    unknown = set(top) - {"profiles", "groups"}
    if unknown:
        name = sorted(unknown)[0]
        raise r.fail(top[name][0], name, "unknown key (known: profiles, groups)")
    if "profiles" not in top or "groups" not in top:
        raise r.fail(root, "(top)", "needs both 'profiles:' and 'groups:'")
    profiles = {}
    for name, key_node, value_node in r.mapping(top["profiles"][1], "profiles"):
        profiles[name] = _profile(r, name, key_node, value_node)
    groups_node = top["groups"][1]
    if not isinstance(groups_node, yaml.SequenceNode) or not groups_node.value:
        raise r.fail(groups_node, "groups", "must be a non-empty list of groups")
    groups = [_group(r, i, node, profiles) for i, node in enumerate(groups_node.value)]
    names = [g.name for g in groups]
    for i, group in enumerate(groups):
        if group.name in names[:i]:
            raise ProfileError(f"{source}:{group.line}: groups[{i}].name: {group.name!r} is used twice")
    defaults = [g for g in groups if g.is_default]
    if len(defaults) > 1:
        raise ProfileError(f"{source}:{defaults[1].line}: groups: two groups without selector ({defaults[0].name}, "
                           f"{defaults[1].name}); only one can be the default group")
    for i, group in enumerate(groups):
        for other in groups[:i]:
            if other.selector and other.selector == group.selector:
                raise ProfileError(f"{source}:{group.line}: groups[{i}].selector: same selector as group "
                                   f"{other.name!r}; the second would never match")
    return Profiles(profiles, tuple(groups), source)


def _profile(r: _Reader, name: str, key_node: yaml.Node, node: yaml.Node) -> Profile:
    where = f"profiles.{name}"
    if not NAME_RE.match(name):
        raise r.fail(key_node, where, "profile names are 1-63 of a-z 0-9 _ -")
    fields: dict = {"name": name}
    for key, k, v in r.mapping(node, where):
        value = r.value(v)
        at = f"{where}.{key}"
        if key in ("kernel", "initrd"):
            if not isinstance(value, str) or not ARTIFACT_RE.match(value):
                raise r.fail(v, at, "must be a file name in the artifacts directory (letters, digits, . _ + -)")
            fields[key] = value
        elif key == "args":
            if not isinstance(value, list):
                raise r.fail(v, at, "must be a list of kernel arguments")
            for item_node, item in zip(v.value, value):
                if not isinstance(item, str) or not KERNEL_ARG_RE.match(item):
                    raise r.fail(item_node, at, f"{str(item)[:60]!r} is not a plain kernel argument (letters, digits "
                                                "and . _ , : / = + @ % -; no spaces, quotes, $ or |)")
                if item.startswith(RESERVED_ARGS):
                    raise r.fail(item_node, at, f"{item[:60]!r}: credentials are set by Cortex itself, not in args")
            _refuse_split_args(r, v, at, value)
            fields["args"] = tuple(value)
        elif key == "role":
            if value != "worker":
                raise r.fail(v, at, "netbooted nodes run from RAM and join as workers only (role: worker)")
        elif key in ("token_ttl", "idle_poweroff_after"):
            fields[key] = parse_duration(value, f"{r.source}:{v.start_mark.line + 1}: {at}")
            if key == "token_ttl" and not 1 <= fields[key] <= 86400:
                raise r.fail(v, at, "must be between 1s and 1d (the token is for one boot)")
        elif key == "gc_offline_after":
            fields[key] = None if value is None else parse_duration(value, f"{r.source}:{v.start_mark.line + 1}: {at}")
        elif key == "ephemeral":
            if not isinstance(value, bool):
                raise r.fail(v, at, "must be true or false")
            fields[key] = value
        elif key == "log_level":
            if value not in ("debug", "info", "warning", "error"):
                raise r.fail(v, at, "must be debug, info, warning or error")
            fields[key] = value
        else:
            raise r.fail(k, at, "unknown key (known: kernel, initrd, args, role, token_ttl, ephemeral, "
                                "gc_offline_after, idle_poweroff_after, log_level)")
    return Profile(**fields)


_SPLIT_REST_RE = re.compile(r"^\d[0-9a-z]*$")  # 115200n8, 9600: the speed part of console=ttyS0,115200n8


def _refuse_split_args(r: _Reader, node: yaml.SequenceNode, at: str, items: list[str]) -> None:
    """YAML splits a flow list at every comma: `[console=ttyS0,115200n8]` is two items, `console=ttyS0`
    and `115200n8`, and the kernel would get neither as meant. Refuse a comma written without a space
    between two items (nobody separates list items that way on purpose) and an item that can only be the
    tail of the one before it, with the quoted form to write instead."""
    for i in range(1, len(items)):
        before, item = node.value[i - 1], node.value[i]
        if item.style is not None:
            continue  # quoted: written as it was meant
        between = r.text[before.end_mark.index:item.start_mark.index] if r.text else ", "
        if node.flow_style and between == ",":
            joined = f"{items[i - 1]},{item.value}"
            raise r.fail(item, at, f"{items[i - 1]!r} and {item.value!r} were written as one argument {joined!r}, "
                                   f"but YAML splits a list at every comma: quote it ([\"{joined}\"]); "
                                   "for two arguments put a space after the comma")
        if "=" in str(items[i - 1]) and "=" not in item.value and _SPLIT_REST_RE.match(item.value):
            raise r.fail(item, at, f"{item.value!r} looks like the rest of {items[i - 1]!r} split off at a comma: "
                                   f"quote the whole argument ([\"{items[i - 1]},{item.value}\"])")


def _group(r: _Reader, i: int, node: yaml.Node, profiles: dict[str, Profile]) -> Group:
    where = f"groups[{i}]"
    items = {key: (k, v) for key, k, v in r.mapping(node, where)}
    for key, (k, _) in items.items():
        if key not in ("name", "profile", "selector", "node_name"):
            raise r.fail(k, f"{where}.{key}", "unknown key (known: name, profile, selector, node_name)")
    if "name" not in items or "profile" not in items:
        raise r.fail(node, where, "needs name and profile")
    name = r.value(items["name"][1])
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise r.fail(items["name"][1], f"{where}.name", "group names are 1-63 of a-z 0-9 _ -")
    profile = r.value(items["profile"][1])
    if profile not in profiles:
        raise r.fail(items["profile"][1], f"{where}.profile",
                     f"no profile {str(profile)[:60]!r} (defined: {', '.join(sorted(profiles)) or 'none'})")
    selector: dict[str, str] = {}
    if "selector" in items:
        for key, k, v in r.mapping(items["selector"][1], f"{where}.selector"):
            value = r.value(v)
            at = f"{where}.selector.{key}"
            if key not in ("mac", "uuid", "serial"):
                raise r.fail(k, at, "unknown selector (known: mac, uuid, serial)")
            if not isinstance(value, str) or not SELECTOR_VALUE_RE.match(value):
                raise r.fail(v, at, "must be a plain string (letters, digits, . _ : -); quote MAC addresses")
            if key == "mac":
                if not normalize_mac(value):
                    raise r.fail(v, at, f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
                value = normalize_mac(value)
            selector[key] = value
    template = DEFAULT_NODE_NAME
    if "node_name" in items:
        template = r.value(items["node_name"][1])
        at = f"{where}.node_name"
        if not isinstance(template, str):
            raise r.fail(items["node_name"][1], at, "must be a string")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
            literal = "".join(lit for lit, _, _, _ in string.Formatter().parse(template))
        except ValueError as exc:
            raise r.fail(items["node_name"][1], at, f"bad template: {exc}") from None
        bad = [f for f in fields if f not in PLACEHOLDERS]
        if bad:
            raise r.fail(items["node_name"][1], at, f"unknown placeholder {{{bad[0]}}} (known: "
                                                    + ", ".join("{" + p + "}" for p in PLACEHOLDERS) + ")")
        if not re.fullmatch(r"[a-z0-9-]*", literal) or (not fields and not NODE_ID_RE.match(template)):
            raise r.fail(items["node_name"][1], at, f"{template[:80]!r} is not a valid node id (1-63 of a-z 0-9 '-', "
                                                    "starting alphanumeric): refused")
        if not fields and not selector:
            raise r.fail(items["node_name"][1], at, "a default group needs a template ({mac}, ...): every machine "
                                                    "it takes would get the same node name")
    return Group(name, profile, selector, template, node.start_mark.line + 1)
