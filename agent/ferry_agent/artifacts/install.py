"""Verify an artifact and install it into a cache dir, writing nothing outside it.

Order of checks: trailer and manifest id, signature (when a key is
required), manifest rules (paths, links, modes, sizes, `max_bytes`), then the
payload chunk by chunk (crc32c before any byte of a chunk is used) and file by
file (sha256). Files are written into `<into>/.ferry/tmp-*` with O_EXCL and
O_NOFOLLOW; only after everything verified are the top-level entries renamed
into `<into>` (each rename is atomic; entries already present are kept, since
a cache entry's name is its key).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

from ferry_agent.artifacts.archive import ArchiveInfo, open_archive
from ferry_agent.artifacts.errors import ArtifactRejected
from ferry_agent.artifacts.manifest import DIR, FILE, HARDLINK, RESERVED, SYMLINK, Entry, Manifest
from ferry_agent.artifacts.trust import verifier

_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class InstallResult:
    manifest_id: str
    files: int
    bytes: int
    kept: int  # top-level or nested entries already present in the cache dir, left as they were


def iter_payload(f, manifest: Manifest) -> Iterator[tuple[Entry, memoryview]]:
    """Yield (file entry, block) over the payload, verifying as it goes.

    Every chunk's crc32c is checked before any of its bytes are yielded; each
    file's sha256 is checked after its last block (a consumer writing into a
    staging dir discards everything on the exception).
    """
    files = manifest.files
    fi, left = 0, files[0].size if files else 0
    h = hashlib.sha256()

    def finish_files() -> None:
        nonlocal fi, left, h
        while fi < len(files) and left == 0:
            if h.hexdigest() != files[fi].sha256:
                raise ArtifactRejected(
                    "sha256-mismatch", f"{files[fi].path!r} does not match its sha256"
                )
            fi += 1
            h = hashlib.sha256()
            left = files[fi].size if fi < len(files) else 0

    finish_files()  # leading empty files
    for index in range(len(manifest.chunks)):
        start, end = manifest.chunk_bounds(index)
        data = f.read(end - start)
        if len(data) != end - start:
            raise ArtifactRejected(
                "truncated", f"payload ends inside chunk {index} at {start + len(data)}"
            )
        crc = google_crc32c.value(data)
        if crc != manifest.chunks[index]:
            raise ArtifactRejected("crc-mismatch", f"chunk {index} (offset {start}) fails crc32c")
        view = memoryview(data)
        while view:
            take = min(left, len(view))
            block = view[:take]
            h.update(block)
            yield files[fi], block
            view = view[take:]
            left -= take
            finish_files()


def verify(
    archive: str | os.PathLike[str],
    *,
    pubkey=None,
    expected_id: str | None = None,
    max_bytes: int | None = None,
) -> ArchiveInfo:
    """Check everything `install` would check, writing nothing."""
    info = open_archive(
        archive, verify_signature=verifier(pubkey), expected_id=expected_id, max_bytes=max_bytes
    )
    with open(archive, "rb") as f:
        for _ in iter_payload(f, info.manifest):
            pass
    return info


def state_dir(into: str | os.PathLike[str]) -> Path:
    """`<into>/.ferry`, created if missing; refused if it is anything but a real dir."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    state = into / RESERVED
    try:
        os.mkdir(state, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(state).st_mode):
            raise ArtifactRejected(
                "reserved-path", f"{state} exists and is not a directory"
            ) from None
    return state


def _force_rmtree(path: Path) -> None:
    def retry(func: Callable[[str], object], p: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


def _write_all(fd: int, block: memoryview) -> None:
    while block:
        block = block[os.write(fd, block) :]


def _extract(info: ArchiveInfo, stage: Path) -> None:
    m = info.manifest
    with open(info.path, "rb", buffering=0) as src:
        payload = iter_payload(src, m)
        for e in m.entries:
            dest = stage / e.path
            if e.type == DIR:
                os.mkdir(dest, 0o700)
            elif e.type == SYMLINK:
                os.symlink(e.target, dest)
            elif e.type == HARDLINK:
                os.link(stage / e.target, dest, follow_symlinks=False)
            elif e.type == FILE:
                fd = os.open(dest, _OPEN_NEW, 0o600)
                try:
                    written = 0
                    while written < e.size:
                        entry, block = next(payload)
                        if entry is not e:
                            raise ArtifactRejected(
                                "bad-manifest", f"payload out of step at {e.path!r}"
                            )
                        _write_all(fd, block)
                        written += len(block)
                finally:
                    os.close(fd)
                os.chmod(dest, e.mode)
        # Drain: the last files' sha256 is checked when the generator finishes.
        for _ in payload:
            raise ArtifactRejected("oversize", "payload holds bytes past the last file")


def _commit(stage: Path, into: Path, rel: str = "") -> tuple[list[str], int]:
    """Rename staged entries into place, keeping what exists.

    Returns the relative paths renamed and the number of entries kept.
    """
    moved: list[str] = []
    kept = 0
    for name in sorted(os.listdir(stage)):
        path = f"{rel}/{name}" if rel else name
        src, dest = stage / name, into / name
        try:
            dest_st = os.lstat(dest)
        except FileNotFoundError:
            os.rename(src, dest)
            moved.append(path)
            continue
        # Merge into an existing real directory (never through a symlink).
        if stat.S_ISDIR(dest_st.st_mode) and stat.S_ISDIR(os.lstat(src).st_mode):
            sub_moved, sub_kept = _commit(src, dest, path)
            moved += sub_moved
            kept += sub_kept
        else:
            kept += 1
    return moved, kept


def _apply_dir_modes(into: Path, m: Manifest, moved: list[str]) -> None:
    """Set directory modes after the renames (renaming a dir needs it writable),
    deepest first, and only on dirs this install created."""
    roots = set(moved)
    for e in sorted((e for e in m.entries if e.type == DIR), key=lambda e: e.path, reverse=True):
        parts = e.path.split("/")
        if any("/".join(parts[:i]) in roots for i in range(1, len(parts) + 1)):
            os.chmod(into / e.path, e.mode)


def install(
    archive: str | os.PathLike[str],
    into: str | os.PathLike[str],
    *,
    pubkey=None,
    expected_id: str | None = None,
    max_bytes: int | None = None,
) -> InstallResult:
    """Verify `archive` completely, then move its tree into `into`.

    `pubkey` (key or PEM path) makes a valid signature mandatory. Raises
    `ArtifactRejected`; on any refusal `into` holds nothing new but an empty
    `.ferry/` state dir.
    """
    into = Path(into)
    state = state_dir(into)
    info = open_archive(
        archive, verify_signature=verifier(pubkey), expected_id=expected_id, max_bytes=max_bytes
    )
    stage = Path(tempfile.mkdtemp(prefix="tmp-", dir=state))
    try:
        _extract(info, stage)
        moved, kept = _commit(stage, into)
        _apply_dir_modes(into, info.manifest, moved)
    finally:
        _force_rmtree(stage)
    m = info.manifest
    return InstallResult(m.id, len(m.files), m.payload_size, kept)


def clean_stale_staging(into: str | os.PathLike[str]) -> None:
    """Remove staging dirs left by a crashed installer (call while holding the lock)."""
    state = Path(into) / RESERVED
    if not state.is_dir():
        return
    for p in state.iterdir():
        if p.name.startswith(("tmp-", "dl-")) and not p.is_symlink():
            if p.is_dir():
                _force_rmtree(p)
            else:
                p.unlink(missing_ok=True)
