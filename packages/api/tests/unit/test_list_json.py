"""GET /list's body is serialized an entry at a time, each entry once while it is the same object
(``routes.list_json``): byte for byte what one ``model_dump_json`` of the whole answer gives."""

from __future__ import annotations

import json

import pytest

from api.models import routes
from api.models.routes import SERIALIZED_ENTRIES, list_json
from api.models.types import (
    Model,
    ModelListItem,
    ModelListResponse,
    ModelStatus,
    NodeUnanswered,
)


def entry(i: int) -> ModelListItem:
    return ModelListItem(
        model=Model(hf_repo=f"org/model-{i:05d}", hf_commit=f"{i:040x}"),
        status=ModelStatus.DOWNLOADED if i % 3 else ModelStatus.PARTIAL,
        size_bytes=i * 1000,
        refs=["main"] if i % 2 else [],
        error_message='a "quoted" \\"models\\":[] message' if i % 7 == 0 else None,
        nodes=["n1", "n2"] if i % 5 == 0 else None,
    )


@pytest.mark.parametrize("count", [0, 1, 450])
def test_the_batched_body_is_the_whole_answer_s_json(count: int) -> None:
    plain = ModelListResponse(models=[entry(i) for i in range(count)])
    assert list_json(plain) == plain.model_dump_json(by_alias=True).encode()
    paged = ModelListResponse(
        models=[entry(i) for i in range(count)],
        total=count + 10,
        next_cursor="abc",
        nodes_unanswered=[NodeUnanswered(node_id="n3", address="10.0.0.3", error_message="gone")],
    )
    body = list_json(paged)
    assert body == paged.model_dump_json(by_alias=True).encode()
    assert len(json.loads(body)["models"]) == count


def test_an_entry_serialized_before_is_not_serialized_again_and_the_kept_ones_are_bounded() -> None:
    entries = [entry(i) for i in range(300)]
    first = list_json(ModelListResponse(models=entries))
    kept = dict(routes._SERIALIZED)
    assert all(kept[id(e)][0] is e for e in entries)
    # The same objects: the same bytes, from what was kept (the very bytes objects).
    assert list_json(ModelListResponse(models=entries)) == first
    assert all(routes._SERIALIZED[id(e)][1] is kept[id(e)][1] for e in entries)
    # Another entry of the same revision (the cache changed): serialized anew.
    changed = entries[0].model_copy(update={"size_bytes": 1})
    body = json.loads(list_json(ModelListResponse(models=[changed, *entries[1:]])))
    assert body["models"][0]["size_bytes"] == 1
    # Never more than the bound, or the last answer's entries.
    many = [entry(i) for i in range(SERIALIZED_ENTRIES + 10)]
    list_json(ModelListResponse(models=many))
    assert len(routes._SERIALIZED) <= SERIALIZED_ENTRIES + 10
    list_json(ModelListResponse(models=entries))
    assert len(routes._SERIALIZED) <= SERIALIZED_ENTRIES + 10


def test_the_same_entries_answered_again_are_the_last_body_and_nothing_else_is() -> None:
    entries = [entry(i) for i in range(50)]
    first = list_json(ModelListResponse(models=entries))
    assert list_json(ModelListResponse(models=list(entries))) is first  # the very bytes
    # One entry fewer, another order, another object of equal content, another total: each is
    # its own answer's JSON.
    for other in (
        ModelListResponse(models=entries[1:]),
        ModelListResponse(models=entries[::-1]),
        ModelListResponse(models=[entries[0].model_copy(update={"pinned": True}), *entries[1:]]),
        ModelListResponse(models=entries, total=50),
    ):
        body = list_json(other)
        assert body is not first
        assert body == other.model_dump_json(by_alias=True).encode()
    assert list_json(ModelListResponse(models=entries)) == first
