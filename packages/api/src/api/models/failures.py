"""Why the last download of each model failed, remembered for its status and kept in the job
store, so that a restart still says it. Keyed by task id (``org/name:latest``) and by the exact
revision (``org/name:<commit>``): a status asked under another name of the same revision finds
it too."""

from __future__ import annotations

from api.models.backend import CachedRevision
from api.models.threads import Keeper


class Failures:
    def __init__(self, keeper: Keeper) -> None:
        self._keeper = keeper
        self._errors: dict[str, str] = {}  # task id or "repo:commit" -> why it failed
        self.version = 0  # changes with every error remembered or dropped

    def load(self, errors: dict[str, str]) -> None:
        """The errors the store kept from before a restart."""
        self._errors.update(errors)
        self.version += 1

    def get(self, task_id: str) -> str | None:
        return self._errors.get(task_id)

    def of(self, repo_id: str, commit: str | None) -> str | None:
        """Why the last download of this exact revision failed, whatever name it was asked by."""
        return self._errors.get(f"{repo_id}:{commit}") if commit is not None else None

    def remember(self, errors: dict[str, str]) -> None:
        self._errors.update(errors)
        self.version += 1
        self._keeper.keep(self._keeper.store.set_errors, errors)

    def drop(self, *task_ids: str) -> None:
        dropped = [t for t in task_ids if self._errors.pop(t, None) is not None]
        if dropped:
            self.version += 1
            self._keeper.keep(self._keeper.store.drop_errors, dropped)

    def forget_removed(
        self, repo_id: str, removed: set[str | None], cached: list[CachedRevision]
    ) -> None:
        """A removed revision's last error goes with it; a model removed whole takes the errors
        of every name it was asked by (``org/name:latest``...), as a delete does."""
        left = {r.commit for r in cached if r.repo_id == repo_id} - removed
        forgotten = []
        for key in self._errors:
            name, _, revision = key.rpartition(":")
            if name == repo_id and (not left or revision in removed):
                forgotten.append(key)
        self.drop(*forgotten)
