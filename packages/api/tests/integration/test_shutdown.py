"""The service stops promptly, whatever is connected (issue 12)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from fakehub import FakeHub
from tests.helpers import service_from_its_entry_point


def test_sigterm_with_event_streams_open_exits_within_seconds(
    hub: FakeHub, cache_dir: Path, tmp_path: Path
) -> None:
    with service_from_its_entry_point(cache_dir, hub.url, tmp_path / "service.log") as (
        url,
        process,
    ):
        connected = threading.Barrier(4, timeout=20)
        ended: list[int] = []

        def listen() -> None:
            with httpx.stream("GET", f"{url}/api/models/events", timeout=60) as response:
                lines = response.iter_lines()
                next(lines)  # ": connected"
                connected.wait()
                count = sum(1 for _ in lines)
            ended.append(count)

        listeners = [threading.Thread(target=listen, daemon=True) for _ in range(3)]
        for listener in listeners:
            listener.start()
        connected.wait()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        elapsed = time.monotonic() - started
        for listener in listeners:
            listener.join(timeout=10)
    assert elapsed < 5, f"the service took {elapsed:.1f} s to stop"
    # uvicorn re-raises the signal once it has shut down gracefully: killed by SIGTERM is its
    # normal end (a crash would be another code).
    assert process.returncode in (0, -signal.SIGTERM)
    assert len(ended) == 3  # each stream ended cleanly (no error in its reader)
