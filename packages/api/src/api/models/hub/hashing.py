"""Checking content against the Hub's ETags (adapter): sha256 for LFS/Xet files, the git blob id
for regular files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

_HASH_CHUNK = 8 * 1024 * 1024


def new_digest(etag: str, size: int) -> Any:
    """The hash an ETag is of: sha256 for a 64-hex ETag (LFS/Xet files); for a 40-hex one
    (regular files) the git blob id, sha1 of ``blob <size>\\0`` + content, so it needs the size.
    None for anything else."""
    if len(etag) == 64:
        return hashlib.sha256()
    if len(etag) == 40:
        return hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    return None


def descriptor_matches(fd: int, etag: str, on_bytes: Callable[[int], None] | None = None) -> bool:
    """Whether the content of a file already open (``fd``, read from its start, then closed:
    what the cache's anchored opening, ``ModelCache.open_content``, gives) hashes to ``etag``:
    sha256 for a 64-hex ETag (LFS/Xet files), the git blob id (sha1 of ``blob <size>\\0`` +
    content) for a 40-hex one (regular files)."""
    with os.fdopen(fd, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        digest = new_digest(etag.lower(), size)
        if digest is None:
            return False  # not an ETag the Hub serves: cannot be vouched for
        while chunk := source.read(_HASH_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large buffers
            if on_bytes is not None:
                on_bytes(len(chunk))
        return bool(digest.hexdigest() == etag.lower())
