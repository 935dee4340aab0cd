"""The playground's files as the server serves them (no browser: tests/integration/test_playground.py
drives the page itself in Chromium)."""

from __future__ import annotations

import re

import pytest

from server.playground import STATIC_DIR
from tests.apps import app_client

KEY = "playground-key"


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with app_client(tiny_model_dir, tmp_path_factory.mktemp("playground"), api_key=KEY) as client:
        yield client


def test_the_page_loads_without_the_key_and_the_api_still_needs_it(client):
    page = client.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<textarea" in page.text and ">Send</button>" in page.text
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_bare_address_and_ui_without_a_slash_lead_to_the_page(client):
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "ui/"
    bare = client.get("/ui", follow_redirects=False)
    assert bare.status_code in (307, 308) and bare.headers["location"].endswith("/ui/")
    assert client.get("/").url.path == "/ui/"


def test_every_file_has_the_headers_that_keep_the_page_to_itself(client):
    for path in ("/ui/", "/ui/playground.css", "/ui/js/main.js"):
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        for rule in ("script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
            assert rule in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-cache"
    assert "javascript" in client.get("/ui/js/main.js").headers["content-type"]


@pytest.mark.parametrize(
    "path", ["/ui/../server/app.py", "/ui/%2e%2e/__init__.py", "/ui/__init__.py", "/ui/missing.js"]
)
def test_nothing_outside_the_folder_is_served(client, path):
    response = client.get(path)
    assert response.status_code in (401, 404)  # a path the client normalised away from /ui needs the key
    assert "create_app" not in response.text
    assert response.json()["error"]["message"]  # the OpenAI error shape, from a mounted app too


def test_every_file_the_page_names_is_there():
    """Each script, stylesheet and module import resolves to a file of the folder (a broken
    name would only show in a browser)."""
    html = (STATIC_DIR / "index.html").read_text()
    named = re.findall(r'(?:src|href)="([^":]+)"', html)
    assert {"js/main.js", "playground.css"} <= set(named)
    for name in named:
        assert (STATIC_DIR / name).is_file(), name
    for module in (STATIC_DIR / "js").glob("*.js"):
        for imported in re.findall(r'from "(\./[^"]+)"', module.read_text()):
            assert (module.parent / imported).resolve().is_file(), f"{module.name} imports {imported}"


def test_the_page_uses_only_the_public_api():
    """Every path the scripts call is a route of the OpenAPI schema (or the capture files under it)."""
    from server.routes import router

    public = {route.path for route in router.routes}
    scripts = "\n".join(path.read_text() for path in (STATIC_DIR / "js").glob("*.js"))
    called = set(re.findall(r'["`](/(?:v1|tokenize|detokenize)[^"`$?]*)', scripts))
    assert called, "no API path found in the scripts"
    for path in called:
        assert any(path == route or route.startswith(path) for route in public), path
