"""Every replica converges after a heal: a leader cut off while it holds entries of its term that nobody else
has, while the others commit more than one AppendEntries batch, must end with the same log, applied index
and digest as the rest within seconds of the heal (cut in both directions and in each one alone).

Three RaftNodes in this process on loopback, the leader's Raft port dropped with nftables
(tests/support/raftlab.py); bench/heal.py runs the same trial many times.
"""

from __future__ import annotations

import pytest

from cortex.dev import portcut
from tests.support import raftlab
from tests.support.cluster import free_base_port

pytestmark = pytest.mark.skipif(bool(raftlab.available()), reason=raftlab.available() or "runs")

CONVERGE_WITHIN = 5.0  # the figure bench/heal.py reports; a healed replica converges well inside it


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = raftlab.Lab(tmp_path_factory.mktemp("heal"), free_base_port())
    try:
        lab.leader(timeout=60)
        yield lab
    finally:
        lab.close()


@pytest.mark.parametrize("direction", portcut.DIRECTIONS)
def test_a_healed_leader_with_entries_of_its_old_term_converges(lab, direction):
    trial = raftlab.heal_trial(lab, direction, converge_within=CONVERGE_WITHIN)
    if direction == "both":  # nothing it appended while cut off left it: its tail conflicts with the leader's
        assert trial["diverged"], trial
        assert trial["applied_lost"] == [], trial  # and no server ever applied any of it
    assert trial["converged_s"] is not None, trial
    # Every store holds every acknowledged write (the 40 and the one before the cut), and all agree on the
    # cut-off leader's unacknowledged ones (kept when the cut let them out, else gone everywhere).
    lost, healed = set(), set()
    for node in lab.nodes:
        db = node.store.reader()
        healed.add(db.execute("SELECT count(*) FROM kv WHERE key LIKE 'heal/%'").fetchone()[0])
        lost.add(db.execute("SELECT count(*) FROM kv WHERE key LIKE ?", (f"lost/{lab.trials}/%",)).fetchone()[0])
    assert healed == {41} and len(lost) == 1, (healed, lost)


def test_a_healed_leader_brought_level_by_a_snapshot_never_applies_its_old_entries(lab):
    """The new leader compacted its log past the healed server's end, so it sends a snapshot: while the chunks
    arrive, the server's entries of its old term must not be taken as committed (and applied)."""
    trial = raftlab.heal_trial(lab, "both", converge_within=CONVERGE_WITHIN, compact=True)
    assert trial["diverged"], trial
    assert trial["applied_lost"] == [], trial
    assert trial["converged_s"] is not None, trial
