"""Which proven items the memory abstracts on its own, and into which domains
(peerd/memory/abstraction.py): pure, with a fake clock."""

from __future__ import annotations

import dataclasses

import pytest

from peerd.memory.abstraction import Abstraction, AbstractionRules, due, proven
from peerd.memory.item import Record, sign_item
from tests.test_memory_controller import AUTHOR, DAY, KEY, T0, S, record

RULES = AbstractionRules(min_uses=8, min_weight=0.1, min_runs=4, per_round=2)
RUNS = {"arithmetic": 50, "gsm8k": 40, "chat": 4, "code": 3}


def used(text: str, *, uses: int = 10, delta_sum: float = 3.0, domain: str = "arithmetic",
         last_used: float = T0) -> Record:
    """An item whose `uses` gained `delta_sum` over the baseline in all."""
    return record(text, u0=0.2, uses=uses, delta_sum=delta_sum, domain=domain,
                  last_used=last_used)


def test_only_an_item_its_uses_proved_is_abstracted() -> None:
    assert proven(used("a"), T0, S, RULES)
    assert not proven(used("a", uses=7), T0, S, RULES)  # too few uses: the replay alone
    assert not proven(used("a", delta_sum=-0.5), T0, S, RULES)  # its uses lost
    assert not proven(used("a", delta_sum=0.0), T0, S, RULES)
    assert not proven(used("a", uses=100, delta_sum=1.0), T0, S, RULES)  # weight ~0.018
    # faded: the same item unused for eight half-lives weighs under min_weight
    assert not proven(used("a"), T0 + 8 * 7 * DAY, S, RULES)


def test_an_insight_is_never_abstracted_again() -> None:
    rec = used("Tip: answer with the number alone.")
    item, signed = sign_item(KEY.private_key, AUTHOR, rec.item.text, "arithmetic",
                             "insight", created=T0)
    insight = Record(item=item, signed=signed, stats=rec.stats)
    assert proven(rec, T0, S, RULES) and not proven(insight, T0, S, RULES)
    assert due([insight], RUNS, set(), T0, S, RULES) == []


def test_its_insight_goes_to_every_other_domain_with_enough_runs_most_runs_first() -> None:
    rec = used("a")
    assert due([rec], RUNS, set(), T0, S, RULES) == [Abstraction(rec.item.id,
                                                                  ("gsm8k", "chat"))]
    # its own domain is not a target; a domain with too few runs is not either
    assert due([rec], {"arithmetic": 99, "code": 3}, set(), T0, S, RULES) == []


def test_a_pair_tried_once_is_not_tried_again() -> None:
    rec = used("a")
    tried = {(rec.item.id, "gsm8k")}
    assert due([rec], RUNS, tried, T0, S, RULES) == [Abstraction(rec.item.id, ("chat",))]
    tried.add((rec.item.id, "chat"))
    assert due([rec], RUNS, tried, T0, S, RULES) == []
    # a new domain reaching min_runs is a new target
    assert due([rec], {**RUNS, "code": 4}, tried, T0, S, RULES) == [
        Abstraction(rec.item.id, ("code",))]


def test_a_round_takes_the_heaviest_items_first_at_most_per_round() -> None:
    light, heavy, middle = used("light", delta_sum=2.0), used("heavy", delta_sum=6.0), \
        used("middle", delta_sum=4.0)
    got = due([light, heavy, middle], RUNS, set(), T0, S, RULES)
    assert [a.item_id for a in got] == [heavy.item.id, middle.item.id]
    one = dataclasses.replace(RULES, per_round=1)
    # an item with every target tried takes no place in the round
    tried = {(heavy.item.id, "gsm8k"), (heavy.item.id, "chat")}
    assert [a.item_id for a in due([light, heavy, middle], RUNS, tried, T0, S, one)] == [
        middle.item.id]


@pytest.mark.parametrize("bad", [{"min_uses": 0}, {"min_runs": 0}, {"per_round": 0},
                                 {"min_weight": -0.1}, {"min_weight": float("nan")}])
def test_nonsense_rules_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AbstractionRules(**bad)  # type: ignore[arg-type]
