"""Hostile and broken artifacts, crafted byte by byte, must all be refused.

Each case writes an archive by hand (not with `pack`), installs it into
`sandbox/into`, and checks: the right `ArtifactRejected.reason`, a message
naming the problem, nothing changed in the sandbox outside `into`, and
nothing but Ferry's empty state dir inside `into`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from artifact_helpers import canonical, crcs, file_entry, manifest_dict, snapshot, write_archive
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ferry_agent.artifacts import ArtifactRejected, install, verify
from ferry_agent.artifacts.trust import sign

KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
A, B = b"hello", b"world" * 1000


@dataclass
class Case:
    reason: str
    entries: list[dict] | None = None
    payload: bytes | None = None
    manifest_bytes: bytes | None = None  # raw manifest, overrides entries
    mutate: object = None  # fn(archive_bytes, manifest_len, sig_len) -> bytes
    sign_with: Ed25519PrivateKey | None = None
    signature: bytes | None = None
    claimed_id: bytes | None = None
    install_kw: dict = field(default_factory=dict)
    chunk_size: int = 4096
    manifest_edit: object = None  # fn(manifest dict) -> None
    detail: str = ""  # a word the message must contain


def base_entries() -> list[dict]:
    return [{"path": "d", "type": "dir", "mode": 0o755}, file_entry("d/a", A), file_entry("d/b", B)]


def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


CASES: dict[str, Case] = {
    "absolute-path": Case("absolute-path", [file_entry("/etc/evil", A)], A, detail="/etc/evil"),
    "dotdot-leading": Case("path-traversal", [file_entry("../evil", A)], A, detail="../evil"),
    "dotdot-nested": Case(
        "path-traversal",
        [{"path": "d", "type": "dir", "mode": 0o755}, file_entry("d/../../evil", A)],
        A,
    ),
    "dot-component": Case("bad-path", [base_entries()[0], file_entry("d/./a", A)], A),
    "empty-component": Case("bad-path", [base_entries()[0], file_entry("d//a", A)], A),
    "nul-in-path": Case("bad-path", [base_entries()[0], file_entry("d/a\x00b", A)], A),
    "reserved-state-dir": Case("reserved-path", [file_entry(".ferry/state-00.json", A)], A),
    "symlink-absolute": Case(
        "symlink-escape", [{"path": "l", "type": "symlink", "target": "/etc/passwd"}], b""
    ),
    "symlink-dotdot": Case(
        "symlink-escape",
        [base_entries()[0], {"path": "d/l", "type": "symlink", "target": "../../victim.txt"}],
        b"",
    ),
    "symlink-dotdot-after-name": Case(
        "symlink-escape",
        [base_entries()[0], {"path": "d/l", "type": "symlink", "target": "x/../../victim.txt"}],
        b"",
    ),
    "symlink-to-state-dir": Case(
        "reserved-path", [{"path": "l", "type": "symlink", "target": ".ferry"}], b""
    ),
    "write-through-symlink": Case(
        "parent-not-dir",
        [
            {"path": "a", "type": "symlink", "target": "sub"},
            file_entry("a/x", A),
            {"path": "sub", "type": "dir", "mode": 0o755},
        ],
        A,
    ),
    "parent-not-listed": Case("parent-not-dir", [file_entry("nodir/x", A)], A),
    "hardlink-absolute": Case(
        "hardlink-escape", [{"path": "h", "type": "hardlink", "target": "/etc/passwd"}], b""
    ),
    "hardlink-dotdot": Case(
        "hardlink-escape", [{"path": "h", "type": "hardlink", "target": "../victim.txt"}], b""
    ),
    "hardlink-unknown-target": Case(
        "bad-hardlink", [{"path": "h", "type": "hardlink", "target": "zzz"}], b""
    ),
    "hardlink-to-symlink": Case(
        "bad-hardlink",
        [
            {"path": "a", "type": "symlink", "target": "b"},
            {"path": "h", "type": "hardlink", "target": "a"},
        ],
        b"",
    ),
    "char-device": Case("special-file", [{"path": "null", "type": "chardev", "mode": 0o666}], b""),
    "block-device": Case("special-file", [{"path": "sda", "type": "blockdev", "mode": 0o660}], b""),
    "fifo": Case("special-file", [{"path": "pipe", "type": "fifo", "mode": 0o644}], b""),
    "unknown-type": Case("bad-entry", [{"path": "x", "type": "weird", "mode": 0o644}], b""),
    "extra-entry-key": Case("bad-entry", [{**file_entry("x", A), "uid": 0}], A),
    "setuid-file": Case("setuid", [file_entry("x", A, mode=0o4755)], A, detail="4755"),
    "setgid-dir": Case("setuid", [{"path": "d", "type": "dir", "mode": 0o2755}], b""),
    "sticky-dir": Case("bad-mode", [{"path": "d", "type": "dir", "mode": 0o1777}], b""),
    "file-bigger-than-manifest": Case(
        "oversize",
        base_entries(),
        A + B,
        mutate=lambda raw, m, s: (A + B + b"EXTRA") + raw[len(A + B) :],
    ),
    "sizes-disagree-with-payload": Case(
        "bad-manifest",
        [base_entries()[0], {**file_entry("d/a", A), "size": 3}, file_entry("d/b", B)],
        A + B,
    ),
    "negative-size": Case("bad-manifest", [{**file_entry("x", A), "size": -5}], A),
    "over-max-bytes": Case("max-bytes", base_entries(), A + B, install_kw={"max_bytes": 1000}),
    "truncated-mid-file": Case(
        "truncated", base_entries(), A + B, mutate=lambda raw, m, s: raw[: len(raw) // 2]
    ),
    "truncated-payload-intact-trailer": Case(
        "truncated", base_entries(), A + B, mutate=lambda raw, m, s: raw[100:]
    ),
    "flipped-payload-byte": Case(
        "crc-mismatch", base_entries(), A + B, mutate=lambda raw, m, s: flip(raw, 2000)
    ),
    "flipped-byte-forged-crc": Case(
        "sha256-mismatch",
        base_entries(),
        flip(A + B, 3),
        manifest_edit=lambda m: m.update(chunks=crcs(flip(A + B, 3), 4096)),
        detail="d/a",
    ),
    "flipped-last-file-forged-crc": Case(
        "sha256-mismatch",
        base_entries(),
        flip(A + B, 4000),
        manifest_edit=lambda m: m.update(chunks=crcs(flip(A + B, 4000), 4096)),
        detail="d/b",
    ),
    "flipped-manifest-byte": Case(
        "manifest-id-mismatch",
        base_entries(),
        A + B,
        mutate=lambda raw, m, s: flip(raw, len(A + B) + 10),
    ),
    "trailer-claims-other-id": Case(
        "manifest-id-mismatch", base_entries(), A + B, claimed_id=b"\x11" * 32
    ),
    "not-the-expected-id": Case(
        "manifest-id-mismatch", base_entries(), A + B, install_kw={"expected_id": "ab" * 32}
    ),
    "unsigned-trust-required": Case(
        "unsigned", base_entries(), A + B, install_kw={"pubkey": KEY.public_key()}
    ),
    "signed-by-wrong-key": Case(
        "bad-signature",
        base_entries(),
        A + B,
        sign_with=OTHER_KEY,
        install_kw={"pubkey": KEY.public_key()},
    ),
    "signature-flipped": Case(
        "bad-signature",
        base_entries(),
        A + B,
        sign_with=KEY,
        mutate=lambda raw, m, s: flip(raw, len(raw) - 52 - 5),
        install_kw={"pubkey": KEY.public_key()},
    ),
    "signature-wrong-length": Case("bad-signature", base_entries(), A + B, signature=b"\x00" * 32),
    "manifest-not-canonical": Case(
        "bad-manifest",
        manifest_bytes=canonical(manifest_dict([file_entry("x", A)], A)).replace(b",", b", "),
        payload=A,
    ),
    "manifest-duplicate-json-key": Case(
        "bad-manifest",
        manifest_bytes=canonical(manifest_dict([file_entry("x", A)], A)).replace(
            b'{"chunk_size"', b'{"chunk_size":4096,"chunk_size"'
        ),
        payload=A,
    ),
    "manifest-lone-surrogate": Case(
        "bad-manifest",
        manifest_bytes=canonical(manifest_dict([file_entry("x", A)], A)).replace(
            b'"path":"x"', b'"path":"\\udc80"'
        ),
        payload=A,
    ),
    "duplicate-path": Case("duplicate-path", [file_entry("x", A), file_entry("x", B)], A + B),
    "unsorted-entries": Case("bad-manifest", [file_entry("y", A), file_entry("x", B)], A + B),
    "wrong-chunk-count": Case(
        "bad-manifest", base_entries(), A + B, manifest_edit=lambda m: m["chunks"].append(0)
    ),
    "manifest-length-absurd": Case(
        "bad-manifest",
        base_entries(),
        A + B,
        mutate=lambda raw, m, s: raw[:-20] + (1 << 40).to_bytes(8, "big") + raw[-12:],
    ),
    "not-an-artifact": Case("truncated", [], b"", mutate=lambda raw, m, s: os.urandom(4096)),
}


def build(case: Case, path: Path) -> None:
    if case.manifest_bytes is not None:
        body = case.manifest_bytes
    else:
        m = manifest_dict(case.entries, case.payload, case.chunk_size)
        if case.manifest_edit:
            case.manifest_edit(m)
        body = canonical(m)
    sig = case.signature or b""
    if case.sign_with is not None:
        sig = sign(case.sign_with, hashlib.sha256(body).hexdigest())
    write_archive(path, body, case.payload, sig, claimed_id=case.claimed_id)
    if case.mutate:
        path.write_bytes(case.mutate(path.read_bytes(), len(body), len(sig)))


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    box = tmp_path / "sandbox"
    box.mkdir()
    (box / "victim.txt").write_text("do not touch\n")
    (box / "etc").mkdir()
    (box / "etc" / "passwd").write_text("root:x:0:0\n")
    (box / "into").mkdir()
    return box


def test_there_are_at_least_25_distinct_refusals():
    assert len(CASES) >= 25
    assert len({c.reason for c in CASES.values()}) >= 15


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_archive_is_refused(name: str, sandbox: Path, tmp_path: Path):
    case = CASES[name]
    archive = tmp_path / f"{name}.ferry"
    build(case, archive)
    before = snapshot(sandbox)
    outside_before = {k: v for k, v in before.items() if not k.startswith("into")}

    with pytest.raises(ArtifactRejected) as err:
        install(archive, sandbox / "into", **case.install_kw)

    assert err.value.reason == case.reason, str(err.value)
    message = str(err.value)
    assert message.startswith(case.reason + ": ") and "\n" not in message
    assert case.detail in message
    after = snapshot(sandbox)
    assert {k: v for k, v in after.items() if not k.startswith("into")} == outside_before
    assert os.listdir(sandbox / "into") == [".ferry"]
    assert os.listdir(sandbox / "into" / ".ferry") == []
    assert (sandbox / "victim.txt").read_text() == "do not touch\n"

    # verify (no install) refuses the same way
    with pytest.raises(ArtifactRejected) as err2:
        verify(archive, **{k: v for k, v in case.install_kw.items()})
    assert err2.value.reason == case.reason


def test_base_case_is_accepted(sandbox: Path, tmp_path: Path):
    """The cases above differ from a valid archive only in what they break."""
    archive = tmp_path / "ok.ferry"
    build(Case("", base_entries(), A + B, sign_with=KEY), archive)
    result = install(archive, sandbox / "into", pubkey=KEY.public_key(), max_bytes=len(A + B))
    assert result.files == 2 and result.bytes == len(A + B)
    assert (sandbox / "into" / "d" / "b").read_bytes() == B
