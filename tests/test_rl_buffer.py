"""Staleness admission and the replay buffer, pure: every refusal counted by reason,
staleness measured when a group is trained on, and the accounting through a restart."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from peerd.rl.buffer import ReplayBuffer, admit
from peerd.rl.types import Group, Rollout

G = 4


def group(gid: str, version: int, size: int = G, run_id: str = "run") -> Group:
    return tuple(
        Rollout(run_id=run_id, prompt_index=0, group_id=gid, prompt_ids=(1, 2, 3),
                completion_ids=(4, 5), behaviour_logprobs=(-0.5, -1.25), version=version,
                sampler="peerA", text=f"completion {i}")
        for i in range(size))


def test_admission_rule() -> None:
    assert admit(5, 5, 0) is None
    assert admit(5, 4, 0) == "stale"
    assert admit(5, 6, 0) == "future"
    assert admit(5, 3, 2) is None  # 5 - 3 = 2 <= S
    assert admit(5, 2, 2) == "stale"  # 3 > S
    assert admit(5, 6, 2) == "future"  # a version the trainer has not made yet
    assert admit(0, -1, 3) == "bad_version"
    with pytest.raises(ValueError, match="staleness"):
        admit(5, 5, -1)


def test_staleness_zero_admits_only_the_current_version() -> None:
    buf = ReplayBuffer(0, 8, group_size=G)
    assert buf.offer(group("a", 3), trainer_version=3) is None
    assert buf.offer(group("b", 2), trainer_version=3) == "stale"
    assert buf.offer(group("c", 4), trainer_version=3) == "future"
    assert [g[0].group_id for g in buf.take(8, trainer_version=3)] == ["a"]
    assert buf.refused == {"stale": 1, "future": 1}
    assert buf.staleness_histogram == {0: 1}


def test_a_group_ages_in_the_queue_and_is_dropped_when_trained_on_too_late() -> None:
    s = 2
    buf = ReplayBuffer(s, 8, group_size=G)
    assert buf.offer(group("old", 5), trainer_version=5) is None  # fresh at arrival
    assert buf.offer(group("new", 7), trainer_version=7) is None
    assert buf.waiting == 2
    # at v = 5 + S + 1 = 8 "old" is 3 versions behind: dropped, counted, never returned
    taken = buf.take(4, trainer_version=8)
    assert [g[0].group_id for g in taken] == ["new"]
    assert buf.refused == {"stale_at_train": 1}
    assert buf.staleness_histogram == {1: 1}  # "new" trained on 1 version behind
    assert buf.waiting == 0
    # at exactly S behind it is still taken
    buf.offer(group("edge", 8), trainer_version=8)
    assert len(buf.take(1, trainer_version=10)) == 1
    assert buf.staleness_histogram == {1: 1, 2: 1}


def test_take_serves_the_oldest_version_first_and_at_most_n() -> None:
    buf = ReplayBuffer(3, 8, group_size=G)
    buf.offer(group("v6", 6), trainer_version=6)
    buf.offer(group("v4", 4), trainer_version=6)  # a lagging sampler, still admissible
    buf.offer(group("v5a", 5), trainer_version=6)
    buf.offer(group("v5b", 5), trainer_version=6)
    assert [g[0].group_id for g in buf.take(3, 6)] == ["v4", "v5a", "v5b"]
    assert [g[0].group_id for g in buf.take(3, 6)] == ["v6"]
    assert buf.take(3, 6) == []
    assert buf.taken == 4


def test_group_shape_refusals_are_counted_by_reason() -> None:
    buf = ReplayBuffer(1, 8, group_size=G, run_id="run")
    assert buf.offer(group("p", 0, size=3), 0) == "partial"
    assert buf.offer((), 0) == "partial"
    assert buf.offer(group("o", 0, size=5), 0) == "oversized"
    mixed = (*group("m", 0)[:3], dataclasses.replace(group("m", 0)[0], version=1))
    assert buf.offer(mixed, 1) == "mixed"
    other = (*group("m2", 0)[:3], dataclasses.replace(group("x", 0)[0]))
    assert buf.offer(other, 0) == "mixed"  # another group's rollout
    assert buf.offer(group("w", 0, run_id="other"), 0) == "wrong_run"
    short = dataclasses.replace(group("s", 0)[0], behaviour_logprobs=(-0.5,))
    assert buf.offer((short, *group("s", 0)[1:]), 0) == "malformed"
    positive = dataclasses.replace(group("q", 0)[0], behaviour_logprobs=(-0.5, 0.3))
    assert buf.offer((positive, *group("q", 0)[1:]), 0) == "malformed"
    nan = dataclasses.replace(group("n", 0)[0], behaviour_logprobs=(-0.5, float("nan")))
    assert buf.offer((nan, *group("n", 0)[1:]), 0) == "malformed"
    assert buf.offer(group("ok", 0), 0) is None
    assert buf.offer(group("ok", 0), 0) == "duplicate"  # the same group pushed twice
    buf.take(1, 0)
    assert buf.offer(group("ok", 0), 0) == "duplicate"  # ...even after it was trained on
    assert buf.refused == {"partial": 2, "oversized": 1, "mixed": 2, "wrong_run": 1,
                           "malformed": 3, "duplicate": 2}
    assert buf.admitted == 1


def test_a_partial_group_is_admitted_when_allowed() -> None:
    buf = ReplayBuffer(1, 8, group_size=G, allow_partial=True)
    assert buf.offer(group("p", 0, size=2), 0) is None
    assert buf.offer((), 0) == "partial"  # never an empty one
    assert buf.offer(group("o", 0, size=5), 0) == "oversized"


def test_a_full_buffer_refuses_after_making_room_from_groups_gone_stale() -> None:
    buf = ReplayBuffer(1, 2, group_size=G)
    assert buf.offer(group("a", 0), 0) is None
    assert buf.offer(group("b", 1), 1) is None
    assert buf.offer(group("c", 1), 1) == "full"  # back-pressure: the sampler waits
    assert buf.waiting == 2
    # at v2 "a" is 2 behind (> S): it can never be trained on, so it makes room
    assert buf.offer(group("d", 2), 2) is None
    assert buf.refused == {"full": 1, "stale_at_train": 1}
    assert [g[0].group_id for g in buf.take(2, 2)] == ["b", "d"]


def test_every_group_offered_is_accounted_for() -> None:
    buf = ReplayBuffer(1, 3, group_size=G)
    offered = 0
    for v in range(6):
        for k in range(3):
            buf.offer(group(f"{v}.{k}", v - k), trainer_version=v)
            offered += 1
        if v % 2:
            buf.take(2, trainer_version=v + 1)
    at_offer = sum(n for r, n in buf.refused.items() if not r.endswith("_at_train"))
    assert buf.admitted + at_offer == offered
    assert buf.admitted == buf.taken + buf.waiting + buf.refused["stale_at_train"]
    assert sum(buf.staleness_histogram.values()) == buf.taken


def test_prune_drops_the_stale_and_says_how_many_wait() -> None:
    buf = ReplayBuffer(0, 4, group_size=G)
    buf.offer(group("a", 0), 0)
    buf.offer(group("b", 1), 1)
    assert buf.prune(1) == 1
    assert buf.refused == {"stale_at_train": 1}


def test_accounting_survives_a_restart() -> None:
    buf = ReplayBuffer(1, 8, group_size=G)
    buf.offer(group("a", 0), 0)
    buf.offer(group("b", 0), 0)
    buf.offer(group("c", 0), 2)
    buf.take(1, 1)
    buf.offer(group("d", 1), 1)  # still waiting when the trainer stops
    state = json.loads(json.dumps(buf.to_json()))  # what the checkpoint holds
    back = ReplayBuffer.from_json(state, staleness=1, capacity_groups=8, group_size=G)
    assert back.admitted == buf.admitted == 3
    assert back.taken == buf.taken == 1
    assert back.staleness_histogram == buf.staleness_histogram == {1: 1}
    assert back.waiting == 0
    # the groups that were waiting did not survive; they are counted, not lost silently
    assert back.refused == {"stale": 1, "restart": 2}
    assert back.admitted == back.taken + back.waiting + back.refused["restart"]
    # and counting goes on from there
    back.offer(group("e", 2), 2)
    back.take(1, 2)
    assert back.staleness_histogram == {1: 1, 0: 1}
    assert back.to_json()["taken"] == 2


@pytest.mark.parametrize("bad", [
    {},
    {"format": 99},
    {"format": 1, "admitted": "3", "taken": 0, "refused": {}, "staleness_histogram": {},
     "waiting": 0},
    {"format": 1, "admitted": 3, "taken": 0, "refused": {"stale": -1},
     "staleness_histogram": {}, "waiting": 0},
    {"format": 1, "admitted": 3, "taken": 0, "refused": {},
     "staleness_histogram": {"x": 1}, "waiting": 0},
    [],
])
def test_a_corrupt_saved_state_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match="replay buffer state"):
        ReplayBuffer.from_json(bad, staleness=1, capacity_groups=8, group_size=G)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        ReplayBuffer(-1, 8, group_size=G)
    with pytest.raises(ValueError):
        ReplayBuffer(0, 0, group_size=G)
    with pytest.raises(ValueError):
        ReplayBuffer(0, 8, group_size=0)


def test_the_buffer_does_not_import_torch() -> None:
    assert "peerd.rl.buffer" in sys.modules
    import subprocess

    code = ("import sys, peerd.rl.buffer, peerd.rl.types; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_take_ids_takes_the_named_groups_only_when_all_wait() -> None:
    buf = ReplayBuffer(staleness=1, capacity_groups=8, group_size=G)
    for gid, v in (("s2", 3), ("s0", 3), ("s5", 3)):
        assert buf.offer(group(gid, v), trainer_version=3) is None
    assert buf.take_ids(["s0", "s1"], trainer_version=3) is None  # s1 missing
    assert buf.waiting == 3 and buf.taken == 0  # nothing taken meanwhile
    assert buf.offer(group("s1", 3), trainer_version=3) is None
    out = buf.take_ids(["s0", "s1"], trainer_version=4)
    assert out is not None and [g[0].group_id for g in out] == ["s0", "s1"]
    assert buf.staleness_histogram == {1: 2}
    assert buf.waiting == 2 and buf.taken == 2


def test_expire_returns_what_aged_out_so_its_prompts_can_go_out_again() -> None:
    buf = ReplayBuffer(staleness=0, capacity_groups=8, group_size=G)
    assert buf.offer(group("old", 2), trainer_version=2) is None
    assert buf.offer(group("new", 3), trainer_version=3) is None
    gone = buf.expire(trainer_version=3)
    assert [g[0].group_id for g in gone] == ["old"]
    assert buf.refused["stale_at_train"] == 1 and buf.waiting == 1
    assert buf.take_ids(["old"], trainer_version=3) is None


def test_a_group_found_wanting_after_admission_is_discarded_and_counted() -> None:
    buf = ReplayBuffer(staleness=0, capacity_groups=8, group_size=G)
    assert buf.offer(group("liar", 1), trainer_version=1) is None
    assert buf.get("liar") is not None and buf.waiting == 1  # get leaves it waiting
    assert buf.discard("liar", "verification") is not None
    assert buf.get("liar") is None and buf.discard("liar", "verification") is None
    assert buf.refused == {"verification": 1} and buf.waiting == 0
    assert buf.admitted == buf.taken + buf.waiting + buf.refused["verification"]
