"""The resume record of a ranged download is read from the cache, which others write: whatever is
planted there is taken as no record (the download starts over), never trusted or followed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.models.anchored import Folder
from api.models.hub.ranged import MiB, Record, _fresh, record_name

ETAG = "a" * 64
GOOD = {
    "path": "w.bin",
    "etag": ETAG,
    "size": 3 * MiB,
    "part_bytes": MiB,
    "written": [MiB, 5, 0],
}


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Folder]:
    opened = Folder.anchor(tmp_path)
    assert opened is not None
    with opened:
        yield opened


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_a_record_this_code_wrote_is_read_back(tmp_path: Path, folder: Folder) -> None:
    write(tmp_path / record_name(ETAG), GOOD)
    record = Record.load(folder, ETAG)
    assert record is not None
    assert record.parts() == [(0, MiB), (MiB, 2 * MiB), (2 * MiB, 3 * MiB)]
    (tmp_path / record_name(ETAG)).unlink()
    record.save(folder)
    assert Record.load(folder, ETAG) == record


@pytest.mark.parametrize(
    "change",
    [
        {"written": [MiB, 5]},  # not one count a part
        {"written": [MiB + 1, 0, 0]},  # more than the part holds
        {"written": [-1, 0, 0]},
        {"part_bytes": 0},
        {"part_bytes": 1, "size": 10**15, "written": []},  # a billion parts: refused unbuilt
        {"size": -1},
        {"written": "x"},
        {"etag": None, "size": "x"},
    ],
)
def test_a_planted_record_counts_as_none(
    tmp_path: Path, folder: Folder, change: dict[str, object]
) -> None:
    write(tmp_path / record_name(ETAG), {**GOOD, **change})
    assert Record.load(folder, ETAG) is None


def test_a_huge_or_linked_record_is_not_read(tmp_path: Path, folder: Folder) -> None:
    huge = tmp_path / record_name(ETAG)
    huge.write_text(json.dumps(GOOD) + " " * (2 * MiB))
    assert Record.load(folder, ETAG) is None
    huge.unlink()
    target = write(tmp_path / "elsewhere.json", GOOD)
    (tmp_path / record_name(ETAG)).symlink_to(target)
    assert Record.load(folder, ETAG) is None


def test_saving_never_writes_through_a_planted_link(tmp_path: Path, folder: Folder) -> None:
    """A link planted under the record's name is replaced by the record (a rename replaces the
    link itself), never written through."""
    outside = tmp_path / "outside"
    outside.write_text("keep")
    (tmp_path / record_name(ETAG)).symlink_to(outside)
    record = Record("w.bin", ETAG, 3 * MiB, MiB, [MiB, 5, 0])
    record.save(folder)
    assert outside.read_text() == "keep"
    assert not (tmp_path / record_name(ETAG)).is_symlink()
    assert Record.load(folder, ETAG) == record


def test_a_partial_file_that_starts_over_is_a_new_file(tmp_path: Path, folder: Folder) -> None:
    """Not the old one truncated to zero: ext4 writes a file truncated to zero back whole when it
    is closed, which cost a third of a second per GiB at the end of every transfer."""
    partial = tmp_path / "blob.ranged.incomplete"
    partial.write_bytes(b"stale" * 1000)
    old = tmp_path / "old"
    os.link(partial, old)  # the old file, seen from elsewhere: left as it was, not truncated
    fd = os.open(partial, os.O_RDWR)
    fd = _fresh(folder, partial.name, fd, 8 * MiB)
    try:
        stat = os.fstat(fd)
        assert stat.st_size == 8 * MiB
        assert stat.st_ino == os.stat(partial).st_ino
        assert os.pread(fd, 5000, 0) == bytes(5000)  # nothing of the old content
        assert old.read_bytes() == b"stale" * 1000
    finally:
        os.close(fd)


def test_an_empty_partial_file_is_kept(tmp_path: Path, folder: Folder) -> None:
    partial = tmp_path / "blob.ranged.incomplete"
    fd = os.open(partial, os.O_RDWR | os.O_CREAT)
    inode = os.fstat(fd).st_ino
    fd = _fresh(folder, partial.name, fd, 3 * MiB)
    try:
        assert os.fstat(fd).st_ino == inode
        assert os.fstat(fd).st_size == 3 * MiB
    finally:
        os.close(fd)


def test_a_prefix_is_recorded_part_by_part() -> None:
    """What the library's own transfer wrote in order, as the record of parts: a next attempt
    fetches the rest by ranges."""
    record = Record("w.bin", "a" * 64, 3 * MiB, MiB, [0, 0, 0])
    record.up_to(MiB + 5)
    assert record.written == [MiB, 5, 0]
    assert record.within(MiB + 5)  # a file that long holds all of it
    assert not record.within(MiB)  # a shorter one does not: the record is not trusted
    record.up_to(0)
    assert record.written == [0, 0, 0]
    assert record.within(0)
    record.up_to(10 * MiB)
    assert record.written == [MiB, MiB, MiB]
