"""`ferry artifact ...` through the top-level CLI, in process (one subprocess check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from artifact_helpers import make_tree, snapshot

from ferry_api.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["artifact", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src", small=20, large=1, large_size=1 << 16)


def test_keygen_pack_verify_install(capsys, tree: Path, tmp_path: Path):
    key = tmp_path / "k"
    assert run(capsys, "keygen", str(key))[0] == 0
    rc, out, _ = run(capsys, "pack", str(tree), "-o", str(tmp_path / "a.ferry"), "--key", str(key))
    assert rc == 0 and out.startswith("packed ") and out.strip().endswith("signed")
    rc, out, _ = run(capsys, "verify", str(tmp_path / "a.ferry"), "--pubkey", f"{key}.pub")
    assert rc == 0 and out.startswith("ok ")
    dest = tmp_path / "dest"
    rc, out, _ = run(
        capsys, "install", str(tmp_path / "a.ferry"), "--into", str(dest), "--pubkey", f"{key}.pub"
    )
    assert rc == 0 and out.startswith("installed ")
    assert snapshot(dest) == snapshot(tree)
    rc, out, _ = run(capsys, "install", str(tmp_path / "a.ferry"), "--into", str(dest))
    assert rc == 0 and out.startswith("present ")


def test_refusals_exit_nonzero_with_one_line(capsys, tree: Path, tmp_path: Path):
    run(capsys, "keygen", str(tmp_path / "k"))
    run(capsys, "pack", str(tree), "-o", str(tmp_path / "u.ferry"))
    rc, out, err = run(
        capsys, "verify", str(tmp_path / "u.ferry"), "--pubkey", str(tmp_path / "k.pub")
    )
    assert rc == 1 and out == "" and err.count("\n") == 1 and err.startswith("refused: unsigned: ")
    rc, _, err = run(
        capsys,
        "install",
        str(tmp_path / "u.ferry"),
        "--into",
        str(tmp_path / "d"),
        "--max-bytes",
        "10",
    )
    assert rc == 1 and err.count("\n") == 1 and "max-bytes" in err
    rc, _, err = run(capsys, "verify", str(tmp_path / "missing.ferry"))
    assert rc == 1 and err.startswith("refused: ") and err.count("\n") == 1
    rc, _, err = run(capsys, "pack", str(tmp_path / "nodir"), "-o", str(tmp_path / "x.ferry"))
    assert rc == 1 and "not a directory" in err


def test_installed_console_script_reports_refusal(tmp_path: Path):
    bad = tmp_path / "bad.ferry"
    bad.write_bytes(b"\x00" * 100)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferry_api.cli",
            "artifact",
            "install",
            str(bad),
            "--into",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("refused: truncated: ") and proc.stderr.count("\n") == 1
