"""The follower's side of AppendEntries (append.reconcile_append, append.rejection_next_index), against a
model of what pysyncobj does with the message afterwards: a follower keeps the entries it holds unless one
conflicts with the leader's, and a pipelining leader brings a follower with a conflicting tail level."""

from hypothesis import assume, given
from hypothesis import strategies as st

from cortex.raft.append import reconcile_append, rejection_next_index, snapshot_chunk


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


# --- a pipelining leader and a follower holding a deposed leader's tail ---------------------------------

def _pysyncobj_rejection(log: list[int], message: dict) -> int:
    """The next index pysyncobj's follower names when it refuses a message."""
    prev = message["prevLogIdx"]
    return len(log) + 1 if prev > len(log) else prev


def _rounds_to_converge(leader: list[int], follower: list[int], commit: int, next_index: int, batch: int,
                        hint, rounds: int = 50) -> int | None:
    """pysyncobj's leader: each round sends batches from its next index to its log's end (advancing the next
    index as it sends), then reads the answers in order (a rejection sets the next index to what it names).
    Returns the round after which the follower's log equals the leader's, None if not within `rounds`."""
    for n in range(1, rounds + 1):
        answers = []
        while True:
            count = min(batch, len(leader) - next_index + 1)
            message = _message(leader, next_index - 1, count, commit=len(leader))
            log, ack, took = _deliver(follower, message)
            if ack is None:
                answers.append(hint(follower, message, commit))
            else:
                follower, commit = log, max(commit, took or 0)
            next_index += count
            if next_index > len(leader):
                break
        for answer in answers:
            next_index = answer
        if follower == leader:
            return n
    return None


DEPOSED = LEADER[:6] + [2, 2]  # entries 7 and 8 of term 2, never committed; the leader holds term 3 there


def test_pysyncobj_answers_keep_a_deposed_tail_for_ever_and_the_commit_hint_converges():
    """The leader's next index past the follower's end (it learnt of the follower after appending more), two
    or more batches to send: pysyncobj's answers rewind and advance it again every round."""
    ours = lambda log, message, commit: rejection_next_index(_pysyncobj_rejection(log, message), commit, 1)  # noqa: E731
    theirs = lambda log, message, commit: _pysyncobj_rejection(log, message)  # noqa: E731
    assert _rounds_to_converge(LEADER, DEPOSED, commit=6, next_index=11, batch=1, hint=theirs) is None
    assert _rounds_to_converge(LEADER, DEPOSED, commit=6, next_index=11, batch=1, hint=ours) == 2


def test_a_rejection_never_names_an_entry_past_the_commit_index():
    assert rejection_next_index(9, commit_index=6, first_index=1) == 7
    assert rejection_next_index(5, commit_index=6, first_index=1) == 5  # already lower: kept
    assert rejection_next_index(9, commit_index=2, first_index=4) == 5  # compacted past it: the snapshot's end


@st.composite
def _deposed(draw):
    leader = [0] + sorted(draw(st.lists(st.integers(1, 4), min_size=1, max_size=14)))
    commit = draw(st.integers(1, len(leader)))  # the follower's commit index: a prefix of the leader's log
    tail = sorted(draw(st.lists(st.integers(0, 4), max_size=5)))  # what it appended after, maybe conflicting
    assume(all(t < leader[-1] for t in tail))  # the leader's last entry is of its own term (its no-op at least)
    follower = leader[:commit] + tail
    assume(all(a <= b for a, b in zip(follower, follower[1:])))
    assume(all(follower[:i + 1] == leader[:i + 1] for i in range(min(len(follower), len(leader)))
               if follower[i] == leader[i]))
    next_index = draw(st.integers(1, len(leader) + 1))
    return leader, follower, commit, next_index, draw(st.integers(1, 4))


@given(_deposed())
def test_every_follower_converges_within_two_rounds(case):
    leader, follower, commit, next_index, batch = case
    ours = lambda log, message, commit: rejection_next_index(_pysyncobj_rejection(log, message), commit, 1)  # noqa: E731
    assert _rounds_to_converge(leader, follower, commit, max(next_index, 2), batch, hint=ours) in (1, 2)


def test_a_snapshot_chunk_commits_none_of_the_followers_entries():
    chunk = {"type": "append_entries", "term": 4, "commit_index": 40, "serialized": (b"..", 0, False)}
    held = snapshot_chunk(chunk, commit_index=6)
    assert held["commit_index"] == 6 and held["serialized"] == chunk["serialized"]
    # A deposed leader's entries 7 and 8 stay uncommitted: the model follower takes min(commit, its end).
    assert _pysyncobj_follower(DEPOSED, held)[2] == 6
    assert _pysyncobj_follower(DEPOSED, chunk)[2] == 8  # what the unpatched path commits
    plain = _message(LEADER, prev=6, count=1, commit=9)
    assert snapshot_chunk(plain, commit_index=6) is plain
