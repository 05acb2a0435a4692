"""netboot/README.md's commands work when copied, profiles that YAML splits are refused, and the join
token stays off the kernel command line (it travels in a one-time credentials initrd)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from cortex import cli
from cortex.netboot import credstore, profiles, render
from cortex.netboot.profiles import Machine

REPO = Path(__file__).resolve().parents[2]
README = REPO / "netboot" / "README.md"
EXAMPLE = REPO / "netboot" / "profiles.example.yaml"
BASE = "http://10.77.0.1:8080"
TOKEN = "cx1.abcdefgh.0123456789abcdef0123456789abcdef"


def readme_commands() -> list[list[str]]:
    """The indented `cortex ...` command lines of the README, continuation lines joined, comments dropped."""
    commands, pending = [], ""
    for line in README.read_text().splitlines():
        if not line.startswith("    ") and not pending:
            continue
        text = (pending + " " + line.strip()) if pending else line.strip()
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        words = shlex.split(text, comments=True)
        if words[:1] == ["sudo"]:
            words = words[1:]
        if words[:2] == ["cortex", "netboot"]:
            commands.append(words)
    return commands


def test_the_readme_commands_that_only_print_run_as_written(capsys, monkeypatch):
    """Render and check commands, as a user copies them: from the repository root, no cluster needed."""
    monkeypatch.chdir(REPO)
    ran = []
    for words in readme_commands():
        sub = words[2]
        if sub == "profiles" and "FILE" not in words:
            assert cli.main(words[1:]) == 0, words
            assert "ok (3 profiles, 4 groups" in capsys.readouterr().out
            ran.append(words)
        elif sub == "dnsmasq" and "--write" not in words and "--network" in words:
            assert cli.main(words[1:]) == 0, (words, capsys.readouterr().err)
            out = capsys.readouterr().out
            if "--interface" in words:
                assert f"interface={words[words.index('--interface') + 1]}" in out
            ran.append(words)
    assert [w[2] for w in ran] == ["profiles", "dnsmasq"], ran


def test_lab_without_an_address_in_the_network_asks_for_base_url(capsys):
    assert cli.main(["netboot", "dnsmasq", "--lab", "--network", "10.250.250.0/24", "--interface", "br0"]) == 2
    assert "--base-url" in capsys.readouterr().err


def test_interface_all_serves_everywhere_and_a_named_one_is_kept(capsys):
    base = ["netboot", "dnsmasq", "--proxy", "--network", "192.168.77.0/24", "--base-url", "http://192.168.77.5:8080"]
    assert cli.main([*base, "--interface", "all"]) == 0
    assert "interface=" not in capsys.readouterr().out
    assert cli.main([*base, "--interface", "eth7"]) == 0
    assert "interface=eth7\n" in capsys.readouterr().out


@pytest.mark.parametrize("args, culprit", [
    ("[console=ttyS0,115200n8]", "quote it ([\"console=ttyS0,115200n8\"])"),
    ("[quiet,splash]", "'quiet' and 'splash' were written as one argument 'quiet,splash'"),
    ("[console=ttyS0, 115200n8]", "'115200n8' looks like the rest of 'console=ttyS0'"),
    ("\n      - console=ttyS0\n      - 115200n8", "looks like the rest of"),
])
def test_a_kernel_argument_split_by_yaml_is_refused(args, culprit):
    text = f"profiles:\n  lab:\n    args: {args}\ngroups:\n  - {{name: all, profile: lab, node_name: 'pxe-{{mac}}'}}\n"
    with pytest.raises(profiles.ProfileError) as exc:
        profiles.loads(text, "p.yaml")
    assert str(exc.value).startswith("p.yaml:") and culprit in str(exc.value)


@pytest.mark.parametrize("args", ['["console=ttyS0,115200n8"]', "[console=ttyS0, console=tty0, quiet]",
                                  "['console=ttyS0,115200n8', quiet]", "\n      - console=ttyS0,115200n8"])
def test_arguments_written_as_meant_pass(args):
    text = f"profiles:\n  lab:\n    args: {args}\ngroups:\n  - {{name: all, profile: lab, node_name: 'pxe-{{mac}}'}}\n"
    assert all("," not in a or a == "console=ttyS0,115200n8" for a in profiles.loads(text).profiles["lab"].args)


def test_the_example_lab_profile_keeps_its_serial_console_in_one_argument():
    assert profiles.load(EXAMPLE).profiles["lab"].args == ("console=ttyS0,115200n8",)


# --- the token off the kernel command line ------------------------------------------------------------------

def machine_script(credentials_url: str) -> str:
    match = profiles.load(EXAMPLE).match(Machine(mac="52:54:00:12:34:01"))
    p = match.profile
    return render.machine_script(render.MachineScript(
        machine=match.machine.key, group=match.group.name, profile=p.name, node_id=match.node_id, base_url=BASE,
        kernel=p.kernel, initrd=p.initrd, args=p.args, join_address="10.77.0.1:7400", token=TOKEN,
        expires="2026-01-01 00:00:00 UTC", log_level=p.log_level, credentials_url=credentials_url))


def test_the_boot_script_keeps_the_token_off_the_kernel_command_line_and_names_the_host():
    url = f"{BASE}/credentials/{'ab' * 16}/{credstore.NAME}"
    script = machine_script(url)
    assert TOKEN not in script
    kernel = next(line for line in script.splitlines() if line.startswith("kernel ")).split()
    assert "systemd.hostname=rack-1" in kernel and "systemd.set_credential=cortex.node_name:rack-1" in kernel
    assert f"initrd={credstore.NAME}" in kernel and "console=ttyS0,115200n8" in kernel
    initrds = [line for line in script.splitlines() if line.startswith("initrd ")]
    # The OS image first, then the credentials over it (the kernel unpacks them in this order).
    assert initrds == [f"initrd {BASE}/artifacts/cortex-netboot.cpio.zst || goto failed", f"initrd {url} || goto failed"]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_credentials_archive_unpacks_with_cpio_into_a_private_credstore(tmp_path):
    archive = credstore.credentials_cpio({"cortex.join_token": TOKEN + "\n", "cortex.x": "y"}, mtime=1_700_000_000)
    assert len(archive) % 512 == 0
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive, cwd=tmp_path, check=True,
                   timeout=30)
    store = tmp_path / "etc/credstore"
    assert store.stat().st_mode & 0o777 == 0o700
    assert (store / "cortex.join_token").read_text() == TOKEN + "\n"
    assert (store / "cortex.join_token").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in store.iterdir()) == ["cortex.join_token", "cortex.x"]
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True, timeout=30)
    assert listing.stdout.decode().split() == ["etc/credstore", "etc/credstore/cortex.join_token", "etc/credstore/cortex.x"]


def test_tickets_serve_once_and_expire():
    now = [1000.0]
    tickets = credstore.Tickets(clock=lambda: now[0])
    first = tickets.mint({"cortex.join_token": "a"}, expires_at=1100)
    second = tickets.mint({"cortex.join_token": "b"}, expires_at=1050)
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second
    assert b"cortex.join_token" in tickets.take(first)
    assert tickets.take(first) is None  # once
    now[0] = 1060
    assert tickets.take(second) is None and len(tickets) == 0  # past its token's expiry
    with pytest.raises(ValueError):
        credstore.credentials_cpio({"../x": "y"})


def test_netboot_node_reads_the_token_from_the_credstore(tmp_path):
    """What cortex-config does on the netbooted node: the token in /etc/credstore joins the rest."""
    from cortex.appliance import credentials

    creds_dir, store = tmp_path / "creds", tmp_path / "credstore"
    creds_dir.mkdir()
    (creds_dir / "cortex.node_name").write_text("rack-1")
    (creds_dir / "cortex.role").write_text("worker")
    (creds_dir / "cortex.join_address").write_text("10.77.0.1:7400")
    archive = credstore.credentials_cpio({"cortex.join_token": TOKEN})
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path, check=True, timeout=30)
    os.rename(tmp_path / "etc/credstore", store)
    out = tmp_path / "run/config.yaml"
    assert credentials.main(["render", "--credentials", str(creds_dir), "--credstore", str(store), "--out", str(out),
                             "--address", "10.77.0.11", "--data-dir", str(tmp_path / "data")]) == 0
    assert (out.with_name("join-token")).read_text().strip() == TOKEN
    assert "join" in out.read_text() and TOKEN not in out.read_text()
