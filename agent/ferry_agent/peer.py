"""gRPC client for another agent: manifests, versions, health, and remote pull requests."""

from __future__ import annotations

import threading
from typing import Any

import grpc

from .auth import call_metadata
from .errors import Cancelled, FerryError, PeerUnavailable, Unauthenticated, from_reason
from .manifest import Manifest
from .proto import ferry_agent_pb2 as _pb
from .proto import ferry_agent_pb2_grpc as _pb_grpc

# Generated modules have no type stubs.
pb: Any = _pb
pb_grpc: Any = _pb_grpc

# 64 MiB: a manifest of ~1M tensors; NIXL metadata is a few KiB.
MAX_MESSAGE = 64 << 20


class AgentClient:
    def __init__(self, endpoint: str, token: str, *, timeout: float = 10.0):
        self.endpoint = endpoint
        self.timeout = timeout
        self._md = call_metadata(token)
        self._channel = grpc.insecure_channel(
            endpoint,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self._stub = pb_grpc.FerryAgentStub(self._channel)

    def _call(self, method, request, timeout: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return method(request, metadata=self._md, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(
                    f"{self.endpoint} refused our token", endpoint=self.endpoint
                ) from exc
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise PeerUnavailable(
                f"agent {self.endpoint}: {code.name if code else 'error'}: {detail}",
                endpoint=self.endpoint,
                code=code.name if code else "",
            ) from exc

    def manifest(self, *, with_metadata: bool = True) -> Manifest:
        reply = self._call(
            self._stub.GetManifest, pb.ManifestRequest(omit_nixl_metadata=not with_metadata)
        )
        return Manifest.from_proto(reply)

    def version(self, timeout: float | None = None) -> Any:
        return self._call(self._stub.GetVersion, pb.VersionRequest(), timeout)

    def relay_status(
        self, timeout: float | None = None, *, after_bytes: int = -1, wait_s: float = 0.0
    ) -> Any:
        """The upstream's pull progress; with `wait_s`, answered once more than
        `after_bytes` landed or the pull ended (long poll), at the latest after wait_s."""
        req = pb.RelayStatusRequest(
            after_bytes=max(after_bytes, 0), wait_ms=int(wait_s * 1e3) if after_bytes >= 0 else 0
        )
        if timeout is None and wait_s:
            timeout = wait_s + 5.0
        return self._call(self._stub.RelayStatus, req, timeout)

    def health(self) -> Any:
        return self._call(self._stub.Health, pb.HealthRequest())

    def pull(
        self,
        sources: list[str],
        *,
        version: str = "latest",
        timeout_s: float = 60.0,
        chunk_bytes: int = 0,
        max_gbps: float = 0.0,
        retries: int = 2,
        quiesce_engine: bool = False,
        quiesce_timeout_s: float = 30.0,
        relay: bool = False,
        double_buffer: bool = False,
        cancel: threading.Event | None = None,
    ) -> Any:
        """Ask this agent to pull; raises the typed FerryError the target reported.

        Setting `cancel` cancels the call, which cancels the pull on the target."""
        req = pb.PullRequest(
            sources=sources,
            version=version,
            timeout_s=timeout_s,
            chunk_bytes=chunk_bytes,
            max_gbps=max_gbps,
            retries=retries,
            quiesce_engine=quiesce_engine,
            quiesce_timeout_s=quiesce_timeout_s,
            relay=relay,
            double_buffer=double_buffer,
        )
        if cancel is None:
            reply = self._call(self._stub.Pull, req, timeout=timeout_s + 30.0)
        else:
            fut = self._stub.Pull.future(req, metadata=self._md, timeout=timeout_s + 30.0)
            while not fut.done():
                if cancel.wait(0.05):
                    fut.cancel()
                    raise Cancelled(f"pull on {self.endpoint} cancelled", endpoint=self.endpoint)
            reply = self._call(lambda *_a, **_k: fut.result(), req)
        if not reply.ok:
            raise from_reason(
                reply.reason,
                reply.message,
                differences=list(reply.differences),
                endpoint=self.endpoint,
            )
        return reply

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AgentClient", "FerryError"]
