"""Domain errors of the models package. Each carries the data a caller needs; the routes map them to
HTTP codes in one table (``api.models.routes.ERROR_STATUS``)."""

from __future__ import annotations

import enum

from api.units import human_bytes


class ModelError(Exception):
    """Base class: ``str(error)`` is a message safe to show a client (no URL, path or token).

    Every one crosses a process boundary intact (a fleet node's refusal comes back to the service
    as the error it raised, its class, message and data): pickling rebuilds it without calling
    its own constructor, whose parameters are not its ``args``."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuilt, (type(self), self.args, self.__dict__))


def _rebuilt(
    cls: type[ModelError], args: tuple[object, ...], state: dict[str, object]
) -> ModelError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class DownloadConflict(ModelError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"{task_id} is already downloading; poll POST /api/models/status")
        self.task_id = task_id


class DownloadCancelled(ModelError):
    """A DELETE cancelled the download while it was starting: nothing was downloaded."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"{task_id} was cancelled while it was starting; nothing was downloaded")
        self.task_id = task_id


class TooManyDownloads(ModelError):
    def __init__(self, limit: int, retry_after: int, queued: int = 0) -> None:
        queue = f" and the queue of {queued} is full" if queued else ""
        super().__init__(
            f"all {limit} download slots are busy{queue}; retry in {retry_after} s or cancel a"
            " download"
        )
        self.limit = limit
        self.retry_after = retry_after


class TooManyVerifications(ModelError):
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(
            f"{limit} verification(s) already running (MODELS_MAX_CONCURRENT_VERIFICATIONS);"
            f" retry in {retry_after} s"
        )
        self.limit = limit
        self.retry_after = retry_after


class ModelNotFound(ModelError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"{task_id} is neither downloading nor in the cache")
        self.task_id = task_id


class InsufficientStorage(ModelError):
    """The files still missing do not fit: ``available`` is the free space less what running
    downloads still need (``reserved``) and less the margin kept free (``margin``)."""

    def __init__(
        self, needed: int, available: int, free: int = 0, reserved: int = 0, margin: int = 0
    ) -> None:
        super().__init__(
            f"not enough free space in the cache: {needed} bytes ({human_bytes(needed)}) needed,"
            f" {available} ({human_bytes(available)}) available: {human_bytes(free)} free, less"
            f" {human_bytes(reserved)} that running downloads still need, less"
            f" {human_bytes(margin)} kept free (MODELS_SPACE_MARGIN_BYTES)"
        )
        self.needed = needed
        self.available = available
        self.free = free
        self.reserved = reserved
        self.margin = margin


class BudgetExceeded(ModelError):
    """A download needs more room than eviction may free: ``needed`` bytes over the budget (or
    the free space); evicting every revision that may go would free ``evictable``; ``kept``
    says what may not go, and why (pinned, served, downloading). Nothing was removed."""

    def __init__(self, needed: int, evictable: int, kept: list[str], budget: int | None) -> None:
        limit = (
            f"the cache budget ({human_bytes(budget)}, MODELS_CACHE_BUDGET_BYTES)"
            if budget is not None
            else "the free space"
        )
        why = "; ".join(kept[:5]) + (f"; and {len(kept) - 5} more" if len(kept) > 5 else "")
        super().__init__(
            f"not enough room within {limit}: {human_bytes(needed)} must be freed, and evicting"
            f" every revision that may go would free {human_bytes(evictable)}"
            + (f"; kept: {why}" if why else "")
            + ". Nothing was removed: unpin, delete or raise the budget"
        )
        self.needed = needed
        self.evictable = evictable
        self.kept = kept
        self.budget = budget


class NoBudget(ModelError):
    def __init__(self) -> None:
        super().__init__(
            "no cache budget is set (MODELS_CACHE_BUDGET_BYTES): give target_bytes, the most the"
            " cache may hold after the eviction"
        )


class BadCursor(ModelError):
    """A ``GET /list`` cursor this service did not give, or given with another sort."""


class NotPinned(ModelError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not pinned")
        self.what = what


class UnsafeCachePath(ModelError):
    """A link (or another kind of file) stands where the model's cache folder holds a folder or
    a file, or leads outside it (planted, or swapped in while the service worked): it was not
    followed. ``where``: the entry, relative to the cache folder, when known."""

    def __init__(self, repo_id: str, where: str | None = None, partly: bool = False) -> None:
        done = (
            "the delete stopped there and some of its files may already be gone"
            if partly
            else "nothing was deleted"
        )
        at = f" ({where})" if where else ""
        super().__init__(
            f"the cache folder of {repo_id} holds a link{at} that the service does not follow:"
            f" it leads outside the model's folder, or stands where a folder or file belongs;"
            f" {done}. Remove the link, or the model's folder, and try again"
        )
        self.repo_id = repo_id
        self.where = where


class RevisionBusy(ModelError):
    """Another process sharing the cache is downloading this model: nothing was deleted."""

    def __init__(self, repo_id: str, commit: str) -> None:
        super().__init__(
            f"{repo_id} at {commit} is being downloaded by another process sharing the cache;"
            " nothing was deleted"
        )
        self.repo_id = repo_id
        self.commit = commit


class CacheNotWritable(ModelError):
    """The cache (or the model's folder) is read-only or not ours to change."""

    def __init__(self, repo_id: str, partly: bool = False) -> None:
        done = "some of its files may already be gone" if partly else "nothing was deleted"
        super().__init__(
            f"the cache folder of {repo_id} is not writable (read-only file system or"
            f" permissions); {done}"
        )
        self.repo_id = repo_id


class ModelInUse(ModelError):
    """A vLLM server serves the revision (its ``GET /v1/models``): nothing was deleted."""

    def __init__(self, what: str, server: str, served_as: str) -> None:
        super().__init__(
            f"{what} is in use by the vLLM server at {server} (served as {served_as!r}); nothing"
            " was deleted. Stop that server first, or add ?force=true to delete it anyway"
        )
        self.server = server


class InUseUnknown(ModelError):
    """A configured vLLM server did not answer: whether it serves the revision is not known."""

    def __init__(self, what: str, server: str, why: str) -> None:
        super().__init__(
            f"cannot tell whether {what} is in use: the vLLM server at {server} did not answer"
            f" ({why}); nothing was deleted. Add ?force=true to delete it anyway"
        )
        self.server = server


class SelectionUnusable(ModelError):
    """The files asked for cannot be downloaded as asked: the selection matches no file of the
    revision, or ``files: vllm`` finds no weights vLLM's default loader reads."""


class HubAnswer(ModelError):
    """The Hub could not give a revision's file list (``POST /plan``): the failure, by kind."""

    def __init__(self, failure: DownloadFailed) -> None:
        super().__init__(str(failure))
        self.kind = failure.kind
        self.retry_after = failure.retry_after


class OnNode(ModelError):
    """A node of the fleet refused: ``error`` is the ``ModelError`` its service raised, as it
    raised it; the answer is that error's (its status code), with the node named."""

    def __init__(self, node: str, error: ModelError) -> None:
        super().__init__(f"node {node[:12]}: {error}")
        self.node = node
        self.error = error


class FleetUnavailable(ModelError):
    """No node of the fleet could act (each left, or did not answer in time): the fleet is
    unavailable for now, which is neither the request's fault nor a bug (503)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"no node of the fleet could answer: {why}")


class NodesLackSpace(ModelError):
    """Some targeted nodes cannot fit the download: nothing started anywhere."""

    def __init__(self, lacking: list[tuple[str, int, int]]) -> None:
        names = "; ".join(
            f"node {node[:12]} needs {needed} bytes, has {available}"
            for node, needed, available in lacking
        )
        super().__init__(f"not enough space on {len(lacking)} node(s): {names}; nothing started")
        self.lacking = lacking


class NotAFleet(ModelError):
    """``nodes`` was given to a service that runs on one machine."""

    def __init__(self) -> None:
        super().__init__(
            "nodes: this service runs on one machine (MODELS_RAY_ADDRESS is unset); leave nodes out"
        )


class UnknownNode(ModelError):
    def __init__(self, asked: str) -> None:
        super().__init__(
            f"nodes: {asked!r} is not the id (or a unique prefix) of an alive node of the fleet;"
            " GET /api/models/space lists them"
        )
        self.asked = asked


class FailureKind(enum.Enum):
    NOT_FOUND = "not_found"
    GATED = "gated"
    UNAUTHORIZED = "unauthorized"
    REVISION_NOT_FOUND = "revision_not_found"
    DISK_FULL = "disk_full"
    PERMISSION = "permission"
    NETWORK = "network"
    RATE_LIMITED = "rate_limited"  # the Hub answered 429: too many calls for the token
    INVALID = "invalid"
    CRASHED = "crashed"
    TIMEOUT = "timeout"
    STALLED = "stalled"
    CORRUPT = "corrupt"
    UNTRUSTED = "untrusted_answer"  # the Hub's metadata failed a safety check
    UNEXPECTED = "unexpected"


class DownloadFailed(Exception):
    """A download (or one attempt of it) ended without the model: the one failure type of the
    adapter and the manager. ``str(error)`` is safe to show a client. Not a ``ModelError``: it
    becomes a status's ``error_message``, never an HTTP error."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        attempts: int = 1,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.attempts = attempts
        self.retryable = retryable  # whether another attempt could succeed
        self.retry_after = retry_after  # what the Hub asked to wait, when it did
