"""Shared helpers for the artifact tests (imported by unit and e2e conftests)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path

import google_crc32c

MAGIC = b"FERRYAC1"
TRAILER = struct.Struct(">32sQI8s")  # written here independently of archive.py


def make_tree(
    root: Path, *, small: int = 200, large: int = 3, large_size: int = 3 << 20, seed: int = 7
) -> Path:
    """A cache-like tree: nested dirs, many small files, a few large ones,
    an internal relative symlink, a hardlink, an empty file and an empty dir."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(small):
        d = root / f"k{i % 17:02x}" / f"h{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"kernel_{i}.cubin").write_bytes(rng.randbytes(rng.randint(0, 4096)))
    big = root / "inductor" / "fxgraph"
    big.mkdir(parents=True)
    for i in range(large):
        (big / f"graph{i}.bin").write_bytes(rng.randbytes(large_size + i * 1234))
    (root / "inductor" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "inductor" / "run.sh", 0o755)
    os.chmod(root / "k00" / "h0" / "kernel_0.cubin", 0o600)
    (root / "inductor" / "latest").symlink_to("fxgraph/graph0.bin")
    (root / "k01" / "up").symlink_to("../inductor/run.sh")
    os.link(root / "k02" / "h2" / "kernel_2.cubin", root / "k02" / "hard.cubin")
    (root / "empty.txt").write_bytes(b"")
    (root / "emptydir").mkdir()
    os.chmod(root / "emptydir", 0o750)
    return root


def snapshot(root: Path, skip_state: bool = True) -> dict[str, tuple]:
    """path -> (kind, mode, content sha256 or link target), for tree equality."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if skip_state and rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".ferry"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(p)
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def file_entry(path: str, data: bytes, mode: int = 0o644) -> dict:
    return {
        "path": path,
        "type": "file",
        "mode": mode,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def crcs(payload: bytes, chunk_size: int) -> list[int]:
    return [
        google_crc32c.value(payload[i : i + chunk_size]) for i in range(0, len(payload), chunk_size)
    ]


def manifest_dict(
    entries: list[dict], payload: bytes, chunk_size: int = 4096, identity=None
) -> dict:
    return {
        "version": 1,
        "identity": identity,
        "chunk_size": chunk_size,
        "chunks": crcs(payload, chunk_size),
        "payload_size": len(payload),
        "entries": entries,
    }


def write_archive(
    path: Path,
    manifest: dict | bytes,
    payload: bytes,
    signature: bytes = b"",
    *,
    claimed_id: bytes | None = None,
) -> str:
    """Frame an artifact by hand: payload | manifest | signature | trailer."""
    body = manifest if isinstance(manifest, bytes) else canonical(manifest)
    mid = hashlib.sha256(body).digest()
    path.write_bytes(
        payload
        + body
        + signature
        + TRAILER.pack(claimed_id or mid, len(body), len(signature), MAGIC)
    )
    return mid.hex()
