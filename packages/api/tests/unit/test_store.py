"""The job store on its own: rows in order, claims between two owners, what is read back."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import pytest

from api.models.backend import FileSelection, FilesPreset
from api.models.store import JobStore
from api.models.types import Model


def store(folder: Path) -> JobStore:
    opened = JobStore(folder)
    opened.open()
    return opened


def test_rows_come_back_in_order_with_their_selection(tmp_path: Path) -> None:
    first = store(tmp_path)
    vllm = FileSelection(FilesPreset.VLLM, (), ("*.bin",))
    first.add("a1", Model(hf_repo="org/a", hf_commit="v1"), vllm)
    first.add("b2", Model(hf_repo="org/b"), None)
    first.add("c3", Model(hf_repo="org/c"), None)
    first.remove("b2")
    first.close()  # a stop: the claims go, the rows stay
    second = store(tmp_path)
    found = second.claim_unowned()
    assert [(s.key, s.model.task_id, s.asked) for s in found] == [
        ("a1", "org/a:v1", vllm),
        ("c3", "org/c:latest", None),
    ]
    assert not (tmp_path / "claims" / "b2.lock").exists()


def test_a_live_owner_keeps_its_rows(tmp_path: Path) -> None:
    owner = store(tmp_path)
    owner.add("a1", Model(hf_repo="org/a"), None)
    other = store(tmp_path)
    assert other.claim_unowned() == []  # the owner's flock says it runs it
    owner.remove("a1")
    owner.add("b2", Model(hf_repo="org/b"), None)
    owner.close()
    assert [s.key for s in other.claim_unowned()] == ["b2"]
    # Claimed now: a third one does not get it while the other lives.
    assert store(tmp_path).claim_unowned() == []


def test_errors_are_kept_and_read_back_bounded(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.set_errors({"org/a:latest": "gone", "org/a:" + "0" * 40: "gone"})
    first.drop_errors(["org/a:" + "0" * 40])
    first.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "jobs.sqlite3")) as db:
        db.execute("INSERT INTO errors VALUES ('org/b:latest', ?, 0)", ("x" * 100_000,))
        db.execute("INSERT INTO errors VALUES (?, 'a key no service writes', 0)", ("k" * 1000,))
        db.commit()
    errors = store(tmp_path).errors()
    # A message longer than the service writes, and a key that is no task id, are not served.
    assert errors == {"org/a:latest": "gone"}


def victim_database(path: Path) -> bytes:
    """Another application's SQLite database; its bytes, to compare after."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE precious (v TEXT)")
        db.execute("INSERT INTO precious VALUES ('keep')")
        db.commit()
    return path.read_bytes()


@pytest.mark.parametrize("planted", ["another database", "an empty file"])
def test_a_database_that_is_a_link_is_moved_aside_never_written(
    tmp_path: Path, planted: str
) -> None:
    """``jobs.sqlite3`` made a link to another application's file: moved aside as a link; the
    file it names is not opened, and no WAL or SHM file appears beside it."""
    elsewhere = tmp_path / "other-app"
    elsewhere.mkdir()
    victim = elsewhere / "app.db"
    if planted == "an empty file":
        victim.touch()
        before = b""
    else:
        before = victim_database(victim)
    state = tmp_path / "state"
    state.mkdir()
    (state / "jobs.sqlite3").symlink_to(victim)
    opened = store(state)
    opened.add("a1", Model(hf_repo="org/a"), None)
    opened.close()
    assert victim.read_bytes() == before
    assert sorted(p.name for p in elsewhere.iterdir()) == ["app.db"]
    assert (state / "jobs.sqlite3").is_file()
    assert not (state / "jobs.sqlite3").is_symlink()
    aside = [p for p in state.iterdir() if p.name.startswith("jobs.sqlite3.link-")]
    assert len(aside) == 1
    assert aside[0].is_symlink()


@pytest.mark.parametrize("journal", ["jobs.sqlite3-wal", "jobs.sqlite3-shm"])
def test_a_journal_that_is_a_link_is_moved_aside(tmp_path: Path, journal: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    state = tmp_path / "state"
    state.mkdir()
    store(state).close()  # a store of the service's own, then a link beside it
    (state / journal).unlink(missing_ok=True)
    (state / journal).symlink_to(victim)
    opened = store(state)
    opened.add("a1", Model(hf_repo="org/a"), None)
    opened.close()
    assert victim.read_bytes() == b"keep"


def test_a_file_with_a_second_name_or_not_sqlite_is_moved_aside(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    other = tmp_path / "other.db"
    before = victim_database(other)
    os.link(other, state / "jobs.sqlite3")  # a hard link: writing it writes the other file
    store(state).close()
    assert other.read_bytes() == before
    (state / "jobs.sqlite3").unlink()
    (state / "jobs.sqlite3").write_bytes(b"not a database at all" * 10)
    opened = store(state)
    opened.add("a1", Model(hf_repo="org/a"), None)
    assert [p.name.split("-")[0] for p in state.iterdir() if "foreign" in p.name] == [
        "jobs.sqlite3.foreign",
        "jobs.sqlite3.foreign",
    ]


def test_a_claims_folder_that_is_a_link_is_moved_aside(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / "claims").symlink_to(victim)
    opened = store(state)
    opened.add("a1", Model(hf_repo="org/a"), None)
    assert list(victim.iterdir()) == []
    assert (state / "claims" / "a1.lock").is_file()
    assert any(p.name.startswith("claims.link-") for p in state.iterdir())


def test_rows_the_service_would_not_write_are_dropped(tmp_path: Path) -> None:
    """Read back as request bodies are checked: a 10 MB repo name, a message with control
    characters or longer than the service writes never reach an answer."""
    store(tmp_path).close()
    with contextlib.closing(sqlite3.connect(tmp_path / "jobs.sqlite3")) as db:
        db.execute(
            "INSERT INTO downloads (key, hf_repo, hf_commit, selection, accepted_at)"
            " VALUES ('k1', ?, NULL, NULL, 0)",
            ("org/" + "m" * 10_000_000,),
        )
        db.execute(
            "INSERT INTO downloads (key, hf_repo, hf_commit, selection, accepted_at)"
            " VALUES ('k2', 'org/fine', NULL, NULL, 0)"
        )
        db.execute(
            "INSERT INTO errors VALUES (?, 'x', 0)", ("org/" + "m" * 10_000_000 + ":latest",)
        )
        db.execute("INSERT INTO errors VALUES ('org/c:latest', ?, 0)", ("a\x1b[31mred",))
        db.execute("INSERT INTO errors VALUES ('org/d:latest', 'plain words', 0)")
        db.commit()
    again = store(tmp_path)
    assert [s.model.hf_repo for s in again.claim_unowned()] == ["org/fine"]
    assert again.errors() == {"org/d:latest": "plain words"}


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's needs root")
def test_a_state_folder_of_another_user_is_not_used(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    with pytest.raises(PermissionError, match="another user"):
        store(state)
    assert list(state.iterdir()) == []


def test_the_state_folder_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    store(state).close()
    assert state.stat().st_mode & 0o022 == 0
