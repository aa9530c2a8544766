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


def test_no_eta_until_the_speed_was_measured_a_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first fraction of a second of a download (a small file, a first burst) is no speed
    to promise a time by: it said '648 h 16 min left' at the start."""
    import time

    from api.models import job as job_module

    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    job = DownloadJob(model=Model(hf_repo="org/m"))
    job.apply(U(total_bytes=10_000_000_000, downloaded_bytes=0))
    clock[0] += 0.5
    job.apply(U(downloaded_bytes=1_000))  # 2 kB/s: a start, not a speed
    progress = job.progress()
    assert progress.bytes_per_second == 2000.0
    assert progress.eta_seconds is None
    clock[0] += job_module.ETA_AFTER_SECONDS
    job.apply(U(downloaded_bytes=1_000 + 300_000_000))
    eta = job.progress().eta_seconds
    assert eta is not None
    assert eta < 3600  # at the measured speed, not the first one's
