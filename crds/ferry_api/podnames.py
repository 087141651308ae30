"""The names a Ferry pod certificate carries, in one place for the agent that asks for it
and the operator that signs it (agent ferry_agent/peerid.py, operator signer.py)."""

from __future__ import annotations

SIGNER = "ferry.dev/agent"  # the CertificateSigningRequest signerName
SPIFFE_PREFIX = "spiffe://ferry.dev/ns/"
DNS_SUFFIX = "pod.ferry.dev"


def spiffe_id(namespace: str, pod: str) -> str:
    """The URI SAN: what a server reads of its caller."""
    return f"{SPIFFE_PREFIX}{namespace}/pod/{pod}"


def dns_name(namespace: str, pod: str) -> str:
    """The DNS SAN: what a client checks of the server it dialled."""
    return f"{pod}.{namespace}.{DNS_SUFFIX}"
