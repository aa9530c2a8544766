"""The operator's page over a fleet (issue 32), in a real browser: the service as its own
process joined to the test's 3-node Ray cluster. The page shows the nodes (each one's cache and
free space), a bar per node while a model downloads, which nodes hold each model, and a node
that stops answering."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from fakehub import FakeHub, Generated, RepoBuilder, trickle
from fakehub.raycluster import RayCluster
from tests.browser.test_page import browser, page  # noqa: F401 (the browser tests' fixtures)
from tests.helpers import MB, running_service, workers_using

pytestmark = [pytest.mark.fleet, pytest.mark.browser]


def _agent_of(cache: Path) -> int:
    """The pid of the agent working on a node's cache: the parent of its zygote."""
    pids = set(workers_using(cache))
    for pid in pids:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if parent not in pids:
            return parent
    raise AssertionError(f"no zygote works on {cache}")


async def test_the_page_shows_every_node_a_bar_per_node_and_a_node_that_stops_answering(
    page: Page,  # noqa: F811
    hub: FakeHub,
    repos: RepoBuilder,
    cluster: RayCluster,
    node_caches: list[Path],
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    repos.commit("org/model", {"config.json": "{}", "w.bin": Generated(8 * MB, seed=85)})
    hub.add_fault(trickle(2 * MB, path="*/resolve/*/w.bin"))  # the Hub's one copy: 4 s
    env = {"MODELS_RAY_ADDRESS": cluster.address, "MODELS_FLEET_ANSWER_SECONDS": "2"}
    with running_service(cache_dir, hub.url, tmp_path / "service.log", **env) as (url, _):
        await page.goto(url)
        await expect(page.locator("#connection")).to_have_text("Live")
        await expect(page.locator("#fleet-title")).to_have_text("Fleet: 3 node(s)")
        await expect(page.locator("#fleet-nodes li")).to_have_count(3)
        await expect(page.locator("#fleet-nodes li.bad")).to_have_count(0)
        await page.fill("#repo", "org/model")
        await page.click("#start")
        # One node fetches from the Hub, the two others copy from it as it receives: all three
        # download at once, a line and a bar each, with their figures.
        card = page.locator("#downloads li.card[data-task='org/model:latest']")
        await expect(card.locator(".node-bars li")).to_have_count(3)
        await expect(card.locator(".node-bars li", has_text=" of 8.4 MB")).to_have_count(3)
        await expect(card.locator(".node-bars progress")).to_have_count(3)
        # Done: the model's card names the three nodes that hold it.
        model = page.locator("#models li.card[data-repo='org/model']")
        await expect(model.locator(".status")).to_have_text("DOWNLOADED")
        await expect(model.locator(".meta")).to_contain_text("on 3 of 3 node(s)")
        await expect(page.locator("#no-downloads")).to_be_visible()
        # One node's agent frozen: the page, reloaded, says which node does not answer.
        node = cluster.nodes[2]
        agent = _agent_of(cluster.caches[node])
        os.kill(agent, signal.SIGSTOP)
        try:
            await page.reload()
            quiet = page.locator(f"#fleet-nodes li[data-node='{node}']")
            await expect(quiet).to_have_class("node bad")
            await expect(quiet).to_contain_text("unreachable")
            await expect(page.locator("#fleet-title")).to_have_text(
                "Fleet: 3 node(s), 1 not answering"
            )
            await expect(model.locator(".meta")).to_contain_text("on 2 of 3 node(s)")
        finally:
            os.kill(agent, signal.SIGCONT)
