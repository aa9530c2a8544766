"""``make demo`` (scripts/demo.py): a busy port fails loudly; both servers start and stop together."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port, tls

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


def started_demo(tmp_path: Path) -> tuple[subprocess.Popen[str], int, int, httpx.Response]:
    """The demo on two free ports, and the service's first answer. Under load another test's
    server can take a port between its pick and the demo's bind: the demo then exits saying the
    port is in use (or the answer came from that other server), and it is tried on other ports."""
    for _ in range(3):
        port, hub_port = free_port(), free_port()
        process = demo(tmp_path, port, hub_port)
        deadline = time.monotonic() + 120
        answer = None
        while process.poll() is None and time.monotonic() < deadline:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/api/models/status",
                    json={"hf_repo": "demo/tiny-model"},
                    timeout=2,
                    verify=tls(),
                )
                break
            except httpx.TransportError:
                time.sleep(0.2)
        ours = answer is not None and answer.headers.get("content-type") == "application/json"
        if answer is not None and ours and process.poll() is None:
            return process, port, hub_port, answer
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert answer is not None or "in use" in stderr, stderr
    raise AssertionError("the demo found no free ports in 3 tries")


def test_both_servers_start_and_stop_together(tmp_path: Path) -> None:
    process, port, hub_port, answer = started_demo(tmp_path)
    try:
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
    # It starts again at once on the same ports: the connections of the demo just stopped, in
    # TIME_WAIT for a minute, do not count as the ports being in use (they did: the README's
    # crash walkthrough failed at this very step).
    again = demo(tmp_path, port, hub_port)
    try:
        deadline = time.monotonic() + 120
        while again.poll() is None and time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2, verify=tls())
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert again.poll() is None, again.communicate(timeout=60)[1]
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=60)
