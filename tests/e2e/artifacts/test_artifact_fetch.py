"""Fetch over gRPC between two processes: a serving peer and this test."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from artifact_helpers import make_tree, snapshot

from ferry_agent.artifacts import (
    ArtifactRejected,
    FetchFailed,
    Identity,
    generate_keypair,
    install,
    load_private_key,
)
from ferry_agent.artifacts.fetch import fetch, fetch_and_install
from ferry_agent.artifacts.service import ArtifactStore

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token-for-tests"
IDENT = Identity.build("triton", triton="3.5.0", cuda="12.8", gpu_arch="sm_90")
OTHER = Identity.build("triton", triton="3.4.0", cuda="12.8", gpu_arch="sm_90")
TAMPER = Path(__file__).with_name("tamper_server.py")


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening "):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, f"127.0.0.1:{int(line.split()[1])}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("peer")
    tree = make_tree(base / "src", small=150, large=3, large_size=3 << 20)
    generate_keypair(base / "k", base / "k.pub")
    store = ArtifactStore(base / "store")
    signed = store.publish(tree, IDENT, key=load_private_key(base / "k"), chunk_size=256 << 10)
    unsigned = store.publish(tree, OTHER, chunk_size=256 << 10)
    token_file = base / "token"
    token_file.write_text(TOKEN + "\n")
    return {
        "base": base,
        "tree": tree,
        "store": base / "store",
        "pub": base / "k.pub",
        "token_file": token_file,
        "signed": signed,
        "unsigned": unsigned,
    }


@pytest.fixture(scope="module")
def peer(source) -> Iterator[str]:
    proc, endpoint = start(
        [
            sys.executable,
            "-m",
            "ferry_agent.artifacts.service",
            "--store",
            str(source["store"]),
            "--token-file",
            str(source["token_file"]),
        ]
    )
    yield endpoint
    stop(proc)


def test_fetch_verify_install_between_processes(source, peer, tmp_path: Path):
    dest = tmp_path / "cache.ferry"
    result = fetch(peer, IDENT, TOKEN, dest, pubkey=source["pub"], max_bytes=1 << 30)
    assert result.manifest_id == source["signed"].manifest_id
    assert result.chunks == len(source["signed"].manifest.chunks) > 30
    assert dest.read_bytes() == source["signed"].path.read_bytes()  # same artifact, byte for byte
    install(dest, tmp_path / "into", pubkey=source["pub"], expected_id=result.manifest_id)
    assert snapshot(tmp_path / "into") == snapshot(source["tree"])


def test_fetch_and_install_once_for_a_pod(source, peer, tmp_path: Path):
    into = tmp_path / "pod-cache"
    first = fetch_and_install(peer, IDENT, TOKEN, into, pubkey=source["pub"])
    again = fetch_and_install(peer, IDENT.hash, TOKEN, into, pubkey=source["pub"])
    assert (first.state, again.state) == ("installed", "present")
    assert snapshot(into) == snapshot(source["tree"])
    assert sorted(p.name for p in (into / ".ferry").iterdir()) == [
        "lock",
        f"state-{first.key}.json",
    ]


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x"])
def test_calls_without_the_token_are_refused(peer, tmp_path: Path, token):
    import grpc

    from ferry_agent.artifacts import artifacts_pb2 as pb
    from ferry_agent.artifacts import artifacts_pb2_grpc as pb_grpc

    with grpc.insecure_channel(peer) as ch:
        stub = pb_grpc.ArtifactServiceStub(ch)
        md = None if token is None else (("authorization", f"Bearer {token}"),)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetManifest(
                pb.GetManifestRequest(identity_hash=IDENT.hash), metadata=md, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.FetchChunks(
                    pb.FetchChunksRequest(manifest_id="00" * 32), metadata=md, timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(FetchFailed) as err2:
        fetch(peer, IDENT, token or "nope", tmp_path / "x.ferry")
    assert err2.value.code == "UNAUTHENTICATED"
    assert not (tmp_path / "x.ferry").exists()


def test_unknown_identity_is_not_found(peer, tmp_path: Path):
    ident = Identity.build("deepgemm", cuda="12.8", gpu_arch="sm_100")
    with pytest.raises(FetchFailed) as err:
        fetch(peer, ident, TOKEN, tmp_path / "x.ferry")
    assert err.value.code == "NOT_FOUND"


def test_trust_is_checked_before_downloading(source, peer, tmp_path: Path):
    with pytest.raises(ArtifactRejected) as err:
        fetch(peer, OTHER, TOKEN, tmp_path / "x.ferry", pubkey=source["pub"])
    assert err.value.reason == "unsigned"
    with pytest.raises(ArtifactRejected) as err:
        fetch(peer, IDENT, TOKEN, tmp_path / "x.ferry", max_bytes=1 << 20)
    assert err.value.reason == "max-bytes"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("flip-data", "crc-mismatch"),
        ("flip-quiet", "crc-mismatch"),
        ("short", "truncated"),
        ("swap-identity", "identity-mismatch"),
    ],
)
def test_a_lying_peer_is_refused(source, tmp_path: Path, mode: str, reason: str):
    store = tmp_path / "store"
    store.mkdir()
    os.link(source["signed"].path, store / source["signed"].path.name)
    proc, endpoint = start(
        [sys.executable, str(TAMPER), "--store", str(store), "--token", TOKEN, "--mode", mode]
    )
    try:
        with pytest.raises(ArtifactRejected) as err:
            fetch(
                endpoint, OTHER if mode == "swap-identity" else IDENT, TOKEN, tmp_path / "x.ferry"
            )
        assert err.value.reason == reason, str(err.value)
        if reason == "crc-mismatch":
            assert "chunk 1 " in str(err.value)
        assert not (tmp_path / "x.ferry").exists() and not (tmp_path / "x.ferry.part").exists()
    finally:
        stop(proc)
