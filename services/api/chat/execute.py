"""One chat completion without HTTP: what a batch item runs (``coe batch run``, the Batches API).

The same paths as ``POST /v1/chat/completions`` without streaming: a named
expert through the dispatcher, ``model="coe"`` through the pipeline. Every
failure becomes an HTTP status and an OpenAI error body, never an exception, so
one bad item never stops a batch. A batch passes its stager (``coe.batch.stages``)
as ``staged`` so every expert call of the item waits for its wave.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from coe.batch.lines import BatchItem
from coe.config import ROUTED_MODEL
from coe.errors import CoeError
from coe.pipeline import ChatCaller
from coe.pipeline.response import completion, log_run
from services.api.app import AppState
from services.api.chat.composed import run_pipeline
from services.api.chat.protocol import ChatCompletionRequest
from services.api.chat.service import coe_field, direct
from services.api.errors import validation_error

log = logging.getLogger("coe.batch")


def check_body(body: dict[str, Any]) -> str | None:
    """Why a batch item's body is not a valid chat completion request, or None."""
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc.errors()).message
    return None


async def execute(state: AppState, item: BatchItem, request_id: str,
                  staged: ChatCaller | None = None) -> tuple[int, dict[str, Any]]:
    try:
        body = ChatCompletionRequest.model_validate(item.body)
        registry = state.registry.current
        if body.model == ROUTED_MODEL:
            run, _ = await run_pipeline(state, registry, body, request_id, session=None, staged=staged)
            log_run(run, request_id)
            return 200, completion(run, request_id)
        expert, decision = direct(state, body)
        caller: ChatCaller = staged or state.dispatcher
        result, expert, call = await caller.chat([expert], body.upstream(), request_id=request_id)
        result["model"] = expert.name
        result["coe"] = coe_field(decision, [call], request_id)
        return 200, result
    except CoeError as exc:
        return exc.status, exc.to_openai()
    except ValidationError as exc:
        return 400, validation_error(exc.errors()).to_openai()
    except Exception:
        log.exception("batch item %s failed unexpectedly", item.custom_id)
        return 500, {"error": {"message": "internal error; see the log", "type": "internal_error", "param": None,
                               "code": None}}
