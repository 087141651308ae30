"""The webhook's one serving certificate per Service, shared by every operator replica (pure).

Every replica serves the webhook behind one Service and writes one caBundle into
the webhook configuration, so they must serve certificates of one CA: when each
generated its own at start, the caBundle flipped to the last writer's CA and the
apiserver refused TLS to every other replica (pods labelled for injection were
refused under failurePolicy: Fail).

The material lives in one Secret (SECRET_KEYS). A replica reads it and decides:
- absent or unreadable: a new CA and leaf (written with create-if-absent: the
  first replica to write wins, the others adopt its Secret);
- leaf expiring within RENEW_BEFORE, or not covering the webhook's host, or not
  from the stored CA: a new leaf from the same CA (the caBundle stays);
- CA expiring: a new CA, and the caBundle keeps the old CA next to it while the
  old one is valid, so a replica still serving the old leaf is trusted until it
  reloads.
The decision (`plan`) is pure; webhook.py does the reads, writes and reloads.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import pki

SECRET_NAME = "ferry-webhook-serving"
SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt", "ca.key")
LEAF_DAYS = 365
CA_DAYS = 3650
# Renewed this long before expiry: every replica polls far more often than this.
RENEW_BEFORE = dt.timedelta(days=30)
CA_RENEW_BEFORE = dt.timedelta(days=365)


@dataclass(frozen=True)
class Serving:
    """What a replica serves (cert, key) and what the apiserver trusts (ca_bundle)."""

    cert_pem: bytes
    key_pem: bytes
    ca_bundle: bytes
    ca_key_pem: bytes = b""  # only in the shared Secret: lets any replica renew the leaf

    def data(self) -> dict[str, bytes]:
        return {
            "tls.crt": self.cert_pem,
            "tls.key": self.key_pem,
            "ca.crt": self.ca_bundle,
            "ca.key": self.ca_key_pem,
        }

    @classmethod
    def from_data(cls, data: dict[str, bytes]) -> Serving:
        return cls(
            data.get("tls.crt", b""),
            data.get("tls.key", b""),
            data.get("ca.crt", b""),
            data.get("ca.key", b""),
        )


def _certs(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem) if pem.strip() else []
    except ValueError:
        return []


def _covers(cert: x509.Certificate, hosts: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for host in hosts:
        try:
            if str(ipaddress.ip_address(host)) not in ips:
                return False
        except ValueError:
            if host not in names:
                return False
    return True


def _signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
        return True
    except Exception:  # InvalidSignature, or a key type that cannot verify
        return False


def _key_matches(cert: x509.Certificate, key_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*der) == cert.public_key().public_bytes(*der)


def _valid_until(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def problem(current: Serving | None, hosts: list[str], now: dt.datetime) -> str | None:
    """Why `current` cannot be served as is (None: it can)."""
    if current is None:
        return "absent"
    leaves, cas = _certs(current.cert_pem), _certs(current.ca_bundle)
    if not leaves or not cas:
        return "unreadable"
    leaf = leaves[0]
    if not _key_matches(leaf, current.key_pem):
        return "key does not match certificate"
    if not any(_signed_by(leaf, ca) for ca in cas):
        return "certificate not issued by the CA in ca.crt"
    if not _covers(leaf, hosts):
        return f"certificate does not cover {', '.join(hosts)}"
    if _valid_until(leaf) - now < RENEW_BEFORE:
        return f"certificate expires {_valid_until(leaf):%Y-%m-%d}"
    return None


def plan(
    current: Serving | None, hosts: list[str], now: dt.datetime, serving_bundle: bytes = b""
) -> Serving | None:
    """The material to write in place of `current`, or None when `current` is fine.
    `serving_bundle` is the CA bundle this replica serves under now: a new CA keeps
    those CAs trusted too (a deleted Secret must not strand replicas still serving
    the previous certificate until they reload)."""
    why = problem(current, hosts, now)
    if why is None:
        return None
    cas = _certs(current.ca_bundle) if current else []
    ca = cas[0] if cas else None
    if (
        ca is not None
        and current is not None
        and _key_matches(ca, current.ca_key_pem)
        and _valid_until(ca) - now > CA_RENEW_BEFORE + dt.timedelta(days=LEAF_DAYS)
    ):
        keep = pki.KeyPair(ca.public_bytes(serialization.Encoding.PEM), current.ca_key_pem)
        leaf = pki.issue(keep, hosts[0], hosts, days=LEAF_DAYS, now=now)
        return Serving(leaf.cert_pem, leaf.key_pem, current.ca_bundle, current.ca_key_pem)
    new_ca = pki.make_ca("ferry-webhook-ca", days=CA_DAYS, now=now)
    leaf = pki.issue(new_ca, hosts[0], hosts, days=LEAF_DAYS, now=now)
    old: list[x509.Certificate] = []
    for c in [*cas, *_certs(serving_bundle)]:
        if _valid_until(c) > now and c not in old:
            old.append(c)
    still_valid = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in old)
    return Serving(leaf.cert_pem, leaf.key_pem, new_ca.cert_pem + still_valid, new_ca.key_pem)
