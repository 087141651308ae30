"""gRPC side of a target: fetch a peer's packed cache, verifying as it arrives.

The manifest is checked first (its id, the signature when a key is required,
the manifest rules and `max_bytes`, the identity asked for), so nothing is
downloaded from a peer that would be refused anyway. Each chunk must arrive
in order with the size the manifest says, and its crc32c must match both the
sender's value and the manifest's. The result is an ordinary artifact file
that `install` then verifies file by file (sha256).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import grpc

from ferry_agent.artifacts import artifacts_pb2 as pb
from ferry_agent.artifacts import artifacts_pb2_grpc as pb_grpc
from ferry_agent.artifacts.archive import trailer
from ferry_agent.artifacts.errors import ArtifactRejected, FetchFailed
from ferry_agent.artifacts.identity import Identity
from ferry_agent.artifacts.install import install, state_dir
from ferry_agent.artifacts.lock import OnceResult, install_once
from ferry_agent.artifacts.manifest import Manifest, parse_manifest
from ferry_agent.artifacts.service import GRPC_OPTIONS
from ferry_agent.artifacts.trust import verifier
from ferry_agent.auth import call_metadata


@dataclass(frozen=True)
class RemoteManifest:
    manifest: Manifest
    signature: bytes

    @property
    def manifest_id(self) -> str:
        return self.manifest.id


@dataclass(frozen=True)
class FetchResult:
    path: Path
    manifest_id: str
    bytes: int
    chunks: int
    seconds: float


def _identity_hash(identity: Identity | str) -> str:
    return identity.hash if isinstance(identity, Identity) else identity


def _rpc_error(exc: grpc.RpcError) -> FetchFailed:
    code = exc.code().name if exc.code() else "UNKNOWN"
    return FetchFailed(code, exc.details() or "")


def get_manifest(
    stub: pb_grpc.ArtifactServiceStub,
    identity: Identity | str,
    token: str,
    *,
    pubkey=None,
    expected_id: str | None = None,
    max_bytes: int | None = None,
    timeout: float = 30.0,
) -> RemoteManifest:
    """Ask a peer for the manifest of `identity` and check it completely."""
    want = _identity_hash(identity)
    try:
        resp = stub.GetManifest(
            pb.GetManifestRequest(identity_hash=want),
            metadata=call_metadata(token),
            timeout=timeout,
        )
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    actual = hashlib.sha256(resp.manifest).hexdigest()
    if actual != resp.manifest_id or (expected_id is not None and actual != expected_id):
        raise ArtifactRejected(
            "manifest-id-mismatch",
            f"manifest hashes to {actual[:16]}, peer says {resp.manifest_id[:16]}"
            + (f", expected {expected_id[:16]}" if expected_id else ""),
        )
    check = verifier(pubkey)
    if check is not None:
        check(actual, resp.signature)
    manifest = parse_manifest(resp.manifest, max_bytes=max_bytes)
    if manifest.identity_hash != want:
        raise ArtifactRejected(
            "identity-mismatch",
            f"peer sent a cache for identity {str(manifest.identity_hash)[:16]}",
        )
    return RemoteManifest(manifest, bytes(resp.signature))


def fetch_payload(
    stub: pb_grpc.ArtifactServiceStub,
    remote: RemoteManifest,
    token: str,
    dest_file: str | os.PathLike[str],
    *,
    timeout: float = 600.0,
) -> FetchResult:
    """Stream the payload of `remote` into artifact file `dest_file` (atomically)."""
    m = remote.manifest
    dest = Path(dest_file)
    part = dest.with_name(dest.name + ".part")
    start = time.monotonic()
    index = 0
    try:
        with open(part, "wb") as f:
            stream = stub.FetchChunks(
                pb.FetchChunksRequest(manifest_id=m.id, offset=0),
                metadata=call_metadata(token),
                timeout=timeout,
            )
            try:
                for chunk in stream:
                    if index >= len(m.chunks):
                        raise ArtifactRejected(
                            "oversize", f"peer sent more than {len(m.chunks)} chunks"
                        )
                    lo, hi = m.chunk_bounds(index)
                    data = chunk.data
                    if chunk.offset != lo or len(data) != hi - lo:
                        raise ArtifactRejected(
                            "bad-chunk",
                            f"chunk {index}: got offset {chunk.offset} size {len(data)}, "
                            f"manifest says {lo} size {hi - lo}",
                        )
                    crc = google_crc32c.value(data)
                    if crc != chunk.crc32c or crc != m.chunks[index]:
                        raise ArtifactRejected(
                            "crc-mismatch", f"chunk {index} (offset {lo}) fails crc32c"
                        )
                    f.write(data)
                    index += 1
            except grpc.RpcError as exc:
                raise _rpc_error(exc) from None
            finally:
                stream.cancel()
            if index != len(m.chunks):
                raise ArtifactRejected("truncated", f"peer sent {index} of {len(m.chunks)} chunks")
            body = m.canonical()
            f.write(body)
            f.write(remote.signature)
            f.write(trailer(m.id, len(body), len(remote.signature)))
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return FetchResult(dest, m.id, m.payload_size, index, time.monotonic() - start)


def channel(endpoint: str, tls=None, pod: str = "") -> grpc.Channel:
    """Plaintext (token mode), or with `tls` (auth.PeerTls, cluster mode) mTLS to pod
    `pod`: refused (FetchFailed) before connecting unless tls.allow accepts it, and the
    handshake fails unless the server's certificate names it."""
    if tls is None:
        return grpc.insecure_channel(endpoint, options=GRPC_OPTIONS)
    from ..peerid import PodIdentity

    peer = PodIdentity(tls.identity.namespace, pod)
    why = tls.allow(peer) if pod else "the source entry names no pod"
    if why:
        raise FetchFailed(
            "PERMISSION_DENIED", f"not fetching from {pod or '?'} at {endpoint}: {why}"
        )
    return grpc.secure_channel(
        endpoint,
        tls.channel_credentials(),
        options=[*GRPC_OPTIONS, ("grpc.ssl_target_name_override", peer.dns_name)],
    )


def fetch(
    endpoint: str,
    identity: Identity | str,
    token: str,
    dest_file: str | os.PathLike[str],
    *,
    pubkey=None,
    expected_id: str | None = None,
    max_bytes: int | None = None,
    timeout: float = 600.0,
    tls=None,
    pod: str = "",
) -> FetchResult:
    """Fetch the cache a peer at `endpoint` (host:port) packed for `identity`.

    Raises `ArtifactRejected` (bad manifest, signature, chunk) or
    `FetchFailed` (unreachable, unauthenticated, not found).
    """
    with channel(endpoint, tls, pod) as ch:
        stub = pb_grpc.ArtifactServiceStub(ch)
        remote = get_manifest(
            stub,
            identity,
            token,
            pubkey=pubkey,
            expected_id=expected_id,
            max_bytes=max_bytes,
            timeout=min(timeout, 30.0),
        )
        return fetch_payload(stub, remote, token, dest_file, timeout=timeout)


def fetch_and_install(
    endpoint: str,
    identity: Identity | str,
    token: str,
    into: str | os.PathLike[str],
    *,
    pubkey=None,
    expected_id: str | None = None,
    max_bytes: int | None = None,
    timeout: float = 600.0,
    tls=None,
    pod: str = "",
    **once_kw,
) -> OnceResult:
    """What a target's sidecar runs before the engine starts, once per pod.

    Every rank may call it: the manifest is fetched (small) by each, then one
    rank downloads and installs under the lock while the others wait for its
    outcome. The download lives in `<into>/.ferry/` and is removed after.
    """
    with channel(endpoint, tls, pod) as ch:
        stub = pb_grpc.ArtifactServiceStub(ch)
        remote = get_manifest(
            stub,
            identity,
            token,
            pubkey=pubkey,
            expected_id=expected_id,
            max_bytes=max_bytes,
            timeout=min(timeout, 30.0),
        )

        def attempt() -> None:
            download = state_dir(into) / f"dl-{remote.manifest_id}"
            try:
                fetch_payload(stub, remote, token, download, timeout=timeout)
                install(
                    download,
                    into,
                    pubkey=pubkey,
                    expected_id=remote.manifest_id,
                    max_bytes=max_bytes,
                )
            finally:
                download.unlink(missing_ok=True)

        return install_once(into, remote.manifest_id, attempt, **once_kw)
