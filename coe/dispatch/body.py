"""Shape a client's chat body for one expert: its defaults, its system prompt, its model name.

Client values win over the expert's default ``params``; the expert's system
prompt is merged into the conversation's first system message (one system
message, since some chat templates reject two); streams always ask the server
for usage so cost is known even when the client did not ask for it.
"""

from __future__ import annotations

from typing import Any

from coe.config import ExpertConfig

COE_ONLY_KEYS = ("coe",)


def _with_system(messages: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        content = first.get("content")
        if isinstance(content, str):
            return [{**first, "content": f"{prompt}\n\n{content}"}, *messages[1:]]
        if isinstance(content, list):
            return [{**first, "content": [{"type": "text", "text": prompt}, *content]}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def upstream_body(expert: ExpertConfig, body: dict[str, Any], *, stream: bool = False,
                  base_adapter: str | None = None) -> dict[str, Any]:
    """``base_adapter``: the backend's zero-weight adapter, named instead of the base model
    (see ``coe.models.zero`` for the vLLM-CPU bug this avoids)."""
    out: dict[str, Any] = {**expert.params}
    out.update((k, v) for k, v in body.items() if k not in COE_ONLY_KEYS)
    out["model"] = expert.upstream_model if expert.adapter or not base_adapter else base_adapter
    if expert.system_prompt:
        out["messages"] = _with_system(list(body.get("messages", [])), expert.system_prompt)
    if stream:
        out["stream"] = True
        out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    else:
        out.pop("stream_options", None)
        out["stream"] = False
    return out
