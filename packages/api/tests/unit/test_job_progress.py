"""The job's progress arithmetic, as a table: what a status shows after a run of updates."""

from __future__ import annotations

import pytest

from api.models.backend import DownloadUpdate
from api.models.job import DownloadJob
from api.models.types import DownloadPhase, Model

U = DownloadUpdate

CASES: list[tuple[str, list[DownloadUpdate], dict[str, object]]] = [
    ("nothing yet", [], {"phase": DownloadPhase.RESOLVING, "percent": None}),
    (
        "half way",
        [U(total_bytes=200), U(downloaded_bytes=100)],
        {"phase": DownloadPhase.DOWNLOADING, "percent": 50.0, "downloaded_bytes": 100},
    ),
    ("an empty model", [U(total_bytes=0), U(downloaded_bytes=0)], {"percent": 100.0}),
    (
        "more than announced is 100 %, not more",
        [U(total_bytes=100), U(downloaded_bytes=150)],
        {"percent": 100.0},
    ),
    (
        "bytes fetched are a total from the adapter",
        [U(total_bytes=100), U(transferred_bytes=30), U(transferred_bytes=85)],
        {"transferred_bytes": 85},
    ),
    (
        "verifying",
        [U(total_bytes=100), U(downloaded_bytes=100), U(downloaded_bytes=40, verifying=True)],
        {"phase": DownloadPhase.VERIFYING, "verified_bytes": 40, "downloaded_bytes": 100},
    ),
    ("a retry", [U(attempt=2, retry_reason="HTTP 503", retry_kind="network")], {"attempt": 2}),
    (
        "files",
        [U(files_total=3), U(files_done=2)],
        {"files_total": 3, "files_done": 2},
    ),
]


@pytest.mark.parametrize(("updates", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_progress_after_updates(updates: list[DownloadUpdate], expected: dict[str, object]) -> None:
    job = DownloadJob(model=Model(hf_repo="org/m"))
    for update in updates:
        job.apply(update)
    progress = job.progress().model_dump()
    assert {key: progress[key] for key in expected} == expected
