from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from artifact_helpers import make_tree, snapshot

from ferry_agent.artifacts import ArtifactRejected, Identity, PackError, install, pack, verify
from ferry_agent.artifacts.archive import open_archive, read_trailer
from ferry_agent.artifacts.manifest import parse_manifest


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("src") / "cache")


def test_round_trip_preserves_content_modes_and_links(tree: Path, tmp_path: Path):
    result = pack(tree, tmp_path / "a.ferry", chunk_size=64 << 10)
    dest = tmp_path / "elsewhere" / "cache"
    installed = install(result.path, dest)

    assert snapshot(dest) == snapshot(tree)
    assert os.readlink(dest / "inductor" / "latest") == "fxgraph/graph0.bin"
    assert (dest / "inductor" / "latest").read_bytes() == (
        tree / "inductor/fxgraph/graph0.bin"
    ).read_bytes()
    assert os.stat(dest / "inductor" / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(dest / "emptydir").st_mode & 0o777 == 0o750
    # the hardlink is stored once and installed as a link
    assert (
        os.stat(dest / "k02" / "hard.cubin").st_ino
        == os.stat(dest / "k02/h2/kernel_2.cubin").st_ino
    )
    assert installed.files == result.files and installed.bytes == result.bytes
    assert result.files > 200 and result.bytes > 9 << 20
    assert os.listdir(dest / ".ferry") == []  # no staging left behind


def test_pack_is_deterministic(tree: Path, tmp_path: Path):
    one = pack(tree, tmp_path / "1.ferry")
    os.utime(tree / "empty.txt", (1, 1))  # mtimes are not part of an artifact
    two = pack(tree, tmp_path / "2.ferry")
    assert one.manifest_id == two.manifest_id
    assert one.path.read_bytes() == two.path.read_bytes()


def test_any_content_or_mode_change_changes_the_id(tree: Path, tmp_path: Path):
    base = pack(tree, tmp_path / "base.ferry").manifest_id
    target = tree / "k03" / "h3" / "kernel_3.cubin"
    orig = target.read_bytes()
    try:
        target.write_bytes(orig + b"x")
        assert pack(tree, tmp_path / "c.ferry").manifest_id != base
    finally:
        target.write_bytes(orig)
    os.chmod(target, 0o600)
    try:
        assert pack(tree, tmp_path / "m.ferry").manifest_id != base
    finally:
        os.chmod(target, 0o644)
    assert pack(tree, tmp_path / "again.ferry").manifest_id == base


def test_manifest_lists_path_mode_size_sha_and_chunk_crcs(tree: Path, tmp_path: Path):
    result = pack(tree, tmp_path / "a.ferry", chunk_size=64 << 10)
    raw = json.loads(result.manifest.canonical())
    by_path = {e["path"]: e for e in raw["entries"]}
    assert by_path["inductor/run.sh"]["mode"] == 0o755
    assert by_path["inductor/latest"] == {
        "path": "inductor/latest",
        "type": "symlink",
        "target": "fxgraph/graph0.bin",
    }
    assert by_path["k02/hard.cubin"] == {
        "path": "k02/hard.cubin",
        "type": "hardlink",
        "target": "k02/h2/kernel_2.cubin",
    }
    assert len(by_path["empty.txt"]["sha256"]) == 64 and by_path["empty.txt"]["size"] == 0
    assert len(raw["chunks"]) == -(-raw["payload_size"] // (64 << 10))
    assert "mtime" not in result.manifest.canonical().decode()
    # a packed manifest passes the same gate as an untrusted one
    assert parse_manifest(result.manifest.canonical()).id == result.manifest_id


def test_identity_is_part_of_the_manifest(tree: Path, tmp_path: Path):
    ident = Identity.build("triton", triton="3.4.0", cuda="12.8", gpu_arch="sm_90")
    with_id = pack(tree, tmp_path / "i.ferry", identity=ident)
    assert with_id.manifest.identity_hash == ident.hash
    assert with_id.manifest_id != pack(tree, tmp_path / "n.ferry").manifest_id
    assert open_archive(with_id.path).manifest.identity_hash == ident.hash


def test_ferry_state_dir_is_not_packed(tmp_path: Path):
    src = tmp_path / "c"
    (src / ".ferry").mkdir(parents=True)
    (src / ".ferry" / "state-x.json").write_text("{}")
    (src / "k").write_text("v")
    result = pack(src, tmp_path / "a.ferry")
    assert [e.path for e in result.manifest.entries] == ["k"]


def test_pack_refuses_special_files_and_escaping_links(tmp_path: Path):
    src = tmp_path / "fifo"
    src.mkdir()
    os.mkfifo(src / "pipe")
    with pytest.raises(PackError, match="special file"):
        pack(src, tmp_path / "x.ferry")
    src = tmp_path / "sock"
    src.mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "s"))
        with pytest.raises(PackError, match="special file"):
            pack(src, tmp_path / "x.ferry")
    src = tmp_path / "esc"
    src.mkdir()
    (src / "l").symlink_to("/etc/passwd")
    with pytest.raises(PackError, match="symlink-escape"):
        pack(src, tmp_path / "x.ferry")
    assert not (tmp_path / "x.ferry").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_pack_drops_setuid_bits(tmp_path: Path):
    src = tmp_path / "c"
    src.mkdir()
    (src / "x").write_text("x")
    os.chmod(src / "x", 0o4755)
    result = pack(src, tmp_path / "a.ferry")
    assert result.manifest.entries[0].mode == 0o755
    install(result.path, tmp_path / "out")
    assert os.stat(tmp_path / "out" / "x").st_mode & 0o7777 == 0o755


def test_install_keeps_existing_entries_and_never_follows_symlinks(tree: Path, tmp_path: Path):
    result = pack(tree, tmp_path / "a.ferry")
    dest = tmp_path / "box" / "cache"
    outside = tmp_path / "box" / "outside"
    outside.mkdir(parents=True)
    dest.mkdir()
    # A pre-existing symlink in the cache dir where the archive has a directory.
    (dest / "inductor").symlink_to(outside)
    (dest / "k00").mkdir()
    (dest / "k00" / "local.txt").write_text("mine")
    res = install(result.path, dest)
    assert os.listdir(outside) == []
    assert (dest / "inductor").is_symlink()
    assert (dest / "k00" / "local.txt").read_text() == "mine"
    assert (dest / "k00" / "h0" / "kernel_0.cubin").read_bytes() == (
        tree / "k00/h0/kernel_0.cubin"
    ).read_bytes()
    assert res.kept >= 1


def test_verify_reads_the_whole_payload(tree: Path, tmp_path: Path):
    result = pack(tree, tmp_path / "a.ferry")
    raw = bytearray(result.path.read_bytes())
    raw[result.bytes - 1] ^= 0xFF  # last payload byte
    bad = tmp_path / "bad.ferry"
    bad.write_bytes(bytes(raw))
    assert read_trailer(bad).manifest_id == result.manifest_id
    with pytest.raises(ArtifactRejected) as err:
        verify(bad)
    assert err.value.reason == "crc-mismatch"
    assert err.value.condition_reason == "CrcMismatch"


def test_empty_tree_round_trips(tmp_path: Path):
    (tmp_path / "e").mkdir()
    result = pack(tmp_path / "e", tmp_path / "e.ferry")
    assert result.files == 0 and result.bytes == 0 and result.manifest.chunks == ()
    install(result.path, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == [".ferry"]
