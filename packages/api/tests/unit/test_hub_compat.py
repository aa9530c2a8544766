"""Each behaviour of huggingface_hub that ``api.models.hub._compat`` relies on, pinned against the
installed library: an upgrade that changes one fails here, naming it. (The shared store's links:
``test_anchored.py``; the pattern matcher: ``test_selection.py``; the guarded client the library
builds with its event hook: ``tests/adapter``.)"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys

import pytest
from huggingface_hub import file_download, set_client_factory
from huggingface_hub.utils import _http

from api.models.hub import _compat


def test_the_token_follows_a_redirect_to_the_same_origin_or_the_hub_only() -> None:
    mirror = "http://127.0.0.1:8900/org/m/resolve/main/w.bin"
    assert _compat.same_origin_or_hub(mirror, "http://127.0.0.1:8900/cdn/abc")
    assert not _compat.same_origin_or_hub(mirror, "http://127.0.0.1:8901/cdn/abc")
    assert not _compat.same_origin_or_hub(mirror, "https://evil.example/abc")
    assert _compat.same_origin_or_hub(mirror, "https://huggingface.co/org/m/resolve/main/w.bin")


def test_the_headers_carry_the_token_given() -> None:
    headers = _compat.build_hf_headers(token="hf_" + "x" * 30)
    assert headers["authorization"] == "Bearer hf_" + "x" * 30
    assert "user-agent" in headers


def test_xet_is_available_exactly_when_hf_xet_is_installed() -> None:
    assert _compat.is_xet_available() is (importlib.util.find_spec("hf_xet") is not None)


def test_xet_off_and_the_chunk_size_are_read_at_each_download(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker sets them after import: the library must read them from ``constants`` when it
    downloads, not copy them at its own import."""
    source = inspect.getsource(file_download)
    assert "constants.DOWNLOAD_CHUNK_SIZE" in source
    assert "constants.HF_HUB_DISABLE_XET" in source or "is_xet_available()" in source
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", constants.HF_HUB_DISABLE_XET)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", constants.DOWNLOAD_CHUNK_SIZE)
    _compat.disable_xet(True)
    assert _compat.xet_disabled() is True
    assert _compat.is_xet_available() is False  # the library's own switch, read now
    _compat.disable_xet(False)
    assert _compat.xet_disabled() is False
    _compat.set_download_chunk_size(123_456)
    assert constants.DOWNLOAD_CHUNK_SIZE == 123_456


def test_the_request_hook_is_the_one_the_librarys_own_client_uses() -> None:
    """The guard builds the library's default client plus its own transport: the same hook."""
    assert _compat.hf_request_event_hook is _http.hf_request_event_hook
    client = _http.default_client_factory()
    try:
        assert _compat.hf_request_event_hook in client.event_hooks["request"]
    finally:
        client.close()
    assert callable(set_client_factory)


def test_hf_xet_is_imported_only_by_a_xet_download() -> None:
    """The worker tells hf_xet's bytes from the plain HTTP download's (both feed the library's
    transfer bar) by whether hf_xet is imported: neither the worker nor the library imports it
    before a Xet download."""
    code = (
        "import sys, huggingface_hub, api.models.hub.worker, api.models.hub.zygote;"
        " from huggingface_hub import snapshot_download, file_download;"
        " print('hf_xet' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False", found.stderr


def test_the_plain_http_download_feeds_the_transfer_bar_too() -> None:
    """Why the worker cannot read the transfer bar as hf_xet's alone (huggingface_hub 2.x)."""
    source = inspect.getsource(file_download.http_get)
    assert "update_transfer" in source
