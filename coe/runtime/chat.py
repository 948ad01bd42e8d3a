"""The chat request paths without HTTP, built once per ``Runtime``.

- A named expert (``model="<expert>"``): that expert answers through the
  dispatcher, bypassing the pipeline, so it pays for nothing it does not use.
- ``model="coe"``: the composition pipeline runs up to its final stage, which
  is returned whole or left open for the caller to stream
  (``coe.pipeline.final`` records it the same way in both cases).
- A batch item: either path without streaming; every failure becomes a status
  and an OpenAI error body, never an exception, so one bad item never stops a batch.

The HTTP layer (``services/api/chat``) only parses, frames SSE and counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Status, StatusCode
from pydantic import ValidationError

from coe import usage as usage_mod
from coe.aggregate import FinalCall
from coe.batch.lines import BatchItem
from coe.config import ROUTED_MODEL, ExpertConfig, RegistryConfig
from coe.dispatch import Dispatcher, ExpertCall, OpenedStream
from coe.errors import CoeError, InvalidRequest, ModelNotFound, clip, from_validation
from coe.metrics import Metrics
from coe.pipeline import ChatCaller, Options, Pipeline, State
from coe.pipeline import final as final_stage
from coe.pipeline.response import answered, calls_of, coe_field, completion, log_run
from coe.pipeline.spans import record_request
from coe.registry import Registry, RegistryManager
from coe.runtime.explorer import Explorer
from coe.runtime.protocol import ChatCompletionRequest
from coe.telemetry import OFF, Telemetry, batch_link
from routers.base import ExpertChoice, RoutingDecision

log = logging.getLogger("coe.chat")

Finish = Callable[[ExpertCall], tuple[dict[str, Any], "dict[str, Any] | None"]]
"""Given the streamed call (usage known): the ``coe`` field, and the usage the client is told
(None: the server's own)."""


@dataclass
class Streamed:
    """An answer to stream: the opened upstream stream, what to add once it ends, and every expert that
    answered (the ``x-coe-experts`` header)."""

    opened: OpenedStream
    finish: Finish
    experts: str


@dataclass
class Composed:
    """A pipeline run up to (or through) its final stage, with the sampling parameters its calls used."""

    run: State
    params: dict[str, Any]
    registry: Registry
    messages: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    staged: bool = False


def direct_field(decision: RoutingDecision, calls: list[ExpertCall], request_id: str) -> dict[str, Any]:
    """The ``coe`` field of a direct answer (a composed answer's is ``coe.pipeline.response.coe_field``)."""
    return {
        "request_id": request_id,
        "decision": decision.model_dump(mode="json"),
        "experts": [c.to_json() for c in calls],
        "usage": usage_mod.add(c.usage for c in calls),
        "cost": usage_mod.total_cost(c.cost for c in calls),
    }


def check_limits(body: ChatCompletionRequest, config: RegistryConfig, expert: ExpertConfig | None) -> None:
    """``limits`` (and the expert's own ``max_tokens``): a 400 naming the param, before any work."""
    limits = config.limits
    if len(body.messages) > limits.max_messages:
        raise InvalidRequest(f"messages: {len(body.messages)} messages; the limit is {limits.max_messages} "
                             "(limits.max_messages)", param="messages")
    cap = expert.max_tokens if expert is not None and expert.max_tokens is not None else limits.max_tokens
    for param in ("max_tokens", "max_completion_tokens"):
        asked = getattr(body, param)
        if asked is not None and asked > cap:
            where = f"expert {expert.name!r}'s max_tokens" if expert is not None and expert.max_tokens else \
                "limits.max_tokens"
            raise InvalidRequest(f"{param}: {asked} is more than {cap} ({where})", param=param)


def body_checker(config: RegistryConfig, experts: Mapping[str, ExpertConfig]) -> Callable[[dict[str, Any]], str | None]:
    """Why a batch line's body would fail, or None: the same checks as ``POST /v1/chat/completions``
    (the wire model, the limits, what ``model="coe"`` cannot honour), so a batch is refused whole at
    creation rather than failing item by item."""
    def check(body: dict[str, Any]) -> str | None:
        try:
            request = ChatCompletionRequest.model_validate(body)
            if request.model == ROUTED_MODEL:
                options(request, None)
            check_limits(request, config, experts.get(request.model))
        except ValidationError as exc:
            return from_validation(exc.errors()).message
        except InvalidRequest as exc:
            return exc.message
        return None

    return check


def options(body: ChatCompletionRequest, registry: Registry | None) -> Options:
    """The request's ``coe`` options checked against the registry (None: the parts that need none); a
    clear 400 otherwise."""
    bad = body.routed_unsupported()
    if bad:
        raise InvalidRequest(f"model='coe' composes several experts' answers and cannot honour {', '.join(bad)}; "
                             "name one expert as the model to use them", param=bad[0])
    opts = body.coe
    if opts is None:
        return Options()
    if registry is None:
        return Options()
    if opts.experts:
        unknown = [n for n in opts.experts if registry.expert(n) is None]
        if unknown:
            raise InvalidRequest(f"unknown experts: {', '.join(unknown)}", param="coe.experts")
    max_k = registry.config.pipeline.max_k
    if opts.k is not None and opts.k > max_k:
        raise InvalidRequest(f"coe.k ({opts.k}) exceeds pipeline.max_k ({max_k})", param="coe.k")
    return Options(k=opts.k, experts=list(dict.fromkeys(opts.experts)) if opts.experts else None,
                   strategy=opts.strategy, rag=opts.rag, level2=opts.level2)


class ChatPaths:
    def __init__(self, registry: RegistryManager, dispatcher: Dispatcher, pipeline: Pipeline,
                 metrics: Metrics, telemetry: Telemetry = OFF, explorer: Explorer | None = None) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.pipeline = pipeline
        self.metrics = metrics
        self.telemetry = telemetry
        self.explorer = explorer

    def finished(self, composed: Composed, request_id: str, run: State | None = None, *,
                 field: dict[str, Any] | None = None, stream: bool = False) -> None:
        """A composed request's answer is complete: its log line, and its decision for the explorer
        (live traffic only: a batch's items are not decisions anyone watches live). ``field``: its ``coe``
        field when the caller has built it already."""
        done = composed.run if run is None else run
        log_run(done, request_id)
        if self.explorer is not None and self.explorer.config.enabled and not composed.staged:
            self.explorer.record(field or coe_field(done, request_id), composed.messages, started=composed.started,
                                 stream=stream)

    # -- a named expert ---------------------------------------------------------------------

    def expert_for(self, body: ChatCompletionRequest) -> tuple[ExpertConfig, RoutingDecision]:
        """The expert the request names, and the decision that says so; 404 for an unknown name."""
        expert = self.registry.current.expert(body.model)
        if expert is None:
            raise ModelNotFound(f"The model {clip(body.model)} does not exist: use 'coe' or an expert from /v1/models",
                                param="model")
        if body.coe is not None:
            raise InvalidRequest("the 'coe' options apply to model='coe' only; this request names one expert",
                                 param="coe")
        check_limits(body, self.registry.current.config, expert)
        decision = RoutingDecision(router="direct", experts=[ExpertChoice(name=expert.name, score=1.0)],
                                   confidence=1.0, reason="the request named this expert")
        return expert, decision

    async def direct(self, body: ChatCompletionRequest, request_id: str,
                     caller: ChatCaller | None = None) -> dict[str, Any]:
        """The named expert's whole answer, with ``model`` set to the expert and the ``coe`` field."""
        expert, decision = self.expert_for(body)
        result, expert, call = await (caller or self.dispatcher).chat([expert], body.upstream(),
                                                                      request_id=request_id)
        result["model"] = expert.name
        result["coe"] = direct_field(decision, [call], request_id)
        record_request("direct", result["coe"])
        return result

    async def open_direct(self, body: ChatCompletionRequest, request_id: str) -> Streamed:
        """The named expert's answer as a stream (the server's own usage is passed on as sent)."""
        expert, decision = self.expert_for(body)
        opened = await self.dispatcher.open_stream([expert], body.upstream(), request_id=request_id)

        def finish(call: ExpertCall) -> tuple[dict[str, Any], dict[str, Any] | None]:
            field = direct_field(decision, [call], request_id)
            record_request("direct", field)
            return field, None

        return Streamed(opened, finish, opened.expert.name)

    # -- model="coe" ---------------------------------------------------------------------------

    async def compose(self, body: ChatCompletionRequest, request_id: str, *, session: str | None = None,
                      staged: ChatCaller | None = None) -> Composed:
        """The graph's run for one request (the final stage left open when it streams). ``staged``: a
        batch's stager (``coe.batch.stages``) that holds the expert calls for their wave; the run's time
        deadlines are then off (``Context.staged``)."""
        started = time.perf_counter()
        registry = self.registry.current
        opts = options(body, registry)
        check_limits(body, registry.config, None)
        params = body.upstream()
        messages = params.pop("messages")
        for key in ("model", "stream", "stream_options"):
            params.pop(key, None)
        ctx = self.pipeline.context(registry, metrics=self.metrics, messages=messages, params=params,
                                    request_id=request_id, options=opts, session=session, stream=body.stream,
                                    dispatcher=staged, staged=staged is not None)
        return Composed(await self.pipeline.run(ctx), params, registry, messages, started, staged is not None)

    async def open_final(self, composed: Composed, request_id: str) -> Streamed | None:
        """Stream the final stage of a streaming run. None when the answer is already text (a vote, a
        consensus, the best answer, or the vote because the aggregator could not be reached: then
        ``composed.run`` holds it)."""
        run = composed.run
        plan = run["final"]
        if not isinstance(plan, FinalCall):
            return None
        experts, body = final_stage.request(run, plan, composed.params, composed.registry.experts)
        try:
            with self.telemetry.labels(final_stage.labels(run)):
                opened = await self.dispatcher.open_stream(experts, body, request_id=request_id)
        except CoeError as exc:
            if final_stage.role(run) == "final":
                raise
            composed.run = final_stage.merge(run, final_stage.degrade(run, plan, exc))
            return None

        def finish(call: ExpertCall) -> tuple[dict[str, Any], dict[str, Any] | None]:
            done = final_stage.merge(run, final_stage.answered(run, call, streamed=True))
            field = coe_field(done, request_id)
            self.finished(composed, request_id, done, field=field, stream=True)
            return field, usage_mod.add(c.usage for c in calls_of(done))

        names = ",".join(filter(None, [answered(run.get("calls", [])), opened.expert.name]))
        return Streamed(opened, finish, names)

    # -- without streaming: both paths ------------------------------------------------------------

    async def complete(self, body: ChatCompletionRequest, request_id: str, *, session: str | None = None,
                       staged: ChatCaller | None = None) -> dict[str, Any]:
        """One whole chat completion, by a named expert or composed."""
        if body.model == ROUTED_MODEL:
            composed = await self.compose(body, request_id, session=session, staged=staged)
            response = completion(composed.run, request_id)
            self.finished(composed, request_id, field=response["coe"])
            return response
        return await self.direct(body, request_id, staged)

    async def execute(self, item: BatchItem, request_id: str,
                      staged: ChatCaller | None = None) -> tuple[int, dict[str, Any]]:
        """A batch item: (status, body); every failure becomes an OpenAI error body. Traced, the item is the
        root span of its own trace (``batch item``), and its expert calls, which a stager runs in its
        waves outside the item's context, are made its children by request id. Run by a batch worker
        (``coe.telemetry.batch_scope``), it carries ``coe.batch.id`` and links to the span of the request
        that created the batch."""
        batch_id, links = batch_link()
        with self.telemetry.span("batch item", root=True, links=links) as span:
            if span.is_recording():
                span.set_attributes({"coe.request_id": request_id, "coe.batch.custom_id": item.custom_id,
                                     "coe.batch.line": item.line, "coe.staged": staged is not None})
                if batch_id is not None:
                    span.set_attribute("coe.batch.id", batch_id)
                self.telemetry.adopt(request_id, span)
            try:
                status, body = await self._execute(item, request_id, staged)
            finally:
                self.telemetry.release(request_id)
            if span.is_recording():
                span.set_attribute("coe.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, str(body.get("error", {}).get("message", ""))[:500]))
            return status, body

    async def _execute(self, item: BatchItem, request_id: str,
                       staged: ChatCaller | None) -> tuple[int, dict[str, Any]]:
        try:
            body = ChatCompletionRequest.model_validate(item.body)
            return 200, await self.complete(body, request_id, staged=staged)
        except CoeError as exc:
            return exc.status, exc.to_openai()
        except ValidationError as exc:
            return 400, from_validation(exc.errors()).to_openai()
        except Exception:
            log.exception("batch item %s failed unexpectedly", item.custom_id)
            return 500, {"error": {"message": "internal error; see the log", "type": "internal_error",
                                   "param": None, "code": None}}
