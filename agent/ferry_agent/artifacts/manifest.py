"""The manifest: the source of truth for what an artifact holds.

A manifest lists every entry (path, type, mode, size, sha256 or link target)
in sorted path order, and the crc32c of every fixed-size chunk of the payload
(the concatenated bytes of the regular files, in entry order). Its id is the
sha256 of its canonical JSON; a signature covers that id, so it covers every
byte the target will write.

`parse_manifest` is the gate every untrusted manifest passes through: it
refuses anything an installer must not do (escape the target, create devices,
set setuid bits, exceed `max_bytes`) before a single byte is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ferry_agent.artifacts.errors import ArtifactRejected
from ferry_agent.artifacts.identity import canonical_json

FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
MAX_ENTRIES = 2_000_000
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
# Top-level name reserved for Ferry's own state (lock, markers, staging) in a cache dir.
RESERVED = ".ferry"

FILE, DIR, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
ENTRY_KEYS = {
    FILE: {"path", "type", "mode", "size", "sha256"},
    DIR: {"path", "type", "mode"},
    SYMLINK: {"path", "type", "target"},
    HARDLINK: {"path", "type", "target"},
}
SPECIAL_TYPES = {"chardev", "blockdev", "fifo", "socket", "device", "char", "block"}
MANIFEST_KEYS = {"version", "identity", "chunk_size", "chunks", "payload_size", "entries"}
_SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Entry:
    path: str
    type: str
    mode: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "type": self.type}
        if self.type in (FILE, DIR):
            d["mode"] = self.mode
        if self.type == FILE:
            d["size"] = self.size
            d["sha256"] = self.sha256
        if self.type in (SYMLINK, HARDLINK):
            d["target"] = self.target
        return d


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    chunk_size: int
    chunks: tuple[int, ...]
    payload_size: int
    identity: dict[str, Any] | None = None
    version: int = FORMAT_VERSION
    _canonical: bytes = field(default=b"", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "identity": self.identity,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
            "payload_size": self.payload_size,
            "entries": [e.to_dict() for e in self.entries],
        }

    def canonical(self) -> bytes:
        return self._canonical or canonical_json(self.to_dict())

    @property
    def id(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @property
    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.type == FILE]

    @property
    def identity_hash(self) -> str | None:
        if self.identity is None:
            return None
        return hashlib.sha256(canonical_json(self.identity)).hexdigest()

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.payload_size)


def n_chunks(payload_size: int, chunk_size: int) -> int:
    return -(-payload_size // chunk_size)


def check_path(path: object) -> str:
    """A relative, normalized path inside the target; refuses everything else."""
    if not isinstance(path, str) or not path:
        raise ArtifactRejected("bad-path", f"entry path {path!r} must be a non-empty string")
    if "\x00" in path:
        raise ArtifactRejected("bad-path", f"entry path {path!r} contains NUL")
    if path.startswith("/"):
        raise ArtifactRejected("absolute-path", f"entry path {path!r} is absolute")
    parts = path.split("/")
    if ".." in parts:
        raise ArtifactRejected("path-traversal", f"entry path {path!r} contains '..'")
    if any(p in ("", ".") for p in parts):
        raise ArtifactRejected("bad-path", f"entry path {path!r} is not normalized")
    raw = path.encode("utf-8", "strict")
    if len(raw) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
        raise ArtifactRejected("bad-path", f"entry path {path[:80]!r}... is too long")
    if parts[0] == RESERVED:
        raise ArtifactRejected("reserved-path", f"entry path {path!r} is under Ferry's state dir")
    return path


def check_symlink_target(path: str, target: object) -> str:
    """A link target must resolve inside the tree whatever the other links are.

    Allowed: leading '..' components that climb no higher than the root, then
    plain names. A '..' after a name is refused, because that name may itself
    be a link, and climbing out of its target could leave the tree.
    """
    if not isinstance(target, str) or not target or "\x00" in target:
        raise ArtifactRejected("bad-symlink", f"symlink {path!r} has target {target!r}")
    if target.startswith("/"):
        raise ArtifactRejected("symlink-escape", f"symlink {path!r} -> {target!r} is absolute")
    parts = target.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    rest = parts[ups:]
    if ".." in rest:
        raise ArtifactRejected(
            "symlink-escape", f"symlink {path!r} -> {target!r} has '..' after a name"
        )
    if any(p in ("", ".") for p in rest):
        raise ArtifactRejected("bad-symlink", f"symlink {path!r} -> {target!r} is not normalized")
    depth = path.count("/")  # directories between the root and the link
    if ups > depth:
        raise ArtifactRejected("symlink-escape", f"symlink {path!r} -> {target!r} leaves the tree")
    if ups == depth and rest and rest[0] == RESERVED:
        raise ArtifactRejected("reserved-path", f"symlink {path!r} -> {target!r} is reserved")
    return target


def _int(value: object, what: str, lo: int = 0, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ArtifactRejected("bad-manifest", f"{what} must be an integer >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ArtifactRejected("bad-manifest", f"{what} must be <= {hi}, got {value!r}")
    return value


def _mode(path: str, value: object) -> int:
    mode = _int(value, f"mode of {path!r}", 0, 0o7777)
    if mode & 0o6000:
        raise ArtifactRejected("setuid", f"{path!r} has mode {mode:o} with setuid/setgid bits")
    if mode & 0o1000:
        raise ArtifactRejected("bad-mode", f"{path!r} has mode {mode:o} with the sticky bit")
    return mode


def _entry(raw: object, seen: dict[str, str]) -> Entry:
    if not isinstance(raw, dict):
        raise ArtifactRejected("bad-manifest", f"entry {raw!r} is not an object")
    path = check_path(raw.get("path"))
    kind = raw.get("type")
    if kind in SPECIAL_TYPES:
        raise ArtifactRejected("special-file", f"{path!r} is a {kind}; only files, dirs and links")
    if kind not in ENTRY_KEYS:
        raise ArtifactRejected("bad-entry", f"{path!r} has unknown type {kind!r}")
    if set(raw) != ENTRY_KEYS[kind]:
        raise ArtifactRejected("bad-entry", f"{path!r} ({kind}) has keys {sorted(raw)}")
    parent = path.rpartition("/")[0]
    if parent and seen.get(parent) != DIR:
        raise ArtifactRejected(
            "parent-not-dir", f"{path!r}: parent {parent!r} is not a directory listed before it"
        )
    if kind == FILE:
        sha = raw["sha256"]
        if not isinstance(sha, str) or not _SHA.match(sha):
            raise ArtifactRejected("bad-entry", f"{path!r} has sha256 {sha!r}")
        return Entry(
            path, FILE, _mode(path, raw["mode"]), _int(raw["size"], f"size of {path!r}"), sha
        )
    if kind == DIR:
        return Entry(path, DIR, _mode(path, raw["mode"]))
    if kind == SYMLINK:
        return Entry(path, SYMLINK, target=check_symlink_target(path, raw["target"]))
    target = raw["target"]
    if isinstance(target, str) and (target.startswith("/") or ".." in target.split("/")):
        raise ArtifactRejected(
            "hardlink-escape", f"hardlink {path!r} -> {target!r} leaves the tree"
        )
    if not isinstance(target, str) or seen.get(target) != FILE:
        raise ArtifactRejected(
            "bad-hardlink", f"hardlink {path!r} -> {target!r} is not a file listed before it"
        )
    return Entry(path, HARDLINK, target=target)


def parse_manifest(data: bytes, max_bytes: int | None = None) -> Manifest:
    """Parse and validate untrusted manifest bytes; raise `ArtifactRejected`."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactRejected("bad-manifest", f"manifest is not JSON: {exc}") from None
    if not isinstance(raw, dict) or set(raw) != MANIFEST_KEYS:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ArtifactRejected("bad-manifest", f"manifest keys {keys} != {sorted(MANIFEST_KEYS)}")
    try:
        canonical = canonical_json(raw)
    except UnicodeEncodeError:
        raise ArtifactRejected(
            "bad-manifest", "manifest holds a string that is not UTF-8"
        ) from None
    if canonical != data:
        # The id must name exactly one manifest: no whitespace, key order or
        # duplicate keys that a parser might read differently.
        raise ArtifactRejected("bad-manifest", "manifest JSON is not in canonical form")
    if raw["version"] != FORMAT_VERSION:
        raise ArtifactRejected("bad-manifest", f"format version {raw['version']!r} unsupported")
    identity = raw["identity"]
    if identity is not None and not isinstance(identity, dict):
        raise ArtifactRejected("bad-manifest", "identity must be an object or null")
    chunk_size = _int(raw["chunk_size"], "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    payload_size = _int(raw["payload_size"], "payload_size")
    if max_bytes is not None and payload_size > max_bytes:
        raise ArtifactRejected("max-bytes", f"{payload_size} bytes exceed maxBytes {max_bytes}")
    chunks = raw["chunks"]
    if not isinstance(chunks, list) or len(chunks) != n_chunks(payload_size, chunk_size):
        raise ArtifactRejected(
            "bad-manifest",
            f"{payload_size} bytes in {chunk_size}-byte chunks need "
            f"{n_chunks(payload_size, chunk_size)} crc32c values",
        )
    crcs = tuple(_int(c, "chunk crc32c", 0, 0xFFFFFFFF) for c in chunks)
    entries_raw = raw["entries"]
    if not isinstance(entries_raw, list) or len(entries_raw) > MAX_ENTRIES:
        raise ArtifactRejected("bad-manifest", f"entries must be a list of <= {MAX_ENTRIES}")
    seen: dict[str, str] = {}
    entries: list[Entry] = []
    total = 0
    prev = ""
    for item in entries_raw:
        entry = _entry(item, seen)
        if entry.path in seen:
            raise ArtifactRejected("duplicate-path", f"{entry.path!r} is listed twice")
        if entry.path < prev:
            raise ArtifactRejected("bad-manifest", f"{entry.path!r} is out of sorted order")
        prev = entry.path
        seen[entry.path] = entry.type
        entries.append(entry)
        total += entry.size
        if max_bytes is not None and total > max_bytes:
            raise ArtifactRejected(
                "max-bytes", f"files exceed maxBytes {max_bytes} at {entry.path!r}"
            )
    if total != payload_size:
        raise ArtifactRejected(
            "bad-manifest", f"file sizes sum to {total} but payload_size is {payload_size}"
        )
    return Manifest(
        entries=tuple(entries),
        chunk_size=chunk_size,
        chunks=crcs,
        payload_size=payload_size,
        identity=identity,
        _canonical=data,
    )
