"""The Xet side of the fake hub: how a file is cut into chunks and xorbs, and what the CAS serves.

What the real client (``hf_xet``, called by ``huggingface_hub``'s ``xet_get``) needs, as described by
huggingface/xet-core ``spec/download_protocol.md``, ``spec/api.md``, ``spec/xorb.md``,
``spec/auth.md``:

- the Hub marks a file as Xet-stored with ``X-Xet-Hash`` and a ``Link: <token url>; rel="xet-auth"``
  on ``HEAD /resolve`` (and ``xetHash`` in the tree listing);
- the token route (``GET /api/models/{repo}/xet-read-token/{rev}``) answers with headers
  ``X-Xet-Cas-Url``, ``X-Xet-Access-Token``, ``X-Xet-Token-Expiration``;
- ``GET {cas}/v1/reconstructions/{file_hash}`` (bearer: the access token; optional ``Range``) answers
  with the terms (xorb hash, chunk index range, unpacked length) and, per xorb, the URLs and byte
  ranges to fetch (``url_range`` end-inclusive, sent back as ``Range``);
- a xorb is a series of chunks, each an 8-byte header (version 0, compressed size u24 LE, scheme,
  uncompressed size u24 LE) then its data.

The fake stores nothing more than the content: chunks are 64 KiB slices of the file, stored
uncompressed (scheme 0, which the format allows), 1024 to a xorb (64 MiB), and a xorb's bytes are
made on the fly from the content file. The hashes are stand-ins (64 hex digits derived from the
content's sha256), not xet's merkle hashes: the client checks sizes, not chunk hashes, on download
(a test pins that the download works, which it would not if it checked). ``/v2/reconstructions``
answers 404, on which the client falls back to v1, as it is built to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK_SIZE = 64 * 1024
CHUNKS_PER_XORB = 1024
HEADER_SIZE = 8
SCHEME_NONE = 0


def file_hash(sha256: str) -> str:
    """The Xet file hash the fake gives the content of this sha256."""
    return hashlib.sha256(b"fakehub-xet-file\0" + sha256.encode()).hexdigest()


def xorb_hash(sha256: str, index: int) -> str:
    return hashlib.sha256(b"fakehub-xorb\0%s\0%d" % (sha256.encode(), index)).hexdigest()


def chunk_header(size: int) -> bytes:
    return (
        bytes([0]) + size.to_bytes(3, "little") + bytes([SCHEME_NONE]) + size.to_bytes(3, "little")
    )


@dataclass(frozen=True)
class Layout:
    """Where each byte of a file of ``size`` bytes lives in its xorbs (of ``per_xorb`` chunks
    each; the real format allows any number up to 64 MiB of data)."""

    size: int
    per_xorb: int = CHUNKS_PER_XORB

    @property
    def chunks(self) -> int:
        return -(-self.size // CHUNK_SIZE)

    @property
    def xorbs(self) -> int:
        return -(-self.chunks // self.per_xorb)

    def chunk_length(self, chunk: int) -> int:
        """Length of the file's chunk number ``chunk`` (global index)."""
        return min(CHUNK_SIZE, self.size - chunk * CHUNK_SIZE)

    def xorb_chunks(self, xorb: int) -> range:
        """Global indices of the chunks of xorb number ``xorb``."""
        first = xorb * self.per_xorb
        return range(first, min(first + self.per_xorb, self.chunks))

    def xorb_size(self, xorb: int) -> int:
        chunks = self.xorb_chunks(xorb)
        return len(chunks) * HEADER_SIZE + sum(self.chunk_length(c) for c in chunks)

    @staticmethod
    def offset_in_xorb(local_chunk: int) -> int:
        """Byte offset of a chunk in its xorb (every chunk but the file's last is full)."""
        return local_chunk * (HEADER_SIZE + CHUNK_SIZE)


def reconstruction(
    sha256: str,
    size: int,
    first: int,
    last: int,
    xorb_url: str,
    xorb_chunks: int = CHUNKS_PER_XORB,
) -> dict[str, Any]:
    """The v1 reconstruction of bytes ``first..last`` (inclusive) of a file: one term per xorb
    the range touches, each with the fetch information of exactly its chunks."""
    layout = Layout(size, xorb_chunks)
    terms: list[dict[str, Any]] = []
    fetch_info: dict[str, list[dict[str, Any]]] = {}
    if size == 0:
        return {"offset_into_first_range": 0, "terms": [], "fetch_info": {}}
    first_chunk, last_chunk = first // CHUNK_SIZE, last // CHUNK_SIZE
    for xorb in range(first_chunk // xorb_chunks, last_chunk // xorb_chunks + 1):
        chunks = layout.xorb_chunks(xorb)
        start = max(first_chunk, chunks.start) - chunks.start
        end = min(last_chunk + 1, chunks.stop) - chunks.start  # exclusive, local
        unpacked = sum(layout.chunk_length(chunks.start + c) for c in range(start, end))
        byte_start = Layout.offset_in_xorb(start)
        byte_end = (
            Layout.offset_in_xorb(end - 1)
            + HEADER_SIZE
            + layout.chunk_length(chunks.start + end - 1)
        )
        name = xorb_hash(sha256, xorb)
        terms.append(
            {"hash": name, "unpacked_length": unpacked, "range": {"start": start, "end": end}}
        )
        fetch_info.setdefault(name, []).append(
            {
                "range": {"start": start, "end": end},
                "url": f"{xorb_url}/{sha256}/{xorb}",
                "url_range": {"start": byte_start, "end": byte_end - 1},
            }
        )
    return {
        "offset_into_first_range": first - first_chunk * CHUNK_SIZE,
        "terms": terms,
        "fetch_info": fetch_info,
    }


class XorbReader:
    """A xorb of a content file as a read-only byte stream (``seek`` / ``read``), made on the fly."""

    def __init__(
        self, content: Path, size: int, xorb: int, xorb_chunks: int = CHUNKS_PER_XORB
    ) -> None:
        self.layout = Layout(size, xorb_chunks)
        self.chunks = self.layout.xorb_chunks(xorb)
        self.size = self.layout.xorb_size(xorb)
        self._source = content.open("rb")
        self._position = 0

    def __enter__(self) -> XorbReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._source.close()

    def seek(self, position: int) -> None:
        self._position = position

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes from the current position (at least one chunk's worth when asked)."""
        out = bytearray()
        for piece in self._pieces(self._position):
            out += piece
            if len(out) >= n:
                break
        data = bytes(out[:n])
        self._position += len(data)
        return data

    def spans(self, start: int, end: int) -> Iterator[bytes | tuple[int, int]]:
        """Bytes ``start..end`` (exclusive) of the stream as they lie: a chunk header's bytes, or
        ``(offset, length)`` of the content file (which can go out with ``sendfile``, uncopied)."""
        local = start // (HEADER_SIZE + CHUNK_SIZE)
        position = Layout.offset_in_xorb(local)
        for chunk in range(self.chunks.start + local, self.chunks.stop):
            if position >= end:
                return
            length = self.layout.chunk_length(chunk)
            header = chunk_header(length)
            lo, hi = max(start - position, 0), min(end - position, HEADER_SIZE)
            if lo < hi:
                yield header[lo:hi]
            data = position + HEADER_SIZE  # where the chunk's data starts in the stream
            lo, hi = max(start, data), min(end, data + length)
            if lo < hi:
                yield (chunk * CHUNK_SIZE + lo - data, hi - lo)
            position = data + length

    def fileno(self) -> int:
        return self._source.fileno()

    def _pieces(self, position: int) -> Iterator[bytes]:
        """The stream from ``position``: the rest of the chunk it falls in, then whole chunks."""
        local = position // (HEADER_SIZE + CHUNK_SIZE)
        skip = position - Layout.offset_in_xorb(local)
        for chunk in range(self.chunks.start + local, self.chunks.stop):
            length = self.layout.chunk_length(chunk)
            self._source.seek(chunk * CHUNK_SIZE)
            piece = chunk_header(length) + self._source.read(length)
            yield piece[skip:]
            skip = 0
