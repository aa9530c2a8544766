"""The public types of the models API (the spec's types, with optional additions only)."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from api.models.backend import MAX_PATTERNS, FileSelection, FilesPreset, patterns_problem

# The Hub's repo id rules (huggingface_hub.utils.validate_repo_id), restricted to `namespace/name`:
# ASCII letters, digits, '-', '_' and '.', each part 1-96 characters, starting and ending with a
# letter, digit or '_', no '--' or '..', not ending in '.git'. A test pins the agreement with the
# library's own validator.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
REPO_ID_PATTERN = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
COMMIT_PATTERN = re.compile(r"[0-9a-fA-F]{40}")
# A branch or tag name: letters, digits and '._-/', at most 128 characters, no '..', no '//', not
# starting with '/', '.' or '-', not ending with '/' or '.lock'. (The library writes refs/<revision>
# as a path and does not validate it: this is what keeps it inside the cache.)
REVISION_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,127}")

# Published in the OpenAPI schema (JSON Schema has no lookaround): the shape of a valid value. The
# validators above are the rule; these patterns are slightly stricter, never looser.
REPO_JSON_PATTERN = r"^[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*/[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*$"
REVISION_JSON_PATTERN = r"^(?:[0-9a-fA-F]{40}|[A-Za-z0-9_]+(?:[./_-][A-Za-z0-9_]+)*)$"

REPO_EXAMPLE = "meta-llama/Llama-2-7b-hf"
COMMIT_EXAMPLE = "01c7f73d771dfac7d292323805ebc428287df4f9"


def repo_id_problem(value: str) -> str | None:
    """Why ``value`` is not a valid ``namespace/name`` repo id, or None when it is."""
    if value.count("/") != 1:
        return (
            "hf_repo must be 'namespace/name' with exactly one '/', e.g. 'meta-llama/Llama-2-7b-hf'"
        )
    if not REPO_ID_PATTERN.fullmatch(value):
        return (
            "hf_repo parts may only use ASCII letters, digits, '-', '_' and '.', must be 1-96"
            " characters, and cannot start or end with '-' or '.'"
        )
    if "--" in value or ".." in value:
        return "hf_repo cannot contain '--' or '..'"
    if value.endswith(".git"):
        return "hf_repo cannot end with '.git'"
    return None


def revision_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable commit id or branch/tag name, or None when it is."""
    if COMMIT_PATTERN.fullmatch(value):
        return None
    if (
        not REVISION_PATTERN.fullmatch(value)
        or ".." in value
        or "//" in value
        or value.endswith(("/", ".lock"))
    ):
        return (
            "hf_commit must be a full 40-character hex commit id, or a branch or tag name of at most"
            " 128 characters from letters, digits, '.', '_', '-' and '/', with no '..' or '//', not"
            " starting with '/', '.' or '-' and not ending with '/'"
        )
    return None


class Model(BaseModel):
    """A model: a Hub repo and, optionally, a commit id or a branch/tag name (default: ``main``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"hf_repo": REPO_EXAMPLE, "hf_commit": COMMIT_EXAMPLE}]},
    )

    hf_repo: str = Field(
        min_length=3,
        max_length=193,
        description="Repo id, 'namespace/name'",
        examples=[REPO_EXAMPLE],
    )
    hf_commit: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="40-hex commit id, or a branch/tag name; omitted means the 'main' branch",
        examples=[COMMIT_EXAMPLE],
        json_schema_extra={"pattern": REVISION_JSON_PATTERN},
    )

    @field_validator("hf_repo")
    @classmethod
    def _check_repo(cls, value: str) -> str:
        if (problem := repo_id_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("hf_commit")
    @classmethod
    def _check_commit(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if (problem := revision_problem(value)) is not None:
            raise ValueError(problem)
        # Commit ids are case-insensitive on input; the cache and the Hub use lowercase.
        return value.lower() if COMMIT_PATTERN.fullmatch(value) else value

    @property
    def revision(self) -> str:
        """The revision to ask the Hub for."""
        return self.hf_commit or "main"

    @property
    def task_id(self) -> str:
        """``org/name:latest`` when no commit is given, else ``org/name:<commit or branch>``."""
        return f"{self.hf_repo}:{self.hf_commit or 'latest'}"


class ModelRequest(Model):
    """A model and, optionally, which of its files are wanted (additions to the spec's body).

    Without ``files``, ``allow_patterns`` and ``ignore_patterns``: the selection the revision was
    downloaded with, else ``MODELS_DEFAULT_FILES``. Otherwise a file is selected when the ``files``
    preset selects it or an allow pattern matches it (only the pattern's files when ``files`` is
    not given), and no ignore pattern matches it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"hf_repo": REPO_EXAMPLE, "files": "vllm"},
                {"hf_repo": "org/model-GGUF", "allow_patterns": ["*Q4_K_M*.gguf", "*.json"]},
            ]
        },
    )

    files: FilesPreset | None = Field(
        default=None,
        description="A named set: 'all' (every file) or 'vllm' (what vLLM's default loader reads:"
        " one weight format, the config and tokenizer files, nothing under original/)",
    )
    allow_patterns: list[str] | None = Field(
        default=None,
        max_length=MAX_PATTERNS,
        description="Glob patterns (huggingface_hub's allow_patterns): files matching one are"
        " selected (beside the 'files' preset when one is given)",
        examples=[["*.safetensors", "*.json"]],
    )
    ignore_patterns: list[str] | None = Field(
        default=None,
        max_length=MAX_PATTERNS,
        description="Glob patterns (huggingface_hub's ignore_patterns): files matching one are not"
        " selected",
        examples=[["original/*"]],
    )
    nodes: list[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8,64}$")]] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="With a fleet (MODELS_RAY_ADDRESS): the Ray node ids (or unique prefixes of 8"
        " or more) to act on; every alive node when omitted (addition)",
    )

    @field_validator("allow_patterns", "ignore_patterns")
    @classmethod
    def _check_patterns(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is not None and (problem := patterns_problem(str(info.field_name), value)):
            raise ValueError(problem)
        return value

    @property
    def selection(self) -> FileSelection | None:
        """The selection asked for, or None when the request names none (the revision's
        recorded selection applies, else the default)."""
        if self.files is None and self.allow_patterns is None and self.ignore_patterns is None:
            return None
        return FileSelection(
            preset=self.files,
            allow=tuple(self.allow_patterns or ()),
            ignore=tuple(self.ignore_patterns or ()),
        )

    def as_model(self) -> Model:
        """The spec's part (``model`` in answers)."""
        return Model.model_construct(hf_repo=self.hf_repo, hf_commit=self.hf_commit)


class SelectionInfo(BaseModel):
    """A file selection as a request names it."""

    files: FilesPreset | None = Field(default=None, description="The preset, if any")
    allow_patterns: list[str] = Field(default_factory=list)
    ignore_patterns: list[str] = Field(default_factory=list)

    @classmethod
    def of(cls, selection: FileSelection) -> SelectionInfo:
        return cls(
            files=selection.preset,
            allow_patterns=list(selection.allow),
            ignore_patterns=list(selection.ignore),
        )


class ModelStatus(StrEnum):
    DOWNLOADED = "DOWNLOADED"
    DOWNLOADING = "DOWNLOADING"
    NOT_FOUND = "NOT_FOUND"
    PARTIAL = "PARTIAL"


class DownloadPhase(StrEnum):
    QUEUED = "queued"  # waiting for a slot (MODELS_MAX_QUEUED_DOWNLOADS)
    RESOLVING = "resolving"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    COMPLETED = "completed"  # in the `completed` event


def _none(value: object) -> bool:
    """A fleet's additions (``nodes``, ``from_peers_bytes``) are left out of single-node answers: they stay exactly the spec's."""
    return value is None


class DownloadProgress(BaseModel):
    """Progress of a running download. ``start_time`` and ``elapsed_seconds`` are the spec's; the
    byte and file figures are additions (null until the file list is known)."""

    start_time: float = Field(description="Unix time the download started")
    elapsed_seconds: float = Field(description="Seconds since it started")
    phase: DownloadPhase | None = Field(
        default=None,
        description="queued, resolving, downloading, verifying (completed in that event)",
    )
    queue_position: int | None = Field(
        default=None, description="While queued: 1 for the next to start (addition)"
    )
    downloaded_bytes: int | None = Field(
        default=None,
        description="Bytes of the revision's files on disk, those already cached included",
    )
    total_bytes: int | None = Field(default=None, description="Bytes of every file of the revision")
    percent: float | None = Field(
        default=None, description="downloaded_bytes of total_bytes, 0-100"
    )
    bytes_per_second: float | None = Field(default=None, description="Recent speed (smoothed)")
    eta_seconds: float | None = Field(
        default=None,
        description="Seconds left at that speed; null until the speed was measured for 3 s",
    )
    files_done: int | None = Field(default=None, description="Files fetched by the current pass")
    files_total: int | None = Field(default=None, description="Files of the revision")
    verified_bytes: int | None = Field(
        default=None, description="Bytes checked against their ETags so far (phase verifying)"
    )
    transferred_bytes: int | None = Field(
        default=None,
        description="Bytes fetched from the Hub by this download (files already cached excluded)",
    )
    from_peers_bytes: int | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: of transferred_bytes, those copied from other nodes instead of"
        " the Hub (addition)",
    )
    attempt: int | None = Field(
        default=None, description="1 for the first attempt, 2 after a retry"
    )
    bandwidth_limit_bytes_per_second: float | None = Field(
        default=None,
        description="This download's share of MODELS_MAX_DOWNLOAD_BYTES_PER_SECOND while a cap is"
        " set (the cap shared between the downloads fetching now); null: no cap (addition)",
    )
    bandwidth_note: str | None = Field(
        default=None,
        description="Why the cap does not hold for (part of) this download, when it does not"
        " (addition)",
    )


MIN_BANDWIDTH = 64 * 1024


class BandwidthSetting(BaseModel):
    """The total download rate of the service (PUT /api/models/settings/bandwidth)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"max_bytes_per_second": 50_000_000}]}
    )

    max_bytes_per_second: StrictInt | None = Field(
        description=f"Bytes per second for all downloads together, at least {MIN_BANDWIDTH}"
        " (64 KiB/s); null or 0: no cap",
    )

    @field_validator("max_bytes_per_second")
    @classmethod
    def _check_rate(cls, value: int | None) -> int | None:
        if value is None or value == 0:
            return None
        if value < MIN_BANDWIDTH:
            raise ValueError(
                f"a cap is at least {MIN_BANDWIDTH} bytes per second (64 KiB/s); null or 0 for none"
            )
        return value


class DownloadShare(BaseModel):
    task_id: str
    bytes_per_second: float | None = Field(description="Its share now; null: no cap")
    note: str | None = Field(default=None, description="Why the cap does not hold for it")
    node_id: str | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the node it runs on (addition)"
    )


class BandwidthResponse(BaseModel):
    max_bytes_per_second: int | None = Field(description="The cap; null: none")
    xet_when_capped: str = Field(
        description="'http': under a cap, Xet files come by plain HTTP (capped); 'xet': through"
        " hf_xet, which cannot be capped (MODELS_XET_WHEN_CAPPED)"
    )
    downloads: list[DownloadShare] = Field(description="Each running download's share")
    per_node: bool | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: true, the cap holds on each node, for its downloads from the"
        " Hub and its copies from other nodes together (addition)",
    )
    nodes_unanswered: list[NodeUnanswered] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: the nodes whose downloads are not in this answer (and that"
        " a new cap may not have reached), and why",
    )


class InUseInfo(BaseModel):
    """A vLLM server that serves a cached revision (from its ``GET /v1/models``)."""

    server: str = Field(description="The server's base URL", examples=["http://127.0.0.1:8001"])
    model: str = Field(description="The name it serves the model under (its model card's id)")


InUseBy = Annotated[
    list[InUseInfo] | None,
    Field(
        description="The vLLM servers (MODELS_VLLM_URLS) serving this revision; null when none is"
        " configured (addition)"
    ),
]


class ModelStatusResponse(BaseModel):
    model: Model = Field(description="The model as it was asked")
    status: ModelStatus = Field(
        description="DOWNLOADED (complete and verified), DOWNLOADING, PARTIAL (part of it, or not"
        " verified: error_message says why) or NOT_FOUND"
    )
    progress: DownloadProgress | None = Field(default=None, description="While DOWNLOADING")
    error_message: str | None = Field(
        default=None, description="Why it is not DOWNLOADED, in plain words, when known"
    )
    commit: str | None = Field(
        default=None, description="The commit the status refers to, when known (addition)"
    )
    pinned: bool = Field(
        default=False,
        description="A pin keeps the revision from eviction and prune (PUT /api/models/pin)"
        " (addition)",
    )
    selection: list[SelectionInfo] | None = Field(
        default=None,
        description="The selection the status answers for: the one asked, else those the revision"
        " was downloaded with (their union); null: MODELS_DEFAULT_FILES (addition)",
    )
    served_commit: str | None = Field(
        default=None,
        description="While a branch updates: the complete commit its ref still names, which"
        " whatever resolves the branch from the cache loads now (addition)",
    )
    coming_commit: str | None = Field(
        default=None,
        description="While a branch updates: the commit being downloaded, which the ref names"
        " once it is complete and verified (addition)",
    )
    in_use_by: InUseBy = None
    nodes: list[NodeStatus] | None = Field(
        default=None, exclude_if=_none, description="With a fleet: each node's status (addition)"
    )


class NodeStatus(BaseModel):
    """A model's status on one node of the fleet."""

    node_id: str
    address: str = Field(description="The node's address in the Ray cluster")
    status: ModelStatus | None = Field(description="null when the node did not answer")
    progress: DownloadProgress | None = None
    error_message: str | None = Field(
        default=None, description="Why it is not DOWNLOADED there, or why the node did not answer"
    )
    gone: bool = Field(default=False, description="The node left the cluster")
    unreachable: bool = Field(
        default=False,
        description="The node did not answer within MODELS_FLEET_ANSWER_SECONDS (why: in"
        " error_message); the rest of the answer did not wait for it",
    )
    waiting_for: str | None = Field(
        default=None,
        description="No longer set: every node of a rollout starts at once, copying from the"
        " nodes that receive the model before it (kept so that clients that read it still work)",
    )
    from_hub_bytes: int | None = Field(
        default=None, description="Bytes its last download of the model fetched from the Hub"
    )
    from_peers_bytes: int | None = Field(
        default=None, description="Bytes its last download of the model copied from other nodes"
    )


class DownloadStartedResponse(BaseModel):
    task_id: str = Field(
        description="org/name:latest, or org/name:<commit or branch>",
        examples=[f"{REPO_EXAMPLE}:latest"],
    )
    status: ModelStatus = Field(
        description="DOWNLOADING (started), or DOWNLOADED (already complete: nothing started)",
        examples=[ModelStatus.DOWNLOADING],
    )
    nodes: list[str] | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the nodes it started on"
    )


class DeleteStatus(StrEnum):
    DELETED = "deleted"
    CANCELLED = "cancelled"


class DeleteResponse(BaseModel):
    status: DeleteStatus = Field(
        description="cancelled (a download was stopped; what it fetched stays) or deleted"
    )
    freed_bytes: int | None = Field(default=None, description="Bytes removed from disk (addition)")
    nodes: list[NodeDeleted] | None = Field(
        default=None, exclude_if=_none, description="With a fleet: what each node did (addition)"
    )


class NodeDeleted(BaseModel):
    node_id: str
    status: DeleteStatus | None = Field(description="null: nothing of it there, or an error")
    freed_bytes: int | None = None
    error_message: str | None = None


class ModelListItem(BaseModel):
    model: Model = Field(description="The repo and the cached commit")
    status: ModelStatus = Field(description="The same status POST /status gives this revision")
    size_bytes: int | None = Field(default=None, description="Bytes on disk (addition)")
    unique_bytes: int | None = Field(
        default=None,
        description="Of size_bytes, those no other revision of the model shares: what deleting"
        " this revision alone frees (addition)",
    )
    model_size_bytes: int | None = Field(
        default=None,
        description="The bytes of every revision of the model together, each shared file once:"
        " model_size_bytes less the unique_bytes of each revision is what its revisions share"
        " (addition)",
    )
    refs: list[str] = Field(default_factory=list, description="Branches/tags cached (addition)")
    progress: DownloadProgress | None = None
    error_message: str | None = Field(
        default=None,
        description="Why it is not DOWNLOADED, when known: the same words as its status (addition)",
    )
    selection: list[SelectionInfo] | None = Field(
        default=None,
        description="The selections the revision was downloaded with (status checks their union);"
        " null when none was recorded: MODELS_DEFAULT_FILES applies (addition)",
    )
    in_use_by: InUseBy = None
    pinned: bool = Field(default=False, description="Pinned: never evicted nor pruned (addition)")
    last_used_at: float | None = Field(
        default=None,
        description="Unix time of its last use the service knows of (served by vLLM, downloaded or"
        " verified here): the eviction order (addition)",
    )
    nodes: list[str] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: the nodes that hold this revision (addition)",
    )


class NodeUnanswered(BaseModel):
    """A node of the fleet that is not in an answer, and why."""

    node_id: str
    address: str
    error_message: str = Field(description="Why the node did not answer")
    gone: bool = Field(default=False, description="The node left the cluster")
    unreachable: bool = Field(
        default=False,
        description="The node did not answer within MODELS_FLEET_ANSWER_SECONDS (why: in"
        " error_message); the rest of the answer did not wait for it",
    )


class ListSort(StrEnum):
    NAME = "name"  # by repo id, then commit
    SIZE = "size"  # largest first
    LAST_USED = "last_used"  # most recently used first; never used last


class ModelListResponse(BaseModel):
    models: list[ModelListItem]
    total: int | None = Field(
        default=None,
        exclude_if=_none,
        description="With limit, cursor, q or status: how many entries match (addition)",
    )
    next_cursor: str | None = Field(
        default=None,
        exclude_if=_none,
        description="The cursor of the next page (give it as `cursor`, with the same q, status and"
        " sort); absent: this is the last page (addition)",
    )
    nodes_unanswered: list[NodeUnanswered] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: the nodes whose models are not in this list, and why",
    )


class DiskSpaceInfo(BaseModel):
    cache_size_bytes: int = Field(
        description="Bytes of every file in the cache", examples=[13958643712]
    )
    available_bytes: int = Field(
        description="Bytes free on the cache's filesystem", examples=[500000000000]
    )
    cache_path: str = Field(
        description="The cache folder", examples=["/root/.cache/huggingface/hub"]
    )
    nodes: list[NodeSpace] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: each node's cache (the figures above are their sums)",
    )


class NodeSpace(BaseModel):
    node_id: str
    address: str
    cache_path: str | None = None
    cache_size_bytes: int | None = None
    available_bytes: int | None = None
    error_message: str | None = Field(default=None, description="Why the node did not answer")
    gone: bool = False
    unreachable: bool = Field(
        default=False,
        description="The node did not answer within MODELS_FLEET_ANSWER_SECONDS (why: in"
        " error_message); the rest of the answer did not wait for it",
    )


class PlanFile(BaseModel):
    path: str = Field(description="Path in the repo")
    size: int = Field(description="Bytes")
    selected: bool = Field(description="Whether the selection takes it")


class WeightChoice(BaseModel):
    """Weight files of one format (and one quantization, for GGUF) in one folder: one of the
    choices a repo offers."""

    format: str = Field(description="safetensors, bin, pt, pth, gguf, ...", examples=["gguf"])
    quantization: str | None = Field(
        default=None, description="GGUF quantization, from the file names", examples=["Q4_K_M"]
    )
    folder: str = Field(description="'' for the top of the repo, else e.g. 'original/'")
    pattern: str = Field(
        description="An allow pattern that selects these files", examples=["*Q4_K_M*.gguf"]
    )
    files: list[str] = Field(description="Its files")
    size_bytes: int = Field(description="Bytes of its files")
    selected: bool = Field(description="Whether the selection takes every one of its files")


class NodePlan(BaseModel):
    node_id: str
    missing_bytes: int | None = Field(default=None, description="What this node would fetch")
    available_bytes: int | None = None
    fits: bool | None = Field(description="null: the node did not answer")
    error_message: str | None = None


class EvictionCandidate(BaseModel):
    """A cached revision that eviction may remove, in the order it would."""

    model: Model = Field(description="The repo and the commit")
    size_bytes: int = Field(
        description="Bytes its removal would free (files another revision shares stay)"
    )
    last_used_at: float | None = Field(
        default=None,
        description="Unix time of its last use: served by a vLLM server, downloaded or verified"
        " here, else its files' last access time; null: never seen used",
    )
    last_used_how: str | None = Field(
        default=None,
        description="The evidence of that use: 'served', 'downloaded', 'verified' or 'accessed'",
    )
    node_id: str | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the node (addition)"
    )


class PlanResponse(BaseModel):
    """What a download would fetch, computed from the Hub's file list without writing anything."""

    model: Model = Field(description="The model as it was asked")
    commit: str = Field(description="The commit the revision resolves to now")
    selection: list[SelectionInfo] = Field(description="The selection applied")
    files: list[PlanFile] = Field(description="Every file of the revision")
    selected_files: int = Field(description="How many files the selection takes")
    selected_bytes: int = Field(description="Bytes of the selected files")
    missing_bytes: int = Field(
        description="Bytes a download of the selection would still fetch (the rest is cached)"
    )
    available_bytes: int = Field(
        description="Free space for it: free bytes less what running downloads still need and the"
        " margin (MODELS_SPACE_MARGIN_BYTES)"
    )
    fits: bool = Field(description="Whether a download would pass the 507 check")
    evicts: list[EvictionCandidate] = Field(
        default_factory=list,
        description="With a cache budget (MODELS_CACHE_BUDGET_BYTES): the revisions a download"
        " would evict first, least recently used first (addition)",
    )
    weights: list[WeightChoice] = Field(
        description="The weight files grouped by format and quantization, to choose from"
    )
    nodes: list[NodePlan] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: each node's figures; the top ones are the worst node's"
        " (addition)",
    )
    note: str | None = Field(
        default=None,
        description="Why POST /download would refuse this selection (422), when it would",
    )


class VerifyResponse(BaseModel):
    """The result of checking every file of a cached revision against its ETag (sha256 for LFS
    files, git blob id for regular files)."""

    model: Model = Field(description="The model as it was asked")
    commit: str = Field(description="The commit checked")
    verified: bool = Field(description="True when every file is present and matches")
    files_checked: int = Field(description="Files present and hashed")
    missing: list[str] = Field(description="Files of the revision that are not there")
    mismatched: list[str] = Field(description="Files whose content does not match their ETag")
    nodes: list[NodeVerified] | None = Field(
        default=None, exclude_if=_none, description="With a fleet: each node's check (addition)"
    )


class NodeVerified(BaseModel):
    node_id: str
    verified: bool | None = Field(description="null: the node did not answer, or has no copy")
    files_checked: int = 0
    missing: list[str] = Field(default_factory=list)
    mismatched: list[str] = Field(default_factory=list)
    error_message: str | None = None


class DownloadEventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    RETRYING = "retrying"
    VERIFYING = "verifying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EVICTED = "evicted"  # a revision removed to keep the cache within its budget


class DownloadEvent(BaseModel):
    """One event of a download, as sent on ``GET /api/models/events``."""

    type: DownloadEventType
    task_id: str
    model: Model
    time: float = Field(description="Unix time of the event")
    commit: str | None = None
    progress: DownloadProgress | None = None
    error_message: str | None = Field(default=None, description="Why it failed (failed)")
    retry_reason: str | None = Field(default=None, description="Why it retries (retrying)")
    retry_kind: str | None = Field(default=None, description="Class of that failure (retrying)")
    reason: str | None = Field(
        default=None, description="Why it was removed, and for which download (evicted)"
    )
    freed_bytes: int | None = Field(default=None, description="Bytes its removal freed (evicted)")
    seq: int | None = Field(
        default=None,
        description="Number of the event in this service (the SSE id): send it back as"
        " Last-Event-ID on reconnect to get the events missed meanwhile",
    )
    node_id: str | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: the node the download runs on (addition)",
    )


class DownloadListResponse(BaseModel):
    downloads: list[ModelStatusResponse] = Field(
        description="Each running or queued download (with a fleet: each once, with every node's"
        " status in its nodes)"
    )
    nodes_unanswered: list[NodeUnanswered] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: the nodes whose downloads are not in this list, and why",
    )


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer: what went wrong and what to do about it."""

    detail: str | list[dict[str, object]]


class UpdateInfo(BaseModel):
    """Whether a branch (or tag) cached points on the Hub at another commit now."""

    model: Model = Field(
        description="The model as POST /download takes it to update: the repo and the branch"
        " (null for main)"
    )
    ref: str = Field(description="The branch or tag, as cached (refs/<ref>)", examples=["main"])
    cached_commit: str = Field(description="The commit the ref names in the cache")
    hub_commit: str | None = Field(
        default=None, description="The commit it names on the Hub now; null when unknown (error)"
    )
    update_available: bool = Field(description="Whether hub_commit differs from cached_commit")
    bytes_to_download: int | None = Field(
        default=None,
        description="Bytes an update would still fetch: the new revision's files (for the"
        " selection the cached one was downloaded with) less those already in the cache; 0"
        " without an update; null when unknown",
    )
    error: str | None = Field(
        default=None, description="Why the Hub could not say, in plain words (gone, gated, down)"
    )
    checked_at: float | None = Field(
        description="Unix time of the check these fields come from (answers are reused a"
        " while); null when none has ended yet (pending)"
    )
    pending: bool = Field(
        default=False,
        description="A check of this ref is queued or running (within the budget of Hub calls):"
        " the other fields are the last check's; ask again for its answer",
    )
    nodes: list[str] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: the nodes whose cache has this ref at cached_commit (addition)",
    )


class UpdateBudget(BaseModel):
    """The update checks' budget of calls to the Hub (MODELS_UPDATE_CALLS_PER_MINUTE)."""

    calls_per_minute: int = Field(description="The most calls the checks make in any minute")
    calls_last_minute: int = Field(description="Calls they made in the last minute")
    paused_until: float | None = Field(
        default=None,
        description="While the Hub's 429 paused them: the Unix time the checks go on at",
    )
    pending: int = Field(description="Checks queued or running")


class UpdatesResponse(BaseModel):
    models: list[UpdateInfo]
    budget: UpdateBudget | None = Field(
        default=None,
        exclude_if=_none,
        description="The budget of Hub calls the checks keep to (with a fleet: the nodes' sums,"
        " and the latest pause)",
    )
    nodes_unanswered: list[NodeUnanswered] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: the nodes whose branches are not in this answer, and why",
    )


class PruneRequest(BaseModel):
    """What to prune: revisions no ref points to (and, when asked, partial leftovers)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"dry_run": True}]})

    # Strict: a number or a string is not taken for a yes or a no (1, "false"...): 422.
    dry_run: StrictBool = Field(
        description="true: only say what would be removed; false: remove it (required, so that"
        " nothing is removed by a body that forgot it)"
    )
    hf_repo: str | None = Field(
        default=None,
        min_length=3,
        max_length=193,
        description="Only this repo ('namespace/name'); all of them when omitted",
        examples=[REPO_EXAMPLE],
    )
    include_partial: StrictBool = Field(
        default=False,
        description="Also remove PARTIAL revisions (failed or cancelled downloads), refs or not",
    )

    @field_validator("hf_repo")
    @classmethod
    def _check_repo(cls, value: str | None) -> str | None:
        if value is not None and (problem := repo_id_problem(value)) is not None:
            raise ValueError(problem)
        return value


class PrunedRevision(BaseModel):
    model: Model = Field(description="The repo and the commit (null: a folder with no revision)")
    size_bytes: int = Field(
        description="Bytes of the files only this revision held (those shared with a kept"
        " revision stay)"
    )
    node_id: str | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the node (addition)"
    )


class KeptRevision(BaseModel):
    model: Model = Field(description="The repo and the commit")
    reason: str = Field(description="Why it was not removed, in plain words")
    node_id: str | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the node (addition)"
    )


class PruneResponse(BaseModel):
    dry_run: bool = Field(description="true: nothing was removed")
    revisions: list[PrunedRevision] = Field(description="Removed (or, dry run, to be removed)")
    freed_bytes: int = Field(description="Bytes freed (dry run: that would be freed)")
    kept: list[KeptRevision] = Field(
        default_factory=list,
        description="Revisions that would qualify but were kept: in use by vLLM, downloading, or"
        " refused by the cache (addition)",
    )
    note: str | None = Field(
        default=None,
        description="What the answer could not take into account (a vLLM server that did not"
        " answer), when something (addition)",
    )


class BudgetResponse(BaseModel):
    """The cache's budget, what it holds, and the order in which eviction would free room."""

    budget_bytes: int | None = Field(
        description="MODELS_CACHE_BUDGET_BYTES; null: no budget, nothing is ever evicted"
    )
    usage_bytes: int = Field(description="Bytes of the files in the cache")
    reserved_bytes: int = Field(description="Bytes running downloads still need")
    candidates: list[EvictionCandidate] = Field(
        description="What eviction may remove, least recently used first"
    )
    kept: list[KeptRevision] = Field(
        description="What eviction never removes now, and why: pinned, served, downloading"
    )
    note: str | None = Field(
        default=None, description="What the answer could not take into account, when something"
    )
    node_id: str | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the node (addition)"
    )
    nodes: list[BudgetResponse] | None = Field(
        default=None,
        exclude_if=_none,
        description="With a fleet: each node's budget (it holds per node); the top figures are"
        " their sums (addition)",
    )


class EvictRequest(BaseModel):
    """``POST /api/models/evict``: free room down to a target."""

    model_config = ConfigDict(extra="forbid")

    # Strict: true or "5" is not taken for a number of bytes (422).
    target_bytes: StrictInt | None = Field(
        default=None,
        ge=0,
        description="Evict until the cache holds at most this many bytes; default: the budget",
    )


class EvictResponse(BaseModel):
    dry_run: bool = Field(description="true: nothing was removed")
    evicted: list[EvictionCandidate] = Field(
        description="Removed (dry run: to be removed), in that order"
    )
    freed_bytes: int = Field(description="Bytes freed (dry run: that would be freed)")
    usage_bytes: int = Field(description="Bytes in the cache after it (dry run: now)")
    target_bytes: int = Field(description="The target it freed room down to")
    kept: list[KeptRevision] = Field(default_factory=list, description="Never evicted now, and why")
    note: str | None = Field(
        default=None,
        description="Why the target was not reached, or what could not be taken into account",
    )
    node_id: str | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the node (addition)"
    )
    nodes: list[EvictResponse] | None = Field(
        default=None, exclude_if=_none, description="With a fleet: each node's answer (addition)"
    )


class PinResponse(BaseModel):
    model: Model = Field(description="The pin, as it was asked: a commit, a branch or a tag")
    pinned: bool = Field(description="Whether it is pinned now")
    commits: list[str] = Field(
        default_factory=list,
        description="The cached commits the pin protects now (a branch's or tag's follow it)",
    )
    nodes: list[str] | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the nodes it holds on (addition)"
    )


class HistoryEntry(BaseModel):
    """One thing that happened to the cache (``GET /api/models/history``)."""

    time: float = Field(description="Unix time")
    event: str = Field(
        description="'downloaded', 'failed', 'cancelled' (a download's end), 'deleted', 'pruned'"
        " or 'evicted' (a revision removed)"
    )
    task_id: str = Field(description="The download's task id, or repo:commit of what was removed")
    model: Model = Field(description="The repo and the revision (as asked, or the commit)")
    size_bytes: int | None = Field(
        default=None, description="Bytes downloaded, or freed by the removal"
    )
    duration_seconds: float | None = Field(default=None, description="How long the download took")
    detail: str | None = Field(default=None, description="Why it failed, or why it was removed")
    by: str | None = Field(
        default=None,
        description="The name of the API key that asked (MODELS_API_KEY 'name:key'; 'key' for a"
        " key without a name); null without keys. Never the key itself",
    )
    node_id: str | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the node (addition)"
    )


class ThroughputSeries(BaseModel):
    task_id: str = Field(description="The running download's task id")
    model: Model
    bytes_per_second: list[float] = Field(
        description="Its bytes off the network per second, each interval of the window, oldest"
        " first"
    )
    node_id: str | None = Field(
        default=None, exclude_if=_none, description="With a fleet: the node it runs on"
    )


class ThroughputResponse(BaseModel):
    """``GET /api/models/throughput``: bytes off the network (from the Hub, and from a fleet's
    peers) per second over the last 10 minutes, in intervals of ``bucket_seconds``."""

    bucket_seconds: float = Field(description="The length of one interval")
    start: float = Field(description="Unix time the first interval starts")
    service: list[float] = Field(
        description="Every download together, bytes per second, each interval, oldest first"
    )
    downloads: list[ThroughputSeries] = Field(
        description="Each running download's, over the same intervals"
    )


class HistoryResponse(BaseModel):
    entries: list[HistoryEntry] = Field(description="Newest first")
