"""The service config: one YAML file, validated with pydantic; every error names its key.

API keys never live in the file: a provider names the environment variable that holds its key,
and client keys are listed as sha256 hashes (or read in plain text from a named environment variable).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    input_price_per_1m: NonNegative = 0.0
    output_price_per_1m: NonNegative = 0.0
    context_window: int = Field(8192, gt=0)  # tokens: prompt + completion must fit
    timeout_s: Positive = 60.0  # a non-streaming call as a whole; for a stream, the wait for each chunk
    connect_timeout_s: Positive = 5.0
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

    @model_validator(mode="after")
    def _default_name(self) -> ProviderConfig:
        if not self.name:
            object.__setattr__(self, "name", self.model)
        return self

    def cost_usd(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.input_price_per_1m + output_tokens * self.output_price_per_1m) / 1e6


class Providers(Strict):
    """Each tier is an ordered fallback chain: the first provider is tried first."""

    strong: list[ProviderConfig] = Field(min_length=1)
    weak: list[ProviderConfig] = Field(min_length=1)


class RouterConfig(Strict):
    path: str = "models/default"  # a router folder; relative paths are relative to the working directory
    threads: int | None = Field(1, ge=1)  # onnxruntime intra-op threads; None: onnxruntime's default
    workers: int = Field(1, ge=1)  # threads scoring batches at the same time
    max_batch: int = Field(32, ge=1)  # most prompts scored in one onnxruntime call
    max_wait_ms: NonNegative = 0.0  # extra wait for more prompts before scoring a batch


class RoutingConfig(Strict):
    """The threshold as a raw value, or as a target fraction of strong calls; neither: the router's default."""

    threshold: float | None = Field(None, ge=0.0, le=1.0)
    strong_fraction: float | None = Field(None, ge=0.0, le=1.0)
    score_turn: Literal["last_user", "first_user", "all_user"] = "last_user"
    chars_per_token: Positive = 4.0  # token estimate for the context-window rule and cost estimates
    assumed_output_tokens: int = Field(256, ge=0)  # cost estimate when the request sets no max_tokens
    fallback_to_other_tier: bool = True  # when a whole tier fails, try the other one

    @model_validator(mode="after")
    def _one_threshold(self) -> RoutingConfig:
        if self.threshold is not None and self.strong_fraction is not None:
            raise ValueError("set threshold or strong_fraction, not both")
        return self


class RetryConfig(Strict):
    """Per provider: timeouts, connection errors, 429 and 5xx are retried with full-jitter backoff."""

    attempts: int = Field(2, ge=1)
    backoff_base_s: NonNegative = 0.2
    backoff_max_s: NonNegative = 2.0
    max_retry_after_s: NonNegative = 10.0  # a longer Retry-After moves on to the next provider at once


class CircuitConfig(Strict):
    failures: int = Field(5, ge=1)  # consecutive failed attempts that open a provider's circuit
    cooldown_s: Positive = 30.0  # then one probe request is let through (half-open)


class ClientKey(Strict):
    name: str
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
    enabled: bool = True
    keys: list[ClientKey] = []
    keys_env: str | None = None  # environment variable with comma-separated client keys in plain text

    @field_validator("keys_env")
    @classmethod
    def _key_env(cls, v: str | None) -> str | None:
        return _env_name(v)

    @model_validator(mode="after")
    def _some_key(self) -> AuthConfig:
        if self.enabled and not self.keys and not self.keys_env:
            raise ValueError("auth is enabled but no client keys are configured: add keys or keys_env, or set enabled: false")
        return self


class RateLimitConfig(Strict):
    requests_per_minute: NonNegative = 600.0  # per client key; 0: unlimited
    burst: int = Field(60, ge=1)


class LimitsConfig(Strict):
    max_body_bytes: int = Field(1 << 20, ge=1024)


class ReadinessConfig(Strict):
    probe_timeout_s: Positive = 2.0
    cache_s: NonNegative = 5.0


class ServiceConfig(Strict):
    router: RouterConfig = RouterConfig()
    routing: RoutingConfig = RoutingConfig()
    providers: Providers
    retry: RetryConfig = RetryConfig()
    circuit_breaker: CircuitConfig = CircuitConfig()
    auth: AuthConfig
    rate_limit: RateLimitConfig = RateLimitConfig()
    limits: LimitsConfig = LimitsConfig()
    readiness: ReadinessConfig = ReadinessConfig()

    def client_keys(self) -> dict[str, ClientKey]:
        """sha256 hex -> client key, with the keys of `auth.keys_env` read now (they are hashed, then dropped)."""
        out = {k.sha256: k for k in self.auth.keys}
        if self.auth.keys_env:
            raw = os.environ.get(self.auth.keys_env)
            if raw is None:
                raise ConfigError(f"auth.keys_env: environment variable {self.auth.keys_env} is not set")
            for i, key in enumerate(k.strip() for k in raw.split(",")):
                if key:
                    digest = hash_key(key)
                    out[digest] = ClientKey(name=f"{self.auth.keys_env}[{i}]", sha256=digest)
        return out

    def provider_keys(self) -> dict[str, str | None]:
        """Provider name -> API key read from its environment variable; an unset variable is an error."""
        out: dict[str, str | None] = {}
        for tier in ("strong", "weak"):
            for i, p in enumerate(getattr(self.providers, tier)):
                if p.api_key_env is None:
                    out[p.name] = None
                elif (key := os.environ.get(p.api_key_env)) is None:
                    raise ConfigError(f"providers.{tier}[{i}].api_key_env: environment variable {p.api_key_env} is not set")
                else:
                    out[p.name] = key
        return out


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_config(data: object, source: str = "config") -> ServiceConfig:
    try:
        cfg = ServiceConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = _loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required"
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{msg}") from None
    seen: set[str] = set()
    for tier in ("strong", "weak"):
        for i, p in enumerate(getattr(cfg.providers, tier)):
            if p.name in seen:
                raise ConfigError(f"{source}: providers.{tier}[{i}].name: duplicate provider name {p.name!r}; names must be unique")
            seen.add(p.name)
    return cfg


def load_config(path: str | os.PathLike) -> ServiceConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (router, routing, providers, auth, ...)")
    return parse_config(data, str(path))
