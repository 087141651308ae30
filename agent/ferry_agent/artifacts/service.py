"""gRPC side of a source: serve packed caches from a local store dir.

The store is a flat dir of `<manifest id>.ferry` files written by `pack`
(`ArtifactStore.publish`). `ArtifactServicer` is a thin adapter: it looks
artifacts up by identity hash or manifest id and streams payload chunks with
their crc32c. Every call must carry `authorization: Bearer <token>`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import google_crc32c
import grpc

from ferry_agent.artifacts import artifacts_pb2 as pb
from ferry_agent.artifacts import artifacts_pb2_grpc as pb_grpc
from ferry_agent.artifacts.archive import ArchiveInfo, open_archive
from ferry_agent.artifacts.errors import ArtifactRejected
from ferry_agent.artifacts.identity import Identity
from ferry_agent.artifacts.pack import pack
from ferry_agent.auth import AuthInterceptor, TokenFile

SUFFIX = ".ferry"
# Headroom over the largest chunk (16 MiB, manifest.MAX_CHUNK_SIZE) for framing.
MAX_MESSAGE_BYTES = 32 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
_HEX = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore:
    """Packed caches on local disk, indexed by manifest id and identity hash."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._by_id: dict[str, ArchiveInfo] = {}
        self._by_identity: dict[str, str] = {}
        self.rescan()

    def rescan(self) -> None:
        by_id: dict[str, ArchiveInfo] = {}
        by_identity: dict[str, str] = {}
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            try:
                info = open_archive(path)
            except ArtifactRejected:
                continue  # a half-written or foreign file is not served
            if path.stem != info.manifest_id:
                continue
            by_id[info.manifest_id] = info
            if info.manifest.identity_hash:
                by_identity[info.manifest.identity_hash] = info.manifest_id
        with self._lock:
            self._by_id, self._by_identity = by_id, by_identity

    def publish(
        self, src: str | os.PathLike[str], identity: Identity, key=None, **kw
    ) -> ArchiveInfo:
        """Pack `src` into the store under its manifest id; it replaces older
        artifacts of the same identity for lookups."""
        tmp = self.root / f".publish-{os.getpid()}-{threading.get_ident()}"
        result = pack(src, tmp, identity=identity, key=key, **kw)
        final = self.root / f"{result.manifest_id}{SUFFIX}"
        os.replace(tmp, final)
        info = ArchiveInfo(final, result.manifest, result.signature, final.stat().st_size)
        with self._lock:
            self._by_id[info.manifest_id] = info
            self._by_identity[identity.hash] = info.manifest_id
        return info

    def by_identity(self, identity_hash: str) -> ArchiveInfo | None:
        with self._lock:
            mid = self._by_identity.get(identity_hash)
            return self._by_id.get(mid) if mid else None

    def by_id(self, manifest_id: str) -> ArchiveInfo | None:
        with self._lock:
            return self._by_id.get(manifest_id)


class ArtifactServicer(pb_grpc.ArtifactServiceServicer):
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    def GetManifest(self, request, context):
        if not _HEX.match(request.identity_hash):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "identity_hash must be sha256 hex")
        info = self.store.by_identity(request.identity_hash)
        if info is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"no cache for identity {request.identity_hash[:16]}"
            )
        return pb.GetManifestResponse(
            manifest_id=info.manifest_id,
            manifest=info.manifest.canonical(),
            signature=info.signature,
        )

    def FetchChunks(self, request, context):
        info = self.store.by_id(request.manifest_id)
        if info is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no artifact {request.manifest_id[:16]}")
        m = info.manifest
        if request.offset % m.chunk_size or request.offset > m.payload_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "offset must be a chunk boundary")
        with open(info.path, "rb", buffering=0) as f:
            f.seek(request.offset)
            for index in range(request.offset // m.chunk_size, len(m.chunks)):
                start, end = m.chunk_bounds(index)
                data = f.read(end - start)
                yield pb.Chunk(offset=start, data=data, crc32c=google_crc32c.value(data))


def serve(
    store: ArtifactStore,
    token: str,
    address: str = "127.0.0.1:0",
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start an ArtifactService on `address`; returns (server, bound port).

    Standalone only: inside the agent, the servicer joins the agent's server,
    which already carries its `AuthInterceptor`."""
    if not token:
        raise ValueError("empty bearer token")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[AuthInterceptor(lambda: token)],
        options=GRPC_OPTIONS,
    )
    pb_grpc.add_ArtifactServiceServicer_to_server(ArtifactServicer(store), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    return server, port


def main(argv: list[str] | None = None) -> int:
    """`python -m ferry_agent.artifacts.service --store DIR --token-file F`:
    serve a store until killed; prints `listening <port>` once bound."""
    parser = argparse.ArgumentParser(description="serve packed caches from a store dir")
    parser.add_argument("--store", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--address", default="127.0.0.1:0")
    args = parser.parse_args(argv)
    server, port = serve(ArtifactStore(args.store), TokenFile(args.token_file).get(), args.address)
    print(f"listening {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop(grace=1).wait()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
