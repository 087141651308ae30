"""`pack` reads only the files it scanned: a symlink (or another file) swapped in between
the scan and the read is refused, never followed out of the cache tree."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from ferry_agent.artifacts.errors import PackError

# the module: the package's `pack` attribute is the function it re-exports
pack_mod = importlib.import_module("ferry_agent.artifacts.pack")
SECRET = b"token-of-the-engine-container".ljust(104, b"!")  # the scanned file's size


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "kernel.cubin").write_bytes(b"\x7fELF" + b"k" * 100)
    (root / "index.json").write_bytes(b"{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "kernel.cubin").write_bytes(SECRET)
    (tmp_path / "secret").write_bytes(SECRET)
    return root


def _swap_after_scan(monkeypatch: pytest.MonkeyPatch, swap) -> None:
    real = pack_mod.scan_tree

    def scan_then_swap(root):
        out = real(root)
        swap(Path(root))
        return out

    monkeypatch.setattr(pack_mod, "scan_tree", scan_then_swap)


def _no_secret_in(out: Path) -> None:
    assert not out.exists() or SECRET not in out.read_bytes()
    assert not list(out.parent.glob(f".{out.name}.*.part")), "the partial archive was left"


def test_a_file_swapped_for_a_symlink_during_pack_is_refused(tree, tmp_path, monkeypatch):
    def swap(root: Path) -> None:
        (root / "sub" / "kernel.cubin").unlink()
        os.symlink(tmp_path / "secret", root / "sub" / "kernel.cubin")

    _swap_after_scan(monkeypatch, swap)
    out = tmp_path / "cache.ferry"
    with pytest.raises(PackError, match="sub/kernel.cubin"):
        pack_mod.pack(tree, out)
    _no_secret_in(out)


def test_a_directory_swapped_for_a_symlink_during_pack_is_refused(tree, tmp_path, monkeypatch):
    def swap(root: Path) -> None:
        os.rename(root / "sub", tmp_path / "sub-moved")
        os.symlink(tmp_path / "outside", root / "sub")

    _swap_after_scan(monkeypatch, swap)
    out = tmp_path / "cache.ferry"
    with pytest.raises(PackError, match="symlink"):
        pack_mod.pack(tree, out)
    _no_secret_in(out)


def test_a_file_replaced_by_another_during_pack_is_refused(tree, tmp_path, monkeypatch):
    def swap(root: Path) -> None:
        new = root / "sub" / "kernel.cubin.new"
        new.write_bytes(SECRET)  # same size: only the inode tells
        os.replace(new, root / "sub" / "kernel.cubin")

    _swap_after_scan(monkeypatch, swap)
    out = tmp_path / "cache.ferry"
    with pytest.raises(PackError, match="not the file that was scanned"):
        pack_mod.pack(tree, out)
    _no_secret_in(out)


def test_an_unchanged_tree_still_packs(tree, tmp_path):
    res = pack_mod.pack(tree, tmp_path / "cache.ferry")
    assert res.files == 2 and SECRET not in res.path.read_bytes()
