from __future__ import annotations

from pathlib import Path

import pytest
from artifact_helpers import make_tree

from ferry_agent.artifacts import (
    ArtifactRejected,
    generate_keypair,
    install,
    load_private_key,
    load_public_key,
    pack,
    verify,
)
from ferry_agent.artifacts.trust import sign, verifier


@pytest.fixture
def keys(tmp_path: Path):
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    generate_keypair(tmp_path / "other", tmp_path / "other.pub")
    return tmp_path / "k", tmp_path / "k.pub", tmp_path / "other.pub"


def test_keyfile_is_private_and_round_trips(keys):
    priv, pub, _ = keys
    assert priv.stat().st_mode & 0o777 == 0o600
    key = load_private_key(priv)
    sig = sign(key, "00" * 32)
    verifier(pub)("00" * 32, sig)  # no exception means verified
    with pytest.raises(ArtifactRejected, match="bad-signature"):
        verifier(pub)("01" + "00" * 31, sig)
    with pytest.raises(FileExistsError):
        generate_keypair(priv, pub)  # never overwrite a key


def test_signed_pack_installs_only_with_the_right_key(keys, tmp_path: Path):
    priv, pub, other = keys
    src = make_tree(tmp_path / "src", small=10, large=1, large_size=1 << 16)
    signed = pack(src, tmp_path / "s.ferry", key=load_private_key(priv))
    unsigned = pack(src, tmp_path / "u.ferry")
    assert signed.manifest_id == unsigned.manifest_id  # the signature is not part of the manifest
    assert len(signed.signature) == 64
    assert verify(signed.path, pubkey=pub).manifest_id == signed.manifest_id
    for archive, keyfile, reason in [
        (unsigned.path, pub, "unsigned"),
        (signed.path, other, "bad-signature"),
    ]:
        with pytest.raises(ArtifactRejected) as err:
            install(archive, tmp_path / "dest", pubkey=keyfile)
        assert err.value.reason == reason
    # without a key, peers are trusted: both install
    install(unsigned.path, tmp_path / "trusting")
    install(signed.path, tmp_path / "dest", pubkey=load_public_key(pub))


def test_a_non_ed25519_or_garbage_key_file_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key(bad)
    with pytest.raises(ValueError, match="not a PEM private key"):
        load_private_key(bad)
