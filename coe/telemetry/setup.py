"""Building the runtime's ``Telemetry`` from ``telemetry:`` and the standard ``OTEL_*`` variables.

Called once by ``Runtime.open`` (never at import): with tracing off it returns ``OFF`` without
importing the OpenTelemetry SDK; with tracing on it builds this runtime's own tracer provider and a
batching exporter (a background thread that posts to the collector), which ``Runtime.aclose`` flushes
and stops. A YAML key wins over its variable, and a variable over the default, so an operator can
switch tracing on for a deployment without editing the registry file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from coe import __version__
from coe.config import TelemetryConfig
from coe.errors import ConfigError
from coe.telemetry import OFF, Settings, Telemetry

log = logging.getLogger("coe.telemetry")

DEFAULT_PORTS = {"http/protobuf": 4318, "grpc": 4317}


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _exporters(environ: Mapping[str, str]) -> list[str]:
    return [x.strip().lower() for x in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if x.strip()]


def enabled(config: TelemetryConfig, environ: Mapping[str, str]) -> bool:
    """On when the file says so, or (the file silent) when the environment names an exporter or an OTLP
    endpoint; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` (file silent) keep it off."""
    if _true(environ.get("OTEL_SDK_DISABLED")):
        return False
    if config.enabled is not None:
        return config.enabled
    exporters = _exporters(environ)
    if exporters:
        return exporters != ["none"]
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _traces_url(base: str, protocol: str) -> str:
    base = base.rstrip("/")
    if protocol == "grpc" or base.endswith("/v1/traces"):
        return base
    return f"{base}/v1/traces"


def resolve(config: TelemetryConfig, environ: Mapping[str, str]) -> Settings | None:
    """The settings tracing runs with, or None when it is off. A value nothing here can export to
    (another exporter, the http/json protocol) is a ``ConfigError`` naming where it came from."""
    if not enabled(config, environ):
        return None
    exporter: str
    if config.exporter is not None:
        exporter = config.exporter
    else:
        named = [x for x in _exporters(environ) if x != "none"]
        exporter = named[0] if named else "otlp"
        if exporter not in ("otlp", "console"):
            raise ConfigError([f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: coe exports traces "
                               "with 'otlp' or 'console'"])
    protocol = config.protocol or environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or \
        environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol not in DEFAULT_PORTS:
        raise ConfigError([f"OTLP protocol {protocol!r} (telemetry.protocol or OTEL_EXPORTER_OTLP_PROTOCOL): "
                           "use http/protobuf or grpc"])
    if config.endpoint:
        endpoint = _traces_url(config.endpoint, protocol)
    elif environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        endpoint = environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    else:
        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or f"http://localhost:{DEFAULT_PORTS[protocol]}"
        endpoint = _traces_url(base, protocol)
    service = config.service_name or environ.get("OTEL_SERVICE_NAME")
    if service is None and "service.name=" not in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        service = "coe"
    return Settings(exporter=exporter, protocol=protocol, endpoint=endpoint, headers=dict(config.headers),
                    service_name=service, sample_ratio=config.sample_ratio, capture_content=config.capture_content,
                    max_content_chars=config.max_content_chars, trace_backends=config.trace_backends,
                    exclude_paths=tuple(config.exclude_paths))


def _exporter(settings: Settings) -> Any:
    if settings.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    headers = dict(settings.headers) or None  # None: the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)HEADERS
    if settings.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError as exc:
            raise ConfigError(["telemetry over grpc needs the opentelemetry-exporter-otlp-proto-grpc package "
                               "(pip install 'coe[otlp-grpc]'), or use protocol http/protobuf"]) from exc
        return GrpcExporter(endpoint=settings.endpoint, headers=headers)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=settings.endpoint, headers=headers)


def build(settings: Settings) -> Telemetry:
    """This runtime's tracer provider (resource, sampler, batching exporter) and the ``Telemetry`` on it."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create({"service.name": settings.service_name} if settings.service_name else {})
    sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio)) if settings.sample_ratio is not None else None
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
    tracer = provider.get_tracer("coe", __version__)
    return Telemetry(tracer, settings=settings, provider=provider)


def open_telemetry(config: TelemetryConfig, environ: Mapping[str, str] | None = None) -> Telemetry:
    """``OFF``, or a tracer exporting as ``config`` and the environment say (``environ``: default
    ``os.environ``)."""
    settings = resolve(config, os.environ if environ is None else environ)
    if settings is None:
        return OFF
    telemetry = build(settings)
    log.info("tracing on: %s over %s to %s (service %s)%s", settings.exporter, settings.protocol, settings.endpoint,
             settings.service_name or "from OTEL_RESOURCE_ATTRIBUTES",
             "; prompts and completions recorded" if settings.capture_content else "")
    return telemetry
