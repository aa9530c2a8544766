"""What the service records of a revision in the cache, beside the library's files (adapter):
the journal of revisions not yet verified, and the selections a revision was downloaded with.

Both live in the library's ``.locks/<model folder>/`` (``<commit>.unverified``,
``<commit>.selection.json``): they belong to the cache (processes sharing it must agree), the
library never deletes there, and ``scan_cache_dir`` (so ``hf cache``) skips the folder. They are
in the cache, which others write too: what is read back is checked and bounded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from api.models.backend import FileSelection
from api.models.hub.guard import path_problem

logger = logging.getLogger(__name__)

SELECTION_FORMAT_VERSION = 1
MAX_RECORDED_SELECTIONS = 32


class RevisionRecords:
    """The records of one cache; ``locks_folder`` gives a model's folder under ``.locks``."""

    def __init__(self, locks_folder: Callable[[str], Path]) -> None:
        self.locks_folder = locks_folder

    # -- the journal of unverified revisions ---------------------------------------------

    def unverified_marker(self, repo_id: str, commit: str) -> Path:
        return self.locks_folder(repo_id) / f"{commit}.unverified"

    def mark_unverified(self, repo_id: str, commit: str, reason: str, files: list[str]) -> None:
        """Record, durably, that the revision's content is not known good: written before a
        download's first byte and kept until every file is verified (a stop at any moment leaves
        it), or by a verification that found bad files (``files``, fetched again first)."""
        _write_durably(self.unverified_marker(repo_id, commit), {"reason": reason, "files": files})

    def clear_unverified(self, repo_id: str, commit: str) -> None:
        self.unverified_marker(repo_id, commit).unlink(missing_ok=True)

    def read_unverified(self, repo_id: str, commit: str) -> tuple[str, list[str]] | None:
        """(reason, files known bad) when the revision is marked unverified, else None."""
        path = self.unverified_marker(repo_id, commit)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("unreadable verification journal %s: %s", path, error)
            return ("the revision's verification journal is unreadable", [])
        if not isinstance(data, dict):
            return ("the revision's verification journal is unreadable", [])
        files = [f for f in data.get("files") or [] if isinstance(f, str) and not path_problem(f)]
        # The file is in the cache, which others can write: its text reaches status answers, so
        # it is bounded.
        return str(data.get("reason") or "the revision is not verified")[:300], files[:1000]

    # -- the selections a revision was downloaded with --------------------------------------

    def selection_record(self, repo_id: str, commit: str) -> Path:
        """Beside the journal, in the library's ``.locks`` folder: ``scan_cache_dir`` and
        ``hf cache`` skip it (a test pins that)."""
        return self.locks_folder(repo_id) / f"{commit}.selection.json"

    def read_selections(self, repo_id: str, commit: str) -> tuple[FileSelection, ...]:
        """The selections the revision's downloads recorded (none when none did)."""
        path = self.selection_record(repo_id, commit)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format_version") != SELECTION_FORMAT_VERSION:
                raise ValueError("unknown format")
            found = tuple(FileSelection.from_json(s) for s in data["selections"])
        except FileNotFoundError:
            return ()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            # The cache is written by others too: a record that does not parse counts as none
            # (the default applies), never as a selection of our guessing.
            logger.warning("ignoring the selection record %s: %s", path, error)
            return ()
        return found[:MAX_RECORDED_SELECTIONS]

    def record_selection(self, repo_id: str, commit: str, selection: FileSelection) -> None:
        """Add ``selection`` to the revision's record (written after its files are verified):
        the revision is then kept as the union of what its downloads asked for."""
        path = self.selection_record(repo_id, commit)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Read, add, replace, under a lock: two processes sharing the cache may finish downloads
        # of one revision at once, and neither selection may be lost.
        lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o664)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            recorded = self.read_selections(repo_id, commit)
            if selection.is_everything:
                merged: tuple[FileSelection, ...] = (selection,)  # everything covers the others
            elif selection in recorded or any(s.is_everything for s in recorded):
                return
            else:
                merged = (*recorded, selection)[-MAX_RECORDED_SELECTIONS:]
            body = {
                "format_version": SELECTION_FORMAT_VERSION,
                "selections": [s.to_json() for s in merged],
            }
            _write_durably(path, body)
        finally:
            os.close(lock)


def _write_durably(path: Path, data: object) -> None:
    """``data`` as JSON in ``path``: whole or not at all, and on disk before this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        json.dump(data, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def journal_note(reason: str, files: list[str]) -> str:
    """The status's words for a revision the journal holds as not verified."""
    named = f": {name_some(files)}" if files else ""
    return f"{reason}{named}; POST /api/models/download verifies it and fetches what is bad"


def name_some(paths: list[str], shown: int = 5) -> str:
    """The first paths, and how many more: for a status's words."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more
