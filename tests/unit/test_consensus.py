"""The follower's side of AppendEntries (append.reconcile_append), against a model of what pysyncobj does
with the message afterwards: a follower keeps the entries it holds unless one conflicts with the leader's."""

from hypothesis import assume, given
from hypothesis import strategies as st

from cortex.raft.append import reconcile_append


def _pysyncobj_follower(log: list[int], message: dict) -> tuple[list[int], int | None, int | None]:
    """What pysyncobj's handler does with an AppendEntries, on a log of terms (log[0] is index 1).
    Returns (new log, acknowledged next index or None for a refusal/no answer, commit index it would take)."""
    if "prevLogIdx" not in message:
        return log, None, min(message["commit_index"], len(log))
    prev = message["prevLogIdx"]
    if prev > len(log) or log[prev - 1] != message["prevLogTerm"]:
        return log, None, None  # reset: the leader retries from this log's end
    log = log[:prev] + [e[2] for e in message["entries"]]  # everything after prevLogIdx goes
    ack = message["entries"][-1][1] + 1 if message["entries"] else prev + 1
    return log, ack, min(message["commit_index"], len(log))


def _message(leader: list[int], prev: int, count: int, commit: int) -> dict:
    entries = [(b"cmd%d" % i, i, leader[i - 1]) for i in range(prev + 1, prev + 1 + count)]
    return {"type": "append_entries", "term": leader[-1], "commit_index": commit, "prevLogIdx": prev,
            "prevLogTerm": leader[prev - 1], "entries": entries}


def _term_at(log: list[int]):
    return lambda i: log[i - 1] if 1 <= i <= len(log) else None


def _deliver(follower: list[int], message: dict) -> tuple[list[int], int | None, int | None]:
    plan = reconcile_append(message, _term_at(follower), len(follower))
    log, ack, commit = _pysyncobj_follower(follower, plan.message)
    return log, plan.ack_next_index or ack, commit


LEADER = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]  # terms of entries 1..10


def test_a_late_copy_of_entries_the_follower_holds_deletes_nothing():
    follower = LEADER[:]  # caught up, and has applied everything
    stale = _message(LEADER, prev=3, count=2, commit=5)  # the leader rewound on an old rejection
    log, ack, commit = _deliver(follower, stale)
    assert log == LEADER  # pysyncobj alone would have cut it back to 5 entries
    assert ack == 6  # acknowledges what the message vouched for, not more
    assert commit == 5
    assert _pysyncobj_follower(follower, stale)[0] == LEADER[:5]  # what the unpatched path does


def test_a_heartbeat_behind_the_end_keeps_the_log_and_commits_only_what_it_covers():
    follower = LEADER[:]
    beat = _message(LEADER, prev=6, count=0, commit=10)
    log, ack, commit = _deliver(follower, beat)
    assert log == LEADER and ack == 7
    assert commit == 6  # entries 7..10 are not vouched for by this message


def test_an_overlapping_message_appends_only_the_new_tail():
    follower = LEADER[:7]
    plan = reconcile_append(_message(LEADER, prev=4, count=6, commit=8), _term_at(follower), len(follower))
    assert plan.message["prevLogIdx"] == 7 and [e[1] for e in plan.message["entries"]] == [8, 9, 10]
    assert plan.ack_next_index is None  # pysyncobj appends and answers itself


def test_a_conflicting_suffix_is_still_replaced():
    follower = LEADER[:6] + [2, 2]  # entries 7, 8 from a deposed leader of term 2
    log, ack, _ = _deliver(follower, _message(LEADER, prev=4, count=5, commit=6))
    assert log == LEADER[:9] and ack == 10


def test_messages_it_cannot_judge_pass_unchanged():
    follower = LEADER[:5]
    for message in (_message(LEADER, prev=7, count=2, commit=5),  # beyond this log: pysyncobj resets
                    {**_message(LEADER, prev=3, count=1, commit=3), "prevLogTerm": 9},  # term mismatch
                    {"type": "append_entries", "term": 3, "commit_index": 4, "serialized": b"..."},
                    {**_message(LEADER, prev=2, count=1, commit=3), "transmission": "start", "data": b""}):
        assert reconcile_append(message, _term_at(follower), len(follower)).message is message


@st.composite
def _case(draw):
    terms = draw(st.lists(st.integers(0, 3), min_size=2, max_size=12))
    leader = [0] + sorted(terms)
    known = draw(st.integers(1, len(leader)))  # the follower holds a prefix of the leader's log ...
    stale = draw(st.lists(st.integers(0, 3), max_size=4))  # ... and maybe a deposed leader's entries after it
    follower = leader[:known] + sorted(stale)
    # Only logs Raft can produce: terms never decrease, and two logs holding an entry of the same index and
    # term hold the same entries up to it (Log Matching).
    assume(all(a <= b for a, b in zip(follower, follower[1:])))
    assume(all(follower[:i + 1] == leader[:i + 1] for i in range(min(len(follower), len(leader)))
               if follower[i] == leader[i]))
    prev = draw(st.integers(1, len(leader)))
    count = draw(st.integers(0, len(leader) - prev))
    commit = draw(st.integers(1, len(leader)))
    return leader, follower, _message(leader, prev, count, commit)


@given(_case())
def test_raft_append_rule(case):
    """Whatever the message's age: the follower's log stays consistent with the leader's, a matching prefix
    never shrinks, an accepted message is acknowledged up to its end, and nothing past the message's end is
    committed on its word."""
    leader, follower, message = case
    log, ack, commit = _deliver(follower, message)
    matching = next((i for i, (a, b) in enumerate(zip(follower, leader)) if a != b), min(len(follower), len(leader)))
    end = message["prevLogIdx"] + len(message["entries"])
    if ack is None:  # refused: nothing changed
        assert log == follower
        return
    assert ack == end + 1
    assert log[:end] == leader[:end]  # what the message covers is the leader's now
    assert len(log) >= min(matching, len(follower))  # entries matching the leader's are never deleted
    assert log[:matching] == leader[:matching]
    if commit is not None:
        assert log[:commit] == leader[:commit]  # only the leader's entries are ever committed
