"""Composing several experts' answers into one (the composition pipeline builds on these).

``text`` holds the pure parts every aggregation strategy needs: stripping
reasoning, normalising answers for comparison, the agreement (reliability) of a
set of answers, the majority vote, and a synthesis prompt that quotes the
experts' answers as material (never as instructions) within a token budget,
truncating fairly and saying so.
"""

from coe.aggregate.text import (
    Agreement,
    SynthesisPrompt,
    agreement,
    answer_key,
    strip_think,
    synthesis_prompt,
)

__all__ = ["Agreement", "SynthesisPrompt", "agreement", "answer_key", "strip_think", "synthesis_prompt"]
