"""The registry schema: what ``experts.yaml`` may say, as pydantic models.

Unknown keys are rejected everywhere (``extra="forbid"``) so a typo is an error,
not a silently ignored setting. The top-level keys are fixed: ``backends``,
``experts``, ``auth`` (gateway), ``router``, ``pipeline``, ``rag`` (routing and
composition), ``dispatch``, ``store`` (dispatch and batch), ``limits``, ``telemetry``. Sections a later
feature owns exist now, so files written today stay valid.

This module is a leaf: it imports nothing from the project, so the routers, the
aggregators and everything else can import it. Rules that need more than one
field's value (an expert's backend exists, names are unique) or another part of
the project (``router.strategy`` names a router of ``routers.ROUTERS``,
``pipeline.strategy`` an aggregator of ``coe.aggregate.AGGREGATORS``) are checked
by ``coe.loader``, which reports each with the file's line.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
ROUTED_MODEL = "coe"
"""The model name that asks coe to route; no expert may take it."""
RESERVED_EXPERT_NAMES = frozenset({"merge"})
"""Names that are fixed routes under ``/v1/experts/``, so an expert with one could not be read or removed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def unknown_name(value: str, registry: Collection[str], what: str) -> str | None:
    """Why ``value`` is not a key of an explicit registry (routers, aggregation strategies); None if it is."""
    if value in registry:
        return None
    return f"unknown {what} {value!r} (known: {', '.join(sorted(registry))})"


def check_known(value: str, registry: Collection[str], what: str) -> str:
    """``unknown_name`` for a pydantic validator: ``value``, or ``ValueError`` saying why not."""
    problem = unknown_name(value, registry, what)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):  # not .match: "$" also matches before a trailing newline
        raise ValueError(
            f"invalid name {value!r}: use 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
        )
    return value


class LoraModule(Strict):
    name: str
    path: Path

    _name = field_validator("name")(_check_name)


class LaunchConfig(Strict):
    """A local vLLM process that coe starts, health-checks, restarts on crash and stops."""

    model: Path = Field(description="model folder (relative paths resolve against the YAML file's folder)")
    served_name: str | None = Field(None, description="name vLLM serves the base model under; default: folder name")
    lora_modules: list[LoraModule] = Field(default_factory=list)
    max_loras: int = Field(2, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1)
    max_lora_rank: int = Field(8, ge=1)
    runtime_lora_updating: bool = Field(True, description="allow /v1/load_lora_adapter (needed for POST /v1/experts)")
    zero_base_adapter: bool = Field(
        True, description="with LoRA on, serve base-model requests through a zero-weight adapter: vLLM 0.32 on CPU "
        "gives base requests that share a batch with LoRA requests wrong tokens")
    args: list[str] = Field(default_factory=list, description="extra vLLM command-line arguments")
    env: dict[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535, description="default: a free port")
    startup_timeout_s: float = Field(600.0, gt=0)
    max_restarts: int = Field(5, ge=0, description="restarts after crashes before giving up")
    log_file: Path | None = Field(None, description="default: .coe/logs/<backend>.log next to the YAML file")
    on_demand: bool = Field(
        False, description="start this server only while batch work needs it and stop it when the batch moves to "
        "another on-demand backend (one resident at a time): for whole models that cannot all be resident at once; "
        "online requests to its experts get 503 while it is down")

    def enables_lora(self) -> bool:
        return bool(self.lora_modules) or self.runtime_lora_updating


class Timeouts(Strict):
    connect_s: float = Field(5.0, gt=0)
    read_s: float = Field(300.0, gt=0, description="longest silence between two bytes from the expert")
    total_s: float = Field(600.0, gt=0, description="a whole non-streaming call")


class BackendConfig(Strict):
    """An OpenAI-compatible vLLM server: remote by ``url``, or local by ``launch``."""

    url: str | None = Field(None, description="base URL, e.g. http://gpu-1:8000/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the server's API key")
    launch: LaunchConfig | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_concurrency: int = Field(256, ge=1, description="requests in flight to this server at once")
    max_loras: int | None = Field(
        None, ge=1, description="adapters the server runs in one batch (its --max-loras); managed backends "
        "default to launch.max_loras, remote ones to what the server reports in /metrics once it is full")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="adapters the server keeps loaded (its --max-cpu-loras); default: max_loras")
    base_adapter: str | None = Field(
        None, description="send base-model requests as this zero-weight adapter (managed backends set it themselves)")
    adapter_roots: list[Path] = Field(
        default_factory=list, description="folders that API-registered adapter paths must lie under"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> BackendConfig:
        if (self.url is None) == (self.launch is None):
            raise ValueError("give exactly one of 'url' (a running server) or 'launch' (coe starts one)")
        if self.url is not None and not re.match(r"^https?://", self.url):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self


class Adapter(Strict):
    """A LoRA adapter on the expert's backend: ``name`` is what vLLM serves it as."""

    name: str
    path: Path | None = Field(None, description="adapter folder; needed to load it at run time")

    _name = field_validator("name")(_check_name)


class Cost(Strict):
    input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens")

    def of(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class ExpertConfig(Strict):
    name: str
    backend: str
    model: str = Field(description="the base model's served name on the backend")
    adapter: Adapter | None = None
    system_prompt: str | None = None
    description: str = ""
    skills: list[str] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list, description="the categories this expert serves")
    params: dict[str, Any] = Field(default_factory=dict, description="default sampling parameters")
    cost: Cost = Field(default_factory=Cost)
    tier: Literal["standard", "strong"] = "standard"
    max_tokens: int | None = Field(None, ge=1, description="the most tokens a request may ask this expert for "
                                   "(max_tokens / max_completion_tokens); default: limits.max_tokens")

    _name = field_validator("name")(_check_name)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == ROUTED_MODEL:
            raise ValueError(f"'{ROUTED_MODEL}' is reserved for routed requests")
        if value in RESERVED_EXPERT_NAMES:  # /v1/experts/merge is its own route: GET or DELETE could not reach it
            raise ValueError(f"'{value}' is reserved: /v1/experts/{value} is the admin API's merge endpoint")
        return value

    @field_validator("params")
    @classmethod
    def _no_routing_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        banned = [key for key in ("model", "messages", "stream") if key in value]
        if banned:
            raise ValueError(f"params may not set {', '.join(repr(key) for key in banned)}")
        return value

    @property
    def upstream_model(self) -> str:
        """What goes in ``model`` to the backend: the adapter's name when there is one."""
        return self.adapter.name if self.adapter else self.model


class AuthConfig(Strict):
    """Bearer keys. Both checks are on unless the file turns them off (local use only)."""

    client_auth: bool = True
    admin_auth: bool = True
    api_keys_env: str = Field("COE_API_KEYS", description="comma-separated client keys")
    admin_key_env: str = Field("COE_ADMIN_KEY", description="the admin key (registry changes)")


class CategoryConfig(Strict):
    """A level-1 category: what it covers, in words and example queries (both become training examples)."""

    description: str = ""
    examples: list[str] = Field(default_factory=list)


class SkillsConfig(Strict):
    """How level 2 finds a query's skills."""

    mode: Literal["embedding", "annotator"] = Field(
        "embedding", description="embedding: nearest skills of the profile vocabulary (no LLM call); "
        "annotator: an expert is asked for keywords, as in Symbolic-MoE")
    top: int = Field(3, ge=1, le=20, description="skills kept per query")
    min_similarity: float = Field(0.25, ge=-1, le=1, description="embedding mode: weakest skill match kept")
    strong_similarity: float = Field(
        0.55, ge=-1, le=1, description="a skill match this close counts as strong (fewer experts recruited)")
    annotator: str | None = Field(None, description="annotator mode: the expert asked for keywords")
    samples: int = Field(5, ge=1, le=20, description="annotator mode: answers sampled per query")
    min_count: int = Field(2, ge=1, description="annotator mode: keep keywords seen in at least this many samples")

    @model_validator(mode="after")
    def _annotator_named(self) -> SkillsConfig:
        if self.mode == "annotator" and not self.annotator:
            raise ValueError("mode 'annotator' needs 'annotator': the expert that names a query's skills")
        if self.min_count > self.samples:
            raise ValueError(f"min_count ({self.min_count}) cannot exceed samples ({self.samples})")
        return self


class RouterConfig(Strict):
    """Which router answers ``model="coe"`` and how the two-level router is fitted and tuned.

    Which experts serve a category comes from the experts' own ``categories``.
    """

    strategy: str = Field("default", description="a name in routers.ROUTERS")
    default_expert: str | None = Field(None, description="the expert the 'default' router picks; default: the first")
    fallbacks: int = Field(1, ge=0, description="extra candidates to try when the chosen expert is down")
    seed: int | None = Field(None, description="seeds random choices (the random router, level-2 sampling)")
    # level 1: the category classifier
    generalist: str | None = Field(None, description="the expert for queries no category fits confidently")
    categories: dict[str, CategoryConfig] = Field(default_factory=dict)
    data: Path | None = Field(None, description="labelled JSONL the classifier is fitted on")
    extra_data: list[Path] = Field(
        default_factory=list, description="more labelled JSONL in the same format, fitted on with data: e.g. "
                                          "questions phrased the way users ask, where data is exam-style")
    label: str = Field("category", description="dotted path of the category label in each data line")
    fine_label: str | None = Field(
        None, description="optional finer label (e.g. labels.subject) the linear head is trained on")
    choices_view: bool = Field(
        True, description="also train on question + choices for lines that have choices (doubles embedding time)")
    artifact: Path | None = Field(None, description="fitted classifier folder; default: .coe/router next to the YAML")
    auto_fit: bool = Field(True, description="fit the classifier when the artifact is missing or stale")
    embedder: str = Field("onnx", description="a name in coe.embed.EMBEDDERS")
    lexical_gate: bool = Field(
        False, description="skip the embedding where the fitted word model alone is sure (99.5% agreement with "
                           "the full classifier on held-out rows): 1.4-2x the throughput on text like the training "
                           "data, but it can be sure and wrong on text unlike it (code, before the MMLU example "
                           "had code in its data: -11 points); see the README")
    threshold: float = Field(0.5, ge=0, le=1, description="calibrated confidence below which the generalist joins")
    topic_change: float = Field(
        0.7, ge=0, le=1, description="confidence a new category needs to move a session off its experts")
    session_ttl_s: float = Field(1800.0, gt=0, description="how long a session keeps its experts without a turn")
    # level 2: skill-based recruitment
    k_min: int = Field(1, ge=1, description="experts recruited for an easy query")
    k_max: int = Field(3, ge=1, description="experts recruited for a hard one")
    selection: Literal["top-k", "sample"] = Field("top-k", description="sample: draw k in proportion to score")
    level2_weight: float = Field(
        0.3, ge=0, le=1, description="share of level 2 (skills x profiles) in an expert's score; the rest is level 1")
    profiles: Path | None = Field(None, description="profiles from 'coe profile'; default: .coe/profiles.json "
                                  "next to the YAML when it exists, else synthetic ones from declarations")
    tau: float = Field(0.5, gt=0, description="Symbolic-MoE temperature of global strength")
    skills: SkillsConfig = Field(default_factory=SkillsConfig)
    aggregator: str | None = Field(None, description="fixed aggregator; default: the best aggregation score")

    @model_validator(mode="after")
    def _k_bounds(self) -> RouterConfig:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) cannot exceed k_max ({self.k_max})")
        return self

    def expert_refs(self) -> dict[tuple[str, ...], str]:
        """Fields that name an expert, by location (the loader checks they exist)."""
        refs = {("default_expert",): self.default_expert, ("generalist",): self.generalist,
                ("aggregator",): self.aggregator, ("skills", "annotator"): self.skills.annotator}
        return {loc: name for loc, name in refs.items() if name is not None}


class PipelineConfig(Strict):
    """How ``model="coe"`` composes its recruits' answers (``coe.pipeline``, ``coe.aggregate``)."""

    strategy: str = Field("synthesize", description="a name in coe.aggregate.AGGREGATORS: synthesize, vote, best")
    quorum: float = Field(
        1.0, gt=0, le=1, description="aggregate once this share of the called experts answered (rounded up)")
    expert_deadline_s: float = Field(
        60.0, gt=0, description="a fan-out round waits this long at most; slower experts are skipped and recorded")
    deadline_s: float = Field(
        180.0, gt=0, description="no new escalation round starts after this long into the request")
    consensus_similarity: float | None = Field(
        0.92, ge=-1, le=1, description="answers at least this similar (MiniLM cosine) count as agreeing; "
        "null: only identical normalised answers agree")
    escalate_below: float = Field(
        0.5, ge=0, le=1, description="escalate when the largest agreeing share of the called experts is below this")
    max_rounds: int = Field(2, ge=1, le=5, description="fan-out rounds at most (1: never escalate)")
    escalate_k: int = Field(1, ge=1, le=8, description="experts added per escalation round")
    max_k: int = Field(8, ge=1, le=32, description="largest k a request may ask for")
    context_tokens: int | None = Field(
        None, ge=256, description="the aggregator's context length; default: max_model_len from its server")
    aggregator_max_tokens: int = Field(
        512, ge=1, description="room kept for the aggregator's reply when the request sets no max_tokens")


class RagConfig(Strict):
    """Retrieval: where ``coe rag ingest`` keeps indexes, how it chunks, how much a query retrieves."""

    folder: Path | None = Field(None, description="index folders live here; default: .coe/rag next to the YAML")
    index: str = Field("default", description="the index queries retrieve from")
    chunk_words: int = Field(120, ge=16, le=2000, description="words per chunk")
    overlap_words: int = Field(20, ge=0, description="words shared by consecutive chunks of one section")
    top_k: int = Field(3, ge=1, le=50, description="passages retrieved per query")
    embedder: str = Field("onnx", description="a name in coe.embed.EMBEDDERS")
    gate_threshold: float = Field(
        0.45, ge=-1, le=1, description="retrieve when the nearest passage is at least this similar (calibrate it)")
    categories: dict[str, Literal["auto", "always", "never"]] = Field(
        default_factory=dict, description="per-category gate: always or never retrieve, or auto (the threshold)")

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> RagConfig:
        if self.overlap_words >= self.chunk_words:
            raise ValueError(f"overlap_words ({self.overlap_words}) must be below chunk_words ({self.chunk_words})")
        return self


class DispatchConfig(Strict):
    retries: int = Field(2, ge=0, description="retries of a connect error or 5xx before the first byte")
    backoff_s: float = Field(0.2, ge=0, description="first retry delay; doubles each retry")
    health_interval_s: float = Field(2.0, gt=0)
    group_adapters: bool = Field(
        True, description="when a backend is busy, send waiting calls for adapters already running before calls "
        "that need another adapter loaded")
    max_wait_s: float = Field(
        5.0, gt=0, description="once a call has waited this long, models that have run this long take no new "
        "calls until it goes (bounded waiting; under a backlog, at most one adapter switch per slot per max_wait_s)")
    evict_adapters: bool = Field(
        True, description="unload the least recently used adapter (one coe can reload) before loading one "
        "past the server's max_cpu_loras")


class StoreConfig(Strict):
    """Where state and batch jobs live, and how batch workers behave."""

    redis_url: str | None = Field(None, description="default: in memory (COE_REDIS_URL overrides)")
    prefix: str = "coe"
    claim_idle_s: float = Field(
        30.0, gt=0, le=3600, description="a batch item a worker has held this long without finishing is re-claimed; "
        "also how long a cancel waits for a worker before a read ends the batch")
    worker_concurrency: int = Field(8, ge=1, le=1024, description="expert calls one worker sends a backend at once")
    batch_window: int = Field(
        1000, ge=1, le=10000, description="batch items a worker takes at once and runs in waves grouped by expert")
    embedded_worker: bool = Field(
        True, description="the API server also works on batches (needed without Redis; with Redis, "
        "set false to leave batches to 'coe worker' processes)")
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1, description="largest file POST /v1/files accepts")
    batch_expiry_s: float | None = Field(
        None, gt=0, description="seconds a new batch has before it expires; default: its completion_window "
        "(24h). For tests: OpenAI accepts only 24h")


class ExplorerConfig(Strict):
    """The routing explorer (``/ui``, ``coe.runtime.explorer``): what each replica keeps in the state store
    for the page, bounded, so that the page shows every replica's decisions and load."""

    enabled: bool = Field(True, description="record decisions and publish this replica's load for the page")
    decisions: int = Field(
        200, ge=1, le=10_000, description="recent routed decisions kept per replica (a ring: the oldest is "
        "overwritten); the page shows the newest across replicas")
    keep_queries: bool = Field(
        False, description="keep each decision's query text (truncated) for the page; off: the page shows "
        "'(not kept)', like traces, which keep prompts only when telemetry.capture_content is on")
    query_chars: int = Field(160, ge=1, le=4096, description="with keep_queries: characters kept per query")
    publish_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often a replica writes its new decisions and its load to the store")
    retention_s: float = Field(
        3600, gt=0, description="entries older than this (a replica that stopped) are dropped when read")


class TelemetryConfig(Strict):
    """OpenTelemetry traces (``coe.telemetry``). Off unless ``enabled`` or the standard ``OTEL_*`` variables
    switch them on; a key left out here falls back to its ``OTEL_*`` variable, then to the default."""

    enabled: bool | None = Field(
        None, description="true/false decide; null (default): on when OTEL_TRACES_EXPORTER names an exporter "
        "or an OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set. OTEL_SDK_DISABLED=true always turns tracing off")
    exporter: Literal["otlp", "console"] | None = Field(
        None, description="default: OTEL_TRACES_EXPORTER, else otlp")
    endpoint: str | None = Field(
        None, description="the collector's OTLP base URL (http/protobuf: /v1/traces is added); default: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as is), OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4318 "
        "(http) or :4317 (grpc)")
    protocol: Literal["http/protobuf", "grpc"] | None = Field(
        None, description="default: OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, else http/protobuf; grpc needs the "
        "opentelemetry-exporter-otlp-proto-grpc package")
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra headers to the collector (also: OTEL_EXPORTER_OTLP_HEADERS)")
    service_name: str | None = Field(None, description="default: OTEL_SERVICE_NAME, else coe")
    sample_ratio: float | None = Field(
        None, ge=0, le=1, description="share of new traces kept (parent-based: an incoming traceparent's "
        "decision is followed); default: OTEL_TRACES_SAMPLER(_ARG), else every trace")
    capture_content: bool = Field(
        False, description="record prompts and completions on the spans that call a model")
    max_content_chars: int = Field(
        4096, ge=0, description="with capture_content: characters kept per span and direction, the rest cut")
    trace_backends: bool = Field(
        True, description="start managed vLLM backends with --otlp-traces-endpoint (their spans join coe's "
        "traces); a launch whose args already name the flag is left alone")
    exclude_paths: list[str] = Field(
        default_factory=lambda: ["/health", "/metrics"], description="HTTP paths (prefixes) given no server span")


BackendName = Annotated[str, AfterValidator(_check_name)]
"""A backend's key in ``backends``; checked per key, so each bad name is reported where it is."""


class LimitsConfig(Strict):
    """What one request may ask for. A body over ``max_body_bytes`` gets 413 before it is read whole; the
    rest get 400 after parsing and before any work, both in OpenAI's error shape."""

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="a JSON request body, in bytes")
    max_messages: int = Field(2048, ge=1, description="messages in one chat request")
    max_tokens: int = Field(65536, ge=1, description="max_tokens / max_completion_tokens, unless the expert "
                            "sets its own max_tokens")


class RegistryConfig(Strict):
    backends: dict[BackendName, BackendConfig] = Field(default_factory=dict)
    experts: list[ExpertConfig] = Field(default_factory=list)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    rag: RagConfig = Field(default_factory=RagConfig)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    explorer: ExplorerConfig = Field(default_factory=ExplorerConfig)

    def expert(self, name: str) -> ExpertConfig | None:
        for e in self.experts:
            if e.name == name:
                return e
        return None
