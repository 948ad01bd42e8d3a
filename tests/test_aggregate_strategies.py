"""Aggregation strategies and agreement by meaning: pure logic, plus the real MiniLM for similarity."""

from __future__ import annotations

from typing import Any

import pytest

from coe.aggregate import (
    AGGREGATORS,
    AggregateInput,
    Answer,
    FinalCall,
    FinalText,
    agreement,
    choices_in,
)
from coe.pipeline import similar
from coe.pipeline.fanout import quorum_of


def answers(*texts: str) -> list[Answer]:
    return [Answer(f"e{i}", t, {"choices": [{"message": {"content": t}}]}) for i, t in enumerate(texts)]


def given(texts: list[str], budget: int = 4000, **kw: Any) -> AggregateInput:
    got = answers(*texts)
    return AggregateInput("What is the capital of France?", got, agreement([a.text for a in got], **kw), "e0",
                          budget)


def test_choices_in_reads_lettered_options_in_order() -> None:
    question = "Which is a prime?\nA. 4\nB) 6\nC: 7\nD. 9\n\nAnswer with the letter."
    assert choices_in(question) == ["4", "6", "7", "9"]
    assert choices_in("A. only one option") == []
    assert choices_in("B. starts late\nC. no A") == []


def test_synthesize_calls_the_aggregator_unless_the_experts_agree() -> None:
    plan = AGGREGATORS["synthesize"]().plan(given(["Paris", "Lyon", "Paris is the capital"]))
    assert isinstance(plan, FinalCall)
    assert plan.experts == ["e0", "e1", "e2"]  # the aggregator first, then the others as fallbacks
    assert "<answer expert=\"2\">\nLyon\n</answer>" in plan.messages[-1]["content"]
    skip = AGGREGATORS["synthesize"]().plan(given(["Paris.", "paris"]))
    assert isinstance(skip, FinalText) and skip.consensus and skip.answer.expert == "e0"
    single = AGGREGATORS["synthesize"]().plan(given(["Paris"]))
    assert isinstance(single, FinalText) and not single.consensus


def test_synthesize_records_what_it_cut_by_expert() -> None:
    plan = AGGREGATORS["synthesize"]().plan(given(["short", "long " * 400, "x"], budget=200))
    assert isinstance(plan, FinalCall)
    assert set(plan.truncated) == {"e1"} and plan.truncated["e1"] > 1000
    assert "[...]" in plan.messages[-1]["content"]


def test_vote_takes_the_majority_and_best_the_top_rank() -> None:
    vote = AGGREGATORS["vote"]().plan(given(["Lyon", "Paris", "paris!"]))
    assert isinstance(vote, FinalText) and vote.answer.expert == "e1" and not vote.consensus
    tie = AGGREGATORS["vote"]().plan(given(["Lyon", "Paris"]))
    assert isinstance(tie, FinalText) and tie.answer.expert == "e0"  # a tie goes to the higher-ranked expert
    best = AGGREGATORS["best"]().plan(given(["Lyon", "Paris", "paris"]))
    assert isinstance(best, FinalText) and best.answer.expert == "e0"


def test_vote_on_multiple_choice_compares_letters() -> None:
    choices = ["4", "6", "7", "9"]
    got = agreement(["The answer is C.", "B", "(C) 7"], choices)
    assert got.holders == (0, 2) and got.key == "choice:C"


def test_agreement_by_meaning_with_minilm() -> None:
    texts = ["The capital of France is Paris.", "Paris is the capital city of France.",
             "Photosynthesis turns light into chemical energy."]
    exact = agreement(texts)
    assert exact.share == pytest.approx(1 / 3)
    close = agreement(texts, similar=similar, threshold=0.8)
    assert close.holders == (0, 1) and close.share == pytest.approx(2 / 3)
    sims = similar(texts)
    assert sims[0][1] > 0.8 > sims[0][2]


@pytest.mark.parametrize(("n", "share", "need"), [(3, 1.0, 3), (3, 0.5, 2), (2, 0.5, 1), (4, 0.75, 3),
                                                  (1, 0.1, 1), (5, 0.01, 1)])
def test_quorum_rounds_up_and_needs_at_least_one(n: int, share: float, need: int) -> None:
    assert quorum_of(n, share) == need
