"""Render iPXE scripts and dnsmasq configs from the templates in `templates/` (pure functions).

Escaping: neither iPXE nor dnsmasq has a quoting syntax to rely on (iPXE expands `${...}` anywhere and
splits on white space; `||`/`&&` are operators; dnsmasq reads one `key=value` per line). So every value
printed into a template goes through one of two gates, enforced by the Jinja environment itself:

- `{{ value|word }}`: the value must be a plain word (letters, digits, `. _ , : / = + @ % ? & -`) or
  rendering fails with IpxeEscapeError: used for URLs, kernel arguments, file names, addresses.
- anything else (`{{ value }}`): shown text (echo, menu labels, comments); every character outside a
  small safe set (`$ | ; # " ' \\ { }`, new lines, ...) becomes `_`. So a value can never start a new
  command, line or setting expansion. dnsmasq templates allow no free text at all.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

from cortex.core.args import NODE_ID_RE

TEMPLATES = Path(__file__).with_name("templates")
WORD_RE = re.compile(r"^[A-Za-z0-9._,:/=+@%?&-]+$")
_TEXT_UNSAFE_RE = re.compile(r"[^A-Za-z0-9 ._,:/()+@=-]")
IFACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")


class IpxeEscapeError(ValueError):
    """A value would change the meaning of a generated script or config; refused."""


class _Word(str):
    """A value already checked by the `word` filter: printed as is."""


def word(value: Any) -> _Word:
    if isinstance(value, _Word):
        return value
    text = str(value)
    if not WORD_RE.match(text) or "||" in text or "&&" in text:
        raise IpxeEscapeError(f"{text[:80]!r} is not a plain word (letters, digits, . _ , : / = + @ % ? & -): "
                              "refused in an iPXE script or dnsmasq config")
    return _Word(text)


def text(value: Any) -> str:
    """Shown text: characters that mean something to iPXE become '_'; one line, at most 200 characters."""
    return _TEXT_UNSAFE_RE.sub("_", str(value))[:200]


def _finalize_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, _Word) else text(value)


def _finalize_strict(value: Any) -> str:
    if value is None or value == "":
        return ""
    return value if isinstance(value, _Word) else word(value)


def _environment(finalize) -> jinja2.Environment:
    # Jinja is loaded with the first rendering: an agent that never serves netboot keeps its ~2 MB.
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False, finalize=finalize,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["word"] = word
    return env


@functools.cache
def _ipxe() -> jinja2.Environment:
    return _environment(_finalize_text)


@functools.cache
def _dnsmasq() -> jinja2.Environment:
    return _environment(_finalize_strict)


# --- iPXE ---------------------------------------------------------------------------------------------------

def base_url_problem(url: str) -> str:
    if not re.fullmatch(r"http://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?(/[A-Za-z0-9._/-]*)?", url):
        return f"{url!r} must look like http://HOST:PORT (plain http: iPXE 2019 has no TLS trust here)"
    return ""


def _urls(base_url: str) -> dict[str, str]:
    base = base_url.rstrip("/")
    return {
        "base_url": base,
        "boot_url": f"{base}/boot.ipxe",
        "menu_url": f"{base}/menu.ipxe",
        # iPXE fills these in: `hexhyp` gives aa-bb-..., `uristring` URL-encodes serial numbers and names.
        "machine_url": f"{base}/ipxe?mac=${{mac:hexhyp}}&uuid=${{uuid}}&serial=${{serial:uristring}}"
                       f"&hostname=${{hostname:uristring}}",
    }


def boot_script(base_url: str, retry_seconds: int = 30) -> str:
    urls = _urls(base_url)
    return _ipxe().get_template("boot.ipxe.j2").render(**{**urls, "machine_url": _ipxe_expanding(urls["machine_url"])},
                                                     retry_seconds=retry_seconds)


def menu_script(base_url: str, timeout_ms: int = 5000) -> str:
    urls = _urls(base_url)
    return _ipxe().get_template("menu.ipxe.j2").render(**{**urls, "machine_url": _ipxe_expanding(urls["machine_url"])},
                                                     timeout_ms=timeout_ms)


def custom_menu(base_url: str) -> str:
    """netboot.xyz's custom menu convention: `custom.ipxe` under the user's custom_url."""
    urls = _urls(base_url)
    return _ipxe().get_template("custom.ipxe.j2").render(**{**urls, "machine_url": _ipxe_expanding(urls["machine_url"])})


def _ipxe_expanding(url: str) -> _Word:
    """Our own URL with iPXE `${setting:type}` expansions (iPXE fills them in): the expansions are our
    constants; everything around them (the base URL from the operator) must be a plain word."""
    parts = re.split(r"(\$\{[a-z0-9]+(?::[a-z]+)?\})", url)
    for part in parts[::2]:
        if part:
            word(part)
    return _Word(url)


@dataclass(frozen=True)
class MachineScript:
    """Everything a per-machine script says. With `credentials_url` (what the service always sets) the
    token goes in a second initrd fetched from there (netboot/credstore.py), never on the kernel command
    line, which the console prints and every local user can read; without it, on the command line."""

    machine: str
    group: str
    profile: str
    node_id: str
    base_url: str
    kernel: str
    initrd: str
    args: tuple[str, ...]
    join_address: str
    token: str
    expires: str  # shown in a comment
    log_level: str = "info"
    extra_credentials: dict[str, str] = field(default_factory=dict)
    credentials_url: str = ""  # the one-time credentials archive (credstore.NAME) with the token


def credential_args(script: MachineScript) -> list[str]:
    creds = {"cortex.node_name": script.node_id, "cortex.role": "worker",
             "cortex.join_address": script.join_address, "cortex.join_token": script.token,
             "cortex.log_level": script.log_level, **script.extra_credentials}
    if script.credentials_url:
        del creds["cortex.join_token"]
    # systemd.set_credential=NAME:VALUE (systemd >= 252; the image reads cortex.* via ImportCredential=).
    return [f"systemd.set_credential={name}:{value}" for name, value in creds.items()]


def machine_script(script: MachineScript) -> str:
    from cortex.netboot.credstore import NAME

    urls = _urls(script.base_url)
    # systemd.hostname: PID 1 names the machine after its node before the network (and DHCP) starts.
    cmdline = [*script.args, f"systemd.hostname={script.node_id}", *credential_args(script)]
    if script.credentials_url:
        cmdline.insert(0, f"initrd={NAME}")  # UEFI: the EFI stub loads the initrds named here
    return _ipxe().get_template("machine.ipxe.j2").render(
        machine=script.machine, group=script.group, profile=script.profile, node_id=script.node_id,
        expires=script.expires, kernel_url=f"{urls['base_url']}/artifacts/{script.kernel}",
        initrd_url=f"{urls['base_url']}/artifacts/{script.initrd}", initrd=script.initrd, cmdline=cmdline,
        credentials_url=script.credentials_url, boot_url=urls["boot_url"])


# --- dnsmasq ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabHost:
    mac: str
    ip: str
    name: str = ""


def _network(cidr: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise IpxeEscapeError(f"{cidr!r} is not a network like 192.168.1.0/24") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise IpxeEscapeError("PXE needs an IPv4 network")
    return net


def _interface(name: str) -> str:
    if name and not IFACE_RE.match(name):
        raise IpxeEscapeError(f"{name!r} is not an interface name")
    return name


def dnsmasq_proxy(network: str, boot_url: str, tftp_root: str, interface: str = "") -> str:
    net = _network(network)
    return _dnsmasq().get_template("dnsmasq-proxy.conf.j2").render(
        network=word(str(net)), network_address=str(net.network_address), netmask=str(net.netmask),
        interface=_interface(interface), boot_url=boot_url, tftp_root=tftp_root)


def dnsmasq_lab(network: str, boot_url: str, tftp_root: str, interface: str = "", range_start: str = "",
                range_end: str = "", router: str = "", lease: str = "1h", hosts: tuple[LabHost, ...] = ()) -> str:
    net = _network(network)
    addresses = list(net.hosts())
    if len(addresses) < 4:
        raise IpxeEscapeError(f"{net} is too small for a lab network")
    start = ipaddress.ip_address(range_start) if range_start else addresses[len(addresses) // 2]
    end = ipaddress.ip_address(range_end) if range_end else addresses[-1]
    if start not in net or end not in net or start > end:
        raise IpxeEscapeError(f"DHCP range {start}-{end} must lie inside {net}")
    if router and ipaddress.ip_address(router) not in net:
        raise IpxeEscapeError(f"router {router} is not in {net}")
    for host in hosts:
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", host.mac):
            raise IpxeEscapeError(f"host {host.mac[:40]!r}: expected a MAC address aa:bb:cc:dd:ee:ff")
        if host.name and not NODE_ID_RE.fullmatch(host.name):
            raise IpxeEscapeError(f"host name {host.name[:80]!r} is not a valid host name")
        try:
            ip = ipaddress.ip_address(host.ip)
        except ValueError:
            raise IpxeEscapeError(f"host {host.mac}: {host.ip[:40]!r} is not an IP address") from None
        if ip not in net:
            raise IpxeEscapeError(f"host {host.mac} address {host.ip} is not in {net}")
    return _dnsmasq().get_template("dnsmasq-lab.conf.j2").render(
        network=word(str(net)), interface=_interface(interface), range_start=str(start), range_end=str(end),
        netmask=str(net.netmask), router=router, lease=lease, hosts=hosts, boot_url=boot_url, tftp_root=tftp_root)
