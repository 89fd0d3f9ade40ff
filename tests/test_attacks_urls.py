"""Attacks on the URLs the plugin follows (issue 11, items 4, 6, 7 and the 300 MB answer).

Each test replays one reproduction from the issue against a fake server
(``responses``) or a tiny local HTTP server, and asserts what a user would
check: the request never left for the other host, the bearer token went
nowhere else, the client stopped with one clear error.
"""

from __future__ import annotations

import argparse
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
import responses

from fhir_plugin._backend_auth import discover_token_endpoint
from fhir_plugin._client import FhirClient
from fhir_plugin._errors import InputError, LaunchError, UsageError
from fhir_plugin._token_arg import read_token
from fhir_plugin._urls import safe_url

BASE = "http://fhir.test:8080/fhir"
EVIL = "evil.test:9999"
TOKEN = "secret-token-value"


def searchset(n: int, next_url: str | None) -> dict:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "resource": {"resourceType": "Condition", "id": f"c{n}", "subject": {"reference": "Patient/p1"}},
                "search": {"mode": "match"},
            }
        ],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


@pytest.fixture
def mock():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


# ------------------------------------------------------------------ item 4: the token leaves its server


@pytest.mark.parametrize(
    "link",
    [
        f"http://{EVIL}\\@fhir.test:8080/fhir?_getpages=x",  # urlsplit: fhir.test; urllib3: evil.test
        f"http://{EVIL}%5C@fhir.test:8080/fhir?_getpages=x",  # the same, encoded
        "http://user:pw@fhir.test:8080/fhir?_getpages=x",  # userinfo
    ],
)
def test_a_next_link_that_parsers_read_differently_never_carries_the_token(mock, link):
    mock.get(f"{BASE}/Condition", json=searchset(1, link))
    stolen = mock.get(f"http://{EVIL}/%5C@fhir.test:8080/fhir", json=searchset(2, None))
    client = FhirClient(BASE, token=TOKEN, retries=0)

    with pytest.raises(UsageError, match="refusing") as caught:
        client.search("Condition", {"patient": "p1"})

    assert stolen.call_count == 0
    assert [c.request.url.split("?")[0] for c in mock.calls] == [f"{BASE}/Condition"]
    assert TOKEN not in str(caught.value) and "_getpages" not in str(caught.value)


def test_an_encoded_dot_dot_link_does_not_climb_out_of_the_base(mock):
    mock.get(f"{BASE}/Condition", json=searchset(1, f"{BASE}/%2e%2e/admin/users"))
    admin = mock.get("http://fhir.test:8080/admin/users", json=searchset(2, None))

    with pytest.raises(UsageError, match=r"'\.\.'"):
        FhirClient(BASE, token=TOKEN, retries=0).search("Condition", {"patient": "p1"})
    assert admin.call_count == 0


@pytest.mark.parametrize(
    "url, ok",
    [
        ("http://h/fhir/Patient/1", True),
        ("https://H.example:8443/fhir?x=a..b", True),
        ("http://a:1\\@b:2/", False),
        ("http://a%5c@b/", False),
        ("http://u@h/", False),
        ("http://h/fhir/%2E%2E/x", False),
        ("http://h/fhir/./x", False),
        ("http://h/fhir/a%2f..%2fb", False),
        ("ftp://h/x", False),
        ("http:///x", False),
        ("http://h/a b", False),
    ],
)
def test_the_url_check(url, ok):
    if ok:
        assert safe_url(url).host == url.split("//")[1].split("/")[0].split(":")[0].lower()
    else:
        with pytest.raises(UsageError):
            safe_url(url)


# ------------------------------------------------------------------ item 6: endless paging


def test_distinct_next_links_are_followed_only_up_to_the_page_cap(mock):
    def page(request):
        n = int(request.params.get("page", "0"))
        return (
            200,
            {"Content-Type": "application/fhir+json"},
            json.dumps(searchset(n, f"{BASE}/Condition?page={n + 1}")),
        )

    mock.add_callback("GET", f"{BASE}/Condition", callback=page)
    client = FhirClient(BASE, retries=0, max_pages=25)

    with pytest.raises(InputError, match="more than 25 pages"):
        client.search("Condition", {"patient": "p1"})
    assert len(mock.calls) == 25


def test_the_page_cap_is_documented_and_configurable():
    from fhir_plugin._client import MAX_PAGES, MAX_RESPONSE_BYTES

    client = FhirClient(BASE)
    assert (client.max_pages, client.max_response_bytes) == (MAX_PAGES, MAX_RESPONSE_BYTES)
    with pytest.raises(UsageError):
        FhirClient(BASE, max_pages=0)


# ------------------------------------------------------------------ a huge answer


def test_an_answer_declaring_more_than_the_cap_is_refused_unread(mock):
    mock.get(f"{BASE}/Patient/p1", body=b"{" + b" " * 5000 + b"}", content_type="application/fhir+json")

    with pytest.raises(InputError, match="larger than 1000 bytes"):
        FhirClient(BASE, retries=0, max_response_bytes=1000).read("Patient", "p1")


class _Endless(http.server.BaseHTTPRequestHandler):
    """Answers 200 with a chunked JSON body that goes on far past any cap, and counts what it sent."""

    sent = 0

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b" " * 65536
        try:
            self.wfile.write(b"1\r\n{\r\n")
            for _ in range(2000):  # 128 MB if nobody stops reading
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                type(self).sent += len(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@contextmanager
def local_server(handler) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        server.shutdown()
        server.server_close()


def test_a_streamed_answer_is_read_only_up_to_the_cap():
    _Endless.sent = 0
    with local_server(_Endless) as base, pytest.raises(InputError, match="larger than"):
        FhirClient(base, retries=0, max_response_bytes=1024 * 1024).read("Patient", "p1")
    # the client hung up long before the 128 MB the server had to send
    assert _Endless.sent < 32 * 1024 * 1024


# ------------------------------------------------------------------ item 7: smart_style_url


def test_a_style_url_with_the_backslash_trick_is_not_fetched(mock):
    from smart_launch._app import _fetch_style

    iss = "http://ehr.test/fhir"
    fetched = mock.get(f"http://{EVIL}/%5C@ehr.test/style.json", json={"color_background": "#000000"})
    assert _fetch_style(requests.Session(), f"http://{EVIL}\\@ehr.test/style.json", iss) == {}
    assert _fetch_style(requests.Session(), "http://u@ehr.test/style.json", iss) == {}
    assert fetched.call_count == 0


def test_backend_auth_refuses_a_token_endpoint_that_parsers_read_differently(mock):
    mock.get(
        f"{BASE}/.well-known/smart-configuration",
        json={
            "token_endpoint": f"https://{EVIL}\\@fhir.test/token",
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "grant_types_supported": ["client_credentials"],
        },
    )
    with pytest.raises(LaunchError, match="backslash"):
        discover_token_endpoint(requests.Session(), BASE)


# ------------------------------------------------------------------ --token in the process list


def test_the_token_can_come_from_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FHIR_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_token(argparse.Namespace(token=None, token_file=str(path))) == TOKEN
    with pytest.raises(UsageError, match="not both"):
        read_token(argparse.Namespace(token="x", token_file=str(path)))
    with pytest.raises(UsageError) as caught:
        read_token(argparse.Namespace(token=None, token_file=str(tmp_path / "missing")))
    assert TOKEN not in str(caught.value)
    monkeypatch.setenv("FHIR_TOKEN", "from-env")
    assert read_token(argparse.Namespace(token=None, token_file=None)) == "from-env"


def test_the_help_warns_that_token_is_visible_and_offers_a_file(capsys):
    from fhir_plugin._cli import main

    for command in ("check", "sync"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--token-file" in text and "process list" in text


class _DropsOnce(http.server.BaseHTTPRequestHandler):
    """The first answer breaks off mid-body; the second is whole.  (Reading bodies as a stream must not
    lose the client's retry of a dropped connection.)"""

    calls = 0

    def do_GET(self):
        type(self).calls += 1
        body = json.dumps({"resourceType": "Patient", "id": "p1"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if type(self).calls > 1 else body[:5])
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_an_answer_cut_off_mid_body_is_retried():
    _DropsOnce.calls = 0
    with local_server(_DropsOnce) as base:
        patient = FhirClient(base, retries=2, sleep=lambda s: None).read("Patient", "p1")
    assert patient["id"] == "p1" and _DropsOnce.calls == 2


# ------------------------------------------------------------------ item 4 end to end: check and sync


class _Recorder(http.server.BaseHTTPRequestHandler):
    """The other host: records every Authorization header that reaches it."""

    seen: list[str] = []

    def do_GET(self):
        type(self).seen.append(self.headers.get("Authorization", ""))
        body = json.dumps({"resourceType": "Bundle", "type": "searchset"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _FhirWithLink(http.server.BaseHTTPRequestHandler):
    """A FHIR server answering the record batch; its first search's ``next`` link is ``next_link``."""

    next_link = ""

    def do_POST(self):
        batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        entries = []
        for n, entry in enumerate(batch["entry"]):
            if n == 0:
                resource = {"resourceType": "Patient", "id": entry["request"]["url"].split("/")[1]}
            else:
                resource = {"resourceType": "Bundle", "type": "searchset", "entry": []}
                if n == 1:
                    resource["link"] = [{"relation": "next", "url": type(self).next_link}]
            entries.append({"resource": resource, "response": {"status": "200 OK"}})
        body = json.dumps({"resourceType": "Bundle", "type": "batch-response", "entry": entries}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("command", ["check", "sync"])
def test_check_and_sync_never_send_the_token_to_the_host_urllib3_sees(tmp_path, monkeypatch, command):
    from fhir_plugin._cli import main

    monkeypatch.delenv("FHIR_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    _Recorder.seen = []
    with local_server(_Recorder) as evil, local_server(_FhirWithLink) as base:
        authority, evil_authority = (u.split("//")[1].split("/")[0] for u in (base, evil))
        # urlsplit sees the FHIR server's host here; urllib3 (and so requests) connects to the other one
        _FhirWithLink.next_link = f"http://{evil_authority}\\@{authority}/fhir?_getpages=x"
        args = [command, "--server", base, "--patient", "p1", "--token-file", str(token_file)]
        if command == "sync":
            args += ["--state", str(tmp_path / "state.sqlite"), "--report", str(tmp_path / "r.jsonl")]
        main(args)
    assert _Recorder.seen == []  # before the fix: ["Bearer secret-token-value"]
