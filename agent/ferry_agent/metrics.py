"""Agent metrics (Prometheus) and the small HTTP endpoint serving /metrics, /healthz, /readyz."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds buckets spanning a 1 MiB host copy (~0.1 ms) to a slow 100 GB pull.
_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.bytes_moved = Counter(
            "ferry_agent_bytes_moved",
            "Bytes pulled into this agent's slabs",
            ["direction"],
            registry=r,
        )
        self.transfer_seconds = Histogram(
            "ferry_agent_transfer_seconds",
            "Duration of a pull (NIXL READs, all chunks)",
            buckets=_SECONDS,
            registry=r,
        )
        self.transfer_gbps = Gauge(
            "ferry_agent_transfer_gbps",
            "Throughput of the last successful pull (GB/s, 1e9)",
            registry=r,
        )
        self.registration_seconds = Histogram(
            "ferry_agent_registration_seconds",
            "Time to register slabs with NIXL",
            buckets=_SECONDS,
            registry=r,
        )
        self.failures = Counter(
            "ferry_agent_transfer_failures", "Failed pulls by reason", ["reason"], registry=r
        )
        self.descriptors = Gauge(
            "ferry_agent_descriptors", "Descriptors in the last pull plan", registry=r
        )
        self.dlists_reused = Counter(
            "ferry_agent_dlists_reused", "Pulls that reused prepared descriptor lists", registry=r
        )
        self.version_info = Gauge(
            "ferry_agent_version_info",
            "Version this agent holds",
            ["version", "fingerprint"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves /metrics and health probes; `ready` decides /readyz and `started`
    /startupz (the sidecar's startup probe: the engine starts only after it)."""

    def __init__(
        self,
        metrics: AgentMetrics,
        port: int,
        host: str = "0.0.0.0",
        ready: Callable[[], bool] = lambda: True,
        started: Callable[[], bool] = lambda: True,
    ):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path.startswith("/metrics"):
                    body, ctype, code = outer.metrics.render(), CONTENT_TYPE_LATEST, 200
                elif self.path.startswith("/healthz"):
                    body, ctype, code = b"ok\n", "text/plain", 200
                elif self.path.startswith(("/readyz", "/startupz")):
                    ok = outer.ready() if self.path.startswith("/readyz") else outer.started()
                    body, ctype, code = (
                        (b"ready\n", "text/plain", 200)
                        if ok
                        else (b"not ready\n", "text/plain", 503)
                    )
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.metrics = metrics
        self.ready = ready
        self.started = started
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
