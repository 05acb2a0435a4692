"""cortex-ready's wait: it says each new reason once, repeats a lasting one with its age, survives an agent
that does not answer, and stops at the deadline (a clock and a sleep fed in: no real waiting)."""

from __future__ import annotations

from cortex.appliance import ready


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Agent:
    addr = "10.0.0.2:7400"

    def __init__(self, answers):
        self.answers = list(answers)

    def status(self) -> dict:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_waits_through_silence_and_reports_ready(capsys):
    clock = Clock()
    waiting = {"state": "uninitialized", "waiting_for": "join: connecting"}
    member = {"state": "follower", "leader_id": "node1", "has_quorum": True}
    agent = Agent([TimeoutError("deadline exceeded")] * 3 + [waiting] * 40 + [member])
    ok, why = ready.wait_ready(agent, timeout=600, interval=2, clock=clock, sleep=clock.sleep)
    assert ok and why == "state follower, leader node1, quorum"
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "cortex-ready: waiting: agent at 10.0.0.2:7400 not answering: deadline exceeded",
        "cortex-ready: waiting: state uninitialized: join: connecting",
        "cortex-ready: waiting: state uninitialized: join: connecting (for 66 s)",
        "cortex-ready: CORTEX-READY state follower, leader node1, quorum (after 86 s)",
    ]


def test_gives_up_at_the_deadline_with_the_last_reason():
    clock = Clock()
    agent = Agent([{"state": "follower", "leader_id": "", "has_quorum": False}])
    ok, why = ready.wait_ready(agent, timeout=30, interval=2, clock=clock, sleep=clock.sleep)
    assert not ok and why == "state follower: no leader known" and clock.now == 30
