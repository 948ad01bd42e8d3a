"""OpenTelemetry traces for coe: one ``Telemetry`` per ``Runtime``, a no-op unless tracing is on.

Why a wrapper rather than the OpenTelemetry API everywhere: with tracing off (the default) a request
must pay next to nothing, so every method here returns a shared no-op at once, before any name or
attribute is built; callers build attributes only under ``span.is_recording()``. With tracing on, the
runtime builds the tracer from the registry's ``telemetry:`` section and the ``OTEL_*`` variables
(``coe.telemetry.setup``); it is handed down as a constructor argument, and its provider is this
runtime's own (not the process-global one), so two runtimes in one process export apart.

What is shared is only what OpenTelemetry keeps in context variables: the current span, which the HTTP
server span, the pipeline's steps and the expert calls nest under, and which ``inject`` writes into
every upstream request as ``traceparent``.

This module is a leaf (it imports only ``coe.config``): the backends, the dispatcher, the pipeline, the
runtime and the HTTP shell all import it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, Tracer

from coe.config import LaunchConfig

__all__ = ["OFF", "Settings", "Span", "SpanKind", "Telemetry", "current_span", "extract", "fail", "inject"]

_labels: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("coe_call_labels", default=None)
_batch: contextvars.ContextVar[tuple[str, Mapping[str, str]] | None] = contextvars.ContextVar(
    "coe_batch", default=None)
"""Attributes the next model-call spans of this context get (the pipeline's role and round of a call):
the dispatcher's ``chat`` has no room for them, and a batch's stager implements the same signature."""


class Provider(Protocol):
    """What ``Telemetry`` needs of an SDK tracer provider: flushing and stopping its exporter."""

    def force_flush(self, timeout_millis: int = ...) -> bool: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    """Tracing resolved from the YAML section and the environment (``coe.telemetry.setup.resolve``)."""

    exporter: str = "otlp"
    protocol: str = "http/protobuf"
    endpoint: str = "http://localhost:4318/v1/traces"
    """The URL spans are sent to (for http/protobuf the whole path, ``.../v1/traces``)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    service_name: str | None = "coe"
    sample_ratio: float | None = None
    capture_content: bool = False
    max_content_chars: int = 4096
    trace_backends: bool = True
    exclude_paths: tuple[str, ...] = ("/health", "/metrics")


class _Noop:
    """The block of a span that is not recorded: enters to the invalid span, costs one call."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


_NOOP = _Noop()


def fail(span: Span, exc: BaseException) -> None:
    """Mark ``span`` as failed by ``exc``; a cancellation (client gone, quorum reached) is not a failure."""
    if not span.is_recording():
        return
    if isinstance(exc, asyncio.CancelledError):
        span.set_attribute("coe.cancelled", True)
        return
    span.set_attribute("error.type", type(exc).__name__)
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(getattr(exc, "message", None) or exc)[:500]))


class _Active:
    """``span`` is the current span for the block (the parent of spans started in it, and the
    ``traceparent`` sent upstream); an exception marks it failed; ``end``: ended at the block's end."""

    __slots__ = ("end", "span", "token")

    def __init__(self, span: Span, end: bool) -> None:
        self.span = span
        self.end = end
        self.token: object = None

    def __enter__(self) -> Span:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        otel_context.detach(self.token)  # type: ignore[arg-type]
        if exc is not None:
            fail(self.span, exc)
        if self.end:
            self.span.end()


class _Labelled:
    __slots__ = ("attrs", "token")

    def __init__(self, attrs: Mapping[str, Any]) -> None:
        self.attrs = attrs
        self.token: contextvars.Token[Mapping[str, Any] | None] | None = None

    def __enter__(self) -> None:
        self.token = _labels.set({**(_labels.get() or {}), **self.attrs})

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.token is not None
        _labels.reset(self.token)


class Telemetry:
    """The runtime's tracer, or nothing (``OFF``). ``tracer``: where spans are made; ``provider``: what to
    flush and shut down at close; ``settings``: content capture, excluded paths, the vLLM launch flags."""

    def __init__(self, tracer: Tracer | None = None, *, settings: Settings | None = None,
                 provider: Provider | None = None) -> None:
        self._tracer = tracer
        self.settings = settings or Settings()
        self._provider = provider
        self.enabled = tracer is not None
        self.capture_content = self.enabled and self.settings.capture_content
        self._adopted: dict[str, Span] = {}

    # -- spans ---------------------------------------------------------------------------

    def span(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
             root: bool = False, links: Iterable[trace.Link] = ()) -> _Active | _Noop:
        """A block run under a new current span, ended at its end (``root``: a new trace)."""
        if self._tracer is None:
            return _NOOP
        span = self._tracer.start_span(name, context=otel_context.Context() if root else None, kind=kind,
                                       attributes=attributes, links=list(links) or None)
        return _Active(span, end=True)

    def start(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
              parent: otel_context.Context | None = None) -> Span:
        """A span the caller ends (one that outlives a block: a stream); the invalid span when off."""
        if self._tracer is None:
            return INVALID_SPAN
        return self._tracer.start_span(name, context=parent, kind=kind, attributes=attributes)

    def use(self, span: Span, *, end: bool = False) -> _Active | _Noop:
        """A block with ``span`` current (the parent of what starts in it; ``traceparent`` upstream)."""
        if not span.is_recording():
            return _NOOP
        return _Active(span, end=end)

    # -- what model-call spans carry from their callers ------------------------------------

    def labels(self, attrs: Mapping[str, Any]) -> _Labelled | _Noop:
        """The block's model-call spans get ``attrs`` (e.g. ``coe.role``, ``coe.round``)."""
        if self._tracer is None:
            return _NOOP
        return _Labelled(attrs)

    @staticmethod
    def call_labels() -> Mapping[str, Any]:
        return _labels.get() or {}

    def adopt(self, request_id: str, span: Span) -> None:
        """Calls of ``request_id`` made where no span is current (a batch's waves run them in the stager's
        task) become children of ``span`` (the batch item's)."""
        if span.is_recording():
            self._adopted[request_id] = span

    def release(self, request_id: str) -> None:
        self._adopted.pop(request_id, None)

    def parent_for(self, request_id: str) -> otel_context.Context | None:
        """The parent of a call: the current span's context, else the span that adopted ``request_id``."""
        if trace.get_current_span().get_span_context().is_valid:
            return None
        span = self._adopted.get(request_id)
        return trace.set_span_in_context(span) if span is not None else None

    # -- the exporter ----------------------------------------------------------------------

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export every ended span now (blocking: call it from a thread in async code)."""
        return self._provider.force_flush(int(timeout_s * 1000)) if self._provider is not None else True

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking; once, when the runtime closes)."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None

    # -- managed vLLM ------------------------------------------------------------------------

    def launch(self, name: str, launch: LaunchConfig) -> LaunchConfig:
        """``launch`` with vLLM's own tracing switched on (``--otlp-traces-endpoint``), so that its spans
        join coe's traces (vLLM continues the ``traceparent`` coe sends); unchanged when tracing is off,
        ``trace_backends`` is false, or the args already name the flag."""
        s = self.settings
        if not self.enabled or not s.trace_backends or s.exporter != "otlp" or any(
                a.split("=", 1)[0] == "--otlp-traces-endpoint" for a in launch.args):
            return launch
        env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": s.protocol, "OTEL_SERVICE_NAME": f"vllm-{name}", **launch.env}
        if s.headers and "OTEL_EXPORTER_OTLP_TRACES_HEADERS" not in env:
            env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = ",".join(f"{k}={v}" for k, v in s.headers.items())
        return launch.model_copy(update={"args": [*launch.args, "--otlp-traces-endpoint", s.endpoint], "env": env})

    def excluded(self, path: str) -> bool:
        """Whether an HTTP path gets no server span (health probes and metrics scrapes)."""
        return path.startswith(self.settings.exclude_paths)


OFF = Telemetry()
"""Tracing off: every span is the shared no-op."""


def current_span() -> Span:
    """The current span (the HTTP request's, a batch item's, or the invalid span)."""
    return trace.get_current_span()


def inject(headers: dict[str, str]) -> None:
    """Add ``traceparent`` (and ``tracestate``, baggage) of the current span to outgoing headers; nothing
    when no span is current, which is always the case with tracing off."""
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(headers)


def carrier() -> dict[str, str]:
    """The current span's ``traceparent`` (and ``tracestate``) as a dict to store with work that runs
    later (a batch): empty when no span is current."""
    out: dict[str, str] = {}
    inject(out)
    return out


class batch_scope:
    """The block runs items of batch ``batch_id``: their spans link to the span that created the batch
    (``trace``: the ``carrier()`` stored with the batch) and carry ``coe.batch.id``."""

    def __init__(self, batch_id: str, trace_carrier: Mapping[str, str]) -> None:
        self._value = (batch_id, trace_carrier)
        self._token: contextvars.Token[tuple[str, Mapping[str, str]] | None] | None = None

    def __enter__(self) -> None:
        self._token = _batch.set(self._value)

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._token is not None:
            _batch.reset(self._token)


def batch_link() -> tuple[str | None, list[trace.Link]]:
    """Inside ``batch_scope``: the batch's id and the link to the span that created it (none without one)."""
    scope = _batch.get()
    if scope is None:
        return None, []
    batch_id, stored = scope
    context = trace.get_current_span(propagate.extract(dict(stored))).get_span_context() if stored else None
    return batch_id, [trace.Link(context)] if context is not None and context.is_valid else []


def extract(pairs: Iterable[tuple[bytes, bytes]]) -> otel_context.Context:
    """The context an incoming request carries (``traceparent``): its spans continue that trace."""
    carrier: dict[str, str] = {}
    for name, value in pairs:
        key = name.decode("latin-1").lower()
        if key in ("traceparent", "tracestate", "baggage"):
            text = value.decode("latin-1")
            carrier[key] = f"{carrier[key]},{text}" if key in carrier else text
    return propagate.extract(carrier) if carrier else otel_context.Context()


def attributes(items: Iterator[tuple[str, Any]]) -> dict[str, Any]:
    """Only values a span attribute can hold (str, bool, int, float, or a list of one of them); None and
    empty lists are left out, other lists are written as strings."""
    out: dict[str, Any] = {}
    for key, value in items:
        if value is None:
            continue
        if isinstance(value, (str, bool, int, float)):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            if not value:
                continue
            kinds = {type(v) for v in value}
            if kinds <= {int, float} and len(kinds) == 2:
                out[key] = [float(v) for v in value]
            elif len(kinds) == 1 and kinds <= {str, bool, int, float}:
                out[key] = list(value)
            else:
                out[key] = [str(v) for v in value]
        else:
            out[key] = str(value)
    return out
