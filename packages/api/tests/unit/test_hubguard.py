"""The hook the guard relies on: huggingface_hub 2.x builds its shared client with the factory a
process sets (``set_client_factory``), and the guard's transport sits in it."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import get_session

from api.models.hub import guard
from api.models.hub.guard import GuardedTransport, UntrustedAnswer, check_headers


def test_the_library_uses_the_guarded_client() -> None:
    guard.install(guard.Limits(max_files=7))
    try:
        transport = get_session()._transport
        assert isinstance(transport, GuardedTransport)
        assert transport.limits.max_files == 7
    finally:
        guard.install(guard.Limits())  # what a service of default settings installs


def test_the_tls_context_is_the_librarys_default_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made once per process (the zygote makes it before it forks), verifying as the library's
    own does, and made again from SSL_CERT_FILE when that changes."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    context = guard.ssl_context()
    assert guard.ssl_context() is context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    default = httpx2.create_ssl_context()
    assert len(context.get_ca_certs()) == len(default.get_ca_certs())
    if not context.get_ca_certs():
        pytest.skip("this machine's default CA bundle is a folder, read lazily")
    bundle = tmp_path / "ca.pem"
    bundle.write_text(ssl.DER_cert_to_PEM_cert(context.get_ca_certs(binary_form=True)[0]))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    own = guard.ssl_context()
    assert own is not context
    assert len(own.get_ca_certs()) == 1
    monkeypatch.delenv("SSL_CERT_FILE")
    assert len(guard.ssl_context().get_ca_certs()) == len(default.get_ca_certs())


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({"X-Repo-Commit": "a" * 40, "ETag": '"' + "b" * 40 + '"'}, True),
        ({"X-Linked-Etag": '"' + "c" * 64 + '"', "ETag": '"anything-goes"'}, True),
        ({"ETag": 'W/"' + "d" * 64 + '"'}, True),
        ({"X-Repo-Commit": "../../x"}, False),
        ({"X-Repo-Commit": "A" * 40}, False),
        ({"ETag": '"../../x"'}, False),
        ({"X-Linked-Etag": '"' + "c" * 40 + '"'}, False),
        ({"X-Xet-Hash": "../x"}, False),
    ],
)
@pytest.mark.parametrize("path", ["/org/m/resolve/main/f", "/api/resolve-cache/models/org/m/abc/f"])
def test_headers_the_library_makes_file_names_of(
    headers: dict[str, str], ok: bool, path: str
) -> None:
    def check() -> None:
        check_headers(path, 200, httpx2.Headers(headers))

    if ok:
        check()
    else:
        with pytest.raises(UntrustedAnswer):
            check()
