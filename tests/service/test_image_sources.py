"""Images named by URL: never fetched unless the operator allows the host, then within the caps."""

from __future__ import annotations

import functools
import http.server
import threading

import httpx
import pytest


@pytest.fixture
def image_host(tmp_path, png_bytes):
    """A plain HTTP server on loopback with `a.png`, `big.bin` and a redirect at `/moved.png`."""
    (tmp_path / "a.png").write_bytes(png_bytes[1])
    (tmp_path / "big.bin").write_bytes(b"\0" * 400_000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "http://example.com/a.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def generate(url, image, **fields):
    return httpx.post(f"{url}/v1/generate", json={"image": image, "max_new_tokens": 2, **fields}, timeout=30)


def test_no_url_is_fetched_by_default(serve, image_host):
    with serve() as url:
        answer = generate(url, f"{image_host}/a.png")
        local_file = generate(url, "file:///etc/passwd")
    assert answer.status_code == 400 and "fetches images from no host (KOSMOS_ALLOWED_IMAGE_HOSTS)" in answer.text
    assert local_file.status_code == 400 and "never fetches file: URLs" in local_file.text


def test_an_allowed_host_is_fetched_within_the_caps(serve, image_host):
    with serve(allowed_image_hosts=["127.0.0.1"], max_upload_bytes=300_000) as url:
        fetched = generate(url, f"{image_host}/a.png")
        too_big = generate(url, f"{image_host}/big.bin")
        missing = generate(url, f"{image_host}/nothing.png")
        redirected = generate(url, f"{image_host}/moved.png")
        other_host = generate(url, "http://localhost:1/a.png")
    assert fetched.status_code == 200 and fetched.json()["image_size"] == [300, 200]
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    assert missing.status_code == 400 and "answered HTTP 404" in missing.text
    assert redirected.status_code == 400 and "answered HTTP 302" in redirected.text
    assert other_host.status_code == 400 and "only from 127.0.0.1" in other_host.text


def test_the_environment_lists_hosts_comma_separated(monkeypatch):
    from kosmos_serve.config import ServerSettings

    monkeypatch.setenv("KOSMOS_ALLOWED_IMAGE_HOSTS", "images.example.com, cdn.example.com:8443")
    assert ServerSettings().allowed_image_hosts == ["images.example.com", "cdn.example.com:8443"]
    monkeypatch.delenv("KOSMOS_ALLOWED_IMAGE_HOSTS")
    assert ServerSettings().allowed_image_hosts == []
