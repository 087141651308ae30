"""Pod identities of agents, as their certificates carry them (pure, but for key generation).

Every agent in cluster mode holds a short-lived certificate from the operator's agent CA
(the operator signs a CertificateSigningRequest only for the pod that sent it:
operator/ferry_operator/signer.py). It names exactly one pod:

    URI SAN   spiffe://ferry.dev/ns/<namespace>/pod/<pod>   what a server reads of its caller
    DNS SAN   <pod>.<namespace>.pod.ferry.dev                what a client checks of the
                                                             server it dialled (gRPC's
                                                             hostname check, with the
                                                             target name overridden)
    subject   CN=<pod>, serialNumber=<pod uid>               a re-created pod of the same
                                                             name is another identity

gRPC hands the server the caller's SPIFFE ID (`peer_spiffe_id`) and certificate; the
client learns nothing of the server but that the handshake passed, so it must say
beforehand whom it dials (SourceAddress.pod).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ferry_api.podnames import SIGNER, dns_name, spiffe_id

__all__ = ["SIGNER", "PodIdentity", "TlsMaterial", "caller", "new_key_and_csr"]
_SPIFFE = re.compile(r"^spiffe://ferry\.dev/ns/([a-z0-9-]{1,63})/pod/([a-z0-9.-]{1,253})$")


@dataclass(frozen=True)
class PodIdentity:
    namespace: str
    pod: str
    uid: str = ""  # empty when only the name is known (a client's expectation)

    @property
    def spiffe_id(self) -> str:
        return spiffe_id(self.namespace, self.pod)

    @property
    def dns_name(self) -> str:
        return dns_name(self.namespace, self.pod)

    @classmethod
    def from_spiffe_id(cls, text: str, uid: str = "") -> PodIdentity | None:
        m = _SPIFFE.match(text)
        return cls(m.group(1), m.group(2), uid) if m else None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}"


def caller(auth_context: dict[str, list[bytes]]) -> PodIdentity | None:
    """The pod a gRPC call came from, as its verified certificate names it (None: the call
    carried no certificate of ours). gRPC sets `peer_spiffe_id` only for a certificate
    with exactly one URI SAN; the uid comes from the certificate's subject."""
    ids = auth_context.get("peer_spiffe_id") or []
    if len(ids) != 1:
        return None
    ident = PodIdentity.from_spiffe_id(ids[0].decode(errors="replace"))
    if ident is None:
        return None
    pems = auth_context.get("x509_pem_cert") or []
    return PodIdentity(ident.namespace, ident.pod, _uid_of(pems[0]) if pems else "")


_UIDS: dict[bytes, str] = {}  # certificate PEM -> pod uid: parsed once per certificate


def _uid_of(pem: bytes) -> str:
    uid = _UIDS.get(pem)
    if uid is None:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(pem)
        attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        uid = str(attrs[0].value) if attrs else ""
        if len(_UIDS) > 4096:
            _UIDS.clear()
        _UIDS[pem] = uid
    return uid


def new_key_and_csr(ident: PodIdentity) -> tuple[bytes, bytes]:
    """A fresh P-256 key (it never leaves the agent) and a PKCS#10 request naming `ident`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, ident.pod),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, ident.uid),
        ]
    )
    sans = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(ident.spiffe_id), x509.DNSName(ident.dns_name)]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(sans, critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class TlsMaterial:
    """What an agent serves and presents: its key, its certificate (leaf first, as the CSR's
    status.certificate holds it), and the CA bundle peers must chain to."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    not_after: float = 0.0  # the leaf's expiry, seconds since the epoch

    @classmethod
    def from_chain(cls, key_pem: bytes, chain_pem: bytes, ca_pem: bytes = b"") -> TlsMaterial:
        """The leaf is the first certificate of `chain_pem`; without `ca_pem` the rest of the
        chain is the CA bundle (the operator appends its CA to what it signs)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        certs = x509.load_pem_x509_certificates(chain_pem)
        if not certs:
            raise ValueError("no certificate in the chain")
        leaf = certs[0].public_bytes(serialization.Encoding.PEM)
        bundle = ca_pem or b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[1:])
        if not bundle:
            raise ValueError("no CA certificate to verify peers with")
        return cls(key_pem, leaf, bundle, certs[0].not_valid_after_utc.timestamp())


def grpc_server_config(material: TlsMaterial) -> Any:
    import grpc

    return grpc.ssl_server_certificate_configuration(
        [(material.key_pem, material.cert_pem)], root_certificates=material.ca_pem
    )
