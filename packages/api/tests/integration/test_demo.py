"""``make demo`` (scripts/demo.py): a busy port fails loudly; both servers start and stop together."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port

SCRIPT = Path(__file__).resolve().parents[4] / "scripts" / "demo.py"


def demo(tmp_path: Path, port: int, hub_port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--port",
            str(port),
            "--hub-port",
            str(hub_port),
            "--folder",
            str(tmp_path / "demo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_busy_hub_port_fails_loudly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        process = demo(tmp_path, free_port(), busy)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"port {busy} (hub) is in use" in stderr
    assert "HUB_PORT=" in stderr


def test_both_servers_start_and_stop_together(tmp_path: Path) -> None:
    port, hub_port = free_port(), free_port()
    process = demo(tmp_path, port, hub_port)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/api/models/status",
                    json={"hf_repo": "demo/tiny-model"},
                    timeout=2,
                )
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert answer.json()["status"] == "NOT_FOUND"
        assert (
            httpx.get(f"http://127.0.0.1:{hub_port}/api/models/demo/tiny-model").status_code == 200
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    for used in (port, hub_port):
        with socket.socket() as probe:
            # Free again (connections in TIME_WAIT aside): both servers are gone.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", used))
            probe.listen()
