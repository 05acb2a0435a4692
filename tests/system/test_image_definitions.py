"""The appliance image's definitions (image/) parse and agree with each other; no image is built here.

Checks the repart partition definitions (build time and first boot), the systemd-sysupdate transfers,
the UKI naming, the kernel command line, the units' ordering (cortex-ready gates boot-complete.target)
and the paths shared between the units and cortex.appliance.credentials.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.appliance import credentials
from cortex.appliance import ready as cortex_ready
from tests.support import procs

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "image"
TREE = IMAGE / "tree"
UNITS = TREE / "usr/lib/systemd/system"
MiB = 1024 * 1024
GiB = 1024 * MiB
UKI_BUDGET = 64 * MiB  # what one UKI (kernel + initrd + modules) may grow to


def read_ini(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd-style INI: sections, repeated keys (kept in order), '\\' continuations, # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    assert not pending, f"{path}: dangling continuation"
    return sections


def mkosi_list(conf: dict, section: str, key: str) -> list[str]:
    """mkosi list settings: values on the key line and on indented continuation lines."""
    return [w for v in conf.get(section, {}).get(key, []) for w in v.split()]


def read_mkosi(path: Path) -> dict[str, dict[str, list[str]]]:
    """mkosi.conf: like read_ini, but indented lines continue the previous key's value."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    last_key = None
    for raw in path.read_text().splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace() and last_key:
            current[last_key][-1] += " " + raw.split("#")[0].strip()
            continue
        line = raw.strip()
        if line.startswith("["):
            current = sections.setdefault(line[1:-1], {})
            last_key = None
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
        last_key = key.strip()
    return sections


def one(ini: dict, section: str, key: str) -> str:
    values = ini[section][key]
    assert len(values) == 1, f"{section}.{key} given {len(values)} times"
    return values[0]


def size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)", value)
    assert match, value
    return int(match.group(1)) * {"": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}[match.group(2)]


def sysupdate_regex(pattern: str) -> re.Pattern:
    """A sysupdate MatchPattern as a regex (the @ fields this image uses)."""
    fields = {"@v": r"(?P<v>[A-Za-z0-9.~^]+)", "@u": r"(?P<u>[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",
              "@l": r"(?P<l>\d+)", "@d": r"(?P<d>\d+)"}
    out = ""
    for part in re.split(r"(@[a-z])", pattern):
        out += fields[part] if part in fields else re.escape(part)
    return re.compile(out + "$")


# --- fixtures --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mkosi():
    return read_mkosi(IMAGE / "mkosi.conf")


@pytest.fixture(scope="module")
def build_parts():
    return {p.stem: read_ini(p) for p in sorted((IMAGE / "repart/build").glob("*.conf"))}


@pytest.fixture(scope="module")
def runtime_parts():
    return {p.stem: read_ini(p) for p in sorted((TREE / "usr/lib/repart.d").glob("*.conf"))}


@pytest.fixture(scope="module")
def transfers():
    return {p.stem: read_ini(p) for p in sorted((TREE / "usr/lib/sysupdate.d").glob("*.conf"))}


def by_type(parts: dict, type_: str) -> list[tuple[str, dict]]:
    return [(name, p) for name, p in parts.items() if one(p, "Partition", "Type") == type_]


def fixed_size(part: dict) -> int:
    low, high = size(one(part, "Partition", "SizeMinBytes")), size(one(part, "Partition", "SizeMaxBytes"))
    assert low == high, "slot partitions must have a fixed size (SizeMinBytes == SizeMaxBytes)"
    return low


def image_id(mkosi) -> str:
    return one(mkosi, "Output", "ImageId")


# --- mkosi.conf ----------------------------------------------------------------------------------------------

def test_mkosi_conf(mkosi):
    assert one(mkosi, "Distribution", "Distribution") == "debian"
    assert one(mkosi, "Distribution", "Release") == "bookworm"
    assert one(mkosi, "Output", "Format") == "disk"
    assert one(mkosi, "Output", "SplitArtifacts") == "yes"
    assert one(mkosi, "Host", "Incremental") == "yes"  # [Host] in mkosi 24, not [Output]
    assert one(mkosi, "Host", "QemuKvm") == "no"  # the machines' KVM is PVM: TCG only
    packages = mkosi_list(mkosi, "Content", "Packages")
    for needed in ("linux-image-amd64", "systemd", "systemd-boot", "systemd-boot-efi", "systemd-container",
                   "python3", "libstdc++6", "udev"):
        assert needed in packages
    pin = (IMAGE / "mkosi.pkgmngr/etc/apt/preferences.d/systemd-backports").read_text()
    assert "n=bookworm-backports" in pin and re.search(r"^Package: .*\bsystemd\b", pin, re.M)
    sources = (IMAGE / "mkosi.pkgmngr/etc/apt/sources.list.d/mkosi.sources").read_text()
    assert "bookworm-backports" in sources and "Signed-By:" in sources
    initrd = read_mkosi(IMAGE / "mkosi.images/initrd/mkosi.conf")
    assert one(initrd, "Output", "Format") == "cpio"
    assert one(mkosi, "Content", "Initrds") == "%O/" + one(initrd, "Output", "Output") + ".cpio.zst"
    for needed in ("systemd", "udev", "libcryptsetup12", "e2fsprogs", "util-linux"):
        assert needed in mkosi_list(initrd, "Content", "Packages")


def included(path: Path) -> dict[str, dict[str, list[str]]]:
    """A top-level mkosi file that only names what it includes: [Config] Include= and nothing else."""
    conf = read_mkosi(path)
    assert set(conf) == {"Config"} and set(conf["Config"]) == {"Include"}, f"{path} holds more than Include="
    return conf["Config"]["Include"]


def test_top_level_mkosi_conf_includes_the_image_definitions():
    """`mkosi build` at the repository root builds what image/ defines: the main image, every profile and
    every subimage (mkosi looks for mkosi.profiles/ and mkosi.images/ only where it runs)."""
    assert included(REPO / "mkosi.conf") == ["image/"]
    assert (IMAGE / "mkosi.conf").is_file()
    profiles = sorted(p.name for p in (IMAGE / "mkosi.profiles").glob("*.conf"))
    assert profiles == ["netboot.conf", "plain.conf"]
    assert sorted(p.name for p in (REPO / "mkosi.profiles").iterdir()) == profiles
    for name in profiles:
        assert included(REPO / "mkosi.profiles" / name) == [f"image/mkosi.profiles/{name}"]
        # an included file's relative paths resolve against the directory mkosi runs in, so the profiles'
        # paths are anchored to their own directory (%C) to mean the same from image/ and from the top
        profile = read_mkosi(IMAGE / "mkosi.profiles" / name)
        for key in ("ExtraTrees", "PostInstallationScripts", "FinalizeScripts", "BuildSources", "Initrds"):
            for value in mkosi_list(profile, "Content", key):
                assert value.startswith(("%C/", "/")), f"{name}: {key}={value} depends on where mkosi runs"
    subimages = sorted(p.name for p in (IMAGE / "mkosi.images").iterdir())
    assert subimages == ["initrd"]
    assert sorted(p.name for p in (REPO / "mkosi.images").iterdir()) == [f"{s}.conf" for s in subimages]
    for name in subimages:
        assert included(REPO / "mkosi.images" / f"{name}.conf") == [f"image/mkosi.images/{name}/"]


def mkosi_summary(directory: Path, *argv: str) -> list[dict]:
    done = subprocess.run(["mkosi", "--json", "--image-version=0.1.0.7", *argv, "summary"], cwd=directory,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    images = json.loads(done.stdout)["Images"]
    for image in images:
        image.pop("Seed")  # random on every run without Seed=
        image.pop("Include")  # the top level adds its own Include= lines: the one expected difference
    return images


@pytest.mark.parametrize("profile", [[], ["--profile=netboot"], ["--profile=plain"]], ids=["disk", "netboot", "plain"])
def test_top_level_mkosi_conf_resolves_to_the_same_configuration(profile):
    """mkosi's own reading of both directories (`mkosi summary`, no build): identical, image by image."""
    version = subprocess.run(["mkosi", "--version"], capture_output=True, text=True).stdout.split() \
        if shutil.which("mkosi") else []
    if len(version) < 2 or int(version[1].split(".")[0].split("~")[0]) < 24:
        pytest.skip("mkosi 24 or newer not installed (image/build.sh installs it from bookworm-backports)")
    at_top, in_image = mkosi_summary(REPO, *profile), mkosi_summary(IMAGE, *profile)
    assert [i["Image"] for i in at_top] == [i["Image"] for i in in_image] == ["initrd", None]
    assert at_top == in_image
    assert at_top[-1]["OutputDirectory"] == str(IMAGE / ".build/out")


def test_kernel_command_line_matches_layout(mkosi, runtime_parts, build_parts):
    cmdline = mkosi_list(mkosi, "Content", "KernelCommandLine")
    args = dict(a.split("=", 1) for a in cmdline if "=" in a)
    (_, state), = by_type(runtime_parts, "root")
    assert args["root"] == "PARTLABEL=" + one(state, "Partition", "Label")
    assert args["rootfstype"] == one(state, "Partition", "Format")
    assert "rw" in cmdline and "x-systemd.growfs" in args["rootflags"]
    (_, usr), = by_type(build_parts, "usr")
    assert args["mount.usr"] == "/dev/mapper/usr"  # systemd-veritysetup-generator's name for usrhash=
    assert args["mount.usrfstype"] == one(usr, "Partition", "Format")
    assert "ttyS0" in " ".join(a for a in cmdline if a.startswith("console="))
    # systemd.firstboot=off would stop systemd-firstboot outright, also where cortex-root-password uses it
    # to apply the root password credential; the prompts stay off because systemd-firstboot.service is masked.
    assert "systemd.firstboot" not in args


# --- repart: build time vs first boot ------------------------------------------------------------------------

def test_build_partitions(build_parts, mkosi):
    (_, esp), = by_type(build_parts, "esp")
    (_, usr), = by_type(build_parts, "usr")
    (_, verity), = by_type(build_parts, "usr-verity")
    assert not by_type(build_parts, "root"), "the state partition is created on first boot, not shipped"
    assert one(usr, "Partition", "Format") == "erofs"
    assert one(usr, "Partition", "CopyFiles") == "/usr:/"
    assert one(usr, "Partition", "Verity") == "data" and one(verity, "Partition", "Verity") == "hash"
    assert one(usr, "Partition", "VerityMatchKey") == one(verity, "Partition", "VerityMatchKey")
    assert one(usr, "Partition", "Label") == "%M_%A"
    assert one(verity, "Partition", "Label") == "%M_%A_verity"
    # The split files must carry the partition UUID (sysupdate @u): repart 254 defaults to %t only.
    assert one(usr, "Partition", "SplitName") == one(verity, "Partition", "SplitName") == "%t.%U"
    assert one(esp, "Partition", "Format") == "vfat"
    assert set(esp["Partition"]["CopyFiles"]) == {"/boot:/", "/efi:/"}
    environment = " ".join(mkosi["Content"].get("Environment", []))
    assert "SYSTEMD_REPART_MKFS_OPTIONS_EROFS=-zlz4hc" in environment


def test_slots_agree_between_build_and_first_boot(build_parts, runtime_parts):
    for type_ in ("esp", "usr", "usr-verity"):
        built = by_type(build_parts, type_)
        runtime = by_type(runtime_parts, type_)
        assert len(built) == 1
        assert len(runtime) == (1 if type_ == "esp" else 2), f"{type_}: A and B slot at run time"
        sizes = {fixed_size(p) for _, p in built + runtime}
        assert len(sizes) == 1, f"{type_}: every slot the same fixed size, got {sizes}"
        # Existing partitions are matched in file-name order: the shipped one (A) must come first and
        # carry no label change; the new one (B) is created empty.
        assert "Label" not in runtime[0][1]["Partition"]
        assert "Format" not in runtime[0][1]["Partition"] and "CopyFiles" not in runtime[0][1]["Partition"]
        if type_ != "esp":
            assert one(runtime[1][1], "Partition", "Label") == "_empty"
            assert "Format" not in runtime[1][1]["Partition"]
    names = list(runtime_parts)
    assert names == sorted(names)
    (state_name, state), = by_type(runtime_parts, "root")
    assert names[-1] == state_name, "the state partition is last: it takes (and grows into) the rest of the disk"
    assert one(state, "Partition", "FactoryReset") == "yes"
    assert one(state, "Partition", "Format") == "ext4"
    assert "SizeMaxBytes" not in state["Partition"]


def test_sizes_have_headroom(build_parts):
    (_, esp), = by_type(build_parts, "esp")
    (_, usr), = by_type(build_parts, "usr")
    (_, verity), = by_type(build_parts, "usr-verity")
    slot, hashes = fixed_size(usr), fixed_size(verity)
    assert slot >= GiB
    # sha256 dm-verity tree with 4 KiB blocks: 32 bytes per block + upper levels (< 1 %); keep 2x.
    assert hashes >= 2 * (slot // 4096 * 32) * 1.01
    # The ESP holds at most InstancesMax UKIs plus the one being written, each within the budget.
    assert fixed_size(esp) >= 2 * (2 + 1) * UKI_BUDGET


def test_built_artifacts_fit_their_slots_if_present(build_parts):
    """After a local `just image`: the real /usr filesystem and UKI are within their budgets."""
    out = IMAGE / ".build/out"
    ukis = sorted(out.glob("cortex_*.efi"))
    usr_files = sorted(out.glob("cortex_*.usr-x86-64.*.raw"))
    if not ukis or not usr_files:
        pytest.skip("no image built here (run `just image`)")
    (_, usr), = by_type(build_parts, "usr")
    assert usr_files[-1].stat().st_size == fixed_size(usr)
    used = used_bytes_of_erofs(usr_files[-1])
    assert used <= fixed_size(usr) * 0.6, f"/usr uses {used / MiB:.0f} MiB of the {fixed_size(usr) / MiB:.0f} MiB slot"
    assert ukis[-1].stat().st_size <= UKI_BUDGET


def used_bytes_of_erofs(path: Path) -> int:
    """erofs superblock at 1024: magic 0xE0F5E1E2, blkszbits at +12, blocks (u32) at +36."""
    with open(path, "rb") as f:
        f.seek(1024)
        sb = f.read(128)
    assert int.from_bytes(sb[0:4], "little") == 0xE0F5E1E2, "not an erofs image"
    return int.from_bytes(sb[36:40], "little") << sb[12]


# --- sysupdate ---------------------------------------------------------------------------------------------

def test_sysupdate_partition_transfers_match_repart(transfers, build_parts, mkosi):
    ident = image_id(mkosi)
    labels = {one(p, "Partition", "Type"): one(p, "Partition", "Label") for p in build_parts.values()}
    partition_targets = {n: t for n, t in transfers.items() if one(t, "Target", "Type") == "partition"}
    assert {one(t, "Target", "MatchPartitionType") for t in partition_targets.values()} == {"usr", "usr-verity"}
    for name, t in partition_targets.items():
        ptype = one(t, "Target", "MatchPartitionType")
        label = labels[ptype].replace("%M", ident).replace("%A", "@v")
        assert one(t, "Target", "MatchPattern") == label, name
        assert one(t, "Target", "Path") == "auto"
        assert one(t, "Target", "ReadOnly") == "1"
        assert one(t, "Transfer", "ProtectVersion") == "%A"
        source = one(t, "Source", "MatchPattern")
        # mkosi's split file (repart SplitName %t.%U) as build.sh publishes it (xz: systemd-pull 254
        # cannot unpack zstd).
        assert source == f"{ident}_@v.{ptype.replace('usr', 'usr-x86-64')}.@u.raw.xz", name
        assert sysupdate_regex(source).match(
            f"{ident}_0.1.0.202501010000.{ptype.replace('usr', 'usr-x86-64')}.0f3e2a44-8c2b-4c1e-9d7a-0b1c2d3e4f50.raw.xz")
        assert one(t, "Source", "Type") == "url-file"
        assert ".invalid/" in one(t, "Source", "Path"), "no real update server is configured in the image"


def test_sysupdate_uki_matches_mkosi_naming(transfers, mkosi):
    ident = image_id(mkosi)
    (uki,) = [t for t in transfers.values() if one(t, "Target", "Type") == "regular-file"]
    assert one(uki, "Target", "Path") == "/EFI/Linux" and one(uki, "Target", "PathRelativeTo") == "boot"
    patterns = one(uki, "Target", "MatchPattern").split()
    tries = (TREE / "etc/kernel/tries").read_text().strip()
    assert one(uki, "Target", "TriesLeft") == tries == "3"
    assert one(uki, "Target", "TriesDone") == "0"
    assert int(one(uki, "Target", "InstancesMax")) == 2
    # mkosi names the first UKI %i_%v+&c (with /etc/kernel/tries), the update writes @v+@l-@d, systemd-boot
    # renames while counting and systemd-bless-boot drops the counter: every form must match.
    fmt = one(mkosi, "Content", "UnifiedKernelImageFormat")
    assert fmt == "%i_%v+&c"
    version = "0.1.0.202501010000"
    names = [fmt.replace("%i", ident).replace("%v", version).replace("&c", tries) + ".efi",
             f"{ident}_{version}+2-1.efi", f"{ident}_{version}+0-3.efi", f"{ident}_{version}.efi"]
    for name in names:
        assert any(sysupdate_regex(p).match(name) and sysupdate_regex(p).match(name)["v"] == version
                   for p in patterns), name
    assert sysupdate_regex(one(uki, "Source", "MatchPattern")).match(f"{ident}_{version}.efi")
    loader = (TREE / "efi/loader/loader.conf").read_text()
    assert re.search(rf"^default {ident}_\*", loader, re.M)


def test_build_script_publishes_what_sysupdate_fetches(transfers):
    script = (IMAGE / "build.sh").read_text()
    assert "xz " in script and "SHA256SUMS" in script
    assert "usr-x86-64.*.raw" in script and "usr-x86-64-verity.*.raw" in script
    assert 'cortex_$version.efi' in script


# --- units -------------------------------------------------------------------------------------------------

def unit(name: str) -> dict:
    return read_ini(UNITS / name)


def words(u: dict, section: str, key: str) -> list[str]:
    return [w for v in u.get(section, {}).get(key, []) for w in v.split()]


def test_cortex_ready_gates_boot_complete():
    ready = unit("cortex-ready.service")
    assert "boot-complete.target" in words(ready, "Unit", "Before")
    assert "boot-complete.target" in words(ready, "Install", "RequiredBy")
    assert "cortex-agent.service" in words(ready, "Unit", "After")
    # Wants, never Requires: an agent that cannot start must still let this unit time out and reboot, or a
    # broken version is never given up (the VM ISSU test's broken v3 stayed on probation)
    assert "cortex-agent.service" in words(ready, "Unit", "Wants")
    assert "cortex-agent.service" not in words(ready, "Unit", "Requires") + words(ready, "Unit", "BindsTo")
    assert "--reboot-if-counting" in one(ready, "Service", "ExecStart").split()
    assert one(ready, "Service", "Type") == "oneshot" and one(ready, "Service", "RemainAfterExit") == "yes"
    command = one(ready, "Service", "ExecStart").split()
    # the agent's own interpreter runs the check in-process (importable, so it is tested like the rest)
    assert command[:3] == ["/usr/lib/cortex/venv/bin/python", "-m", "cortex.appliance.ready"]
    assert importlib.util.find_spec(command[2]) is not None


def test_update_requests_are_picked_up_while_the_service_is_still_running():
    # PathChanged drops a request written while cortex-update.service is active (the reboot request that
    # follows an install); PathExists starts the service again once it ends
    watch = unit("cortex-update.path")
    assert words(watch, "Path", "PathExists") == ["/var/lib/private/cortex/plugins/updater/request.json"]
    assert not words(watch, "Path", "PathChanged") and not words(watch, "Path", "PathModified")


@pytest.mark.parametrize("doc, ok", [
    ({"state": "leader", "leader_id": "n1", "has_quorum": True}, True),
    ({"state": "follower", "leader_id": "n1", "has_quorum": True}, True),
    ({"state": "worker", "leader_id": "n1", "has_quorum": True}, True),
    ({"state": "follower", "leader_id": "", "has_quorum": True}, False),
    ({"state": "follower", "leader_id": "n1", "has_quorum": False}, False),
    ({"state": "candidate", "leader_id": "n1", "has_quorum": True}, False),
    ({"state": "uninitialized", "waiting_for": "credentials: cortex.join_token: missing"}, False),
    ({}, False),
])
def test_ready_health_rule(doc, ok):
    healthy, why = cortex_ready.healthy(doc)
    assert healthy is ok
    if doc.get("waiting_for"):
        assert doc["waiting_for"] in why


def test_agent_unit():
    agent = unit("cortex-agent.service")
    svc = agent["Service"]
    assert one(agent, "Service", "Type") == "notify"
    assert one(agent, "Service", "Restart") == "on-failure"
    assert int(one(agent, "Service", "WatchdogSec")) > 0
    # SIGTERM to the agent alone: it hands its services over before they stop (docs/services.md)
    assert one(agent, "Service", "KillMode") == "mixed"
    assert one(agent, "Service", "ProtectSystem") == "strict"
    assert one(agent, "Service", "StateDirectory") == "cortex"
    assert one(agent, "Service", "ExecStart") == "/usr/bin/cortex agent --config /run/cortex/config.yaml"
    assert "cortex-config.service" in words(agent, "Unit", "After") + words(agent, "Unit", "Requires")
    # The token: rendered to /run/cortex/join-token (0600), loaded as the agent's own credential, and the
    # rendered config points token_file at that credential.
    (load,) = svc["LoadCredential"]
    cred_id, path = load.split(":", 1)
    assert path == "/run/cortex/join-token"
    assert credentials.AGENT_TOKEN_PATH == f"/run/credentials/cortex-agent.service/{cred_id}"
    assert one(agent, "Service", "NoNewPrivileges") == "yes"
    assert one(agent, "Service", "CapabilityBoundingSet") == ""


# Settings with which systemd mounts something over part of the agent's /proc (read-only binds, masks, a
# restricted instance), with the value that mounts nothing: in a user namespace the kernel refuses a fresh
# /proc that would reveal what such a mount hides, so every bubblewrap sandbox (tasks, services) would stop
# at "Can't mount proc on /newroot/proc".
PROC_CLEAN = {"ProtectKernelTunables": "no", "ProtectKernelLogs": "no", "ProtectHostname": "no",
              "ProtectProc": "default", "ProcSubset": "all"}


def test_agent_proc_has_nothing_mounted_over_it():
    effective: dict[str, str] = {}
    for path in [UNITS / "cortex-agent.service", *sorted((UNITS / "cortex-agent.service.d").glob("*.conf"))]:
        for key, values in read_ini(path).get("Service", {}).items():
            effective[key] = values[-1]  # systemd's order: the unit, then its drop-ins by name; the last wins
    assert {k: effective.get(k, clean) for k, clean in PROC_CLEAN.items()} == PROC_CLEAN

# Run as the appliance's agent is (a uid of its own, the drop-in's ambient capabilities), in this interpreter:
# what agent.run does first, then a shell task through the real executor, printing the sandbox's capabilities.
_CAPS_PROBE = """
import json, sys, tempfile, threading
from pathlib import Path
from cortex.appliance import capabilities
from cortex.tasks.executor import TaskRun
from cortex.tasks.executors import ExecutorSettings, ShellExecutor
before = capabilities.held("CapAmb")
cleared = capabilities.keep_to_self()
shell = ShellExecutor(ExecutorSettings())
out = []
with tempfile.TemporaryDirectory() as work:
    run = TaskRun("caps", 1, shell.validate({"command": "grep -E '^Cap(Prm|Eff|Amb):' /proc/self/status"}),
                  Path(work), lambda stream, data: out.append(data.decode()), threading.Event())
    outcome = shell.run(run)
print(json.dumps({"before": before, "cleared": cleared, "effective": capabilities.held("CapEff"),
                  "ambient": capabilities.held("CapAmb"), "exit": outcome.exit_code, "error": outcome.error,
                  "task": "".join(out)}))
"""
CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}


def test_floating_address_capabilities_stay_with_the_agent():
    """The appliance's drop-in gives the agent the two capabilities floating addresses need, and AF_PACKET;
    the agent clears them from the ambient set first thing, so a task (bubblewrap refuses to start while it
    holds capabilities) runs, with none, and the agent keeps them for itself."""
    drop_in = read_ini(UNITS / "cortex-agent.service.d/60-floating-addresses.conf")
    names = one(drop_in, "Service", "AmbientCapabilities").split()
    assert sorted(names) == sorted(CAP_BITS)
    assert one(drop_in, "Service", "CapabilityBoundingSet").split() == names
    assert one(drop_in, "Service", "RestrictAddressFamilies") == "AF_PACKET"
    if os.geteuid() != 0 or not shutil.which("bwrap"):
        pytest.skip("granting ambient capabilities to another uid needs root, and the task needs bwrap")
    caps = ",".join(f"+{n.removeprefix('CAP_').lower()}" for n in names)
    done = procs.run(["setpriv", "--reuid=64999", "--regid=64999", "--clear-groups", f"--inh-caps={caps}",
                      f"--ambient-caps={caps}", sys.executable, "-c", _CAPS_PROBE],
                     capture_output=True, text=True, cwd="/", timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.splitlines()[-1])
    mask = sum(1 << bit for bit in CAP_BITS.values())
    assert doc["before"] == mask and doc["cleared"] == mask, doc
    assert doc["ambient"] == 0 and doc["effective"] & mask == mask, doc
    assert doc["exit"] == 0 and not doc["error"], doc
    task = dict(line.split(":") for line in doc["task"].split("\n") if line)
    assert {k: int(v, 16) for k, v in task.items()} == {"CapPrm": 0, "CapEff": 0, "CapAmb": 0}, doc["task"]

def test_config_unit_renders_before_agent():
    cfg = unit("cortex-config.service")
    assert "cortex-agent.service" in words(cfg, "Unit", "Before")
    assert "cortex.*" in cfg["Service"]["ImportCredential"]
    command = one(cfg, "Service", "ExecStart").split()
    assert command[1:4] == ["-m", "cortex.appliance.credentials", "render"]
    assert command[command.index("--out") + 1] == "/run/cortex/config.yaml"
    out = Path(command[command.index("--out") + 1])
    # write_outputs puts the token beside the config: where the agent unit loads it from.
    assert str(out.with_name("join-token")) == "/run/cortex/join-token"
    assert command[command.index("--esp-file") + 1].startswith("/efi/")
    fstab = (TREE / "etc/fstab").read_text()
    assert re.search(r"^PARTLABEL=cortex-esp\s+/efi\s+vfat\s", fstab, re.M)


def test_presets_and_sleep_hook(build_parts):
    preset = (TREE / "usr/lib/systemd/system-preset/10-cortex.preset").read_text().split("\n")
    for name in ("cortex-config.service", "cortex-agent.service", "cortex-ready.service", "systemd-networkd.service"):
        assert f"enable {name}" in preset
    assert "disable systemd-sysupdate.timer" in preset
    (_, esp), = by_type(build_parts, "esp")
    assert one(esp, "Partition", "Label") == "cortex-esp"
    hook = TREE / "usr/lib/systemd/system-sleep/cortex"
    assert os.access(hook, os.X_OK)
    text = hook.read_text()
    assert "SIGUSR1" in text and "cortex-agent.service" in text and "SigCgt" in text


def test_initrd_units():
    base = IMAGE / "mkosi.images/initrd/mkosi.extra/usr/lib"
    populate = read_ini(base / "systemd/system/cortex-populate-root.service")
    assert "sysroot.mount" in words(populate, "Unit", "After")
    before = words(populate, "Unit", "Before")
    assert {"initrd-parse-etc.service", "initrd-fs.target", "initrd-switch-root.target"} <= set(before)
    assert (base / "systemd/system/initrd.target.wants/cortex-populate-root.service").is_symlink()
    repart = read_ini(base / "systemd/system/systemd-repart.service.d/cortex.conf")
    assert repart["Service"]["ExecStart"] == ["", "/usr/lib/cortex/initrd-repart"]
    assert "--definitions=/sysusr/usr/lib/repart.d" in (base / "cortex/initrd-repart").read_text()
    # The state partition is mounted only after repart: a factory reset recreates it in place.
    for name in ("sysroot.mount", "systemd-fsck-root.service"):
        dropin = read_ini(base / f"systemd/system/{name}.d/cortex.conf")
        assert "systemd-repart.service" in words(dropin, "Unit", "After"), name


def test_console_access_and_a_clean_boot_need_these_units():
    """Root password from systemd's credentials early enough for the console and sulogin; no prompting
    first-boot wizard; no boot loader update outside the A/B scheme; the journal on the state partition."""
    password = unit("cortex-root-password.service")
    names = ["passwd.hashed-password.root", "passwd.plaintext-password.root"]
    assert password["Service"]["ImportCredential"] == names
    assert password["Unit"]["ConditionCredential"] == [f"|{n}" for n in names]
    assert {"sysinit.target", "emergency.service"} <= set(words(password, "Unit", "Before"))
    assert set(words(password, "Install", "WantedBy")) == {"sysinit.target", "emergency.target"}
    assert one(password, "Service", "ExecStart") == "/usr/lib/cortex/root-password"
    preset = (TREE / "usr/lib/systemd/system-preset/10-cortex.preset").read_text().split("\n")
    assert "enable cortex-root-password.service" in preset
    finalize = (IMAGE / "scripts/factory-etc.finalize").read_text()
    for masked in ("systemd-firstboot.service", "systemd-boot-update.service"):
        assert f'ln -sfn /dev/null "$BUILDROOT/etc/systemd/system/{masked}"' in finalize
    journald = read_ini(TREE / "usr/lib/systemd/journald.conf.d/cortex.conf")
    assert journald["Journal"]["Storage"] == ["persistent"]
    # the netboot image has no disk: its journal stays in RAM
    netboot = finalize[finalize.index('if [ "${PROFILE:-}" = netboot ]'):]
    assert 'rm -f "$BUILDROOT/usr/lib/systemd/journald.conf.d/cortex.conf"' in netboot.split("exit 0")[0]


FIRSTBOOT = shutil.which("systemd-firstboot")


def root_password(tmp_path: Path, shadow_root: str, **creds: str) -> subprocess.CompletedProcess:
    """Runs the image's root-password script on a scratch root: the factory passwd/shadow, root's shadow
    field as given, and the credentials in a directory as systemd hands them to the service."""
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n")
    (tmp_path / "etc/shadow").write_text(f"root:{shadow_root}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    credentials = tmp_path / "creds"
    shutil.rmtree(credentials, ignore_errors=True)
    credentials.mkdir()
    for name, value in creds.items():
        (credentials / f"passwd.{name.replace('_', '-')}.root").write_text(value)
    return subprocess.run([str(TREE / "usr/lib/cortex/root-password"), str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)})


def shadow_of(tmp_path: Path) -> dict[str, str]:
    return {line.split(":")[0]: line.split(":")[1] for line in (tmp_path / "etc/shadow").read_text().splitlines()}


@pytest.mark.skipif(FIRSTBOOT is None, reason="systemd-firstboot is not installed (image/build.sh installs systemd)")
def test_root_password_credential_applies_once_and_refuses_what_is_no_hash(tmp_path):
    hashed = "$6$abcdefgh$M/eYsB4rVXAm3ZNc88J.UD9rCKAT6FB1rahiwJCHtEndQNORCub5qhjxn50qbqVVthkM.9HpEwtf0t.iV9uH0/"
    done = root_password(tmp_path, "*", hashed_password=hashed)
    assert done.returncode == 0 and "set from the credential passwd.hashed-password.root" in done.stdout, done
    assert shadow_of(tmp_path) == {"root": hashed, "daemon": "*"}  # the other accounts untouched

    # a password already there (set by the credential before, or by passwd) is never overwritten
    done = root_password(tmp_path, hashed, plaintext_password="other")
    assert done.returncode == 0 and "not applied again" in done.stdout
    assert shadow_of(tmp_path)["root"] == hashed
    assert root_password(tmp_path, "!" + hashed, hashed_password=hashed.replace("abc", "xyz")).returncode == 0
    assert shadow_of(tmp_path)["root"] == "!" + hashed  # locked on purpose: stays locked

    # a plaintext password in the hashed credential would become an unusable hash: refused, nothing written
    done = root_password(tmp_path, "!*", hashed_password="hunter2")
    assert done.returncode == 1 and "passwd.hashed-password.root: not a crypt(5) hash" in done.stderr
    assert shadow_of(tmp_path)["root"] == "!*"

    # the plaintext form is hashed (yescrypt, systemd-firstboot's default), never stored as given
    done = root_password(tmp_path, "!*", plaintext_password="hunter2")
    assert done.returncode == 0 and "passwd.plaintext-password.root" in done.stdout, done
    assert shadow_of(tmp_path)["root"].startswith("$y$")

    # no credential: nothing to do
    assert "no root password credential" in root_password(tmp_path, "*").stdout
    assert shadow_of(tmp_path)["root"] == "*"


SCRIPTS = ["build.sh", "flash.sh", "qemu.sh", "scripts/install-cortex.postinst", "scripts/factory-etc.finalize",
           "tree/usr/lib/cortex/factory-reset", "tree/usr/lib/cortex/root-password",
           "mkosi.images/initrd/mkosi.extra/usr/lib/cortex/initrd-repart",
           "mkosi.images/initrd/mkosi.extra/usr/lib/cortex/populate-root",
           "tree/usr/lib/systemd/system-sleep/cortex"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_shell(script):
    path = IMAGE / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
    result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("handles", [True, False])
def test_sleep_hook_signals_only_an_agent_that_handles_sigusr1(tmp_path, handles):
    """The hook sends SIGUSR1 after resume only when the agent catches it (an uncaught one would kill it)."""
    log = tmp_path / "systemctl.log"
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\ncase "$1" in show) echo "$FAKE_PID" ;; *) echo "$@" >>"$FAKE_LOG" ;; esac\n')
    fake.chmod(0o755)
    code = "import signal, sys, time\n"
    if handles:
        code += "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
    code += "print('up', flush=True)\ntime.sleep(30)\n"
    agent = procs.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout.readline().strip() == "up"
        env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "FAKE_PID": str(agent.pid),
               "FAKE_LOG": str(log)}
        hook = str(TREE / "usr/lib/systemd/system-sleep/cortex")
        pre = subprocess.run([hook, "pre", "suspend"], env=env, capture_output=True, text=True, timeout=10)
        assert pre.returncode == 0 and not log.exists()
        post = subprocess.run([hook, "post", "suspend"], env=env, capture_output=True, text=True, timeout=10)
        assert post.returncode == 0, post.stderr
        sent = log.read_text() if log.exists() else ""
        if handles:
            assert "kill --kill-whom=main --signal=SIGUSR1 cortex-agent.service" in sent
        else:
            assert sent == "" and "no SIGUSR1 handler" in post.stdout
    finally:
        agent.kill()
        agent.wait()
