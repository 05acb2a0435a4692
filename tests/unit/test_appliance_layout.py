"""The minimum disk size of the appliance's layout, computed from its repart definitions, and the docs
that quote it."""

from __future__ import annotations

import json

import pytest

from cortex.appliance import layout
from tests.system.test_image_definitions import IMAGE, TREE, by_type, fixed_size, read_ini

MiB = layout.MiB
GiB = layout.GiB
RUNTIME = TREE / "usr/lib/repart.d"


def test_minimum_is_the_sum_of_the_first_boot_layout():
    parts = layout.read_layout(RUNTIME)
    ini = {p.stem: read_ini(p) for p in sorted(RUNTIME.glob("*.conf"))}
    assert [p.file for p in parts] == [f"{name}.conf" for name in ini]
    expected = sum(fixed_size(p) for t in ("esp", "usr", "usr-verity") for _, p in by_type(ini, t))
    (_, state), = by_type(ini, "root")
    expected += layout.parse_size(state["Partition"]["SizeMinBytes"][0], "state")
    minimum = layout.minimum_disk_bytes(parts)
    assert minimum == expected + layout.GPT_OVERHEAD
    # Two fixed /usr slots, their hash trees, the ESP and a 1 GiB state: more than a 2 GiB stick holds,
    # less than a "4 GB" one (4e9 bytes).
    assert 2 * GiB < minimum < 4_000_000_000


def test_the_docs_quote_the_computed_number():
    text = (IMAGE / "README.md").read_text()
    minimum = layout.minimum_disk_bytes(layout.read_layout(RUNTIME))
    assert layout.human(minimum) in text, f"image/README.md should say {layout.human(minimum)}"
    assert "3.6 GiB" not in text


@pytest.mark.parametrize("value, expected", [("512M", 512 * MiB), ("1G", GiB), ("32M", 32 * MiB), ("4096", 4096),
                                             ("2T", 2048 * GiB), ("1.5G", 3 * GiB // 2)])
def test_sizes(value, expected):
    assert layout.parse_size(value, "x") == expected


def test_bad_definitions_name_the_file(tmp_path):
    with pytest.raises(layout.LayoutError, match="no repart definitions"):
        layout.read_layout(tmp_path)
    (tmp_path / "10-usr.conf").write_text("[Partition]\nType=usr\nSizeMinBytes=lots\n")
    with pytest.raises(layout.LayoutError, match=r"10-usr.conf: SizeMinBytes: 'lots'"):
        layout.read_layout(tmp_path)
    (tmp_path / "10-usr.conf").write_text("[Partition]\nSizeMinBytes=1G\n")
    with pytest.raises(layout.LayoutError, match="no \\[Partition\\] Type"):
        layout.read_layout(tmp_path)


def test_padding_and_grain_count(tmp_path):
    (tmp_path / "00-a.conf").write_text("[Partition]\nType=esp\nSizeMinBytes=1000\nPaddingMinBytes=1M\n")
    (tmp_path / "10-b.conf").write_text("# comment\n[Partition]\nType=root\n")  # no size: one grain
    parts = layout.read_layout(tmp_path)
    assert [p.footprint for p in parts] == [4096 + MiB, 4096]
    assert layout.minimum_disk_bytes(parts) == layout.GPT_OVERHEAD + 2 * MiB  # rounded up to a MiB


def test_command_line(capsys):
    assert layout.main([str(RUNTIME), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["minimum_bytes"] == layout.minimum_disk_bytes(layout.read_layout(RUNTIME))
    assert {p["type"] for p in doc["partitions"]} == {"esp", "usr", "usr-verity", "root"}
    assert layout.main(["/nonexistent"]) == 2
    assert "no repart definitions" in capsys.readouterr().err
