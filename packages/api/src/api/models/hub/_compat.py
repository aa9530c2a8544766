"""What the adapter takes from huggingface_hub beyond its documented API, in one place.

Each name below is one the library does not publish (a private module) or a global of its
``constants`` that the worker sets. Each is here with the behaviour relied on, and
``tests/unit/test_hub_compat.py`` pins each behaviour against the installed library, so that an
upgrade that changes one fails there, naming it, not somewhere in a download. Everything else the
adapter uses is the library's public API (``snapshot_download``, ``HfApi``, ``set_client_factory``,
``huggingface_hub.utils``, ``huggingface_hub.errors``).
"""

from __future__ import annotations

from huggingface_hub import constants
from huggingface_hub.utils._headers import build_hf_headers  # also utils.build_hf_headers
from huggingface_hub.utils._http import _is_same_or_hub_host, hf_request_event_hook
from huggingface_hub.utils._paths import filter_repo_objects  # also utils.filter_repo_objects
from huggingface_hub.utils._runtime import is_xet_available
from huggingface_hub.utils._shared_blobs import shared_blob_target

__all__ = [
    "build_hf_headers",
    "disable_xet",
    "filter_repo_objects",
    "hf_request_event_hook",
    "is_xet_available",
    "same_origin_or_hub",
    "set_download_chunk_size",
    "shared_blob_target",
    "xet_disabled",
]


def same_origin_or_hub(url: str, target: str) -> bool:
    """Whether a redirect to ``target`` stays with ``url``'s origin or goes to a Hub origin: the
    library's own rule for keeping the token on a redirect (``utils._http``)."""
    return _is_same_or_hub_host(url, target)


def xet_disabled() -> bool:
    """``HF_HUB_DISABLE_XET`` as the library reads it now (``constants``)."""
    return bool(constants.HF_HUB_DISABLE_XET)


def disable_xet(disabled: bool) -> None:
    """Whether the library's downloads in this process go through hf_xet: it reads
    ``constants.HF_HUB_DISABLE_XET`` at each download, not at import."""
    constants.HF_HUB_DISABLE_XET = disabled


def set_download_chunk_size(size: int) -> None:
    """The size of the library's reads of a plain HTTP download (``constants``, read at each
    download): the worker's progress and bandwidth share see the bytes at that grain."""
    constants.DOWNLOAD_CHUNK_SIZE = size
