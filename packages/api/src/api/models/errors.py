"""Domain errors of the models package. Each carries the data a caller needs; the routes map them to
HTTP codes in one table (``api.models.routes.ERROR_STATUS``)."""

from __future__ import annotations


class ModelError(Exception):
    """Base class: ``str(error)`` is a message safe to show a client (no URL, path or token)."""


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
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(
            f"all {limit} download slots are busy; retry in {retry_after} s or cancel a download"
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
    def __init__(self, needed: int, available: int) -> None:
        super().__init__(
            f"not enough free space in the cache: {needed} bytes needed, {available} available"
        )
        self.needed = needed
        self.available = available


class UnsafeCachePath(ModelError):
    """A path in a model's cache folder leads outside it (a planted symlink): nothing was deleted."""

    def __init__(self, repo_id: str) -> None:
        super().__init__(
            f"the cache folder of {repo_id} holds a link that leads outside it; nothing was deleted"
        )
        self.repo_id = repo_id


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
