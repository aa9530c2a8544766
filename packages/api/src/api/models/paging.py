"""Pages of ``GET /list`` (issue 29): a filter (``q``, a substring of the repo id; ``status``), a
sort (name, size, last use) and keyset pages: a cursor names the sort key of the last entry a page
gave, and the next page starts after it. A download that starts or ends between two pages moves
no other entry from one page to another (an offset would: entries skipped or given twice); the
entry itself is where its new key puts it."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from api.models.errors import BadCursor
from api.models.types import ListSort, ModelListItem, ModelListResponse, ModelStatus

Key = tuple[Any, ...]


@dataclass(frozen=True)
class ListQuery:
    """What a ``GET /list`` asks beyond the spec's answer; all None: the spec's answer."""

    limit: int | None = None
    cursor: str | None = None
    q: str | None = None
    status: frozenset[ModelStatus] | None = None
    sort: ListSort = ListSort.NAME

    @property
    def paged(self) -> bool:
        return (
            self.limit is not None
            or self.cursor is not None
            or self.q is not None
            or self.status is not None
            or self.sort is not ListSort.NAME
        )

    def filters(self) -> ListQuery:
        """The same filter, every page at once (what each node of a fleet is asked)."""
        return ListQuery(q=self.q, status=self.status)

    def matches_repo(self, repo_id: str) -> bool:
        return self.q is None or self.q.casefold() in repo_id.casefold()


def _name(item: ModelListItem) -> Key:
    return (item.model.hf_repo, item.model.hf_commit or "")


_KEYS: dict[ListSort, Callable[[ModelListItem], Key]] = {
    ListSort.NAME: _name,
    ListSort.SIZE: lambda i: (-(i.size_bytes or 0), *_name(i)),
    ListSort.LAST_USED: lambda i: (
        0 if i.last_used_at is not None else 1,
        -(i.last_used_at or 0.0),
        *_name(i),
    ),
}


# The types of each sort's key, for a cursor read back.
_SHAPES: dict[ListSort, tuple[type | tuple[type, ...], ...]] = {
    ListSort.NAME: (str, str),
    ListSort.SIZE: (int, str, str),
    ListSort.LAST_USED: (int, (int, float), str, str),
}


def encode_cursor(sort: ListSort, key: Key) -> str:
    text = json.dumps([sort.value, *key], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, sort: ListSort) -> Key:
    """The key a cursor names, for the sort asked; ``BadCursor`` (422) otherwise."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        values = json.loads(text)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadCursor("the cursor is not one this service gave: start again without it") from None
    if not isinstance(values, list) or not values or values[0] != sort.value:
        raise BadCursor(
            f"the cursor is not of the sort asked ({sort.value}): give the sort its page was"
            " asked with, or start again without a cursor"
        )
    key = tuple(values[1:])
    shape = _SHAPES[sort]
    if len(key) != len(shape) or not all(
        isinstance(v, t) and not isinstance(v, bool) for v, t in zip(key, shape, strict=True)
    ):
        raise BadCursor("the cursor is not one this service gave: start again without it")
    return key


def select(items: Sequence[ModelListItem], query: ListQuery | None) -> ModelListResponse:
    """The entries the query asks for, in its order, a page at a time (all of them, in the
    order given, when nothing is asked: the spec's answer)."""
    if query is None or not query.paged:
        return ModelListResponse(models=list(items))
    chosen = [
        i
        for i in items
        if query.matches_repo(i.model.hf_repo)
        and (query.status is None or i.status in query.status)
    ]
    key = _KEYS[query.sort]
    chosen.sort(key=key)
    total = len(chosen)
    if query.cursor is not None:
        after = decode_cursor(query.cursor, query.sort)
        chosen = [i for i in chosen if key(i) > after]
    page = chosen if query.limit is None else chosen[: query.limit]
    more = query.limit is not None and len(chosen) > query.limit
    return ModelListResponse(
        models=page,
        total=total,
        next_cursor=encode_cursor(query.sort, key(page[-1])) if more and page else None,
    )
