"""The first-boot code names the machine after its node (cortex.appliance.hostname), and keeps a name that
someone chose. The end-to-end case runs `credentials render` in its own UTS namespace (root), so the real
sethostname(2) runs without renaming the machine the tests run on."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from cortex.appliance import hostname
from tests.support import procs

MARKED = f"{hostname.MARKER}\nnode-a\n"


@pytest.mark.parametrize("current, cmdline, credential, expected", [
    ("cortex\n", "", "", f"{hostname.MARKER}\nnode2\n"),          # the image's default: named after the node
    (None, "", "", f"{hostname.MARKER}\nnode2\n"),                # no file at all
    (MARKED, "", "", f"{hostname.MARKER}\nnode2\n"),              # ours, and the node name changed
    (f"{hostname.MARKER}\nnode2\n", "", "", ""),                  # already right: nothing to write
    ("my-desk\n", "", "", ""),                                    # chosen by hand: kept
    ("# comment\nlab-box\n", "", "", ""),
    ("cortex\n", "console=ttyS0 systemd.hostname=pxe1 quiet", "", ""),  # the kernel argument wins (netboot)
    ("cortex\n", "", "chosen\n", ""),                             # a system.hostname credential: systemd's
])
def test_decide(current, cmdline, credential, expected):
    assert hostname.decide("node2", current, cmdline, credential) == expected


def test_apply_writes_the_file_atomically(tmp_path):
    etc, cmdline = tmp_path / "hostname", tmp_path / "cmdline"
    etc.write_text("cortex\n")
    cmdline.write_text("console=ttyS0\n")
    assert hostname.apply("node2", etc, cmdline, set_running=False) == "host name set to node2 (/etc/hostname)"
    assert etc.read_text().splitlines()[-1] == "node2" and oct(etc.stat().st_mode & 0o777) == "0o644"
    assert hostname.apply("node2", etc, cmdline, set_running=False) == ""  # idempotent
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_render_names_the_machine_after_its_node(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cortex.node_name").write_text("node7")
    (creds / "cortex.init").write_text("yes")
    etc = tmp_path / "hostname"
    etc.write_text("cortex\n")
    code = ("import socket, sys; from cortex.appliance import credentials; "
            f"rc = credentials.main(['render', '--credentials', {str(creds)!r}, '--out', {str(tmp_path / 'config.yaml')!r}, "
            f"'--address', '10.0.0.7', '--data-dir', {str(tmp_path / 'data')!r}, '--hostname-file', {str(etc)!r}]); "
            "print('HOSTNAME', socket.gethostname()); sys.exit(rc)")
    result = procs.run(["unshare", "--uts", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HOSTNAME node7" in result.stdout
    assert "note: host name set to node7" in result.stdout
    assert etc.read_text().splitlines()[-1] == "node7"
