"""Aggregation strategies: from the experts' answers to a plan for the final answer.

A strategy does not call anyone. It returns either ``FinalText`` (one expert's
answer is the final answer: a vote, the best-ranked answer, or a consensus) or
``FinalCall`` (the aggregator expert must be asked, with these messages). The
pipeline runs a ``FinalCall``, streamed or not, so the strategies stay pure and
the final stage is the one thing a streaming client waits on.

New strategies are one class plus one entry in ``AGGREGATORS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coe.aggregate.text import Agreement, synthesis_prompt


@dataclass(frozen=True)
class Answer:
    """One expert's answer: ``text`` has reasoning stripped; ``response`` is what its server returned."""

    expert: str
    text: str
    response: dict[str, Any]
    round: int = 1


@dataclass(frozen=True)
class FinalText:
    """An answer already given is the final answer (no aggregator call)."""

    answer: Answer
    reason: str
    consensus: bool = False


@dataclass(frozen=True)
class FinalCall:
    """Ask ``experts[0]`` (later ones are fallbacks if it is down) with ``messages``."""

    experts: list[str]
    messages: list[dict[str, Any]]
    reason: str
    truncated: dict[str, int] = field(default_factory=dict)
    """Expert name -> characters of its answer cut to fit the aggregator's context."""
    params: dict[str, Any] = field(default_factory=dict)


Final = FinalText | FinalCall

SYNTHESIS_STOP = ("</answer>", "<answer")
"""The synthesis prompt quotes answers in ``<answer>`` tags; a small model may continue the pattern: stop
there rather than leak a raw tag into the reply (added to the client's own ``stop``)."""


@dataclass(frozen=True)
class AggregateInput:
    question: str
    answers: Sequence[Answer]
    """Every answer received, in rank order (the router's order, escalations after)."""
    agreement: Agreement
    aggregator: str
    """The expert that synthesizes (the router's choice, or the top recruit)."""
    budget_tokens: int
    """The aggregator's context minus room for its reply."""


class Aggregator(ABC):
    name: str

    @abstractmethod
    def plan(self, given: AggregateInput) -> Final:
        """How the final answer is made from ``given.answers`` (at least one)."""


class Synthesize(Aggregator):
    """The aggregator expert reads every answer and writes the final one (Mixture-of-Agents,
    Symbolic-MoE); skipped when the experts already agree."""

    name = "synthesize"

    def plan(self, given: AggregateInput) -> Final:
        answers = given.answers
        if len(answers) == 1:
            return FinalText(answers[0], "only one expert answered: nothing to synthesize")
        if given.agreement.unanimous:
            return FinalText(answers[0], f"all {len(answers)} answers agree: the aggregator call was skipped",
                             consensus=True)
        prompt = synthesis_prompt(given.question, [a.text for a in answers], budget_tokens=given.budget_tokens,
                                  count_tokens=estimate_tokens)
        others = [a.expert for a in answers if a.expert != given.aggregator]
        return FinalCall([given.aggregator, *others], prompt.messages,
                         f"{given.aggregator} synthesizes {len(answers)} answers",
                         {answers[i].expert: cut for i, cut in prompt.truncated.items()},
                         params={"stop": list(SYNTHESIS_STOP)})


class Vote(Aggregator):
    """The answer most experts gave (normalised, or the chosen letter for multiple choice)."""

    name = "vote"

    def plan(self, given: AggregateInput) -> Final:
        agreement = given.agreement
        winner = given.answers[agreement.holders[0]]
        return FinalText(winner, f"{len(agreement.holders)} of {len(given.answers)} answers agree "
                         f"(first given by {winner.expert})", consensus=agreement.unanimous)


class Best(Aggregator):
    """The top-ranked expert's answer (the first in rank order that answered)."""

    name = "best"

    def plan(self, given: AggregateInput) -> Final:
        return FinalText(given.answers[0], f"the best-ranked expert that answered: {given.answers[0].expert}",
                         consensus=given.agreement.unanimous and len(given.answers) > 1)


AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (Synthesize, Vote, Best)}


def estimate_tokens(text: str) -> int:
    """A deliberately high token estimate (3 characters per token) so a prompt never overflows."""
    return len(text) // 3 + 1
