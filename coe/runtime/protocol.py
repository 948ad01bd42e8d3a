"""Wire models for ``POST /v1/chat/completions`` (and a batch line's body: the same checks).

Validated fields are the ones coe itself reads or that clients commonly get
wrong; any other OpenAI or vLLM parameter (``top_k``, ``repetition_penalty``,
``guided_json``, ...) passes through to the expert's server unchanged, which
validates it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from coe.aggregate import AGGREGATORS
from coe.config import check_known


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(False, strict=True)


class CoeOptions(BaseModel):
    """Per-request composition control (``extra_body={"coe": {...}}``), for ``model="coe"`` only."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(None, ge=1, le=32, description="experts asked in the first round (at most pipeline.max_k)")
    experts: list[str] | None = Field(None, min_length=1, description="the experts to ask, best first")
    strategy: str | None = Field(None, description="aggregation: synthesize, vote or best")
    rag: bool | None = Field(None, strict=True,
                             description="true: always retrieve; false: never; unset: the gate decides")
    level2: bool | None = Field(None, strict=True,
                                description="false: the two-level router ranks by level 1 alone (skills off), "
                                "to compare with and without level 2; unset: as configured")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str | None) -> str | None:
        return None if value is None else check_known(value, AGGREGATORS, "strategy")

    @model_validator(mode="after")
    def _k_fits_experts(self) -> CoeOptions:
        if self.k is not None and self.experts is not None and self.k > len(self.experts):
            raise ValueError(f"k ({self.k}) exceeds the {len(self.experts)} experts listed")
        return self


INT64 = 2**63
"""Integers must fit a signed 64-bit integer: what the experts' servers (and orjson) can take."""


def huge_int(value: Any, path: str) -> str | None:
    """The path of the first integer in ``value`` outside the signed 64-bit range, or None. Strings are
    not walked into (message text cannot hold an integer), so the walk is cheap."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        v, p = stack.pop()
        kind = type(v)
        if kind is int:
            if not -INT64 <= v < INT64:
                return p
        elif kind is dict:
            stack.extend((x, f"{p}.{k}" if p else str(k)) for k, x in v.items())
        elif kind is list:
            stack.extend((x, f"{p}[{i}]") for i, x in enumerate(v))
    return None


ROUTED_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logprobs",
                      "top_logprobs")
"""Parameters a composed answer cannot honour: several experts' tool calls or logprobs do not combine."""


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    coe: CoeOptions | None = None

    @model_validator(mode="after")
    def _ints_fit_64_bits(self) -> ChatCompletionRequest:
        """A 400 naming the param, rather than a 500 when the upstream body is serialised. Only what can
        hold an integer coe does not type itself is walked (the extras, tools, formats), not message text."""
        bad = None
        for name in ("max_tokens", "max_completion_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and not -INT64 <= value < INT64:
                bad = name
                break
        if bad is None:
            for name in ("tools", "tool_choice", "response_format"):
                value = getattr(self, name)
                if value is not None and not isinstance(value, str):
                    bad = huge_int(value, name)
                    if bad is not None:
                        break
        if bad is None and self.model_extra:
            bad = huge_int(self.model_extra, "")
        if bad is None:
            for i, message in enumerate(self.messages):
                if message.model_extra:
                    bad = huge_int(message.model_extra, f"messages[{i}]")
                    if bad is not None:
                        break
        if bad is None and self.stream_options is not None and self.stream_options.model_extra:
            bad = huge_int(self.stream_options.model_extra, "stream_options")
        if bad is not None:
            raise PydanticCustomError("int_too_big", "integers must be within the signed 64-bit range",
                                      {"param": bad})
        return self

    def routed_unsupported(self) -> list[str]:
        """The parameters set in this request that ``model="coe"`` cannot honour."""
        given = self.model_dump(exclude_unset=True)
        bad = [p for p in ROUTED_UNSUPPORTED if given.get(p) not in (None, False, [], "none")]
        if self.n is not None and self.n > 1:
            bad.insert(0, "n")
        return bad

    def upstream(self) -> dict[str, Any]:
        """The body as the client sent it (minus coe's own options), for the expert's server."""
        return self.model_dump(exclude_unset=True, exclude={"coe"})
