"""Helpers for the converter tests: images made in code, and an HTTP image server on 127.0.0.1."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def photo(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth random-ish RGB image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    arr = base + 40 * np.sin(xx[..., None] / (5 + seed) + yy[..., None] / 7 + np.arange(3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").convert(mode)


class ImageServer:
    """Paths: /img/<name> (registered bytes), /404, /slow/<name> (sleeps past the client's
    timeout), /flaky/<name> (503 on the first request, then the bytes), /html (not an image)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.hits: Counter = Counter()
        self.slow_s = 1.5
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                path = self.path
                server.hits[path] += 1
                kind, _, name = path.lstrip("/").partition("/")
                if kind == "slow":
                    time.sleep(server.slow_s)
                if kind == "flaky" and server.hits[path] == 1:
                    return self._send(503, b"try again", "text/plain")
                if kind == "html":
                    return self._send(200, b"<html><body>moved</body></html>", "text/html")
                if kind in ("img", "slow", "flaky") and name in server.files:
                    return self._send(200, server.files[name], "image/jpeg")
                return self._send(404, b"not found", "text/plain")

            def _send(self, code, body, ctype):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server(monkeypatch):
    for k in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(k, "127.0.0.1,localhost")
    server = ImageServer()
    yield server
    server.close()


class _Images:
    encode = staticmethod(encode)
    photo = staticmethod(photo)


@pytest.fixture
def images():
    """``images.photo(w, h, seed, mode)`` and ``images.encode(img, fmt)`` (conftest helpers are not
    importable under --import-mode=importlib, so they travel as a fixture)."""
    return _Images
