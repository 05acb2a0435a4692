"""How a proposal fails, shared by the Raft adapter (consensus) and group commit (commit)."""

from __future__ import annotations

from pysyncobj import FAIL_REASON


class ProposalError(RuntimeError):
    """A command was not committed. `maybe_applied` says whether it could still have been."""

    def __init__(self, message: str, maybe_applied: bool = False):
        super().__init__(message)
        self.maybe_applied = maybe_applied


class NotLeader(ProposalError):
    pass


def fail_name(code) -> str:
    for name in dir(FAIL_REASON):
        if not name.startswith("_") and getattr(FAIL_REASON, name) == code:
            return name
    return str(code)
