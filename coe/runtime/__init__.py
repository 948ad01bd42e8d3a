"""The composition root without HTTP: ``Runtime`` opens what a coe process needs; ``ChatPaths`` (its
``chat``) answers chat requests, by a named expert or composed, streamed or whole.

The API server (``services/api``), ``coe worker``, ``coe batch run``, ``coe profile`` and the benchmarks all
open a Runtime; see ``ARCHITECTURE.md`` for who may import whom.
"""

from coe.runtime.chat import ChatPaths, Composed, Streamed, body_checker
from coe.runtime.core import Runtime
from coe.runtime.protocol import ChatCompletionRequest

__all__ = ["ChatCompletionRequest", "ChatPaths", "Composed", "Runtime", "Streamed", "body_checker"]
