"""Wire models for ``POST /v1/chat/completions``.

Validated fields are the ones coe itself reads or that clients commonly get
wrong; any other OpenAI or vLLM parameter (``top_k``, ``repetition_penalty``,
``guided_json``, ...) passes through to the expert's server unchanged, which
validates it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class CoeOptions(BaseModel):
    """Per-request routing control (``extra_body={"coe": {...}}``)."""

    model_config = ConfigDict(extra="forbid")

    experts: list[str] | None = Field(None, min_length=1, description="candidate experts, in order")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
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
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    coe: CoeOptions | None = None

    def upstream(self) -> dict[str, Any]:
        """The body as the client sent it (minus coe's own options), for the expert's server."""
        return self.model_dump(exclude_unset=True, exclude={"coe"})
