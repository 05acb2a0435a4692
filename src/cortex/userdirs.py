"""The invoking user's directories, where a process may have none."""

from __future__ import annotations

from pathlib import Path


def user_home() -> Path | None:
    """The home directory, or None where there is none (the appliance's agent runs as a DynamicUser without
    $HOME: Path.home() raises there)."""
    try:
        return Path.home()
    except RuntimeError:
        return None
