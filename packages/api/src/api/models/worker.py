"""The download worker: ``python -m api.models.worker``, one process per download.

Reads one JSON line on stdin (what to download, where from, the retry policy; the token comes in
the ``HF_TOKEN`` environment variable), runs ``snapshot_download`` with classified retries, and
writes JSON lines on stdout:

- ``{"type": "resolved", "commit", "total_bytes", "files_total", "downloaded_bytes", "attempt"}``
- ``{"type": "progress", "downloaded_bytes", "files_done", "attempt"}`` (at most every 0.25 s)
- ``{"type": "retry", "attempt", "reason", "wait"}``
- ``{"type": "done", "commit"}`` or ``{"type": "failed", "kind", "message", "attempts"}``

It exits when its stdin closes (the service died) and, on Linux, when its parent dies.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.hf_api import RepoFile
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from api.models.backend import FailureKind
from api.models.cache import ModelCache
from api.models.hub import classify_error, retry_after_seconds

PROGRESS_INTERVAL = 0.25


class Reporter:
    """Writes events to the real stdout (the library's own output goes to stderr)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.attempt = 1
        self.base_bytes = 0
        self.bytes = 0
        self.files = 0
        self._last = 0.0

    def send(self, type_: str, **fields: Any) -> None:
        line = json.dumps({"type": type_, **fields}).encode() + b"\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def start_attempt(self, attempt: int, present_bytes: int) -> None:
        with self._lock:
            self.attempt, self.base_bytes, self.bytes, self.files = attempt, present_bytes, 0, 0

    def add(self, nbytes: int = 0, nfiles: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.files += nfiles
            now = time.monotonic()
            if now - self._last < PROGRESS_INTERVAL and not nfiles:
                return
            self._last = now
            payload = {
                "downloaded_bytes": self.base_bytes + max(self.bytes, 0),
                "files_done": self.files,
                "attempt": self.attempt,
            }
        self.send("progress", **payload)


def progress_class(reporter: Reporter) -> type:
    """A tqdm stand-in for ``snapshot_download(tqdm_class=...)`` that feeds the reporter.

    snapshot_download makes its bars with this class: the byte bar (``desc`` "Reconstructing...",
    fed by every file's download) and the file bar of its thread map (``desc`` "Fetching N files").
    Other bars (the network-transfer bar) are ignored. A test pins this against the library.
    """

    class _Progress:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            desc = str(kwargs.get("desc") or "")
            self.kind = (
                "bytes"
                if desc.startswith("Reconstruct")
                else "files"
                if "Fetching" in desc
                else "other"
            )
            self.n = kwargs.get("initial", 0) or 0
            self.total = kwargs.get("total")
            self.format_dict: dict[str, Any] = {}

        def update(self, n: float | None = 1) -> None:
            step = int(n or 0)
            self.n += step
            if self.kind == "bytes":
                reporter.add(nbytes=step)
            elif self.kind == "files":
                reporter.add(nfiles=step)

        def __enter__(self) -> _Progress:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def close(self) -> None:
            pass

        def refresh(self) -> None:
            pass

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_description_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

    return _Progress


def _exit_with_parent() -> None:
    """Die with the service: on stdin EOF, and (Linux) by PR_SET_PDEATHSIG when the parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="stdin-watch").start()


def run(spec: dict[str, Any], reporter: Reporter) -> int:
    repo_id: str = spec["repo_id"]
    revision: str = spec["revision"]
    cache_dir = Path(spec["cache_dir"])
    endpoint: str = spec["endpoint"]
    # Only the configured token: never a token file the library would find on its own.
    token: str | bool = os.environ.get("HF_TOKEN") or False
    cache = ModelCache(cache_dir)
    api = HfApi(endpoint=endpoint, token=token)
    state: dict[str, Any] = {"commit": None, "tree": None}
    tqdm_class = progress_class(reporter)
    min_wait, max_wait = float(spec["min_backoff"]), float(spec["max_backoff"])
    backoff = wait_random_exponential(multiplier=min_wait or 0.001, max=max_wait)

    def wait(retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        hinted = retry_after_seconds(error) if error is not None else None
        return min(max_wait, hinted) if hinted is not None else backoff(retry_state)

    def before_sleep(retry_state: RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        reason = classify_error(error, repo_id, revision)[2] if error is not None else "retry"
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        reporter.send(
            "retry", attempt=retry_state.attempt_number + 1, reason=reason, wait=round(delay, 3)
        )

    def retryable(error: BaseException) -> bool:
        return classify_error(error, repo_id, revision)[1]

    def attempt(number: int) -> str:
        if state["tree"] is None:
            # The file list first: its sizes give total_bytes before the first byte of content.
            commit = api.repo_info(repo_id, revision=revision).sha
            assert commit is not None
            tree = [
                f
                for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                if isinstance(f, RepoFile)
            ]
            state["commit"], state["tree"] = commit, tree
        commit, tree = state["commit"], state["tree"]
        snapshot = cache.folder(repo_id) / "snapshots" / commit
        present = sum(f.size for f in tree if _size(snapshot / f.path) == f.size)
        reporter.start_attempt(number, present)
        reporter.send(
            "resolved",
            commit=commit,
            total_bytes=sum(f.size for f in tree),
            files_total=len(tree),
            downloaded_bytes=present,
            attempt=number,
        )
        snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            token=token,
            tqdm_class=tqdm_class,
        )
        return str(commit)

    counter = {"n": 0}

    def one_attempt() -> str:
        counter["n"] += 1
        return attempt(counter["n"])

    retrying = Retrying(
        stop=stop_after_attempt(int(spec["attempts"])),
        wait=wait,
        retry=retry_if_exception(retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        commit = retrying(one_attempt)
    except BaseException as error:  # report every failure, then exit non-zero
        kind, retried, message = classify_error(error, repo_id, revision)
        attempts = counter["n"]
        if retried:
            message = f"{message}; gave up after {attempts} attempts"
        else:
            message = f"{message} (attempt {attempts}, not retried)"
        reporter.send("failed", kind=kind.value, message=message, attempts=attempts)
        return 1
    reporter.send("done", commit=commit)
    return 0


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def main() -> int:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # Anything the library prints goes to stderr, never into the event stream.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    line = sys.stdin.buffer.readline()
    reporter = Reporter(out)
    try:
        spec = json.loads(line)
    except ValueError:
        reporter.send(
            "failed", kind=FailureKind.UNEXPECTED.value, message="bad worker input", attempts=0
        )
        return 2
    _exit_with_parent()
    return run(spec, reporter)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip interpreter shutdown: the stdin watcher thread may still block in read().
    os._exit(code)
