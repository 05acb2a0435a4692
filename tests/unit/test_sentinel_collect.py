"""Sentinel's collectors on real-format procfs/sysfs trees and smartctl 7.x JSON documents.

smartctl cannot open real drives here (no root over block devices in CI, often not installed), so the
SmartReader runs a stand-in executable that prints the stored documents exactly as `smartctl -j` does, with
its exit-status bits; the parser sees the same bytes a real drive would produce.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat
from pathlib import Path

from cortex.sentinel import smart
from cortex.sentinel.collect import Collector, Roots, parse_psi

DATA = Path(__file__).parent / "sentinel_data"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


PROC = {
    "stat": "cpu  1000 0 500 8000 100 0 0 0 0 0\ncpu0 500 0 250 4000 50 0 0 0 0 0\n",
    "loadavg": "0.52 0.40 0.33 1/245 12345\n",
    "meminfo": "MemTotal:       16318412 kB\nMemFree:         1234567 kB\nMemAvailable:    8159206 kB\n"
               "SwapTotal:       2097148 kB\nSwapFree:        1048574 kB\n",
    "vmstat": "nr_free_pages 308641\noom_kill 3\n",
    "pressure/cpu": "some avg10=1.50 avg60=0.75 avg300=0.10 total=123456\n",
    "pressure/memory": "some avg10=0.00 avg60=2.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=1.00 avg300=0.00 total=0\n",
    "pressure/io": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
}
SYS = {
    "devices/system/edac/mc/mc0/ce_count": "2\n", "devices/system/edac/mc/mc0/ue_count": "0\n",
    "devices/system/edac/mc/mc1/ce_count": "5\n", "devices/system/edac/mc/mc1/ue_count": "1\n",
    "devices/system/cpu/cpu0/thermal_throttle/core_throttle_count": "4\n",
    "devices/system/cpu/cpu0/thermal_throttle/package_throttle_count": "9\n",
    "devices/system/cpu/cpu0/topology/physical_package_id": "0\n",
    "devices/system/cpu/cpu1/thermal_throttle/core_throttle_count": "6\n",
    "devices/system/cpu/cpu1/thermal_throttle/package_throttle_count": "9\n",
    "devices/system/cpu/cpu1/topology/physical_package_id": "0\n",
    "class/hwmon/hwmon0/temp1_input": "45000\n", "class/hwmon/hwmon0/temp2_input": "71500\n",
    "class/power_supply/BAT0/type": "Battery\n", "class/power_supply/BAT0/energy_full": "41720000\n",
    "class/power_supply/BAT0/energy_full_design": "57020000\n", "class/power_supply/BAT0/cycle_count": "412\n",
    "class/power_supply/BAT0/capacity": "88\n",
    "class/power_supply/AC/type": "Mains\n", "class/power_supply/AC/online": "1\n",
    "block/sda/device/ioerr_cnt": "0x1f\n", "block/loop0/device/ioerr_cnt": "0x5\n",
}


def test_a_full_tree_gives_every_signal(tmp_path):
    roots = Roots(_tree(tmp_path / "proc", PROC), _tree(tmp_path / "sys", SYS))
    c = Collector(roots, watch_paths=[str(tmp_path)])
    first = c.sample()
    assert first["cpu.busy_pct"] is None  # a rate needs two readings
    (tmp_path / "proc" / "stat").write_text("cpu  1100 0 600 8200 100 0 0 0 0 0\n")
    s = c.sample()
    assert s["cpu.busy_pct"] == 50.0 and s["cpu.iowait_pct"] == 0.0
    assert s["load.1"] == 0.52 and s["psi.cpu.some_avg60"] == 0.75 and s["psi.memory.full_avg60"] == 1.0
    assert s["mem.avail_bytes"] == 8159206 * 1024 and s["mem.avail_pct"] == 50.0 and s["swap.used_pct"] == 50.0
    assert s["oom.kills"] == 3.0
    assert s["edac.ce"] == 7.0 and s["edac.ue"] == 1.0
    assert s["thermal.core_throttles"] == 10.0 and s["thermal.package_throttles"] == 9.0  # one package, not two
    assert s["temp.max_c"] == 71.5
    assert s["battery.health_pct:BAT0"] == round(100 * 41720000 / 57020000, 3) and s["battery.cycles:BAT0"] == 412
    assert "battery.health_pct:AC" not in s
    assert s["disk.io_errors:sda"] == 31.0 and "disk.io_errors:loop0" not in s
    st = os.statvfs(tmp_path)
    assert s[f"disk.avail_bytes:{tmp_path}"] == st.f_bavail * st.f_frsize and s[f"disk.size_bytes:{tmp_path}"] > 0
    assert first[f"disk.fill_rate_bps:{tmp_path}"] is None and isinstance(s[f"disk.fill_rate_bps:{tmp_path}"], float)


def test_fill_rate_between_two_readings():
    blocks = [1000]
    clock = [100.0]
    c = Collector(Roots(), watch_paths=["/d"], clock=lambda: clock[0],
                  statvfs=lambda p: os.statvfs_result((4096, 4096, 5000, blocks[0], blocks[0], 0, 0, 0, 0, 255)))
    assert c.disks()["disk.fill_rate_bps:/d"] is None
    blocks[0], clock[0] = 900, 110.0
    assert c.disks()["disk.fill_rate_bps:/d"] == 100 * 4096 / 10


def test_a_missing_tree_is_absent_not_zero_and_logged_once(tmp_path, caplog):
    c = Collector(Roots(tmp_path / "no-proc", tmp_path / "no-sys"), watch_paths=[str(tmp_path / "gone")])
    with caplog.at_level(logging.WARNING, logger="cortex.sentinel"):
        s = c.sample()
        c.sample()
    for name in ("cpu.busy_pct", "mem.avail_bytes", "edac.ce", "edac.ue", "thermal.core_throttles", "temp.max_c",
                 "psi.memory.some_avg60", "oom.kills", f"disk.avail_bytes:{tmp_path / 'gone'}"):
        assert s[name] is None, name
    assert not any(k.startswith("battery.") for k in s)
    sources = [r.fields["source"] for r in caplog.records if hasattr(r, "fields")]
    assert str(tmp_path / "no-proc" / "stat") in sources and f"statvfs {tmp_path / 'gone'}" in sources
    assert len(sources) == len(set(sources))  # each source named once, not once per reading


def test_a_malformed_tree_spares_the_other_signals(tmp_path):
    proc = dict(PROC, loadavg="garbage\n", meminfo="MemTotal: lots\n")
    c = Collector(Roots(_tree(tmp_path / "proc", proc), _tree(tmp_path / "sys", SYS)), watch_paths=[])
    s = c.sample()
    assert s["edac.ce"] == 7.0 and s["psi.cpu.some_avg60"] == 0.75


def test_psi_lines():
    assert parse_psi("some avg10=0.10 avg60=0.20 avg300=0.30 total=1\nfull avg10=0 avg60=0.05 avg300=0 total=2\n") == \
        {"some_avg10": 0.1, "some_avg60": 0.2, "full_avg10": 0.0, "full_avg60": 0.05}


def _doc(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_smart_ata_healthy_and_failing():
    ok = smart.parse(_doc("ata-healthy.json"))
    assert ok["smart.failed:sda"] == 0.0 and ok["smart.temp_c:sda"] == 34.0
    assert all(ok[f"smart.ata{i}:sda"] == 0.0 for i in smart.ATA_IDS)
    bad = smart.parse(_doc("ata-failing.json"))
    assert bad["smart.failed:sdb"] == 1.0 and bad["smart.ata5:sdb"] == 120 and bad["smart.ata197:sdb"] == 8
    assert bad["smart.ata188:sdb"] == 65537.0  # the low 32 bits of a packed raw value


def test_smart_nvme_healthy_and_failing():
    ok = smart.parse(_doc("nvme-healthy.json"))
    assert ok["smart.nvme_critical_warning:nvme0"] == 0 and ok["smart.nvme_percentage_used:nvme0"] == 3
    assert "smart.ata5:nvme0" not in ok  # an NVMe drive has no ATA attributes: absent, not zero
    bad = smart.parse(_doc("nvme-failing.json"))
    assert bad["smart.nvme_critical_warning:nvme1"] == 4 and bad["smart.nvme_media_errors:nvme1"] == 17
    assert bad["smart.nvme_temp_c:nvme1"] == 71 and bad["smart.failed:nvme1"] == 1.0


def _fake_smartctl(tmp_path: Path, mode: str = "ok") -> Path:
    """An executable that answers like smartctl -j: --scan-open lists the drives, -a DEV prints its document
    with smartctl's exit status (a shell script: it starts fast however loaded the machine is)."""
    script = tmp_path / "smartctl"
    script.write_text(f"""#!/bin/sh
data={shlex.quote(str(DATA))}
mode={mode}
for a in "$@"; do dev="$a"; done
case " $* " in *" --scan-open "*) cat "$data/scan-open.json"; exit 0;; esac
if [ "$mode" = slow ] && [ "$dev" = /dev/sda ]; then exec sleep 30; fi
if [ "$mode" = malformed ] && [ "$dev" = /dev/sdb ]; then echo '{{"json_format_version": [1, 0], "device": '; exit 0; fi
if [ "$dev" = /dev/nvme1 ]; then
  echo '{{"smartctl": {{"exit_status": 2, "messages": [{{"string": "Permission denied", "severity": "error"}}]}}}}'
  exit 2
fi
case "$dev" in
  /dev/sda) cat "$data/ata-healthy.json"; exit 0;;
  /dev/sdb) cat "$data/ata-failing.json"; exit 8;;
  /dev/nvme0) cat "$data/nvme-healthy.json"; exit 0;;
esac
exit 2
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_smart_reader_runs_smartctl_rarely_and_survives_bad_drives(tmp_path, caplog):
    now = [1000.0]
    reader = smart.SmartReader(str(_fake_smartctl(tmp_path, "malformed")), interval=300, timeout=20,
                               clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="cortex.sentinel"):
        first = reader.read()
    assert first["smart.ata5:sda"] == 0.0 and first["smart.nvme_media_errors:nvme0"] == 0
    assert not any(k.endswith(":sdb") or k.endswith(":nvme1") for k in first)  # malformed / refused: absent
    named = {r.fields["source"] for r in caplog.records if hasattr(r, "fields")}
    assert {"/dev/sdb", "/dev/nvme1"} <= named
    (tmp_path / "smartctl").unlink()  # not run again within the interval: the same readings come back
    assert reader.read() is first


def test_smart_reader_times_out(tmp_path, caplog):
    reader = smart.SmartReader(str(_fake_smartctl(tmp_path, "slow")), interval=300, timeout=2.5)
    with caplog.at_level(logging.WARNING, logger="cortex.sentinel"):
        got = reader.read()
    assert not any(k.endswith(":sda") for k in got) and got["smart.ata5:sdb"] == 120  # the others still read
    assert any("took more than" in r.fields["error"] and r.fields["source"] == "/dev/sda"
               for r in caplog.records if hasattr(r, "fields"))


def test_smart_reader_without_smartctl(tmp_path):
    assert smart.SmartReader(str(tmp_path / "nowhere" / "smartctl")).read() == {}
