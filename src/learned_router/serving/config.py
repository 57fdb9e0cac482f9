"""The service config: one YAML file, validated with pydantic; every error names its key.

API keys never live in the file: a provider names the environment variable that holds its key,
and client keys are listed as sha256 hashes (or read in plain text from a named environment variable).

The file paths in it (PATHS: the router folder, the stores, the drift reference, the task types file) are relative to
the folder of the config file, whatever the working directory (a config passed as a dict to `parse_config`: to the
working directory).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import first_error
from ..outputs import GENERIC
from ..prices import CHARS_PER_TOKEN, cost_usd
from ..yamlfile import load_yaml
from .errors import ConfigError

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
TIER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")  # provider names and models: headers, metric labels
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    """No unknown keys, no coercion (a boolean is true or false, never "yes"), no infinite or NaN number."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _env_name(v: str | None) -> str | None:
    if v is not None and not ENV_NAME.match(v):
        raise ValueError(f"must be the name of an environment variable (letters, digits, _), got {v!r}")
    return v


class ProviderConfig(Strict):
    """One OpenAI-compatible upstream. Prices are USD per 1M tokens."""

    name: str = ""  # defaults to `model`; names must be unique (they label metrics and errors)
    base_url: str  # e.g. https://api.openai.com/v1 ; requests go to {base_url}/chat/completions
    api_key_env: str | None = None  # environment variable holding the key; None: send no Authorization
    model: str  # the upstream model id sent to the provider
    input_price_per_1m: NonNegative = 0.0  # USD per 1M prompt tokens
    output_price_per_1m: NonNegative = 0.0  # USD per 1M completion tokens
    context_window: int = Field(8192, gt=0)  # tokens: prompt + completion must fit
    timeout_s: Positive = 60.0  # a non-streaming call as a whole; for a stream, the wait for each chunk
    connect_timeout_s: Positive = 5.0  # to open a connection to the provider
    stream_usage: bool = True  # ask for the final usage chunk of a stream (stream_options.include_usage)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"must be an http(s) URL such as https://api.openai.com/v1, got {v!r}")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, v: str | None) -> str | None:
        return _env_name(v)

    @field_validator("name", "model")
    @classmethod
    def _safe(cls, v: str) -> str:
        if v and not SAFE_NAME.match(v):
            raise ValueError(
                f"must be 1-128 ASCII letters, digits or . _ : / @ + - (it goes into headers and metrics), got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _default_name(self) -> ProviderConfig:
        if not self.name:
            object.__setattr__(self, "name", self.model)
        return self

    def cost_usd(self, input_tokens: float, output_tokens: float) -> float:
        return cost_usd(input_tokens, output_tokens, self.input_price_per_1m, self.output_price_per_1m)


class TierConfig(Strict):
    """One tier: an ordered fallback chain of providers, and the router output that gives its pass chance."""

    name: str  # labels headers, metrics and errors
    score: str | None = None  # a router output name (its model); None: always passes (the trusted top tier)
    providers: list[ProviderConfig] = Field(min_length=1)

    @property
    def graded_as(self) -> str:
        """The model name of its graded answers (`label`, shadow grading): its router output, else (unscored, or
        scored by `generic`) its first provider's model."""
        return self.score if self.score not in (None, GENERIC) else self.providers[0].model

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TIER_NAME.match(v):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' (it goes into headers), got {v!r}")
        return v


class RouterConfig(Strict):
    """The router folder and how it scores: onnxruntime threads, micro-batches."""

    path: str = "models/default"  # a router folder; a relative path is from the config file's folder
    threads: int | None = Field(1, ge=1)  # onnxruntime intra-op threads; None: onnxruntime's default
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = (
        "auto"  # threads scoring batches at once; auto: one per usable core
    )
    max_batch: int = Field(32, ge=1)  # most prompts handed to the scorer at once (int8: one onnxruntime call each)
    max_wait_ms: NonNegative = 0.0  # extra wait for more prompts before scoring a batch

    @model_validator(mode="after")
    def _auto_workers(self) -> RouterConfig:
        if self.workers == "auto":
            object.__setattr__(self, "workers", usable_cores())
        return self


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's --cpus)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


class RoutingConfig(Strict):
    """The threshold on pass chances as a raw value, or (binary routers) as a target fraction of strong calls;
    neither: the router's default."""

    threshold: float | None = Field(None, ge=0.0, le=1.0)  # the cheapest tier whose pass chance >= this
    strong_fraction: float | None = Field(None, ge=0.0, le=1.0)  # instead: the share of strong calls (one scored tier)
    score_turn: Literal["last_user", "first_user", "all_user"] = "last_user"  # the turn(s) the router scores
    chars_per_token: Positive = CHARS_PER_TOKEN  # token estimate for the context-window rule and cost estimates
    assumed_output_tokens: int = Field(256, ge=0)  # cost estimate when the request sets no max_tokens
    fallback_to_other_tiers: bool = True  # when the chosen tier's chain fails: the pricier tiers, then the cheaper

    @model_validator(mode="after")
    def _one_threshold(self) -> RoutingConfig:
        if self.threshold is not None and self.strong_fraction is not None:
            raise ValueError("set threshold or strong_fraction, not both")
        return self


class BudgetConfig(Strict):
    """Spend per UTC calendar period; the pacer lowers the threshold to keep within it (and raises it behind pace only
    up to max_threshold, where one is set)."""

    period: Literal["day", "month"]  # the UTC calendar period the budget covers
    usd: Positive  # the budget per period
    store: str = "router-spend.sqlite"  # sqlite file of the spend; a relative path is from the config file's folder
    min_threshold: float = Field(0.0, ge=0.0, le=1.0)  # the lowest threshold pacing may set
    max_threshold: float | None = Field(
        None, ge=0.0, le=1.0
    )  # null: pacing never raises a request's threshold (the budget is a cap); a number: behind pace it may, up to this, spending the budget left on pricier tiers
    window: int = Field(500, ge=10)  # recent chat requests the pacer predicts costs on
    warmup_requests: int = Field(20, ge=1)  # requests seen (this process and period) before the pacer moves

    @model_validator(mode="after")
    def _range(self) -> BudgetConfig:
        if self.max_threshold is not None and self.min_threshold > self.max_threshold:
            raise ValueError(f"min_threshold {self.min_threshold} is above max_threshold {self.max_threshold}")
        return self


class LatencyConfig(Strict):
    """Each provider's p95 latency over its recent calls (successes and timeouts)."""

    window: int = Field(50, ge=1)  # most recent calls kept per provider
    max_age_s: Positive = 300.0  # older calls are forgotten
    min_samples: int = Field(5, ge=1)  # fewer recent calls: p95 unknown, the provider counts as fitting any budget


class RetryConfig(Strict):
    """Per provider: timeouts, connection errors, 429 and 5xx are retried with full-jitter backoff."""

    attempts: int = Field(2, ge=1)  # calls per provider before the next one, the first included
    backoff_base_s: NonNegative = 0.2  # the first retry waits up to this, doubling each time
    backoff_max_s: NonNegative = 2.0  # the longest wait between two attempts
    max_retry_after_s: NonNegative = 10.0  # a longer Retry-After moves on to the next provider at once


class CircuitConfig(Strict):
    """A provider that keeps failing is skipped for a cool-down, then probed."""

    failures: int = Field(5, ge=1)  # consecutive failed attempts that open a provider's circuit
    cooldown_s: Positive = 30.0  # then one probe request is let through (half-open)
    probe_every_s: Positive | None = (
        5.0  # a half-open provider no request reaches is probed this often (GET {base_url}/models); null: requests only
    )


class ClientKey(Strict):
    """One client's bearer key, as its hash."""

    name: str  # the client, in logs and metrics
    sha256: str  # hex sha256 of the bearer token: printf %s "$KEY" | sha256sum
    requests_per_minute: float | None = Field(None, gt=0)  # overrides rate_limit.requests_per_minute

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.lower()
        if not SHA256_HEX.match(v):
            raise ValueError("must be 64 hex digits: the sha256 of the key, never the key itself")
        return v


class AuthConfig(Strict):
    """Client bearer keys: a request without a listed key gets 401."""

    enabled: bool = True  # false: no client key asked (a trusted network only)
    keys: list[ClientKey] = []  # clients and the hashes of their keys
    keys_env: str | None = None  # environment variable with comma-separated client keys in plain text

    @field_validator("keys_env")
    @classmethod
    def _key_env(cls, v: str | None) -> str | None:
        return _env_name(v)

    @model_validator(mode="after")
    def _some_key(self) -> AuthConfig:
        if self.enabled and not self.keys and not self.keys_env:
            raise ValueError(
                "auth is enabled but no client keys are configured: add keys or keys_env, or set enabled: false"
            )
        return self


class RateLimitConfig(Strict):
    """A token bucket per client key; beyond it, 429 with Retry-After."""

    requests_per_minute: NonNegative = 600.0  # per client key; 0: unlimited
    burst: int = Field(60, ge=1)  # requests a key may send at once before the rate applies


class LimitsConfig(Strict):
    """Body size limits (413 for a client, a failed call for a provider), how long a client may take to send its body
    and how long a stream may run."""

    max_body_bytes: int = Field(1 << 20, ge=1024)  # a client's request
    max_upstream_body_bytes: int = Field(8 << 20, ge=1024)  # a provider's answer (a stream: all of it)
    max_stream_seconds: Positive = 600.0  # a stream still going this long after the request came in is ended
    body_read_seconds: Positive = 30.0  # a request body not complete this long after its headers is refused (408)


class ReadinessConfig(Strict):
    """/readyz: each provider answers GET {base_url}/models and its circuit is not open."""

    probe_timeout_s: Positive = 2.0  # the wait for each provider's answer
    cache_s: NonNegative = 5.0  # a provider's result is reused this long


class StateConfig(Strict):
    """Where breakers, rate limits and budget spend live: per process (sqlite for the spend) or in one Redis."""

    backend: Literal["sqlite", "redis"] = "sqlite"  # sqlite: per process (spend per host); redis: shared by replicas
    url: str | None = None  # redis://host:port/db or rediss://host:port/db (TLS); never a password
    password_env: str | None = None  # environment variable holding the Redis password
    prefix: str = Field("learned-router:", min_length=1, max_length=64)  # of every key this service writes
    timeout_s: Positive = 0.25  # a Redis call slower than this counts as Redis being down
    retry_s: Positive = 1.0  # how often a lost Redis is tried again, and the shared breakers and spend re-read
    unavailable_at_start: Literal["exit", "local"] = (
        "exit"  # Redis down at start-up: exit 2, or start on per-process state
    )

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^rediss?://[^/\s@]+(/[0-9]{1,2})?/?$", v):
            raise ValueError(
                f"must be redis://host:port/db or rediss://host:port/db (the password goes in password_env), got {v!r}"
            )
        return v

    @field_validator("password_env")
    @classmethod
    def _password_env(cls, v: str | None) -> str | None:
        return _env_name(v)

    @model_validator(mode="after")
    def _backend(self) -> StateConfig:
        if self.backend == "redis" and self.url is None:
            raise ValueError("backend redis needs url: redis://host:port/db")
        if self.backend == "sqlite" and (self.url is not None or self.password_env is not None):
            raise ValueError("url and password_env are for backend: redis")
        return self

    def password(self) -> str | None:
        if self.password_env is None:
            return None
        if (value := os.environ.get(self.password_env)) is None:
            raise ConfigError(f"state.password_env: environment variable {self.password_env} is not set")
        return value


class TaskTypesConfig(Strict):
    """Task types (code, math, writing, ...): inferred from the router's prompt embedding, or named by the request."""

    enabled: bool = True  # type each request (inference needs a router exported with its embedding output)
    file: str | None = (
        None  # a task types YAML (relative: from the config file's folder); null: the router folder's task_types.yaml, else the package's
    )
    threshold_offsets: dict[
        str, Annotated[float, Field(ge=-1, le=1)]
    ] = {}  # type -> added to its threshold (clipped to [0, 1])
    min_tier: dict[str, str] = {}  # type -> the cheapest tier its requests may go to (e.g. code: strong)


class DriftConfig(Strict):
    """Drift: the last `window` routed requests' pass chances, task types and tiers against a reference, as a
    population-stability index (PSI) per signal."""

    enabled: bool = True  # keep the window and report router_drift_psi
    window: int = Field(1000, ge=20)  # most recent routed requests compared with the reference
    min_requests: int = Field(200, ge=10)  # fewer in the window: no PSI (NaN)
    threshold: Positive = 0.25  # a PSI above this is drift: logged, and alerted on by serving/alerts.yaml
    reference: str | None = (
        None  # JSON file (relative: from the config file's folder): read at start when it exists; POST /v1/drift/reference writes it
    )

    @model_validator(mode="after")
    def _min(self) -> DriftConfig:
        if self.min_requests > self.window:
            raise ValueError(f"min_requests {self.min_requests} is above window {self.window}")
        return self


class TrafficConfig(Strict):
    """The traffic record: each chat request's scored text (or its hash), decision, provider, tokens, cost, latency
    and outcome, with the client's feedback beside it, in a sqlite file (written off the event loop)."""

    store: str = "router-traffic.sqlite"  # sqlite file (relative: from the config file's folder); share it between the processes of a host
    text: Literal["full", "hash", "none"] = "full"  # the scored text as sent, its sha256 only, or neither
    retention_days: Positive | None = 30.0  # older requests (and their feedback) are deleted; null: kept
    max_rows: int | None = Field(1_000_000, ge=1)  # beyond this many requests the oldest are deleted; null: no cap
    never_record: list[str] = []  # data classes whose requests are never recorded, not even their text's hash
    queue_size: int = Field(10_000, ge=1)  # requests waiting to be written; beyond it they are dropped and counted
    feedback_per_minute: Positive | None = (
        60.0  # a client's POST /v1/feedback calls a minute (at most a minute's worth at once); beyond it 429; null: no cap
    )


class AdminConfig(Strict):
    """The admin endpoints (/admin/router, /admin/reload, /admin/rollback): bearer keys of their own, as hashes."""

    keys: list[ClientKey] = []  # admins and the sha256 of their keys (never a client key)
    keys_env: str | None = None  # environment variable with comma-separated admin keys in plain text

    @field_validator("keys_env")
    @classmethod
    def _key_env(cls, v: str | None) -> str | None:
        return _env_name(v)


class JudgeConfig(Strict):
    """The judge of `learned-router label`: a model that grades the answers of the tiers (the rubric: the docstring of
    src/learned_router/judge.py; what a run sends and costs: serving/DEPLOY.md)."""

    provider: ProviderConfig  # the judge's OpenAI-compatible endpoint, model, key variable, prices and timeouts
    mode: Literal["single", "pairwise"] = (
        "single"  # single: each answer rated 1-10 against the strongest's; pairwise: each against the strongest's, in both orders
    )
    max_tokens: int = Field(512, ge=1)  # of the judge's answer (its explanation and verdict)
    answer_max_tokens: int = Field(512, ge=1)  # max_tokens sent to the models compared
    concurrency: int = Field(
        4, ge=1
    )  # requests in flight at most, answers and verdicts together (label --concurrency overrides)


class QualityConfig(Strict):
    """Shadow grading: for a sampled share of routed chat requests, once the client has its answer and off the
    request path, the service also asks the tier it did not use (the strongest, or the cheapest when it went to the
    strongest) and has the `judge` grade both answers. GET /v1/quality and the router_quality_* gauges give the
    quality retained and the cost against sending everything to the strongest tier (serving/DEPLOY.md)."""

    sample: float = Field(0.02, gt=0, le=1)  # share of routed chat requests shadow-graded
    store: str = "router-quality.sqlite"  # sqlite file of the graded requests (relative: from the config's folder)
    max_usd_per_day: Positive = 5.0  # shadow answers and judge calls together, per UTC day; beyond it none start
    exclude_clients: list[str] = []  # client names never shadow-graded
    exclude_tiers: list[str] = []  # tiers never called for a shadow answer, nor graded
    target: float = Field(0.97, gt=0, le=1)  # retained quality to keep: the alert's bar and the suggested threshold's
    window_days: Positive | None = 7.0  # the estimate reads the graded requests of this many days; null: all
    retention_days: Positive | None = 90.0  # older graded requests are deleted from the store; null: kept
    concurrency: int = Field(2, ge=1)  # shadow jobs in flight at most
    queue_size: int = Field(100, ge=1)  # sampled requests waiting; beyond it they are dropped and counted
    refresh_s: Positive = 60.0  # how often the estimate (GET /v1/quality, the gauges) is recomputed from the store


def api_key(provider: ProviderConfig, where: str) -> str | None:
    """The provider's API key from its environment variable (None: it needs none); ConfigError naming `where` when
    the variable is not set."""
    if provider.api_key_env is None:
        return None
    if (key := os.environ.get(provider.api_key_env)) is None:
        raise ConfigError(f"{where}.api_key_env: environment variable {provider.api_key_env} is not set")
    return key


class ServiceConfig(Strict):
    """The whole file: sections, of which `tiers` and `auth` are required."""

    router: RouterConfig = RouterConfig()
    routing: RoutingConfig = RoutingConfig()
    tiers: list[TierConfig]  # cheapest first
    budget: BudgetConfig | None = None
    latency: LatencyConfig = LatencyConfig()
    data_classes: dict[
        str, list[str]
    ] = {}  # class -> the providers that may receive it (the judge's name too, for `label`)
    retry: RetryConfig = RetryConfig()
    circuit_breaker: CircuitConfig = CircuitConfig()
    auth: AuthConfig
    rate_limit: RateLimitConfig = RateLimitConfig()
    limits: LimitsConfig = LimitsConfig()
    readiness: ReadinessConfig = ReadinessConfig()
    api_docs: bool = False  # serve /docs, /redoc and /openapi.json (they need no client key)
    state: StateConfig = StateConfig()
    task_types: TaskTypesConfig = TaskTypesConfig()
    drift: DriftConfig = DriftConfig()
    judge: JudgeConfig | None = None  # the judge of `learned-router label`; none: label refuses to run
    traffic: TrafficConfig | None = None  # record chat requests and feedback (off unless the block is there)
    quality: QualityConfig | None = None  # shadow grading of a sample of requests by the judge (off unless there)
    admin: AdminConfig = AdminConfig()  # no keys: the admin endpoints answer 404 (SIGHUP still reloads)

    @field_validator("tiers")
    @classmethod
    def _two_tiers(cls, v: list[TierConfig]) -> list[TierConfig]:
        if len(v) < 2:
            raise ValueError(f"a router needs at least 2 tiers, cheapest first; got {len(v)}")
        return v

    def client_keys(self) -> dict[str, ClientKey]:
        """sha256 hex -> client key, with the keys of `auth.keys_env` read now (they are hashed, then dropped)."""
        return read_keys(self.auth.keys, self.auth.keys_env, "auth")

    def admin_keys(self) -> dict[str, ClientKey]:
        """sha256 hex -> admin key, likewise from `admin.keys` and `admin.keys_env`."""
        return read_keys(self.admin.keys, self.admin.keys_env, "admin")

    def provider_keys(self) -> dict[str, str | None]:
        """Provider name -> API key read from its environment variable; an unset variable is an error."""
        return {
            p.name: api_key(p, f"tiers[{t}].providers[{i}]")
            for t, tier in enumerate(self.tiers)
            for i, p in enumerate(tier.providers)
        }


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(keys: list[ClientKey], keys_env: str | None, section: str) -> dict[str, ClientKey]:
    out = {k.sha256: k for k in keys}
    if keys_env:
        raw = os.environ.get(keys_env)
        if raw is None:
            raise ConfigError(f"{section}.keys_env: environment variable {keys_env} is not set")
        for i, key in enumerate(k.strip() for k in raw.split(",")):
            if key:
                digest = hash_key(key)
                out[digest] = ClientKey(name=f"{keys_env}[{i}]", sha256=digest)
    return out


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _near_key(loc: tuple) -> str | None:
    """The key of the config model at loc[:-1] closest to the unknown key loc[-1], if one is close."""
    import difflib
    import typing

    model: type[BaseModel] | None = ServiceConfig
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue  # a list's item: the model is the list's
        field = model.model_fields.get(part)
        kinds = [field.annotation] if field else []
        model = None
        while kinds:
            kind = kinds.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                model = kind
                break
            kinds.extend(typing.get_args(kind))
    if model is None or not isinstance(loc[-1], str):
        return None
    near = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return near[0] if near else None


def parse_config(data: object, source: str = "config") -> ServiceConfig:
    try:
        cfg = ServiceConfig.model_validate(data)
    except ValidationError as e:
        loc, msg = first_error(e)
        where = _loc(loc)
        if e.errors()[0]["type"] == "extra_forbidden" and (near := _near_key(loc)):
            msg += f"; did you mean {near!r}?"
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{msg}") from None
    tiers: set[str] = set()
    providers: set[str] = set()
    for t, tier in enumerate(cfg.tiers):
        if tier.name in tiers:
            raise ConfigError(f"{source}: tiers[{t}].name: duplicate tier name {tier.name!r}; names must be unique")
        tiers.add(tier.name)
        for i, p in enumerate(tier.providers):
            if p.name in providers:
                raise ConfigError(
                    f"{source}: tiers[{t}].providers[{i}].name: duplicate provider name {p.name!r}; names must be unique"
                )
            providers.add(p.name)
    for task, tier in cfg.task_types.min_tier.items():
        if tier not in tiers:
            raise ConfigError(
                f"{source}: task_types.min_tier.{task}: unknown tier {tier!r}; tiers: {', '.join(t.name for t in cfg.tiers)}"
            )
    judge = (
        {cfg.judge.provider.name} - providers if cfg.judge is not None else set()
    )  # label's judge may be allowed too
    for cls, allowed in cfg.data_classes.items():
        if not allowed:
            raise ConfigError(f"{source}: data_classes.{cls}: list the providers that may receive this class")
        for i, name in enumerate(allowed):
            if name not in providers | judge:
                raise ConfigError(
                    f"{source}: data_classes.{cls}[{i}]: unknown provider {name!r}; providers: "
                    f"{', '.join(sorted(providers | judge))}"
                )
    for i, cls in enumerate(cfg.traffic.never_record if cfg.traffic else []):
        if cls not in cfg.data_classes:
            raise ConfigError(
                f"{source}: traffic.never_record[{i}]: unknown data class {cls!r}; classes: "
                f"{', '.join(sorted(cfg.data_classes)) or 'none'}"
            )
    if cfg.quality is not None:
        if cfg.judge is None:
            raise ConfigError(f"{source}: quality: shadow grading needs a judge block (judge.provider)")
        for i, tier in enumerate(cfg.quality.exclude_tiers):
            if tier not in tiers:
                raise ConfigError(
                    f"{source}: quality.exclude_tiers[{i}]: unknown tier {tier!r}; tiers: "
                    f"{', '.join(t.name for t in cfg.tiers)}"
                )
    if cfg.judge is not None and cfg.judge.provider.name in providers:
        raise ConfigError(
            f"{source}: judge.provider.name: {cfg.judge.provider.name!r} is also a tier's provider; give the "
            "judge a name of its own (name: judge)"
        )
    return cfg


PATHS = (
    ("router", "path"),
    ("budget", "store"),
    ("traffic", "store"),
    ("quality", "store"),
    ("drift", "reference"),
    ("task_types", "file"),
)


def paths_from(cfg: ServiceConfig, folder: Path) -> ServiceConfig:
    """`cfg` with its relative file paths (PATHS) taken from `folder`."""
    update = {}
    for section, key in PATHS:
        block = getattr(cfg, section)
        value = None if block is None else getattr(block, key)
        if value is not None and not Path(value).is_absolute():
            update[section] = block.model_copy(update={key: str(folder / value)})
    return cfg.model_copy(update=update)


def load_config(path: str | os.PathLike) -> ServiceConfig:
    """The config of a YAML file; its relative paths are from the file's folder."""
    path = Path(path)
    data = load_yaml(path, ConfigError, "config file not found")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (router, routing, tiers, auth, ...)")
    return paths_from(parse_config(data, str(path)), path.parent)
