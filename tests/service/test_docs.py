"""The interactive docs, `/docs` and `/redoc`, name no host but the service: their scripts and styles come from it."""

from __future__ import annotations

import re

import httpx

ASSETS = {"/docs": {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css", "/docs/static/favicon.png"},
          "/redoc": {"/docs/static/redoc.standalone.js", "/docs/static/favicon.png"}}


def test_the_docs_pages_load_everything_from_the_service_even_under_an_api_key(serve):
    with serve(api_key="s3cret") as url:
        assert httpx.get(f"{url}/info").status_code == 401
        pages = {path: httpx.get(f"{url}{path}") for path in (*ASSETS, "/docs/oauth2-redirect")}
        for path, page in pages.items():
            assert page.status_code == 200, path
            assert "://" not in page.text, path  # no absolute URL: nothing from a CDN, a font host or a validator
            policy = page.headers["content-security-policy"]  # and the browser may load from the service alone
            assert policy.startswith("default-src 'self' ") and "://" not in policy and "*" not in policy
        for path, assets in ASSETS.items():
            assert set(re.findall(r'(?:src|href)="([^"]+)"', pages[path].text)) == assets
            for asset in assets:
                served = httpx.get(f"{url}{asset}")
                assert served.status_code == 200 and len(served.content) > 1000, asset
        assert '"validatorUrl": null' in pages["/docs"].text  # else Swagger UI's badge calls validator.swagger.io
