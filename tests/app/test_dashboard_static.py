"""The dashboard router serves the page and its files, offline-safe, with a strict CSP."""

from __future__ import annotations

import posixpath
import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from spkd.app.routes import dashboard


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


SCRIPTS = sorted((dashboard.STATIC_DIR / "js").glob("*.js"))


def _module_imports(text: str) -> list[str]:
    """The relative paths an ES module imports (`import ... from './x.js'`)."""
    return re.findall(r"^import\b[^;]*?\bfrom\s+'(\./[^']+)'", text, flags=re.M)


def test_every_referenced_file_is_served_from_this_origin():
    client = _client()
    html = client.get("/").text
    refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert {"/static/js/main.js", "/static/style.css", "/static/favicon.svg"} <= set(refs)
    # The page's modules and every module they import, as the browser fetches them (relative URLs).
    pending, served = [r for r in refs if r.endswith(".js")], set()
    while pending:
        ref = pending.pop()
        if ref in served:
            continue
        res = client.get(ref)
        assert res.status_code == 200, ref
        assert res.headers["content-type"].startswith("text/javascript"), ref  # modules need a JS type
        served.add(ref)
        pending += [
            posixpath.normpath(posixpath.join(posixpath.dirname(ref), i)) for i in _module_imports(res.text)
        ]
    assert {f"/static/js/{p.name}" for p in SCRIPTS} == served, "a module nothing imports, or one missing"
    for ref in refs:
        res = client.get(ref)
        assert res.status_code == 200, ref
        assert res.content
    # No CDN, no remote fonts: the page must work offline.
    for path in [dashboard.STATIC_DIR / "index.html", dashboard.STATIC_DIR / "style.css", *SCRIPTS]:
        text = path.read_text()
        assert not re.search(r"(?:src|href)=[\"']https?://", text), path.name
        assert "@import" not in text and "cdn" not in text.lower(), path.name
        assert not re.search(r"^import\b[^;]*?\bfrom\s+'(?!\./)", text, flags=re.M), (
            f"{path.name}: a bare import"
        )


def test_the_scripts_take_the_stage_list_from_the_api():
    """common.spec.STAGE_INFO is the one list of stages: the dashboard asks GET /v1/stages for their
    names, order and titles instead of keeping a copy that a new stage would not be in."""
    from spkd.common.spec import STAGE_INFO

    cards = {info.result for info in STAGE_INFO}  # metrics blocks (teacher, baseline, distilled)
    words = {w for info in STAGE_INFO for w in (info.name, info.title)} - cards
    assert len(words) > len(STAGE_INFO)
    for path in SCRIPTS:
        text = path.read_text()
        for word in words:
            quoted = rf"['\"`]{re.escape(word)}['\"`]"  # (`distill: {...}` in a spec is the spec's section)
            assert not re.search(quoted, text), f"{path.name} names the stage {word!r}"
    assert any("/v1/stages" in p.read_text() for p in SCRIPTS)


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
        assert 'src="/static/' in attrs and 'type="module"' in attrs and not body.strip()
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"


def test_every_form_control_has_a_label():
    html = (dashboard.STATIC_DIR / "index.html").read_text()
    ids = re.findall(r"<(?:input|select|textarea)\b[^>]*\bid=\"([^\"]+)\"", html)
    labelled = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', html))
    # Checkboxes wrapped by their <label> are labelled by containment.
    wrapped = set(re.findall(r"<label[^>]*>\s*<input[^>]*\bid=\"([^\"]+)\"", html))
    missing = [i for i in ids if i not in labelled | wrapped]
    assert ids and not missing, missing
