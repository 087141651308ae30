"""Pack a cache directory into one artifact file (see archive.py), deterministically.

Same tree in, same bytes out: entries are sorted, the manifest holds no
timestamps, owners or inode numbers, and ed25519 signatures are
deterministic. Modes keep only the permission bits (setuid/setgid/sticky are
dropped: targets would refuse them). Hardlinked files are stored once.

A file is read only if it is the file that was scanned: every component of its path
is opened relative to the one before with O_NOFOLLOW (a symlink swapped in for the
file or for a directory above it, between the scan and the read, is refused rather
than followed out of the tree), and the opened file must be a regular file with the
scanned (st_dev, st_ino).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import google_crc32c
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ferry_agent.artifacts.archive import trailer
from ferry_agent.artifacts.errors import ArtifactRejected, PackError
from ferry_agent.artifacts.identity import Identity
from ferry_agent.artifacts.manifest import (
    DEFAULT_CHUNK_SIZE,
    DIR,
    FILE,
    HARDLINK,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    RESERVED,
    SYMLINK,
    Entry,
    Manifest,
    check_path,
    check_symlink_target,
)
from ferry_agent.artifacts.trust import sign

READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class PackResult:
    path: Path
    manifest: Manifest
    signature: bytes

    @property
    def manifest_id(self) -> str:
        return self.manifest.id

    @property
    def bytes(self) -> int:
        return self.manifest.payload_size

    @property
    def files(self) -> int:
        return len(self.manifest.files)


class ChunkCrc:
    """crc32c of consecutive fixed-size chunks of a byte stream."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.crcs: list[int] = []
        self._crc = 0
        self._fill = 0

    def update(self, data: bytes) -> None:
        # google_crc32c takes bytes, not memoryviews; slicing copies only at chunk edges.
        while data:
            take = min(len(data), self.chunk_size - self._fill)
            part = data if take == len(data) else data[:take]
            self._crc = google_crc32c.extend(self._crc, part)
            self._fill += take
            data = data[take:] if take < len(data) else b""
            if self._fill == self.chunk_size:
                self.crcs.append(self._crc)
                self._crc, self._fill = 0, 0

    def finish(self) -> list[int]:
        if self._fill:
            self.crcs.append(self._crc)
            self._crc, self._fill = 0, 0
        return self.crcs


def _scan(root: Path) -> list[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry under root, sorted, Ferry's state excluded."""
    out: list[tuple[str, os.stat_result]] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for de in it:
                name = de.name
                if not rel and name == RESERVED:
                    continue
                path = f"{rel}/{name}" if rel else name
                try:
                    path.encode("utf-8", "strict")
                except UnicodeEncodeError:
                    raise PackError(repr(path), "file name is not valid UTF-8") from None
                st = de.stat(follow_symlinks=False)
                out.append((path, st))
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
    out.sort(key=lambda item: item[0])
    return out


class Scanned(NamedTuple):
    """A file to read: its path, size and (st_dev, st_ino) when scanned."""

    path: str
    size: int
    inode: tuple[int, int]


def scan_tree(root: str | os.PathLike[str]) -> tuple[list[Entry], list[Scanned]]:
    """Manifest entries (file sha256 left empty) and the files to read."""
    root = Path(root)
    entries: list[Entry] = []
    reads: list[Scanned] = []
    first_of_inode: dict[tuple[int, int], str] = {}
    for path, st in _scan(root):
        try:
            check_path(path)
        except ArtifactRejected as exc:
            raise PackError(path, exc.detail) from None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            entries.append(Entry(path, DIR, stat.S_IMODE(mode) & 0o777))
        elif stat.S_ISREG(mode):
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and inode in first_of_inode:
                entries.append(Entry(path, HARDLINK, target=first_of_inode[inode]))
                continue
            first_of_inode[inode] = path
            entries.append(Entry(path, FILE, stat.S_IMODE(mode) & 0o777, st.st_size))
            reads.append(Scanned(path, st.st_size, inode))
        elif stat.S_ISLNK(mode):
            target = os.readlink(root / path)
            try:
                check_symlink_target(path, target)
            except ArtifactRejected as exc:
                raise PackError(path, f"{exc.reason}: {exc.detail}") from None
            entries.append(Entry(path, SYMLINK, target=target))
        else:
            raise PackError(path, "special file (device, fifo or socket) cannot be packed")
    return entries, reads


def open_scanned(root: Path, rel: str, inode: tuple[int, int]) -> int:
    """A read-only fd of `root/rel`, opened without following any symlink, that is the
    regular file with `inode` (st_dev, st_ino); PackError otherwise. The caller closes it."""
    parts = rel.split("/")
    fds: list[int] = []
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        fds.append(fd)
        for name in parts[:-1]:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            fds.append(fd)
        # O_NONBLOCK: a fifo swapped in must not block the open (it is refused below)
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as exc:
        raise PackError(
            rel, f"changed while packing (a symlink or a missing file on its path: {exc.strerror})"
        ) from None
    finally:
        for d in fds:
            os.close(d)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != inode:
        os.close(fd)
        raise PackError(rel, "is not the file that was scanned (replaced while packing)")
    return fd


def pack(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    identity: Identity | None = None,
    key: Ed25519PrivateKey | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PackResult:
    """Pack directory `src` into artifact file `out` (written atomically)."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise PackError(str(src), "not a directory")
    entries, reads = scan_tree(src)
    inodes = {r.path: r.inode for r in reads}
    crc = ChunkCrc(chunk_size)
    payload_size = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as dst:
            final: list[Entry] = []
            for e in entries:
                if e.type != FILE:
                    final.append(e)
                    continue
                h = hashlib.sha256()
                left = e.size
                with os.fdopen(open_scanned(src, e.path, inodes[e.path]), "rb", buffering=0) as f:
                    while left:
                        block = f.read(min(left, READ_BLOCK))
                        if not block:
                            raise PackError(e.path, "file shrank while packing")
                        h.update(block)
                        crc.update(block)
                        dst.write(block)
                        left -= len(block)
                    if f.read(1):
                        raise PackError(e.path, "file grew while packing")
                payload_size += e.size
                final.append(Entry(e.path, FILE, e.mode, e.size, h.hexdigest()))
            manifest = Manifest(
                entries=tuple(final),
                chunk_size=chunk_size,
                chunks=tuple(crc.finish()),
                payload_size=payload_size,
                identity=identity.to_dict() if identity is not None else None,
            )
            body = manifest.canonical()
            signature = sign(key, manifest.id) if key is not None else b""
            dst.write(body)
            dst.write(signature)
            dst.write(trailer(manifest.id, len(body), len(signature)))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return PackResult(out, manifest, signature)
