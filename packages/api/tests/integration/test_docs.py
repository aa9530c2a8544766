"""Swagger UI at /docs works with no network: every asset it loads comes from the service."""

from __future__ import annotations

import re

import httpx


async def test_docs_reference_no_other_host(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    html = page.text
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    links += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html)
    assert links, html
    for link in links:
        assert "//" not in link, f"/docs loads {link} from another host"
        asset = await client.get(link)
        assert asset.status_code == 200, link
        assert asset.content
    assert (await client.get("/redoc")).status_code == 404  # no packaged copy: off
    bundle = await client.get("/docs-assets/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in bundle.text
