"""The deployment recipes in ``deploy/`` (issue 30): the systemd unit passes ``systemd-analyze
verify`` and its very ``ExecStart`` and ``Environment`` start a service that answers and stops
cleanly on the unit's stop signal; the container recipe runs the same application with the same
settings (no container engine runs here: it is checked against the unit); the proxy streams the
events unbuffered and passes the Host the service checks."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import tls

DEPLOY = Path(__file__).resolve().parents[4] / "deploy"
UNIT = DEPLOY / "model-service.service"
HOME = "/opt/model-service"


def unit_values(name: str) -> list[str]:
    """The values of ``name=`` lines of the unit (its comments left out)."""
    found = []
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == name and not line.lstrip().startswith("#"):
            found.append(value.strip())
    return found


def unit_environment() -> dict[str, str]:
    return dict(value.split("=", 1) for value in unit_values("Environment"))


def test_the_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    checkout = Path(sys.prefix).parent  # .venv's parent: the checkout, as /opt/model-service
    unit = tmp_path / "model-service.service"
    unit.write_text(UNIT.read_text().replace(HOME, str(checkout)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model-service" not in done.stderr, done.stderr  # no warning about the unit


def test_the_units_command_starts_a_service_that_stops_on_the_units_signal(
    tmp_path: Path,
) -> None:
    [exec_start] = unit_values("ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0] == f"{HOME}/.venv/bin/uvicorn"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "uvicorn", *argv[1:]]
    argv[argv.index("--port") + 1] = str(port)
    root = tmp_path / "var-lib-models"
    env = {
        **os.environ,
        **{k: v.replace("/var/lib/models", str(root)) for k, v in unit_environment().items()},
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing is downloaded here
    }
    log = (tmp_path / "service.log").open("wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(
                    f"http://127.0.0.1:{port}/api/health", timeout=1, verify=tls()
                ).is_success:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp_path / "service.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        space = httpx.get(f"http://127.0.0.1:{port}/api/models/space", timeout=10).json()
        assert space["cache_path"] == str(root / "hub")
        assert unit_values("KillSignal") == ["SIGTERM"]
        process.send_signal(signal.SIGTERM)
        # systemd counts an exit by SIGTERM as clean (the service re-raises it once it shut
        # down, as its default handler would have ended it).
        code = process.wait(timeout=float(unit_values("TimeoutStopSec")[0]))
        assert code in (0, -signal.SIGTERM), code
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert (root / "model-service").is_dir()  # the state folder the unit names
    assert "Application shutdown complete" in (tmp_path / "service.log").read_text()


def test_the_container_runs_the_same_service_with_the_same_settings() -> None:
    recipe = (DEPLOY / "Containerfile").read_text()
    [cmd] = [json.loads(line[4:]) for line in recipe.splitlines() if line.startswith("CMD ")]
    unit_argv = shlex.split(unit_values("ExecStart")[0])
    assert cmd[:2] == unit_argv[:2]  # the same uvicorn and application
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # a container's own interfaces
    assert "--proxy-headers" in cmd
    for name, value in unit_environment().items():
        if name != "MODELS_VLLM_URLS":  # a machine's own servers: not in the image
            assert f"{name}={value}" in recipe, name
    assert "make install" in recipe  # the lock file's versions, no test tools
    assert "USER models" in recipe


def test_the_proxy_streams_events_and_passes_the_host() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    events = conf[conf.index("location /api/models/events") :]
    events = events[: events.index("}")]
    assert "proxy_buffering off;" in events
    assert "proxy_set_header Host $host;" in events
    assert conf.count("proxy_pass http://127.0.0.1:8000;") == 2
    assert "MODELS_ALLOWED_HOSTS" in conf
