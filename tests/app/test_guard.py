"""Only the app's own hosts and origins are served, and every response carries the security headers."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import resources

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cxrsam.errors import CxrsamError
from cxrsam.pipeline import Segmenter

ORIGIN = "http://127.0.0.1:8000"
EXPECTED_HEADERS = {
    "content-security-policy": ("default-src 'self'; script-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "frame-ancestors 'none'; object-src 'none'; base-uri 'none'"),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@pytest.fixture(scope="module")
def client(litemedsam) -> TestClient:
    """The app with its default allow-list (loopback names, any port), reached as 127.0.0.1:8000."""
    from cxrsam.app.server import create_app

    return TestClient(create_app(Segmenter(litemedsam), max_upload_mb=1), base_url=ORIGIN)


@pytest.fixture(scope="module")
def image_id(client, phantom_256) -> str:
    return client.post("/api/images", files={"file": ("p.png", phantom_256[0].read_bytes())}).json()["id"]


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("LOCALHOST", 200), ("[::1]:8000", 200),
    ("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.nip.io:8000", 400), ("localhost.", 400),
    ("127.0.0.1:8000@evil.example", 400), ("", 400),
])
def test_host_header_must_be_an_allowed_host(client, host, status):
    res = client.get("/api/info", headers={"Host": host})
    assert res.status_code == status, host
    if status != 200:
        assert "is not served" in res.json()["detail"]


def test_missing_or_repeated_host_header_refused():
    from cxrsam.app.server import LOOPBACK_HOSTS, RequestGuard, allowed_host_set

    guard = RequestGuard(None, allowed_host_set(LOOPBACK_HOSTS))
    for hosts in ([], [b"localhost", b"localhost"], [b"localhost", b"evil.example"]):
        refusal = guard.refusal({"type": "http", "method": "GET", "headers": [(b"host", h) for h in hosts]})
        assert refusal is not None and refusal.status_code == 400, hosts
    assert guard.refusal({"type": "http", "method": "GET", "headers": [(b"host", b"localhost")]}) is None


def test_foreign_host_refused_before_any_work(client, phantom_256):
    """Refused before the body is read: an oversized body gets 400 (not 413) and nothing is uploaded."""
    res = client.post("/api/images", headers={"Host": "rebound.example:8000", "Content-Length": str(1 << 30)},
                      content=b"")
    assert res.status_code == 400 and "rebound.example:8000" in res.json()["detail"]
    res = client.post("/api/images", headers={"Host": "rebound.example:8000"},
                      files={"file": ("p.png", phantom_256[0].read_bytes())})
    assert res.status_code == 400 and "id" not in res.json()


def test_allow_list_entry_with_a_port_allows_only_that_port(litemedsam):
    from cxrsam.app.server import create_app

    app = create_app(Segmenter(litemedsam), allowed_hosts=["127.0.0.1:8000", "cxr.lan"])
    client = TestClient(app, base_url=ORIGIN)
    assert client.get("/api/info").status_code == 200
    assert client.get("/api/info", headers={"Host": "127.0.0.1:9000"}).status_code == 400
    assert client.get("/api/info", headers={"Host": "localhost:8000"}).status_code == 400  # not listed
    assert client.get("/api/info", headers={"Host": "cxr.lan:443"}).status_code == 200  # no port: any port
    with pytest.raises(CxrsamError, match="allowed host 'http://cxr.lan' is not host"):
        create_app(Segmenter(litemedsam), allowed_hosts=["http://cxr.lan"])


@pytest.mark.parametrize("origin, status", [
    (None, 200), (ORIGIN, 200), ("http://localhost:8000", 200), ("https://127.0.0.1:8000", 200),
    ("http://evil.example", 403), ("http://evil.example:8000", 403), ("null", 403), ("file://", 403),
    ("http://127.0.0.1:8000/path", 403), ("ftp://127.0.0.1:8000", 403), ("127.0.0.1:8000", 403),
])
def test_state_changing_requests_need_the_apps_own_origin(client, image_id, origin, status):
    headers = {} if origin is None else {"Origin": origin}
    res = client.post(f"/api/images/{image_id}/segment", json={"box": [10, 10, 200, 200]}, headers=headers)
    assert res.status_code == status, origin
    if status == 403:
        assert "cross-origin request" in res.json()["detail"]


def test_cross_origin_upload_refused_and_reads_allowed(client, phantom_256):
    res = client.post("/api/images", headers={"Origin": "http://evil.example"},
                      files={"file": ("p.png", phantom_256[0].read_bytes())})
    assert res.status_code == 403
    assert client.get("/api/info", headers={"Origin": "http://evil.example"}).status_code == 200


def test_security_headers_on_every_response(client, image_id):
    responses = [
        client.get("/"), client.get("/app.js"), client.get("/style.css"), client.get("/api/info"),
        client.get("/api/images/" + "0" * 32 + "/mask.png"),  # 404: unknown id
        client.get("/nope"),
        client.post(f"/api/images/{image_id}/segment", json={"box": [1, 2, 3]}),  # 422
        client.post("/api/images", content=b"x" * (2 << 20), headers={"Content-Type": "multipart/form-data"}),  # 413
        client.get("/api/info", headers={"Host": "evil.example"}),  # 400
        client.post(f"/api/images/{image_id}/segment", json={}, headers={"Origin": "http://evil.example"}),  # 403
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 404, 422, 413, 400, 403]
    for res in responses:
        for key, value in EXPECTED_HEADERS.items():
            assert res.headers.get_list(key) == [value], (res.request.url, key)


class _InlineFinder(HTMLParser):
    """Collects what the Content-Security-Policy would block in a page: inline scripts, inline
    styles, event-handler attributes and external sources."""

    def __init__(self):
        super().__init__()
        self.blocked: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.in_script = tag == "script"
        if tag == "style":
            self.blocked.append("<style>")
        if tag == "script" and not attrs.get("src", "").startswith("/"):
            self.blocked.append(f"script {attrs}")
        if tag == "link" and not attrs.get("href", "").startswith("/"):
            self.blocked.append(f"link {attrs}")
        self.blocked += [f"{tag} {name}=" for name in attrs if name == "style" or name.startswith("on")]

    def handle_data(self, data):
        if self.in_script and data.strip():
            self.blocked.append("inline script")

    def handle_endtag(self, tag):
        self.in_script = False


def test_page_has_nothing_the_policy_blocks():
    static = resources.files("cxrsam.app").joinpath("static")
    finder = _InlineFinder()
    finder.feed(static.joinpath("index.html").read_text())
    assert finder.blocked == []
    script = static.joinpath("app.js").read_text()
    assert not re.search(r"\beval\(|new Function|innerHTML|setAttribute\(\s*[\"']style|https?://", script)


def test_cli_allow_list_is_loopback_at_the_port_plus_allow_host(monkeypatch, litemedsam):
    import uvicorn

    import cxrsam.cli
    import cxrsam.pipeline

    served = {}
    monkeypatch.setattr(cxrsam.pipeline, "build_segmenter", lambda **options: Segmenter(litemedsam))
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    result = CliRunner().invoke(cxrsam.cli.app, ["app", "--port", "8765", "--allow-host", "cxr.lan"])
    assert result.exit_code == 0, result.output
    client = TestClient(served["app"], base_url="http://localhost:8765")
    assert (served["host"], served["port"]) == ("127.0.0.1", 8765)
    for host, status in [("localhost:8765", 200), ("127.0.0.1:8765", 200), ("[::1]:8765", 200),
                         ("localhost:8000", 400), ("cxr.lan:8080", 200), ("other.lan:8765", 400)]:
        assert client.get("/api/info", headers={"Host": host}).status_code == status, host
    monkeypatch.setattr(cxrsam.pipeline, "build_segmenter", lambda **options: pytest.fail("models loaded before the check"))
    result = CliRunner().invoke(cxrsam.cli.app, ["app", "--allow-host", "cxr.lan/x"])
    assert isinstance(result.exception, CxrsamError) and "'cxr.lan/x' is not host[:port]" in str(result.exception)
