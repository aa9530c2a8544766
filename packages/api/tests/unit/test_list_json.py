"""GET /list's body is serialized a batch of entries at a time (``routes.list_json``): byte for
byte what one ``model_dump_json`` of the whole answer gives."""

from __future__ import annotations

import json

import pytest

from api.models.routes import SERIALIZE_BATCH, list_json
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


@pytest.mark.parametrize(
    "count", [0, 1, SERIALIZE_BATCH - 1, SERIALIZE_BATCH, 2 * SERIALIZE_BATCH + 3]
)
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
