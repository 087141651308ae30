"""gRPC client for another agent: manifests, versions, health, and remote pull requests."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import grpc

from .auth import PeerTls, call_metadata
from .digests import Digests
from .errors import (
    Cancelled,
    DigestsUnavailable,
    FerryError,
    PeerRefused,
    PeerUnavailable,
    Unauthenticated,
    from_reason,
)
from .manifest import Manifest
from .proto import ferry_agent_pb2 as _pb
from .proto import ferry_agent_pb2_grpc as _pb_grpc
from .request import PullRequest

# Generated modules have no type stubs.
pb: Any = _pb
pb_grpc: Any = _pb_grpc

# 64 MiB: a manifest of ~1M tensors; NIXL metadata is a few KiB.
MAX_MESSAGE = 64 << 20


class AgentClient:
    """With `tls` (cluster mode) the peer is dialled over mTLS as pod `expect` of our
    namespace: PeerRefused, before any connection, unless `tls.allow` accepts that pod;
    every call fails (UNAVAILABLE) unless the server's certificate names it. No token
    is sent then. Without `tls`: plaintext with the shared token (standalone)."""

    def __init__(
        self,
        endpoint: str,
        token: str,
        *,
        timeout: float = 10.0,
        tls: PeerTls | None = None,
        expect: str = "",
    ):
        self.endpoint = endpoint
        self.timeout = timeout
        self.tls = tls
        self._options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        self._material: Any = None
        self._old: list[grpc.Channel] = []  # channels of renewed certificates, still streaming
        if tls is None:
            self._md = call_metadata(token)
            self._channel = grpc.insecure_channel(endpoint, options=self._options)
        else:
            from .peerid import PodIdentity

            if not expect:
                raise PeerRefused(
                    f"{endpoint}: cluster mode dials peers by pod (pod@host:port), and this "
                    "address names none",
                    endpoint=endpoint,
                )
            peer = PodIdentity(tls.identity.namespace, expect)
            why = tls.allow(peer)
            if why:
                raise PeerRefused(
                    f"not pulling from pod {peer} at {endpoint}: {why}",
                    endpoint=endpoint,
                    pod=expect,
                )
            self._md = ()
            self._options.append(("grpc.ssl_target_name_override", peer.dns_name))
            self._channel = self._dial()
        self._stub_now = pb_grpc.FerryAgentStub(self._channel)

    def _dial(self) -> grpc.Channel:
        assert self.tls is not None
        self._material = self.tls.material()
        return grpc.secure_channel(
            self.endpoint, self.tls.channel_credentials(), options=self._options
        )

    def stale(self) -> bool:
        """Made with a certificate we no longer hold (renewed since): dial again."""
        return self.tls is not None and self.tls.material() != self._material

    @property
    def _stub(self) -> Any:
        """The stub of a channel with our current certificate (a reconnect with an expired
        one would fail); streams on the previous channel go on until they end."""
        if self.stale():
            self._old.append(self._channel)
            self._channel = self._dial()
            self._stub_now = pb_grpc.FerryAgentStub(self._channel)
        return self._stub_now

    def _call(self, method, request, timeout: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return method(request, metadata=self._md, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(
                    f"{self.endpoint} refused our credentials", endpoint=self.endpoint
                ) from exc
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise PeerRefused(
                    f"{self.endpoint} refused us: {exc.details()}", endpoint=self.endpoint
                ) from exc
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.UNAVAILABLE and "Verification" in (detail or ""):
                raise PeerRefused(
                    f"{self.endpoint} is not the pod we dialled (its certificate names another, "
                    f"or none of ours): {detail}",
                    endpoint=self.endpoint,
                ) from exc
            raise PeerUnavailable(
                f"agent {self.endpoint}: {code.name if code else 'error'}: {detail}",
                endpoint=self.endpoint,
                code=code.name if code else "",
            ) from exc

    # `rank`: the local rank (GPU) of the peer's pod each call is about.
    def manifest(self, *, with_metadata: bool = True, rank: int = 0) -> Manifest:
        req = pb.ManifestRequest(omit_nixl_metadata=not with_metadata, rank=rank)
        return Manifest.from_proto(self._call(self._stub.GetManifest, req))

    def version(self, timeout: float | None = None, *, rank: int = 0) -> Any:
        return self._call(self._stub.GetVersion, pb.VersionRequest(rank=rank), timeout)

    def digests(self, version: str, *, rank: int = 0) -> Digests:
        """The content digests of `version` this peer serves (DigestsUnavailable: it does
        not serve that version, or has no digests of it)."""
        return self.digests_later(version, rank=rank)()

    def digests_later(self, version: str, *, rank: int = 0) -> Callable[[], Digests]:
        """Ask for the digests now, answer when called: the ask overlaps the READs."""
        req = pb.DigestsRequest(rank=rank, version=version)
        fut = self._stub.GetDigests.future(req, metadata=self._md, timeout=self.timeout)
        return functools.partial(self._digests_of, fut, version)

    def _digests_of(self, fut: Any, version: str) -> Digests:
        try:
            reply = self._call(lambda *_a, **_k: fut.result(), None)
        except PeerUnavailable as exc:
            if exc.fields.get("code") not in ("NOT_FOUND", "UNIMPLEMENTED"):
                raise
            raise DigestsUnavailable(
                f"source {self.endpoint} has no content digests of version {version!r}",
                endpoint=self.endpoint,
                version=version,
            ) from exc
        got = Digests.from_proto(reply)
        if got.version != version:
            raise DigestsUnavailable(
                f"source {self.endpoint} answered digests of {got.version!r}, not {version!r}",
                endpoint=self.endpoint,
                version=version,
            )
        return got

    def relay_status(
        self,
        timeout: float | None = None,
        *,
        after_bytes: int = -1,
        wait_s: float = 0.0,
        rank: int = 0,
    ) -> Any:
        """The upstream's pull progress; with `wait_s`, answered once more than
        `after_bytes` landed or the pull ended (long poll), at the latest after wait_s."""
        req = pb.RelayStatusRequest(
            after_bytes=max(after_bytes, 0),
            wait_ms=int(wait_s * 1e3) if after_bytes >= 0 else 0,
            rank=rank,
        )
        if timeout is None and wait_s:
            timeout = wait_s + 5.0
        return self._call(self._stub.RelayStatus, req, timeout)

    def health(self, *, rank: int = 0) -> Any:
        return self._call(self._stub.Health, pb.HealthRequest(rank=rank))

    def pull(self, request: PullRequest, *, cancel: threading.Event | None = None) -> Any:
        """Ask this agent to pull; raises the typed FerryError the target reported.

        Setting `cancel` cancels the call, which cancels the pull on the target."""
        req = request.to_proto(pb)
        timeout = request.timeout_s + 30.0
        if cancel is None:
            reply = self._call(self._stub.Pull, req, timeout=timeout)
        else:
            fut = self._stub.Pull.future(req, metadata=self._md, timeout=timeout)
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

    def follow(self, follower: str, *, serving: str = "", rank: int = 0) -> FollowCall:
        """Subscribe to this source's versions (ferry_agent.follow): an iterator of Notices, one
        per publish, until cancelled or the source goes away (PeerUnavailable)."""
        req = pb.FollowRequest(follower=follower, rank=rank, serving=serving)
        return FollowCall(self._stub.Follow(req, metadata=self._md), self.endpoint)

    def report(self, outcome: Any, *, rank: int = 0) -> None:
        """Tell this source which version we now serve (a follow.Outcome)."""
        self._call(self._stub.Report, outcome.to_proto(pb, rank))

    def close(self) -> None:
        for ch in (*self._old, self._channel):
            ch.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FollowCall:
    """A Follow stream: iterate for Notices; cancel() ends it (the source unsubscribes)."""

    def __init__(self, call: Any, endpoint: str):
        self._call, self.endpoint = call, endpoint

    def __iter__(self) -> Any:
        from .follow import Notice

        try:
            for m in self._call:
                yield Notice.from_proto(m)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.CANCELLED:
                return
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(
                    f"{self.endpoint} refused our token", endpoint=self.endpoint
                ) from exc
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise PeerRefused(
                    f"{self.endpoint} refused us: {exc.details()}", endpoint=self.endpoint
                ) from exc
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise PeerUnavailable(
                f"follow {self.endpoint}: {code.name if code else 'error'}: {detail}",
                endpoint=self.endpoint,
                code=code.name if code else "",
            ) from exc

    def cancel(self) -> None:
        self._call.cancel()


__all__ = ["AgentClient", "FerryError", "FollowCall"]
