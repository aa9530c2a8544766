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


async def test_every_endpoint_documents_its_answers(client: httpx.AsyncClient) -> None:
    """GETs too: an answer other than 200 is documented with the JSON it carries."""
    schema = (await client.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        if not path.startswith("/api/models"):
            continue
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "500" in responses, (method, path)
            assert "ErrorResponse" in str(responses["500"]), (method, path)
            for code, response in responses.items():
                assert response.get("description"), (method, path, code)
    events = schema["paths"]["/api/models/events"]["get"]["responses"]
    assert "422" in events
