"""The expert backend interface: what coe needs from a server that runs experts.

Failures are split the way the dispatcher needs them: ``BackendUnavailable``
means "nothing was answered, another try or another expert may work" (connect
errors, timeouts and 5xx before the first byte); ``UpstreamError`` means the
server understood and refused (4xx), so retrying elsewhere would not help.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


class ChatStream(ABC):
    """An opened streaming answer: the first byte has arrived, so no retry any more."""

    @abstractmethod
    def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Parsed ``chat.completion.chunk`` objects until ``[DONE]``."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the upstream connection (cancels the request on vLLM)."""


class ExpertBackend(ABC):
    name: str

    @abstractmethod
    async def chat(self, body: dict[str, Any], *, request_id: str) -> dict[str, Any]:
        """One non-streaming chat completion."""

    @abstractmethod
    async def open_chat_stream(self, body: dict[str, Any], *, request_id: str) -> ChatStream:
        """Start a streaming chat completion; returns once the server has accepted it."""

    @abstractmethod
    async def list_models(self) -> list[dict[str, Any]]:
        """The server's ``/v1/models`` entries (adapters carry ``parent``)."""

    @abstractmethod
    async def load_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA adapter at run time; loading one already there is not an error."""

    @abstractmethod
    async def unload_adapter(self, name: str) -> None:
        """Unload a LoRA adapter; unloading one that is not there is not an error."""

    @abstractmethod
    async def health(self) -> bool:
        """True when the server answers its health check."""

    async def max_loras(self) -> int | None:
        """How many adapters the server runs in one batch, when it says so (None: unknown)."""
        return None

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections."""
