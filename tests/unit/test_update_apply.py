"""The appliance's root side of an update (cortex update apply-local) and cortex-ready's probation timeout:
the parts that need no VM — sysupdate definitions pointed at a verified local copy, the boot-entry revert
on a real directory tree, refusing a tampered release before systemd-sysupdate runs."""

from __future__ import annotations

import configparser
import json
import uuid
from pathlib import Path

import yaml

from cortex.appliance import ready as cortex_ready
from cortex.update import apply as update_apply
from cortex.update import releases as updates

REPO = Path(__file__).resolve().parents[2]
SYSUPDATE = REPO / "image/tree/usr/lib/sysupdate.d"


def test_local_definitions_read_from_the_verified_directory(tmp_path: Path):
    release = tmp_path / "releases/2.0.0"
    out = update_apply.local_definitions(release, tmp_path, SYSUPDATE)
    names = sorted(p.name for p in out.glob("*.conf"))
    assert names == ["10-usr.conf", "11-usr-verity.conf", "20-uki.conf"]
    for name in names:
        original, local = configparser.RawConfigParser(strict=False), configparser.RawConfigParser(strict=False)
        original.read(SYSUPDATE / name)
        local.read(out / name)
        assert local["Source"]["Type"] == "regular-file" and local["Source"]["Path"] == str(release)
        # everything else (the match patterns, the target, the tries) is the image's own definition
        assert local["Source"]["MatchPattern"] == original["Source"]["MatchPattern"]
        assert dict(local["Target"]) == dict(original["Target"])
        assert dict(local["Transfer"]) == dict(original["Transfer"])


def test_revert_marks_newer_entries_bad_so_the_previous_one_boots(tmp_path: Path):
    esp = tmp_path / "EFI/Linux"
    esp.mkdir(parents=True)
    for name in ("cortex_1.0.0.efi", "cortex_2.0.0+2-1.efi", "cortex_3.0.0.efi"):
        (esp / name).write_bytes(b"uki")
    renamed = update_apply.revert("1.0.0", (esp,))
    assert sorted(p.name for p in esp.iterdir()) == ["cortex_1.0.0.efi", "cortex_2.0.0+0-2.efi",
                                                     "cortex_3.0.0+0-1.efi"]
    assert len(renamed) == 2
    assert update_apply.revert("1.0.0", (esp,)) == []  # again: nothing more to do


def test_a_tampered_release_is_refused_before_sysupdate_runs(tmp_path: Path):
    key_path = tmp_path / "k.pem"
    public = updates.generate_key(key_path)
    build = tmp_path / "build"
    build.mkdir()
    part = str(uuid.uuid4())
    for name in (f"cortex_2.0.0.usr-x86-64.{part}.raw.xz", f"cortex_2.0.0.usr-x86-64-verity.{part}.raw.xz",
                 "cortex_2.0.0.efi"):
        (build / name).write_bytes(name.encode())
    release = updates.publish(build, tmp_path / "root", "stable", updates.load_private_key(key_path))
    (release / "cortex_2.0.0.efi").write_bytes(b"evil")
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"plugins": {"updater": {"trusted_keys": [public]}}}))
    (state / "request.json").write_text(json.dumps({"action": "install", "release": str(release),
                                                    "version": "2.0.0"}))
    assert update_apply.main(state, config) == 1
    result = json.loads((state / "result.json").read_text())
    assert result["ok"] is False and "does not match its checksum" in result["error"]
    assert not (state / "request.json").exists()  # consumed: the path unit does not fire again for it

    # garbage is consumed too (cortex-update.path uses PathExists: a file left behind would start the service
    # again and again) and answered with the reason
    for garbage in ("{not json", "[1, 2]"):
        (state / "request.json").write_text(garbage)
        assert update_apply.main(state, config) == 1
        assert not (state / "request.json").exists()
        assert "unreadable request" in json.loads((state / "result.json").read_text())["error"]
    assert update_apply.main(state, config) == 0  # no request: nothing to do


def test_cortex_ready_probation_timeout_from_the_kernel_command_line(tmp_path: Path):
    module = cortex_ready
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("quiet usrhash=abc cortex.ready_timeout=45 rw\n")
    assert module.cmdline_timeout(600, str(cmdline)) == 45
    cmdline.write_text("quiet\n")
    assert module.cmdline_timeout(600, str(cmdline)) == 600
    assert module.cmdline_timeout(600, str(tmp_path / "absent")) == 600
