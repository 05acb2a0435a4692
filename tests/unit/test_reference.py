"""docs/reference/ is generated from the code (`just docs`); a change to commands, config keys or tools that
is not regenerated fails here."""

from __future__ import annotations

import dataclasses

from cortex import config
from cortex.dev import reference


def test_committed_reference_matches_the_code(tmp_path):
    outdated = reference.stale()
    assert not outdated, (f"docs/reference/{', '.join(outdated)} differ from what the code generates: run "
                          "`just docs` (python -m cortex.dev.reference) and commit the result")


def test_generation_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("CORTEX_ADDR", "10.9.9.9:1")  # the shell's settings do not leak into the reference
    monkeypatch.setenv("CORTEX_SOCKET", "/elsewhere.sock")
    assert reference.main(["--out", str(tmp_path)]) == 0
    assert reference.main(["--check", "--out", str(tmp_path)]) == 0
    assert reference.render() == {p.name: p.read_text() for p in tmp_path.iterdir()}
    (tmp_path / "cli.md").write_text("edited by hand\n")
    assert reference.main(["--check", "--out", str(tmp_path)]) == 1


def test_reference_covers_every_command_key_and_tool():
    from cortex.cli.main import build_parser

    cli_md = reference.render_cli()
    for path, _parser, _help in reference._commands(build_parser(builtin_only=True), [], {}):
        assert f"`cortex {' '.join(path)}`" in cli_md
    assert "`--socket SOCKET`" in cli_md and "`--insecure-skip-ca-pin`" in cli_md
    config_md = reference.render_config()
    for key in config.KEYS:
        assert f"| `{key.path}` |" in config_md
    assert "| `raft.heartbeat_interval` | float | `0.1` |" in config_md
    tools_md = reference.render_mcp_tools()
    tools = reference.builtin_tools()
    assert {"cluster_status", "kv_put", "tasks_submit", "update_rollout"} <= {t.name for _, t in tools}
    for _plugin, tool in tools:
        assert f"| `{tool.name}` |" in tools_md
    assert "| `update_rollout` | updater | updater | admin | destructive | no |" in tools_md


def test_config_table_matches_the_sections_it_parses():
    # sections parsed into dataclasses take their keys from the table: both must name the same keys
    for section, cls in (("raft", config.RaftConfig), ("liveness", config.LivenessConfig), ("log", config.LogConfig)):
        assert set(config.section_keys(section)) == {f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            key = next(k for k in config.KEYS if k.path == f"{section}.{f.name}")
            assert key.default == f.default
    assert set(config.section_keys("bootstrap.join")) == {f.name for f in dataclasses.fields(config.JoinConfig)}
