"""A real HTTP proxy in front of the test Orthanc that breaks one kind of request on purpose, to
see how the PACS round trip behaves when a PACS fails halfway: it forwards every request to
Orthanc unchanged except

- fault "stow-503": every POST (STOW-RS) is answered 503 Service Unavailable, never forwarded;
- fault "wado-drop-one": a WADO-RS series retrieval comes back with its last instance removed
  from the multipart answer (what a series still arriving, or a PACS cutting a transfer, gives).

Loopback only; the server thread stops with `close()`.
"""
from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERIES_RETRIEVE = re.compile(r"^/dicom-web/studies/[^/]+/series/[^/?]+/?(\?.*)?$")


def _drop_last_part(body: bytes, content_type: str) -> bytes:
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    marker = b"--" + boundary
    parts = body.split(marker)
    # parts: preamble, part1, ..., partN, "--\r\n" epilogue
    kept = parts[:-2] + parts[-1:]
    return marker.join(kept)


class FaultyProxy:
    def __init__(self, target: str, fault: str):
        self.target, self.fault = target.rstrip("/"), fault
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # quiet
                pass

            def _forward(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                if method == "POST" and proxy.fault == "stow-503":
                    body = b'{"error": "injected by the test proxy"}'
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                    return
                hop_by_hop = ("host", "content-length", "connection", "keep-alive", "proxy-connection", "te",
                              "trailer", "transfer-encoding", "upgrade")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop_by_hop}
                request = urllib.request.Request(proxy.target + self.path, data=data, method=method, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as r:
                        status, reason, rheaders, body = r.status, r.reason, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    status, reason, rheaders, body = e.code, e.reason, e.headers, e.read()
                ctype = rheaders.get("Content-Type", "")
                if (proxy.fault == "wado-drop-one" and method == "GET" and SERIES_RETRIEVE.match(self.path)
                        and ctype.startswith("multipart/related")):
                    body = _drop_last_part(body, ctype)
                self.send_response(status, reason)
                for k, v in rheaders.items():
                    # hop-by-hop headers stay behind: a Keep-Alive header copied from Orthanc would make
                    # http.client keep this HTTP/1.0 connection for the next request after the server closed it
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                # this HTTP/1.0 server closes every connection: say so, or a client may send its next
                # request on a pooled connection the server has already closed (RemoteDisconnected)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
