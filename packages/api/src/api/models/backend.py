"""The interface between the manager and the Hub/cache adapter, and the data that crosses it.

The manager owns state and policy and knows nothing of ``huggingface_hub``; an adapter implements
``HubBackend`` (the real one is ``api.models.hub.adapter.HubCacheBackend``; unit tests use a fake).
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from api.models.errors import DownloadFailed, FailureKind

__all__ = ["DownloadFailed", "FailureKind"]  # re-exported: the interface's failure type


class CacheState(enum.Enum):
    COMPLETE = "complete"  # every file of the revision's file list is there with its size
    PARTIAL = "partial"  # something of the model is there, not all of it
    ABSENT = "absent"  # nothing of it
    BUSY = "busy"  # another process (a service sharing the cache) is downloading it now


MAX_PATTERNS = 64
MAX_PATTERN_LENGTH = 256


def patterns_problem(name: str, patterns: list[str]) -> str | None:
    """Why a list of glob patterns is refused, or None: at most 64 patterns of 1 to 256
    characters, none with a control character."""
    if len(patterns) > MAX_PATTERNS:
        return f"{name} takes at most {MAX_PATTERNS} patterns ({len(patterns)} given)"
    for index, pattern in enumerate(patterns):
        if not pattern:
            return f"{name}[{index}] is empty: a pattern needs at least one character"
        if len(pattern) > MAX_PATTERN_LENGTH:
            return f"{name}[{index}] is longer than {MAX_PATTERN_LENGTH} characters"
        if any(unicodedata.category(c) == "Cc" for c in pattern):
            return f"{name}[{index}] contains a control character (a tab, a newline, NUL...)"
    return None


class FilesPreset(enum.StrEnum):
    """A named set of a revision's files (the request's ``files``)."""

    ALL = "all"  # every file (the spec's "fully downloaded")
    VLLM = "vllm"  # what vLLM's default loader reads (api.models.hub.selection)


@dataclass(frozen=True)
class FileSelection:
    """Which files of a revision are wanted: the preset's files, plus those an allow pattern
    matches (only those when there is no preset), less those an ignore pattern matches. Patterns
    are huggingface_hub's (``snapshot_download``'s ``allow_patterns``/``ignore_patterns``)."""

    preset: FilesPreset | None = FilesPreset.ALL
    allow: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    @property
    def is_everything(self) -> bool:
        return self.preset is FilesPreset.ALL and not self.ignore

    def or_preset(self, default: FilesPreset) -> FileSelection:
        """This selection, with ``default`` as its preset when it names neither a preset nor an
        allow pattern (ignore patterns alone narrow the default)."""
        if self.preset is None and not self.allow:
            return FileSelection(default, (), self.ignore)
        return self

    def describe(self) -> str:
        """In a few words, for messages: ``vllm``, ``all``, ``allow ['*.gguf']``..."""
        parts = [f"files: {self.preset.value}"] if self.preset is not None else []
        if self.allow:
            parts.append(f"allow_patterns {list(self.allow)}")
        if self.ignore:
            parts.append(f"ignore_patterns {list(self.ignore)}")
        return ", ".join(parts) or "nothing"

    def to_json(self) -> dict[str, object]:
        return {
            "files": self.preset.value if self.preset is not None else None,
            "allow_patterns": list(self.allow),
            "ignore_patterns": list(self.ignore),
        }

    @classmethod
    def from_json(cls, data: object) -> FileSelection:
        """Raises ValueError for anything but what ``to_json`` writes."""
        if not isinstance(data, dict):
            raise ValueError("a selection is not an object")
        preset = data.get("files")
        allow, ignore = data.get("allow_patterns") or [], data.get("ignore_patterns") or []
        if not isinstance(allow, list) or not isinstance(ignore, list):
            raise ValueError("patterns are not lists")
        if not all(isinstance(p, str) for p in [*allow, *ignore]):
            raise ValueError("a pattern is not a string")
        # Read from the cache, which others write: held to the limits of a request.
        for name, patterns in (("allow_patterns", allow), ("ignore_patterns", ignore)):
            if (problem := patterns_problem(name, patterns)) is not None:
                raise ValueError(problem)
        return cls(FilesPreset(preset) if preset is not None else None, tuple(allow), tuple(ignore))


EVERYTHING = FileSelection()


@dataclass(frozen=True)
class LocalState:
    state: CacheState
    commit: str | None = None
    note: str | None = None  # why it is not COMPLETE, when the cache knows (a pending verification)
    selections: tuple[FileSelection, ...] = ()  # the asked one as applied, else those recorded


@dataclass(frozen=True)
class CachedRevision:
    """One revision of a model found in the cache (or a model folder with no revision yet)."""

    repo_id: str
    commit: str | None
    state: CacheState
    size_bytes: int
    refs: tuple[str, ...] = ()
    note: str | None = None  # why it is not COMPLETE, when the cache knows
    selections: tuple[FileSelection, ...] = ()  # recorded by the downloads of the revision
    # Of size_bytes, the bytes of blobs no other revision of the model links: what removing this
    # revision alone frees (the rest it shares). None: not counted.
    unique_bytes: int | None = None
    # The bytes of the blobs every revision of the model links, each blob once. None: not counted.
    model_bytes: int | None = None


@dataclass
class DownloadUpdate:
    """What a running download reports; ``None`` fields are unchanged."""

    commit: str | None = None
    total_bytes: int | None = None
    files_total: int | None = None
    downloaded_bytes: int | None = None
    transferred_bytes: int | None = None  # fetched by this download so far, all attempts
    files_done: int | None = None
    attempt: int | None = None
    retry_reason: str | None = None
    retry_kind: str | None = None  # a FailureKind value, with retry_reason
    verifying: bool = False
    through_xet: bool | None = None  # bytes came through hf_xet (out of the bandwidth cap's reach)
    from_peers_bytes: int | None = None  # of transferred_bytes, those copied from a fleet's peers
    selections: tuple[FileSelection, ...] | None = None  # what it fetches, once the plan is known


class RateShare:
    """The bandwidth a running download may use (bytes per second; None: no cap), set by the
    manager and changed while the download runs; the backend follows each change."""

    def __init__(self, value: float | None = None) -> None:
        self.value = value
        self._followers: list[Callable[[float | None], None]] = []

    def set(self, value: float | None) -> None:
        if value == self.value:
            return
        self.value = value
        for follower in list(self._followers):
            follower(value)

    def follow(self, follower: Callable[[float | None], None]) -> Callable[[], None]:
        """Call ``follower`` at each change from now on; returns the function that stops it."""
        self._followers.append(follower)
        return lambda: self._followers.remove(follower)


@dataclass(frozen=True)
class Peer:
    """Another node of a fleet that serves its cache's blobs, complete or still arriving, over
    the Hub's ``resolve`` protocol (``models/hub/peers.py``): ``url`` is its base, ``token`` the
    fleet's own secret for it (never the Hub's token)."""

    url: str
    token: str
    # Peers are asked by tier, lowest first, the parts of a file spread over the peers of one
    # tier at once; a failure hands over to the next tier (the Hub after the last).
    tier: int = 0


@dataclass(frozen=True)
class DownloadRequest:
    repo_id: str
    revision: str
    selection: FileSelection | None = None  # None: the recorded selection, else the default
    # A fleet's nodes that have this revision: its files are copied from them first, each checked
    # against the Hub's ETag, with the Hub as the fallback.
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True)
class RemoteFile:
    """A file of a revision as the Hub lists it; ``etag`` is the blob's name in the cache (the
    sha256 for LFS files, the git blob id for regular files)."""

    path: str
    size: int
    etag: str


@dataclass(frozen=True)
class WeightGroup:
    """Weight files of one format (and, for GGUF, one quantization) in one folder."""

    format: str  # safetensors, bin, pt, pth, gguf, ...
    quantization: str | None  # GGUF: Q4_K_M, Q8_0, F16...
    folder: str  # "" for the top of the repo, else "original/"...
    pattern: str  # an allow pattern that selects the group
    files: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class DownloadPlan:
    """What a revision is made of, fetched from the Hub before the first byte of content, and
    which of its files are wanted (``selected``; None: every file)."""

    commit: str
    files: tuple[RemoteFile, ...]
    selected: frozenset[str] | None = None
    selections: tuple[FileSelection, ...] = (EVERYTHING,)  # what ``selected`` was resolved from
    problem: str | None = None  # why the selection cannot be downloaded, when it cannot
    weights: tuple[WeightGroup, ...] = ()

    @property
    def wanted(self) -> tuple[RemoteFile, ...]:
        """The files to fetch and verify."""
        if self.selected is None:
            return self.files
        return tuple(f for f in self.files if f.path in self.selected)

    @property
    def total_bytes(self) -> int:
        """Bytes of the wanted files."""
        return sum(f.size for f in self.wanted)


@dataclass(frozen=True)
class Pruned:
    """What a prune removed of one model (or would remove: a dry run)."""

    repo_id: str
    revisions: tuple[tuple[str | None, int], ...] = ()  # (commit, bytes only it held)
    freed_bytes: int = 0
    refused: str | None = None  # why nothing of it was removed (busy, unsafe, not writable)


@dataclass(frozen=True)
class VerifyReport:
    """The result of checking a cached revision's files against their ETags."""

    commit: str
    files_checked: int
    missing: tuple[str, ...]
    mismatched: tuple[str, ...]


class HubBackend(Protocol):
    """Talks to the Hub and the cache. Blocking methods are called off the event loop."""

    async def plan(self, request: DownloadRequest) -> DownloadPlan:
        """Resolve the revision, list its files on the Hub and resolve the request's selection
        (``problem`` says when it cannot be downloaded). Raises ``DownloadFailed`` (with
        ``retryable`` set, and a message saying whether it will be retried)."""
        ...

    async def resolve(self, repo_id: str, revision: str) -> str:
        """The commit a branch or tag points at on the Hub now (one metadata request). Raises
        ``DownloadFailed``."""
        ...

    def missing_bytes(self, repo_id: str, plan: DownloadPlan) -> int:
        """Bytes of the plan's files not yet complete in the cache (blocking)."""
        ...

    async def download(
        self,
        request: DownloadRequest,
        plan: DownloadPlan | None,
        on_update: Callable[[DownloadUpdate], None],
        rate: RateShare | None = None,
    ) -> str:
        """Download and verify the revision into the cache, within the bandwidth ``rate`` says
        (following its changes); return its commit id.

        Cancelling the awaiting task stops the transfer and removes its temporary files before the
        cancellation propagates. Raises ``DownloadFailed``.
        """
        ...

    def verify(self, repo_id: str, revision: str) -> VerifyReport | None:
        """Hash every cached file of the revision against its ETag; None when it is not cached
        (blocking)."""
        ...

    def local_state(
        self, repo_id: str, revision: str, selection: FileSelection | None = None
    ) -> LocalState:
        """The cache's state for a revision and the files ``selection`` selects (None: those of
        the recorded selection, else the default), offline (blocking)."""
        ...

    def list_cached(self, repo_id: str | None = None) -> list[CachedRevision]:
        """Every model revision in the cache, of ``repo_id`` only when given (blocking)."""
        ...

    def revision_at(self, path: str) -> tuple[str, str] | None:
        """The (repo id, commit) of the snapshot folder ``path`` is in, or None (blocking)."""
        ...

    def prune(self, repo_id: str, commits: frozenset[str] | None, dry_run: bool) -> Pruned:
        """Delete the revisions ``commits`` of a model (None: its folder, which holds no revision),
        keeping the blobs its other revisions use; with ``dry_run``, only say what that would free
        (blocking)."""
        ...

    def delete(self, repo_id: str, revision: str | None) -> int | None:
        """Delete a revision, or the whole model when ``revision`` is None; return the bytes freed,
        or None when nothing of it was cached (blocking)."""
        ...

    def discard_partial(self, repo_id: str) -> int:
        """Remove what interrupted downloads of the model kept to go on from (a user's cancel);
        return how many files (blocking)."""
        ...

    def tidy(self, repo_id: str) -> bool:
        """After a download that ended without its revision (cancelled, failed): leave the
        model's folder as the library's own scan reads it, without a warning; whether anything
        changed (blocking)."""
        ...

    def remove_all_orphans(self) -> int:
        """Remove the temporary files no live process writes (what a killed service left);
        return how many (blocking)."""
        ...

    def free_bytes(self) -> int:
        """Bytes free on the cache's filesystem, without walking the cache (blocking)."""
        ...

    def cache_usage(self) -> tuple[int, int]:
        """(bytes used by the cache, bytes free on its filesystem) (blocking)."""
        ...

    def last_access(self, repo_id: str, commit: str) -> float | None:
        """The newest access time of the revision's files, as the filesystem keeps it (often at
        most once a day: ``relatime``); None when none is known (blocking)."""
        ...

    @property
    def cache_path(self) -> str: ...

    async def start(self) -> None:
        """Get ready for the first download (start what workers are forked from)."""
        ...

    async def aclose(self) -> None:
        """Release what the backend holds (worker processes, what they are forked from)."""
        ...
