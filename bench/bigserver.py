"""A loopback HTTPS upstream for the egress benchmark.

Signed by the test CA of `tests/support/upstream.py`; answers ``/small`` with a short JSON body
and ``/big?bytes=N`` with N bytes (sent in 1 MiB writes), so the gateway's per-request latency
and its streaming throughput can be measured against a direct request to the same server.
"""

from __future__ import annotations

import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.upstream import TestCA  # noqa: E402

_CHUNK = b"\0" * (1 << 20)


class BenchServer:
    def __init__(self, directory: Path, name: str) -> None:
        self.ca = TestCA.create(directory)
        ctx: ssl.SSLContext = self.ca.server_context(directory, [name])
        auth_seen: list[str] = []
        self.auth_seen = auth_seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: without this, delayed ACKs add
            # 40 ms to every request and hide what the gateway costs.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                if "Authorization" in self.headers and len(auth_seen) < 4:
                    auth_seen.append(self.headers["Authorization"])
                if url.path == "/big":
                    size = int(parse_qs(url.query).get("bytes", ["0"])[0])
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    left = size
                    while left > 0:
                        n = min(left, len(_CHUNK))
                        self.wfile.write(_CHUNK[:n])
                        left -= n
                    return
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def ca_path(self) -> Path:
        return self.ca.cert_path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
