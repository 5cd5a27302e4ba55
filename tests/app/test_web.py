"""The web page over HTTP: served at `/` with a strict CSP, assets shipped in the package, no
inline script, nothing third-party, and the audit listing it shows. The browser tests are in
test_web_browser.py."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from fastapi.testclient import TestClient

from app.web import ASSETS, CONTENT_SECURITY_POLICY, STATIC_DIR


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_script = False
        self.attrs: list[tuple[str, str | None]] = []
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs.extend(attrs)
        found = dict(attrs)
        if tag == "script":
            self.scripts.append(found)
            self._in_script = True
        if tag == "style":
            self.inline_script = True  # inline styles are refused by the CSP too
        for name in ("src", "href"):
            if found.get(name):
                self.urls.append(str(found[name]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_script = True


def test_page_is_served_with_a_strict_csp(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert "unsafe" not in csp and "http" not in csp and "*" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "decision support, not a diagnosis" in response.text.lower()

    page = _Collector()
    page.feed(response.text)
    assert page.scripts == [{"src": "/ui/app.js", "defer": None}]
    assert not page.inline_script
    assert not [name for name, _ in page.attrs if name.startswith("on") or name == "style"]
    # every asset from this origin, and every one of them is served
    assert page.urls and all(u.startswith("/ui/") for u in page.urls), page.urls
    for url in page.urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-security-policy"] == CONTENT_SECURITY_POLICY

    again = client.get("/", headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_assets_hold_no_third_party_urls_or_unsafe_sinks() -> None:
    for name in [*ASSETS, "index.html"]:
        text = (STATIC_DIR / name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        # data only ever enters the page as text (textContent), never as markup
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, (name, sink)
        assert "localStorage" not in text, name  # the key is kept for the tab only


def test_assets_are_an_allow_list(client: TestClient) -> None:
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/app.css").headers["content-type"].startswith("text/css")
    for name in ("index.html", "..%2Fpyproject.toml", "nope.js", "%2E%2E%2F__init__.py"):
        response = client.get(f"/ui/{name}")
        assert response.status_code == 404, name
        assert "detail" in response.json()


def test_audit_lists_recent_predictions_newest_first(
    client: TestClient, headers: dict[str, dict[str, str]], enrolled: dict[str, list[dict]]
) -> None:
    from tests.app.conftest_predict import post_predict, synthetic_xray

    ids = []
    for seed, kind in enumerate(("disc", "stripes", "disc")):
        answer = post_predict(
            client, headers["reader"], synthetic_xray(kind, seed=900 + seed), explain=False
        )
        assert answer.status_code == 200, answer.text
        ids.append(answer.json())
    listed = client.get("/predictions?limit=2", headers=headers["admin"])
    assert listed.status_code == 200
    rows = listed.json()
    assert [r["id"] for r in rows] == [ids[2]["id"], ids[1]["id"]]
    assert rows[0]["label"] == ids[2]["label"]
    assert rows[0]["confidence"] == ids[2]["confidence"]
    assert rows[0]["model_version"] == ids[2]["model_version"]
    assert set(rows[0]) == {
        "id",
        "created_at",
        "label",
        "unknown",
        "confidence",
        "method",
        "model_version",
        "index_version",
    }
    assert client.get("/predictions?limit=0", headers=headers["admin"]).status_code == 422
