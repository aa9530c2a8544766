"""Who copies from whom in a rollout: two binary trees per group of nodes, each carrying half of
every file's parts, so that every node sends at most one copy's worth and a node is at most
about log2(N) hops from the Hub.

A rollout starts every node at once. The roots are the nodes that have the revision complete, or,
when none has, the one node that fetches it from the Hub (the seed). The other nodes are dealt
round-robin into one group per root. In each group the nodes form two binary heaps, the second
over the group in reverse order; the first heap's top copies from the group's root, the second's
from the next root (the same one when there is one). A node copies the even parts of each file
from its parent in the first tree and the odd parts from its parent in the second
(``Peer.tier`` 0, the parts spread over the tier in turn: ``ranged._from_peers``), and passes
them on while it still receives them (``models/hub/peers.py``). A node is inside (has children
in) at most one of the two trees, so it sends two halves at most: one copy's worth, like its
root. This is SplitStream's layout (Castro et al., SOSP 2003) for two stripes.

When a parent fails or leaves, its children hand over to the roots (tier 1), which never wait on
anyone but the Hub (no cycle can form), and then to the Hub. The Hub sends each byte once while
nothing fails.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sources:
    """Where one node copies from: ``parents`` first (the parts spread over them in turn),
    then ``roots``."""

    parents: tuple[str, ...]
    roots: tuple[str, ...]


def _heap_parent(position: int) -> int | None:
    return (position - 1) // 2 if position > 0 else None


def plan(roots: list[str], todo: list[str]) -> dict[str, Sources]:
    """The sources of each node of ``todo``, copying from ``roots`` (nodes that have, or are
    fetching from the Hub, the whole revision). Every node of ``todo`` gets at least one parent;
    a node never copies from itself."""
    if not roots:
        raise ValueError("a rollout needs a root")
    groups: list[list[str]] = [todo[g :: len(roots)] for g in range(len(roots))]
    planned: dict[str, Sources] = {}
    for g, group in enumerate(groups):
        first_root, second_root = roots[g], roots[(g + 1) % len(roots)]
        reverse = group[::-1]
        for position, node in enumerate(group):
            up = _heap_parent(position)
            first = group[up] if up is not None else first_root
            back = len(group) - 1 - position  # the node's place in the second tree
            up = _heap_parent(back)
            second = reverse[up] if up is not None else second_root
            parents = (first,) if first == second else (first, second)
            fallback = tuple(r for r in roots if r not in parents)
            planned[node] = Sources(parents, fallback if fallback else ())
    return planned


def uploads(planned: dict[str, Sources]) -> dict[str, float]:
    """What each node sends, in copies of the revision (a parent of a two-parent node sends it
    half the parts): for the tests and the benchmark's report."""
    sent: dict[str, float] = {}
    for sources in planned.values():
        for parent in sources.parents:
            sent[parent] = sent.get(parent, 0.0) + 1 / len(sources.parents)
    return sent


def depth(planned: dict[str, Sources], roots: list[str]) -> int:
    """The most hops between a root and a node along either tree (each stripe of parts flows
    down its own tree: the first parent's for the even parts, the second's for the odd)."""
    deepest = 0
    for stripe in (0, -1):
        for node in planned:
            hops, at = 0, node
            while at not in roots:
                at = planned[at].parents[stripe]
                hops += 1
                if hops > len(planned):
                    raise ValueError(f"a cycle through {node}")
            deepest = max(deepest, hops)
    return deepest
