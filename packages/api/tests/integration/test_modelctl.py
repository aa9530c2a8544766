"""modelctl against a running service: output, --json, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakehub import FakeHub, FakeVllm, Generated, RepoBuilder, trickle
from fakehub.samples import llama_layout
from tests.helpers import MB, modelctl, modelctl_process, running_service, tls


@pytest.fixture
def service_url(hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path) -> Iterator[str]:
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(6 * MB, seed=70)})
    repos.commit("org/slow", {"w.bin": Generated(40 * MB, seed=71)})
    repos.commit("org/llama", llama_layout(MB, seed=72))
    # 40 s at least: the tests that watch it stop it first, however loaded the machine is.
    hub.add_fault(trickle(MB, path="*/org/slow/*"))
    with running_service(cache_dir, hub.url, tmp_path / "service.log") as (url, _):
        yield url


def test_a_session(service_url: str) -> None:
    done = modelctl(service_url, "download", "org/model", "--wait")
    assert done.returncode == 0, done.stderr
    assert "org/model: DOWNLOADED" in done.stdout
    assert "org/model:latest" in done.stderr  # the progress bar's line

    status = modelctl(service_url, "status", "org/model", "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["status"] == "DOWNLOADED"

    listed = modelctl(service_url, "ls", "--json")
    assert [m["model"]["hf_repo"] for m in json.loads(listed.stdout)["models"]] == ["org/model"]
    table = modelctl(service_url, "ls")
    assert "org/model" in table.stdout
    assert "DOWNLOADED" in table.stdout
    assert "6.3 MB" in table.stdout

    verified = modelctl(service_url, "verify", "org/model")
    assert verified.returncode == 0
    assert "verified, 2 files checked" in verified.stdout

    space = json.loads(modelctl(service_url, "space", "--json").stdout)
    assert space["cache_size_bytes"] >= 6 * MB

    again = modelctl(service_url, "download", "org/model", "--json")
    assert json.loads(again.stdout)["status"] == "DOWNLOADED"

    removed = modelctl(service_url, "rm", "org/model")
    assert removed.returncode == 0
    assert "org/model: deleted" in removed.stdout
    assert modelctl(service_url, "status", "org/model").returncode == 3
    assert modelctl(service_url, "rm", "org/model").returncode == 3
    assert modelctl(service_url, "verify", "org/model").returncode == 3


def test_busy_cancel_and_usage_exit_codes(service_url: str) -> None:
    started = modelctl(service_url, "download", "org/slow")
    assert started.returncode == 0
    assert "org/slow:latest: DOWNLOADING" in started.stdout
    busy = modelctl(service_url, "download", "org/slow")
    assert busy.returncode == 4
    assert "already downloading" in busy.stderr
    cancelled = modelctl(service_url, "cancel", "org/slow", "--json")
    assert cancelled.returncode == 0
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert modelctl(service_url, "cancel", "org/slow").returncode == 3
    bad = modelctl(service_url, "status", "../etc")
    assert bad.returncode == 2
    assert "hf_repo" in bad.stderr
    assert modelctl(service_url, "frobnicate").returncode == 2
    # A typo: refused at once with the API's words (404), nothing started.
    typo = modelctl(service_url, "download", "org/missing", "--wait")
    assert typo.returncode == 3, (typo.stdout, typo.stderr)
    assert "not found on the Hub" in typo.stderr


def test_unreachable_service_is_a_failure() -> None:
    # As its own process: the entry point, and the exit code a shell sees.
    result = modelctl_process("http://127.0.0.1:9", "ls")
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_rough_edges_a_new_user_hits(service_url: str) -> None:
    # A commit named like an emoji code, a name like markup: printed as they are.
    fire = modelctl(service_url, "download", "org/model", "--commit", "fire")
    assert fire.returncode == 3, (fire.stdout, fire.stderr)  # no such branch: refused (404)
    assert "'fire'" in fire.stderr or " fire " in fire.stderr, fire.stderr
    assert "\N{FIRE}" not in fire.stdout + fire.stderr
    marked = modelctl(service_url, "status", "org/model", "--commit", "red]x[")
    assert marked.returncode == 2
    assert "hf_commit" in marked.stderr
    # --json before the command, and a URL without its scheme.
    bare = service_url.removeprefix("http://")
    listed = modelctl(service_url, "--json", "--url", bare, "ls")
    assert listed.returncode == 0, listed.stderr
    assert "models" in json.loads(listed.stdout)
    wrong = modelctl(service_url, "--url", "ftp://x", "ls")
    assert wrong.returncode == 2
    assert "--url must be like http://127.0.0.1:8000" in wrong.stderr
    # rm of a running download says what it did and what is left.
    assert modelctl(service_url, "download", "org/slow").returncode == 0
    removed = modelctl(service_url, "rm", "org/slow")
    assert removed.returncode == 0
    assert "download cancelled; " in removed.stdout
    left = modelctl(service_url, "status", "org/slow", "--json")
    if json.loads(left.stdout)["status"] == "NOT_FOUND":  # stopped before its first file
        assert "no file of it was complete: nothing stays" in removed.stdout
    else:
        assert "the files it completed stay in the cache (PARTIAL)" in removed.stdout


def test_ctrl_c_on_wait_says_the_download_goes_on(service_url: str) -> None:
    # PYTHONFAULTHANDLER: should it hang, SIGABRT makes it print where each thread is.
    env = {**os.environ, "MODELCTL_URL": service_url, "COLUMNS": "120", "PYTHONFAULTHANDLER": "1"}
    # As in a terminal, Ctrl-C has its default meaning in modelctl. (An ignored SIGINT is
    # inherited across exec, and this test process can have it ignored for a moment: seen under
    # load, SIGINT and SIGQUIT ignored together, the mark of a system() call in another thread.
    # modelctl, like Python, respects an inherited "ignore", as shells want for background jobs.)
    with_default_sigint = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
        " sys.argv[0] = 'modelctl'; runpy.run_module('api.cli', run_name='__main__')"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", with_default_sigint, "download", "org/slow", "--wait"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Until the service runs the download (asked directly: a modelctl per poll is slow when
    # the machine is loaded, and the download must still run when the Ctrl-C comes).
    deadline = time.monotonic() + 60
    body = {"hf_repo": "org/slow"}
    status_url = f"{service_url}/api/models/status"
    while httpx.post(status_url, json=body, verify=tls()).json()["status"] != "DOWNLOADING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # Where the signal is: pending, blocked or caught, thread by thread.
        masks = [
            " ".join(line for line in status.read_text().splitlines() if line.startswith("Sig"))
            for status in Path(f"/proc/{process.pid}/task").glob("*/status")
        ]
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate(timeout=30)
        pytest.fail(f"modelctl did not exit within 30 s of Ctrl-C: {masks}\n{stderr}")
    assert process.returncode == 130
    assert "goes on downloading in the service" in stderr
    assert "modelctl cancel org/slow" in stderr
    status = json.loads(modelctl(service_url, "status", "org/slow", "--json").stdout)
    assert status["status"] == "DOWNLOADING"


def test_choosing_the_files(service_url: str) -> None:
    plan = modelctl(service_url, "plan", "org/llama", "--files", "vllm")
    assert plan.returncode == 0, plan.stderr
    rows = [line.split("│") for line in plan.stdout.splitlines() if line.count("│") == 4]
    marked = {cells[2].strip() for cells in rows if cells[1].strip() == "*"}
    assert "model-00001-of-00002.safetensors" in marked
    assert "pytorch_model-00001-of-00002.bin" not in marked
    assert "original/consolidated.00.pth" not in marked
    assert "safetensors" in plan.stdout
    assert "chosen" in plan.stdout
    assert "fits" in plan.stdout

    done = modelctl(
        service_url, "download", "org/llama", "--files", "vllm", "--exclude", "README.md", "--wait"
    )
    assert done.returncode == 0, done.stderr
    assert "[files: vllm - README.md]" in done.stdout
    table = modelctl(service_url, "ls")
    assert "vllm - README.md" in table.stdout

    nothing = modelctl(service_url, "download", "org/llama", "--include", "*.gguf")
    assert nothing.returncode == 2  # 422: the selection matches no file
    assert "matches no file" in nothing.stderr


def test_updates_update_prune_and_a_forced_rm(
    hub: FakeHub, repos: RepoBuilder, cache_dir: Path, tmp_path: Path
) -> None:
    old = repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(MB, seed=73)})
    with (
        FakeVllm([("served", "org/model")]) as vllm,
        running_service(
            cache_dir, hub.url, tmp_path / "service.log", MODELS_VLLM_URLS=vllm.url
        ) as (url, _),
    ):
        assert modelctl(url, "download", "org/model", "--wait").returncode == 0
        new = repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(MB, seed=74)})
        listed = modelctl(url, "updates", "--refresh")
        assert listed.returncode == 0, listed.stderr
        assert "yes" in listed.stdout
        assert old[:12] in listed.stdout
        assert new[:12] in listed.stdout
        assert "`modelctl update org/model` fetches one" in listed.stdout
        updated = modelctl(url, "update", "org/model")
        assert updated.returncode == 0, updated.stderr
        assert "org/model: DOWNLOADED" in updated.stdout
        assert "up to date" in modelctl(url, "updates").stdout
        assert modelctl(url, "update", "org/model", "--commit", old).returncode == 2

        preview = modelctl(url, "prune", "--dry-run")
        assert f"would remove org/model@{old[:12]}" in preview.stdout
        assert (cache_dir / "models--org--model" / "snapshots" / old).is_dir()
        pruned = modelctl(url, "prune")
        assert f"removed org/model@{old[:12]}" in pruned.stdout
        assert not (cache_dir / "models--org--model" / "snapshots" / old).exists()

        table = modelctl(url, "ls")
        assert "IN USE BY" in table.stdout
        assert "(served)" in table.stdout
        refused = modelctl(url, "rm", "org/model")
        assert refused.returncode == 4  # 409: in use
        assert "in use by the vLLM server" in refused.stderr
        assert "run it again with --force" in refused.stderr
        forced = modelctl(url, "rm", "org/model", "--force")
        assert forced.returncode == 0, forced.stderr
        assert "org/model: deleted" in forced.stdout


def test_the_bandwidth_cap(service_url: str) -> None:
    assert modelctl(service_url, "bandwidth").stdout.strip() == "bandwidth cap: none"
    assert modelctl(service_url, "download", "org/slow").returncode == 0
    capped = modelctl(service_url, "bandwidth", "40MB/s")
    assert capped.returncode == 0, capped.stderr
    assert capped.stdout.splitlines() == [
        "bandwidth cap: 40.0 MB/s",
        "  org/slow:latest: 40.0 MB/s",
    ]
    status = modelctl(service_url, "status", "org/slow")
    assert "[capped at 40.0 MB/s]" in status.stdout
    kibi = modelctl(service_url, "bandwidth", "400KiB/s", "--json")
    assert json.loads(kibi.stdout)["max_bytes_per_second"] == 409600
    assert modelctl(service_url, "bandwidth", "fast").returncode == 2
    too_low = modelctl(service_url, "bandwidth", "1k")
    assert too_low.returncode == 2, too_low  # the API's 422, in its words
    assert "65536" in too_low.stderr
    assert modelctl(service_url, "bandwidth", "none").stdout.startswith("bandwidth cap: none")
    assert modelctl(service_url, "cancel", "org/slow").returncode == 0


def test_the_habits_of_hf_and_ollama(service_url: str) -> None:
    """--version, --revision (as hf and vLLM say it), ps, show, a --wait that joins a download
    under way, and output piped to another program that is not cut at 80 columns (issue 30)."""
    version = modelctl(service_url, "--version")
    assert version.returncode == 0
    assert version.stdout.startswith("modelctl ")
    # The selection's words make a status line far over 80 characters: one line, whole, from a
    # modelctl process whose output is a pipe (and whose terminal would say 80 columns).
    pattern = "a-pattern-long-enough-to-pass-eighty-columns-by-itself-*.safetensors"
    done = modelctl_process(
        service_url, "download", "org/model", "--revision", "main", "--exclude", pattern, "--wait"
    )
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stdout.splitlines() if "[files:" in line]
    nothing = modelctl_process(service_url, "download", "org/model", "--include", pattern)
    assert nothing.returncode == 2
    assert len(nothing.stderr.strip().splitlines()) == 1  # the error, whole, on one line
    assert len(line) > 80
    assert pattern in line
    shown = modelctl(service_url, "show", "org/model", "-r", "main")
    assert shown.returncode == 0, shown.stderr
    assert "DOWNLOADED" in shown.stdout
    assert "main" in shown.stdout
    assert json.loads(modelctl(service_url, "show", "org/model", "--json").stdout)["revisions"]
    assert modelctl(service_url, "show", "org/nothing").returncode == 3
    assert "nothing is downloading" in modelctl(service_url, "ps").stdout
    # A download under way: ps shows it, and a --wait of the same model follows it (it had
    # exited 4 with advice); it ends when the download is cancelled, saying so.
    assert modelctl(service_url, "download", "org/slow").returncode == 0
    listed = modelctl(service_url, "ps")
    assert "org/slow:latest" in listed.stdout
    assert "this service" in listed.stdout
    env = {**os.environ, "MODELCTL_URL": service_url}
    joining = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "download", "org/slow", "--wait"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert joining.stderr is not None
        first = joining.stderr.readline()  # the line it writes before following
        assert "org/slow:latest is already downloading: following it" in first, first
        assert modelctl(service_url, "cancel", "org/slow").returncode == 0
        out, _ = joining.communicate(timeout=60)
    finally:
        if joining.poll() is None:
            joining.kill()
    assert joining.returncode == 1  # followed to its end: cancelled, not downloaded
    assert "org/slow" in out


def test_pin_unpin_and_the_budget(service_url: str) -> None:
    assert modelctl(service_url, "download", "org/model", "--wait").returncode == 0
    pinned = modelctl(service_url, "pin", "org/model")
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.startswith("org/model@main: pinned (keeps ")
    shown = modelctl(service_url, "budget")
    assert shown.returncode == 0, shown.stderr
    assert "budget: none (nothing is evicted)" in shown.stdout
    assert "kept org/model@" in shown.stdout
    assert ": pinned" in shown.stdout
    assert json.loads(modelctl(service_url, "status", "org/model", "--json").stdout)["pinned"]
    assert (
        modelctl(service_url, "unpin", "org/model").stdout.strip() == "org/model@main: not pinned"
    )
    again = modelctl(service_url, "unpin", "org/model")
    assert again.returncode == 3
    assert "is not pinned" in again.stderr
    history = modelctl(service_url, "history", "-n", "5")
    assert history.returncode == 0, history.stderr
    [line] = history.stdout.splitlines()
    assert " downloaded org/model@" in line
    assert " in " in line  # its duration
