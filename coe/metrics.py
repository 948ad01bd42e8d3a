"""Prometheus metrics, one registry per app (no globals, so tests and several apps
in one process do not collide). Every label has a bounded set of values: route
kind, status class, expert and backend names from the registry, fixed outcome words.

Gauges say how to add up over processes (``multiprocess_mode``), used only under
``coe serve --workers N`` (``services.workers``).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("coe_requests_total", "Chat requests by route and HTTP status",
                                ["route", "status"], registry=r)
        self.request_latency = Histogram("coe_request_duration_seconds", "Whole-request latency",
                                         ["route", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("coe_time_to_first_token_seconds", "Streaming: time to the first chunk",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("coe_requests_in_flight", "Chat requests being answered", registry=r,
                               multiprocess_mode="livesum")
        self.expert_calls = Counter("coe_expert_calls_total", "Calls to experts by outcome",
                                    ["expert", "outcome"], registry=r)
        self.expert_latency = Histogram("coe_expert_call_duration_seconds", "One expert call",
                                        ["expert"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("coe_tokens_total", "Tokens by expert and kind (prompt, completion)",
                              ["expert", "kind"], registry=r)
        self.cost = Counter("coe_cost_usd_total", "Cost in USD at the experts' configured prices",
                            ["expert"], registry=r)
        self.upstream_errors = Counter("coe_upstream_errors_total", "Failed attempts against a backend",
                                       ["backend", "kind"], registry=r)
        self.fallbacks = Counter("coe_fallbacks_total", "Requests answered by a later candidate",
                                 ["expert"], registry=r)
        self.backend_up = Gauge("coe_backend_up", "1 when the backend is healthy", ["backend"], registry=r,
                                multiprocess_mode="livemin")
        self.registry_reloads = Counter("coe_registry_reloads_total", "Registry file reloads by result",
                                        ["result"], registry=r)
        self.consensus_skips = Counter("coe_consensus_skips_total",
                                       "Aggregator calls skipped because the experts agreed", registry=r)
        self.escalations = Counter("coe_escalations_total", "Escalation rounds (experts disagreed)", registry=r)
        self.pipeline_late = Counter("coe_pipeline_late_experts_total",
                                     "Expert calls cancelled at the quorum or the round's deadline",
                                     ["expert"], registry=r)
        self.retrievals = Counter("coe_retrievals_total", "Retrieval gate decisions by outcome (retrieved, skipped)",
                                  ["outcome"], registry=r)
        self.experts_registered = Gauge("coe_experts", "Experts in the registry by source", ["source"], registry=r,
                                        multiprocess_mode="livemax")
        self.adapter_loads = Counter("coe_adapter_loads_total", "LoRA adapters coe loaded into a server",
                                     ["backend"], registry=r)
        self.adapter_evictions = Counter("coe_adapter_evictions_total",
                                         "LoRA adapters coe unloaded to make room (least recently used)",
                                         ["backend"], registry=r)
        self.model_loads = Counter("coe_model_loads_total", "Whole-model experts brought up for offline work",
                                   ["backend"], registry=r)
        self.batch_worker_up = Gauge("coe_batch_worker_up",
                                     "1 while this process's batch worker loop runs (0: retrying or stopped); "
                                     "with several workers, how many run", registry=r, multiprocess_mode="livesum")
        self.batch_worker_errors = Gauge("coe_batch_worker_errors",
                                         "Failed (and retried) batch worker loop iterations since start", registry=r,
                                         multiprocess_mode="livesum")
        self.queue_depth = Gauge("coe_dispatch_queue_depth", "Expert calls waiting for a backend slot",
                                 ["expert"], registry=r, multiprocess_mode="livesum")
        self.queue_wait = Histogram("coe_dispatch_wait_seconds", "Time an expert call waited for a backend slot",
                                    ["expert"], registry=r,
                                    buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        # Virtual keys (``coe.keys``): labelled by the key's name, which an admin chose; never its secret.
        self.key_requests = Counter("coe_key_requests_total", "Requests by virtual key and outcome (admitted, "
                                    "limited)", ["key", "outcome"], registry=r)
        self.key_tokens = Counter("coe_key_tokens_total", "Tokens used by virtual key", ["key"], registry=r)
        self.key_cost = Counter("coe_key_cost_usd_total", "Spend by virtual key at the experts' prices", ["key"],
                                registry=r)

    def record_usage(self, expert: str, usage: dict[str, int] | None, cost: float | None) -> None:
        if usage:
            self.tokens.labels(expert, "prompt").inc(usage.get("prompt_tokens", 0))
            self.tokens.labels(expert, "completion").inc(usage.get("completion_tokens", 0))
        if cost:
            self.cost.labels(expert).inc(cost)

    def render(self) -> bytes:
        """This registry's samples, or, under ``coe serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set
        before the process started), every worker's added up from that folder."""
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if folder and values.ValueClass is not values.MutexValue:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged, folder)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(merged))
        return bytes(generate_latest(self.registry))
