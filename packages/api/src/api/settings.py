"""Service settings, read from the environment (and tests can build them with other values).

Depends on nothing of the service: every other module may read it. ``docs/configuration.md``
says which settings an operator decides (and when) and which are tuning."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_ENDPOINT = "https://huggingface.co"
MIN_KEY_LENGTH = 16
_HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")


def _split_keys(value: str) -> list[str]:
    """Several keys, comma-separated (to rotate one without downtime); each without its name."""
    return [named_key(part)[1] for part in _split_entries(value)]


def _split_entries(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


_KEY_NAME = re.compile(r"([A-Za-z0-9_.-]{1,64}):(.+)")


def named_key(entry: str) -> tuple[str | None, str]:
    """A key of MODELS_API_KEY as (name, key): ``alice:<key>`` names it (the history shows the
    name, never the key); a key alone has no name."""
    match = _KEY_NAME.fullmatch(entry)
    if match is None or len(match.group(2)) < MIN_KEY_LENGTH:
        return None, entry
    return match.group(1), match.group(2)


def display_url(url: str) -> str:
    """The URL as it may be shown: without a user or password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def default_cache_dir() -> Path:
    """The Hub cache as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else the default."""
    if hub_cache := os.environ.get("HF_HUB_CACHE"):
        return Path(hub_cache).expanduser()
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


class Settings(BaseSettings):
    """Configuration of the model-management service.

    The Hub's own variables (``HF_HUB_CACHE``, ``HF_HOME``, ``HF_ENDPOINT``, ``HF_TOKEN``) are read
    under their usual names; the service's own settings carry the ``MODELS_`` prefix.
    """

    # Errors never echo a value: a key or a token would land in the log of a failed start.
    model_config = SettingsConfigDict(
        env_prefix="MODELS_", extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    # -- what an operator decides (docs/configuration.md says when to set each) --------------

    cache_dir: Path = Field(default_factory=default_cache_dir)
    hf_endpoint: str = Field(default=DEFAULT_ENDPOINT, validation_alias="HF_ENDPOINT")
    hf_token: SecretStr | None = Field(default=None, validation_alias="HF_TOKEN")
    api_key: SecretStr | None = Field(
        default=None,
        description="bearer key(s), comma-separated, that requests which change something need"
        " (download, delete, verify, prune); unset: open",
    )
    read_api_key: SecretStr | None = Field(
        default=None,
        description="bearer key(s), comma-separated, that reads need (a write key also does);"
        " unset: reads are open",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated host names the service is reached by besides localhost,"
        " this machine's name and IP addresses (a reverse proxy's public name, a DNS alias);"
        " a request naming another host gets a 400 (DNS rebinding). '*': any",
    )
    vllm_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated base URLs of the vLLM servers using this cache (their"
        " GET /v1/models says what they serve: DELETE and prune keep it)",
    )
    vllm_api_key: SecretStr | None = Field(
        default=None, description="the bearer key of those servers (vLLM's --api-key), if any"
    )
    default_files: Literal["all", "vllm"] = Field(
        default="all",
        description="the files of a revision downloaded without a selection, and of one no"
        " download of the service recorded a selection for: 'all' (every file) or 'vllm' (what"
        " vLLM's default loader reads)",
    )
    max_download_bytes_per_second: int = Field(
        default=0,
        ge=0,
        description="the total rate of all downloads of this service, shared fairly between the"
        " running ones; 0: no cap (changeable at run time: PUT /api/models/settings/bandwidth)",
    )
    max_concurrent_downloads: int = Field(default=3, ge=1, le=64)
    max_queued_downloads: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="downloads beyond MODELS_MAX_CONCURRENT_DOWNLOADS wait in a queue of this"
        " many (first in, first out); 0: refused with 429, as the spec has it",
    )
    space_margin_bytes: int = Field(
        default=512 * 1024 * 1024, ge=0, description="free space kept beyond what downloads need"
    )
    cache_budget_bytes: int | None = Field(
        default=None,
        ge=0,
        description="the most the cache may hold: a download that would exceed it (or the free"
        " space) first evicts the least recently used revisions that are not pinned, served by"
        " vLLM or downloading; unset: nothing is ever evicted",
    )
    update_calls_per_minute: int = Field(
        default=60,
        ge=4,
        le=100_000,
        description="the most calls to the Hub GET /updates makes in any minute, spread out (the"
        " Hub limits calls per token: downloads with the same token share its limit); a 429"
        " pauses the checks until its Retry-After",
    )
    state_dir: Path | None = Field(
        default=None,
        description="the service's own folder: the downloads to resume after a restart and the"
        " last errors (SQLite); default: 'model-service' beside the cache folder",
    )
    resume_on_start: bool = Field(
        default=True,
        description="resume, at start-up, the downloads that were running or queued when the"
        " service stopped or died; false: they are forgotten (the spec's first version)",
    )
    ray_address: str | None = Field(
        default=None,
        description="a fleet: join this Ray cluster ('auto', or host:port) and act on every node"
        " (needs the api[fleet] extra); unset: this machine only",
    )
    fleet_answer_seconds: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="in a fleet, how long a read (status, list, space, plan) waits for each"
        " node; a node that has not answered by then is reported unreachable, with the reason,"
        " and the answer comes without it",
    )
    peer_uplink_bytes_per_second: int = Field(
        default=0,
        ge=0,
        description="in a fleet, the most each node sends to the other nodes' copies, all of"
        " them together (bytes per second); 0: no cap. Set it when the cluster's network also"
        " carries vLLM's traffic",
    )
    log_level: str = Field(
        default="INFO", pattern=r"^(?i:debug|info|warning|error|critical)$", description="log level"
    )

    # -- tuning: the defaults are measured; change one only for a reason you can measure -----

    xet_when_capped: Literal["http", "xet"] = Field(
        default="http",
        description="under a bandwidth cap, files stored in Xet are fetched by the Hub's plain"
        " HTTP download ('http': capped) or through hf_xet ('xet': faster, but hf_xet cannot be"
        " capped: those bytes are not)",
    )
    retry_attempts: int = Field(default=5, ge=1, le=50)
    retry_min_backoff_seconds: float = Field(default=1.0, ge=0)
    retry_max_backoff_seconds: float = Field(default=60.0, ge=0)
    download_timeout_seconds: float = Field(default=24 * 3600, gt=0)
    stall_timeout_seconds: float = Field(
        default=60.0, gt=0, description="an attempt with no progress for this long is restarted"
    )
    plan_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="how long POST /download and /plan wait for the file list, and for where a"
        " cached branch points now",
    )
    max_repo_files: int = Field(
        default=100_000, ge=1, description="a Hub file list longer than this is refused"
    )
    hub_read_timeout_seconds: float = Field(
        default=30.0, gt=0, description="a Hub answer silent for this long is given up"
    )
    max_concurrent_verifications: int = Field(
        default=2, ge=1, le=64, description="POST /verify beyond this many at once gets 429"
    )
    warm_worker: bool = Field(
        default=True,
        description="start the process download workers are forked from at start-up, not at the"
        " first download (it imports the Hub library once: about 0.5 s of CPU)",
    )
    worker_nice: int = Field(
        default=10, ge=0, le=19, description="CPU niceness of download workers (API answers first)"
    )
    retry_after_seconds: int = Field(
        default=5, ge=1, description="Retry-After sent with a 429 when all download slots are busy"
    )
    ranged_min_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="a file this large or larger, served over plain HTTP, is fetched as parallel"
        " byte ranges, resumable (0: never)",
    )
    ranged_part_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024 * 1024, description="the size of those ranges"
    )
    ranged_connections: int = Field(
        default=8, ge=1, le=64, description="connections per file for them (1: never)"
    )
    vllm_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="a vLLM server that has not answered after this long counts as unreachable",
    )
    vllm_check_ttl_seconds: float = Field(
        default=5.0,
        ge=0,
        description="list and status reuse what the vLLM servers serve for this long (DELETE and"
        " prune always ask)",
    )

    @field_validator("api_key", "read_api_key")
    @classmethod
    def _check_keys(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        name = f"MODELS_{str(info.field_name).upper()}"
        keys = _split_keys(value.get_secret_value())
        if not keys:
            raise ValueError(f"{name} is set but holds no key")
        for key in keys:
            if len(key) < MIN_KEY_LENGTH or not key.isprintable() or " " in key:
                # Never the key itself in the message: it lands in logs.
                raise ValueError(
                    f"{name}: each key needs at least {MIN_KEY_LENGTH} printable characters"
                    " without spaces (e.g. the output of `openssl rand -hex 32`)"
                )
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and not _HOST_NAME.fullmatch(name):
                raise ValueError(
                    f"MODELS_ALLOWED_HOSTS: {name[:100]!r} is not a host name (letters, digits,"
                    " dots and hyphens, no port, no scheme), nor '*'"
                )
        return value

    @field_validator("vllm_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("vllm_urls")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"MODELS_VLLM_URLS: {display_url(url)!r} is not an http(s) URL with a host,"
                    " e.g. http://127.0.0.1:8001"
                )
        return value

    @field_validator("cache_dir")
    @classmethod
    def _absolute_cache_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, value: Path | None) -> Path | None:
        return value.expanduser().absolute() if value is not None else None

    @field_validator("hf_endpoint")
    @classmethod
    def _strip_endpoint(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def state_path(self) -> Path:
        """The state folder: ``MODELS_STATE_DIR``, else beside the cache (never inside the
        library's folders, which ``hf cache`` tools and the library itself manage)."""
        return self.state_dir or self.cache_dir.parent / "model-service"

    @property
    def token(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None

    @property
    def write_keys(self) -> list[str]:
        return _split_keys(self.api_key.get_secret_value()) if self.api_key else []

    @property
    def read_keys(self) -> list[str]:
        return _split_keys(self.read_api_key.get_secret_value()) if self.read_api_key else []

    @property
    def named_write_keys(self) -> list[tuple[str | None, str]]:
        value = self.api_key.get_secret_value() if self.api_key else ""
        return [named_key(entry) for entry in _split_entries(value)]

    @property
    def named_read_keys(self) -> list[tuple[str | None, str]]:
        value = self.read_api_key.get_secret_value() if self.read_api_key else ""
        return [named_key(entry) for entry in _split_entries(value)]

    @property
    def vllm_key(self) -> str | None:
        return self.vllm_api_key.get_secret_value() if self.vllm_api_key else None
