"""The artifact file: payload, manifest, signature, fixed trailer.

    payload      the regular files' bytes, concatenated in manifest order
    manifest     canonical JSON (see manifest.py)
    signature    0 or 64 bytes: ed25519 over the manifest id
    trailer      52 bytes: manifest id (32) | manifest length (u64) |
                 signature length (u32) | magic "FERRYAC1"

The trailer sits at the end (as in zip) so `pack` writes in one pass. There
are no names, modes or sizes outside the manifest: the framing carries bytes
only, so there is no second, disagreeing description of the tree to exploit.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ferry_agent.artifacts.errors import ArtifactRejected
from ferry_agent.artifacts.manifest import Manifest, parse_manifest

MAGIC = b"FERRYAC1"
TRAILER = struct.Struct(">32sQI8s")
SIGNATURE_SIZE = 64
MAX_MANIFEST_BYTES = 256 << 20


def trailer(manifest_id: str, manifest_len: int, sig_len: int) -> bytes:
    return TRAILER.pack(bytes.fromhex(manifest_id), manifest_len, sig_len, MAGIC)


@dataclass(frozen=True)
class ArchiveInfo:
    """A checked view of an artifact file's framing; the payload is not read yet."""

    path: Path
    manifest: Manifest
    signature: bytes
    file_size: int

    @property
    def manifest_id(self) -> str:
        return self.manifest.id


@dataclass(frozen=True)
class RawTrailer:
    manifest_id: str
    manifest_len: int
    sig_len: int
    file_size: int


def read_trailer(path: str | os.PathLike[str]) -> RawTrailer:
    """The claimed manifest id and lengths, unverified."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < TRAILER.size:
            raise ArtifactRejected("truncated", f"{path}: {size} bytes is shorter than a trailer")
        f.seek(size - TRAILER.size)
        raw_id, mlen, slen, magic = TRAILER.unpack(f.read(TRAILER.size))
    if magic != MAGIC:
        raise ArtifactRejected(
            "truncated", f"{path}: no Ferry trailer (truncated or not an artifact)"
        )
    return RawTrailer(raw_id.hex(), mlen, slen, size)


def open_archive(
    path: str | os.PathLike[str],
    *,
    verify_signature=None,
    expected_id: str | None = None,
    max_bytes: int | None = None,
) -> ArchiveInfo:
    """Check the framing, manifest id, signature and manifest; not the payload.

    `verify_signature(manifest_id, signature)` raises when trust is required
    and the signature is missing or wrong; it runs before the manifest is
    parsed, so an untrusted peer's manifest is never interpreted.
    """
    t = read_trailer(path)
    if t.manifest_len > MAX_MANIFEST_BYTES or t.manifest_len == 0:
        raise ArtifactRejected("bad-manifest", f"manifest length {t.manifest_len} is out of range")
    if t.sig_len not in (0, SIGNATURE_SIZE):
        raise ArtifactRejected("bad-signature", f"signature length {t.sig_len} is not 0 or 64")
    payload_len = t.file_size - TRAILER.size - t.manifest_len - t.sig_len
    if payload_len < 0:
        raise ArtifactRejected("truncated", f"{path}: file is shorter than its manifest")
    with open(path, "rb") as f:
        f.seek(payload_len)
        manifest_bytes = f.read(t.manifest_len)
        signature = f.read(t.sig_len)
    actual_id = hashlib.sha256(manifest_bytes).hexdigest()
    if actual_id != t.manifest_id:
        raise ArtifactRejected(
            "manifest-id-mismatch",
            f"manifest hashes to {actual_id[:16]}, trailer says {t.manifest_id[:16]}",
        )
    if expected_id is not None and actual_id != expected_id:
        raise ArtifactRejected(
            "manifest-id-mismatch", f"manifest is {actual_id[:16]}, expected {expected_id[:16]}"
        )
    if verify_signature is not None:
        verify_signature(actual_id, signature)
    manifest = parse_manifest(manifest_bytes, max_bytes=max_bytes)
    if payload_len < manifest.payload_size:
        raise ArtifactRejected(
            "truncated", f"payload has {payload_len} bytes, manifest says {manifest.payload_size}"
        )
    if payload_len > manifest.payload_size:
        raise ArtifactRejected(
            "oversize", f"payload has {payload_len} bytes, manifest says {manifest.payload_size}"
        )
    return ArchiveInfo(Path(path), manifest, signature, t.file_size)
