"""Offline model builders: a tiny random Llama (tests) and Gemma 3 270M (demo).

Both write a folder vLLM can serve with ``--model DIR`` and need no model hub.
Heavy libraries (torch, transformers, peft) are imported inside the builders,
so importing this package stays cheap for the gateway.
"""

from __future__ import annotations

from coe.models.gemma import GEMMA_CHAT_TEMPLATE, GEMMA_DEFAULT_PARAMS, build_gemma
from coe.models.tiny import TINY_CHAT_TEMPLATE, TinyModel, build_tiny

__all__ = [
    "GEMMA_CHAT_TEMPLATE",
    "GEMMA_DEFAULT_PARAMS",
    "TINY_CHAT_TEMPLATE",
    "TinyModel",
    "build_gemma",
    "build_tiny",
]
