"""Peer authentication, in one of two modes (`ferry agent run --peer-auth`):

- `mtls` (the default in cluster mode, never left silently): the server requires a
  client certificate of the agent CA and serves a call only when `PeerTls.allow`
  accepts the pod the certificate names; `Pull` (which pauses the engine and points
  the agent at sources) is never served to peers: it is asked on the pod's own control
  socket. A client names the pod it dials and the handshake fails unless the server's
  certificate names that pod; no bearer token is sent at all.
- `token` (standalone and dev): a shared bearer token read from a file (a mounted
  Secret), over plaintext gRPC. The file is re-read when its mtime changes, so a
  rotated Secret takes effect without a restart. Calls without the right token get
  UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from .peerid import PodIdentity, TlsMaterial, caller

HEADER = "authorization"
# Never served to a peer in mtls mode: the pod's own engine or job runner asks its agent
# (control socket, in process).
LOCAL_ONLY = frozenset({"Pull"})


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
    """The token header; none without a token (mTLS mode sends no token at all)."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


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


@dataclass
class PeerTls:
    """An agent's mTLS side: who it is, its current certificate (`material()` is called
    per handshake and per new client: a renewed certificate is picked up without a
    restart), and whom it talks to (`allow(peer)`: None when allowed, else why not)."""

    identity: PodIdentity
    material: Callable[[], TlsMaterial]
    allow: Callable[[PodIdentity], str | None]

    def server_credentials(self) -> grpc.ServerCredentials:
        from .peerid import grpc_server_config

        served = [self.material()]

        def fetch() -> Any:
            now = self.material()
            if now == served[0]:
                return None  # keep the current configuration
            served[0] = now
            return grpc_server_config(now)

        return grpc.dynamic_ssl_server_credentials(
            grpc_server_config(served[0]), fetch, require_client_authentication=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        m = self.material()
        return grpc.ssl_channel_credentials(m.ca_pem, m.key_pem, m.cert_pem)


class PeerInterceptor(grpc.ServerInterceptor):
    """Serves a call only to a caller whose verified certificate names a pod `allow`
    accepts; LOCAL_ONLY methods to nobody. The handshake already refused callers
    without a certificate of the agent CA."""

    def __init__(self, tls: PeerTls):
        self.tls = tls

    def _refusal(
        self, method: str, context: grpc.ServicerContext
    ) -> tuple[grpc.StatusCode, str] | None:
        if method in LOCAL_ONLY:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is not served to peers in cluster mode: it is asked on the pod's "
                "own control socket (ferry_agent.client) or by the operator's assignment",
            )
        peer = caller(context.auth_context())
        if peer is None:
            return grpc.StatusCode.UNAUTHENTICATED, "no Ferry pod certificate"
        why = self.tls.allow(peer)
        if why:
            return grpc.StatusCode.PERMISSION_DENIED, f"pod {peer}: {why}"
        return None

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        refusal = self._refusal
        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                no = refusal(method, context)
                if no:
                    context.abort(*no)
                return inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Any:
                no = refusal(method, context)
                if no:
                    context.abort(*no)
                yield from inner_us(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)

        # No streaming-request methods exist; refuse rather than serve one unchecked.
        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served")

        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.stream_stream_rpc_method_handler(deny)
