"""A dishonest ArtifactService peer for the fetch tests; run as a process.

--mode flip-data     flips a byte in chunk 1 and sends the crc of the flipped data
--mode flip-quiet    flips a byte in chunk 1 but sends the original crc
--mode short         stops after the first chunk
--mode swap-identity answers any identity with the one artifact it has
"""

from __future__ import annotations

import argparse
import threading
from concurrent import futures

import google_crc32c
import grpc

from ferry_agent.artifacts import artifacts_pb2 as pb
from ferry_agent.artifacts import artifacts_pb2_grpc as pb_grpc
from ferry_agent.artifacts.service import (
    GRPC_OPTIONS,
    ArtifactServicer,
    ArtifactStore,
)
from ferry_agent.auth import AuthInterceptor


class Tamper(ArtifactServicer):
    def __init__(self, store: ArtifactStore, mode: str) -> None:
        super().__init__(store)
        self.mode = mode

    def GetManifest(self, request, context):
        if self.mode == "swap-identity":
            info = next(iter(self.store._by_id.values()))
            return pb.GetManifestResponse(
                manifest_id=info.manifest_id,
                manifest=info.manifest.canonical(),
                signature=info.signature,
            )
        return super().GetManifest(request, context)

    def FetchChunks(self, request, context):
        for i, chunk in enumerate(super().FetchChunks(request, context)):
            if self.mode == "short" and i == 1:
                return
            if i == 1 and self.mode.startswith("flip"):
                data = bytearray(chunk.data)
                data[7] ^= 0x40
                crc = google_crc32c.value(bytes(data)) if self.mode == "flip-data" else chunk.crc32c
                chunk = pb.Chunk(offset=chunk.offset, data=bytes(data), crc32c=crc)
            yield chunk


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--mode", required=True)
    args = p.parse_args()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[AuthInterceptor(lambda: args.token)],
        options=GRPC_OPTIONS,
    )
    pb_grpc.add_ArtifactServiceServicer_to_server(
        Tamper(ArtifactStore(args.store), args.mode), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
