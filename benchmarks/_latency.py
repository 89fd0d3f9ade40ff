"""A loopback proxy that adds a fixed delay to every request: the network a real EHR sits behind.

On loopback a round trip costs well under a millisecond, so only the server's
work shows; behind a WAN each round trip costs its latency again.  Both clients
go through the same proxy in the same run, so the comparison stays fair.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import requests

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


@contextlib.contextmanager
def delayed(base_url: str, latency_ms: float) -> Iterator[str]:
    """Yield a base URL that reaches ``base_url`` with ``latency_ms`` added to each request."""
    if latency_ms <= 0:
        yield base_url
        return
    upstream = urlsplit(base_url)
    # one upstream session per handler thread: requests in flight at once reach the server at once, as
    # over a network (a shared session behind a lock made the proxy send them one at a time, which
    # charged a reader that sends its searches together for a queue no real network has)
    local = threading.local()
    sessions: list[requests.Session] = []
    sessions_lock = threading.Lock()

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            with sessions_lock:
                sessions.append(local.session)
        return local.session

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # headers and body go out in separate writes: without this, Nagle's algorithm and delayed
            # ACKs add ~40 ms to every answer, which would swamp the latency being simulated
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _forward(self) -> None:
            time.sleep(latency_ms / 1000.0)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            answer = session().request(
                self.command,
                f"{upstream.scheme}://{upstream.netloc}{self.path}",
                data=body,
                headers=headers,
                timeout=120,
            )
            data = answer.content
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in _HOP_HEADERS:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _forward

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{upstream.path}"
    finally:
        server.shutdown()
        for each in sessions:
            each.close()
