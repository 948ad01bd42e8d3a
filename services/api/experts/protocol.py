"""Wire models of the expert admin endpoints (the register body is ``coe.config.ExpertConfig`` itself)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MergeRequest(BaseModel):
    """``POST /v1/experts/merge``: the same choices as ``coe experts merge``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    name: str = Field(description="the new expert's (and adapter's) name")
    sources: list[str] = Field(alias="from", min_length=2, max_length=64,
                               description="the adapter experts to merge, two or more")
    method: Literal["linear", "cat", "ties", "dare_linear", "dare_ties"]
    weights: list[float] | None = Field(None, description="one per source (default: 1 each)")
    density: float | None = Field(None, gt=0, le=1, description="kept fraction, for ties and dare_* (default: 1)")
    rank: int | None = Field(None, ge=1, le=512, description="rank of the SVD methods' result "
                             "(default: the largest source rank; cat is exact at the summed rank)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of DARE's masks")
    system_prompt: str | None = Field(None, description="default: the sources' one when they all share it")
    description: str | None = None
