"""The vLLM guard: which cached revisions the vLLM servers of ``MODELS_VLLM_URLS`` serve, so that
a delete or a prune never removes one unasked, and a status or a list can say so.

A delete or a prune asks the servers now (``fresh``); a status or a list reuses an answer up to
``MODELS_VLLM_CHECK_TTL_SECONDS`` old and waits at most a quarter of a second for a new one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from api.models.backend import CachedRevision, HubBackend
from api.models.errors import InUseUnknown, ModelInUse
from api.models.revisions import Revision, in_use_map
from api.models.serving import ServedModel, ServedNow, VllmServers
from api.models.threads import Threads
from api.models.types import COMMIT_PATTERN, InUseInfo, Model

if TYPE_CHECKING:  # budget.py imports this module
    from api.models.budget import Uses


class InUse:
    def __init__(
        self,
        servers: VllmServers,
        backend: HubBackend,
        threads: Threads,
        ttl: float,
        uses: Uses | None = None,
    ) -> None:
        self.servers = servers
        self._uses = uses  # each revision seen served is a use (the cache budget's order)
        self._backend = backend
        self._threads = threads
        self._ttl = ttl

    @property
    def configured(self) -> bool:
        return self.servers.configured

    async def users(
        self,
        repo_id: str | None,
        fresh: bool,
        revisions: list[CachedRevision] | None = None,
    ) -> tuple[ServedNow, dict[Revision, list[ServedModel]]]:
        """What the servers answered, and which cached revisions (of ``repo_id``, else all) they
        serve; ``fresh``: asked now."""
        if fresh:
            now = await self.servers.now()
        else:
            now = await self.servers.now(self._ttl, waited=0.25)
        if revisions is None:
            revisions = await self._threads.cache(self._backend.list_cached, repo_id)
        users = await self._threads.cache(in_use_map, now, revisions, self._backend.revision_at)
        if self._uses is not None:
            for repo, commit in users:
                self._uses.used(repo, commit, "served")
        return now, users

    async def refuse(self, model: Model) -> None:
        """Raise ``ModelInUse`` when a server serves a revision a delete of ``model`` would
        remove (every revision without ``hf_commit``), ``InUseUnknown`` when a server did not
        answer; asked now, not from a previous answer."""
        revisions = await self._threads.cache(self._backend.list_cached, model.hf_repo)
        if model.hf_commit is None:
            targets = [r.commit for r in revisions if r.commit is not None]
        elif COMMIT_PATTERN.fullmatch(model.hf_commit):
            targets = [model.hf_commit]
        else:
            targets = [r.commit for r in revisions if r.commit and model.hf_commit in r.refs]
        if not targets:
            return  # nothing of it cached: the delete says so
        now, users = await self.users(model.hf_repo, fresh=True, revisions=revisions)
        for commit in targets:
            for card in users.get((model.hf_repo, commit), []):
                raise ModelInUse(f"{model.hf_repo} at {commit}", card.server, card.model_id)
        for server, why in now.unreachable:
            raise InUseUnknown(model.task_id, server, why)

    async def aclose(self) -> None:
        await self.servers.aclose()


def in_use_info(cards: list[ServedModel]) -> list[InUseInfo]:
    return [InUseInfo(server=card.server, model=card.model_id) for card in cards]
