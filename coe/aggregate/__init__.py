"""Composing several experts' answers into one.

``text`` holds the pure parts every strategy needs: stripping reasoning,
normalising answers for comparison, the agreement (reliability) of a set of
answers, and a synthesis prompt that quotes the experts' answers as material
(never as instructions) within a token budget, truncating fairly and saying so.
``strategies`` holds the strategies themselves (``synthesize``, ``vote``,
``best``) in the explicit registry ``AGGREGATORS``.
"""

from coe.aggregate.strategies import (
    AGGREGATORS,
    AggregateInput,
    Aggregator,
    Answer,
    Final,
    FinalCall,
    FinalText,
    estimate_tokens,
)
from coe.aggregate.text import (
    Agreement,
    SynthesisPrompt,
    agreement,
    answer_key,
    choices_in,
    strip_think,
    synthesis_prompt,
)

__all__ = [
    "AGGREGATORS",
    "AggregateInput",
    "Aggregator",
    "Agreement",
    "Answer",
    "Final",
    "FinalCall",
    "FinalText",
    "SynthesisPrompt",
    "agreement",
    "answer_key",
    "choices_in",
    "estimate_tokens",
    "strip_think",
    "synthesis_prompt",
]
