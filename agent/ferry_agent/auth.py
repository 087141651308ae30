"""Peer authentication: a shared bearer token read from a file (a mounted Secret).

The file is re-read when its mtime changes, so a rotated Secret takes effect
without a restart. Calls without the right token get UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable
from typing import Any

import grpc

HEADER = "authorization"


class TokenFile:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._token = ""
        self.get()  # fail at start-up, not at the first call
        if not self._token:
            raise ValueError(f"token file {path} is empty")

    def get(self) -> str:
        st = os.stat(self.path)
        with self._lock:
            if st.st_mtime != self._mtime:
                with open(self.path) as f:
                    self._token = f.read().strip()
                self._mtime = st.st_mtime
            return self._token


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((HEADER, f"Bearer {token}"),)


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose `authorization: Bearer <token>` does not match.

    Reusable for any servicer added to the agent's server (e.g. ArtifactCache)."""

    def __init__(self, token: Callable[[], str]):
        self._token = token

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = deny

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        md = dict(handler_call_details.invocation_metadata or ())
        got = md.get(HEADER, "")
        want = self._token()
        if not want or not hmac.compare_digest(got.encode(), f"Bearer {want}".encode()):
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(self._deny)
            if handler.unary_stream:
                return grpc.unary_stream_rpc_method_handler(self._deny)
            if handler.stream_unary:
                return grpc.stream_unary_rpc_method_handler(self._deny)
            return grpc.stream_stream_rpc_method_handler(self._deny)
        return continuation(handler_call_details)
