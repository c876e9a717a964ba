"""The dashboard router serves the page and its files, offline-safe, with a strict CSP."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.routes import dashboard


def _client() -> TestClient:
    app = FastAPI()
    app.include_router(dashboard.router)
    return TestClient(app)


def test_index_is_served_with_security_headers():
    res = _client().get("/")
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/html")
    csp = res.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "<title>spkd dashboard</title>" in res.text


def test_every_referenced_file_is_served_from_this_origin():
    client = _client()
    html = client.get("/").text
    refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert {"/static/app.js", "/static/style.css", "/static/favicon.svg"} <= set(refs)
    for ref in refs:
        res = client.get(ref)
        assert res.status_code == 200, ref
        assert res.content
    # No CDN, no remote fonts: the page must work offline.
    for name in ("index.html", "app.js", "style.css"):
        text = (dashboard.STATIC_DIR / name).read_text()
        assert not re.search(r"(?:src|href)=[\"']https?://", text), name
        assert "@import" not in text and "cdn" not in text.lower(), name


def test_static_refuses_traversal_and_unknown_files():
    client = _client()
    assert client.get("/static/../dashboard.py").status_code == 404
    assert client.get("/static/%2e%2e/dashboard.py").status_code == 404
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/static/").status_code == 404


def test_no_inline_script_so_the_csp_holds():
    html = (dashboard.STATIC_DIR / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts, "the page loads its script"
    for attrs, body in scripts:
        assert 'src="/static/' in attrs and not body.strip()
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"


def test_every_form_control_has_a_label():
    html = (dashboard.STATIC_DIR / "index.html").read_text()
    ids = re.findall(r"<(?:input|select|textarea)\b[^>]*\bid=\"([^\"]+)\"", html)
    labelled = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', html))
    # Checkboxes wrapped by their <label> are labelled by containment.
    wrapped = set(re.findall(r"<label[^>]*>\s*<input[^>]*\bid=\"([^\"]+)\"", html))
    missing = [i for i in ids if i not in labelled | wrapped]
    assert ids and not missing, missing
