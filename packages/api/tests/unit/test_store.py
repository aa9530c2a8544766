"""The job store on its own: rows in order, claims between two owners, what is read back."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

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
    assert errors["org/a:latest"] == "gone"
    assert len(errors["org/b:latest"]) == 4096
    assert len(errors) == 2
