"""leases.patch sends the API client's bearer token (found by the per-pod authorization
work: kubeconfig and in-cluster configs keep it as api_key["BearerToken"], and the bare
PATCH read "authorization", so on a real cluster every agent report went out anonymous).
A real HTTP server on loopback records what the PATCH carried."""

from __future__ import annotations

import http.server
import threading

from kubernetes import client

from ferry_api import leases


def test_lease_patch_carries_the_clients_bearer_token():
    seen: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PATCH(self):  # noqa: N802
            seen.update(path=self.path, auth=self.headers.get("Authorization", ""))
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{server.server_port}"
        cfg.api_key = {"BearerToken": "pod-bound-token"}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
        leases.patch(
            client.ApiClient(cfg), "ns", "pod-a", {"report.ferry.dev/x": "{}"}, "ferry-agent"
        )
    finally:
        server.shutdown()
    assert seen["path"].startswith(
        "/apis/coordination.k8s.io/v1/namespaces/ns/leases/ferry-agent-pod-a"
    )
    assert seen["auth"] == "Bearer pod-bound-token"
