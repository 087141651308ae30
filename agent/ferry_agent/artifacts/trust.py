"""ed25519 signatures over manifest ids.

A signature covers the manifest id, and the id covers every path, mode, size,
sha256 and chunk crc32c, so one 64-byte signature authenticates the whole
cache. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public); in a
cluster the private key is mounted from a Secret on source pods only.

Without a public key, `verifier` returns None and any archive is accepted: the
agent only does that under ArtifactCache `spec.trust.allowUnsigned` (k8s/artifacts.py),
and then a compromised peer can hand out executable kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ferry_agent.artifacts.errors import ArtifactRejected

# Domain separation: a Ferry signature can never be replayed as a signature
# over some other 32-byte message signed with the same key.
CONTEXT = b"ferry.dev/artifact-manifest/v1\x00"


def _message(manifest_id: str) -> bytes:
    return CONTEXT + bytes.fromhex(manifest_id)


def generate_keypair(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]
) -> None:
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    Path(public_path).write_bytes(pub)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an ed25519 key ({type(key).__name__})")
    return key


def sign(key: Ed25519PrivateKey, manifest_id: str) -> bytes:
    return key.sign(_message(manifest_id))


class Verifier:
    """Callable for `open_archive(verify_signature=...)`: refuses unless signed by `key`."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self.key = key

    def __call__(self, manifest_id: str, signature: bytes) -> None:
        if not signature:
            raise ArtifactRejected("unsigned", f"manifest {manifest_id[:16]} is not signed")
        try:
            self.key.verify(signature, _message(manifest_id))
        except InvalidSignature:
            raise ArtifactRejected(
                "bad-signature", f"manifest {manifest_id[:16]} is not signed by the trusted key"
            ) from None


def verifier(pubkey: Ed25519PublicKey | str | os.PathLike[str] | None) -> Verifier | None:
    """`None` means peers are trusted; a key or key file means signatures are required."""
    if pubkey is None:
        return None
    if isinstance(pubkey, Ed25519PublicKey):
        return Verifier(pubkey)
    return Verifier(load_public_key(pubkey))
