"""Who copies from whom in a fleet's rollout (``api.fleet.rollout``): every node sends one copy's
worth at most, the trees are about log2(N) deep, and each stripe of parts flows down a tree."""

from __future__ import annotations

import math

import pytest

from api.fleet.rollout import Sources, depth, plan, uploads


@pytest.mark.parametrize("roots", [1, 2, 3])
def test_each_node_sends_one_copy_at_most_and_the_trees_are_log_deep(roots: int) -> None:
    root_ids = [f"root{i}" for i in range(roots)]
    for count in range(1, 130):
        todo = [f"node{i}" for i in range(count)]
        planned = plan(root_ids, todo)
        assert set(planned) == set(todo)
        sent = uploads(planned)
        assert max(sent.values()) <= 1.0 + 1e-9, (count, sent)
        assert sum(sent.values()) == pytest.approx(count)  # each node receives one copy
        assert depth(planned, root_ids) <= math.ceil(math.log2(count / roots + 1)) + 1
        for node, sources in planned.items():
            assert node not in sources.parents
            assert 1 <= len(sources.parents) <= 2
            assert not set(sources.roots) & set(sources.parents)


def test_a_hundred_nodes_from_one_seed_are_seven_hops_deep() -> None:
    planned = plan(["seed"], [f"node{i}" for i in range(99)])
    assert depth(planned, ["seed"]) == 7
    assert uploads(planned)["seed"] == 1.0


def test_four_nodes_the_layout_the_fleet_test_relies_on() -> None:
    # tests/fleet: the second node named feeds the two after it; its children hand over to
    # the seed (tier 1) or, when the seed is already their parent, to the Hub.
    planned = plan(["s"], ["a", "b", "c"])
    assert planned == {
        "a": Sources(("s", "c"), ()),
        "b": Sources(("a", "c"), ("s",)),
        "c": Sources(("a", "s"), ()),
    }


def test_a_rollout_needs_a_root() -> None:
    with pytest.raises(ValueError, match="root"):
        plan([], ["a"])
