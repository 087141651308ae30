"""Signer `ferry.dev/agent`: a certificate for the pod that asked, and for no other.

An agent sends a CertificateSigningRequest with its pod's token (agent k8s/podcert.py).
What the apiserver wrote into the CSR about the requester is the evidence; what the
agent wrote into the PKCS#10 request must match it exactly:

    spec.username          system:serviceaccount:<ns>:<sa>        set by the apiserver
    spec.extra             authentication.kubernetes.io/pod-name   present only for a
                           authentication.kubernetes.io/pod-uid    pod-bound token
    the Pod <ns>/<name>    exists with that uid, runs as <sa>, is not being deleted or
                           finished, and carries ferry.dev/inject=true (pods Ferry serves)
    the request            subject CN=<name>, serialNumber=<uid>; SANs exactly
                           spiffe://ferry.dev/ns/<ns>/pod/<name> and
                           <name>.<ns>.pod.ferry.dev; no other extension; a valid
                           signature; EC P-256/P-384 or RSA >= 2048
    spec.usages            within digital signature, key encipherment, client auth,
                           server auth

Anything else is Denied with a reason naming the mismatch. The certificate lives at
most MAX_SECONDS (1 h) and is signed by the agent CA, kept in one Secret of the
operator's namespace (AGENT_CA_SECRET; created by the first replica that needs it),
which is not the webhook's CA: an agent certificate is never a webhook serving one.
`review` and `sign` are pure; `handle` is the kopf handler's body.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry_api.podnames import SIGNER, dns_name, spiffe_id

from . import pki

log = logging.getLogger(__name__)

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"
INJECT_LABEL = "ferry.dev/inject"
AGENT_CA_SECRET = "ferry-agent-ca"
MIN_SECONDS, DEFAULT_SECONDS, MAX_SECONDS = 600, 3600, 3600
USAGES = frozenset({"digital signature", "key encipherment", "client auth", "server auth"})


@dataclass(frozen=True)
class Requester:
    """Who sent the CSR, as the apiserver recorded it."""

    namespace: str
    service_account: str
    pod: str
    uid: str


@dataclass(frozen=True)
class Decision:
    approve: bool
    reason: str  # CamelCase, the condition's reason
    message: str
    seconds: int = 0


def deny(reason: str, message: str) -> Decision:
    return Decision(False, reason, message)


def requester(spec: dict[str, Any]) -> Requester | Decision:
    """The pod that sent the CSR, or the Decision that refuses it."""
    user = str(spec.get("username") or "")
    extra = spec.get("extra") or {}
    names, uids = extra.get(POD_NAME) or [], extra.get(POD_UID) or []
    if not user.startswith(SA_PREFIX) or len(names) != 1 or len(uids) != 1:
        return deny(
            "NotPodBound",
            f"requester {user!r} did not use a pod-bound service-account "
            "token (no authentication.kubernetes.io/pod-name and pod-uid in spec.extra): "
            "send the request with the pod's projected token",
        )
    ns, _, sa = user[len(SA_PREFIX) :].partition(":")
    return Requester(ns, sa, str(names[0]), str(uids[0]))


def _names(req: Requester) -> tuple[str, str]:
    return spiffe_id(req.namespace, req.pod), dns_name(req.namespace, req.pod)


def review(spec: dict[str, Any], pod: dict[str, Any] | None) -> Decision:
    """Approve, or deny naming why. `pod`: the requester's Pod object as read now (None:
    not found)."""
    who = requester(spec)
    if isinstance(who, Decision):
        return who
    if spec.get("signerName") != SIGNER:
        return deny("WrongSigner", f"signerName {spec.get('signerName')!r} is not {SIGNER}")
    if pod is None:
        return deny("PodNotFound", f"pod {who.namespace}/{who.pod} does not exist")
    meta, pspec = pod.get("metadata") or {}, pod.get("spec") or {}
    if meta.get("uid") != who.uid:
        return deny(
            "PodMismatch",
            f"pod {who.namespace}/{who.pod} has uid {meta.get('uid')}, the "
            f"token was bound to {who.uid}",
        )
    if (pspec.get("serviceAccountName") or "default") != who.service_account:
        return deny(
            "PodMismatch",
            f"pod {who.pod} runs as service account "
            f"{pspec.get('serviceAccountName') or 'default'}, not {who.service_account}",
        )
    if meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") in (
        "Succeeded",
        "Failed",
    ):
        return deny("PodNotRunning", f"pod {who.pod} is being deleted or has finished")
    if (meta.get("labels") or {}).get(INJECT_LABEL) != "true":
        return deny("NotFerryPod", f"pod {who.pod} is not labelled {INJECT_LABEL}=true")
    usages = set(spec.get("usages") or [])
    if not usages or not usages <= USAGES:
        return deny("BadUsages", f"usages {sorted(usages)} must be within {sorted(USAGES)}")
    try:
        csr = x509.load_pem_x509_csr(base64.b64decode(spec.get("request") or ""))
    except ValueError as exc:
        return deny("BadRequest", f"spec.request is not a PEM certificate request: {exc}")
    why = _request_problem(csr, who)
    if why:
        return deny("NamesAnotherIdentity", why)
    seconds = int(spec.get("expirationSeconds") or DEFAULT_SECONDS)
    seconds = max(MIN_SECONDS, min(MAX_SECONDS, seconds))
    return Decision(True, "FerryAgentPod", f"pod {who.namespace}/{who.pod} ({who.uid})", seconds)


def _request_problem(csr: x509.CertificateSigningRequest, who: Requester) -> str | None:
    if not csr.is_signature_valid:
        return "the request's signature is not valid"
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            return f"EC curve {key.curve.name}: use P-256 or P-384"
    elif not (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048):
        return "key: EC P-256/P-384 or RSA of at least 2048 bits"
    want_subject = [(NameOID.COMMON_NAME, who.pod), (NameOID.SERIAL_NUMBER, who.uid)]
    got_subject = [(a.oid, a.value) for a in csr.subject]
    if got_subject != want_subject:
        return (
            f"subject {csr.subject.rfc4514_string()!r} must be exactly "
            f"CN={who.pod}, serialNumber={who.uid} (the requesting pod)"
        )
    exts = list(csr.extensions)
    if len(exts) != 1 or not isinstance(exts[0].value, x509.SubjectAlternativeName):
        return "the request may carry one extension: subjectAltName"
    san = exts[0].value
    uri, dns = _names(who)
    got = (
        sorted(san.get_values_for_type(x509.UniformResourceIdentifier)),
        sorted(san.get_values_for_type(x509.DNSName)),
        len(list(san)),
    )
    if got != ([uri], [dns], 2):
        return f"subjectAltName {[str(n.value) for n in san]} must be exactly [{uri}, {dns}] (the requesting pod)"
    return None


def sign(
    ca: pki.KeyPair, request_pem: bytes, seconds: int, now: dt.datetime | None = None
) -> bytes:
    """The leaf for an approved request, followed by the CA certificate (the agent's
    trust bundle comes from the same place)."""
    now = now or dt.datetime.now(dt.UTC)
    csr = x509.load_pem_x509_csr(request_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(seconds=seconds))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(san, critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem


# -- the adapter (kopf handler body) ---------------------------------------------------------
def _condition(kind: str, decision: Decision) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": kind,
        "status": "True",
        "reason": decision.reason,
        "message": decision.message,
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    }


def handle(body: dict[str, Any], ca: Any) -> Decision | None:
    """Decide one CSR of our signer and write the outcome; None when there is nothing
    to do (already decided and issued, or decided by someone else)."""
    from kubernetes import client

    from . import kube

    spec, status = body.get("spec") or {}, body.get("status") or {}
    if spec.get("signerName") != SIGNER or status.get("certificate"):
        return None
    conds = {c.get("type") for c in status.get("conditions") or []}
    if conds & {"Denied", "Failed"}:
        return None
    who = requester(spec)
    pod = None
    if isinstance(who, Requester):
        try:
            pod = kube.api().sanitize_for_serialization(
                kube.core().read_namespaced_pod(who.pod, who.namespace)
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise
    decision = review(spec, pod)
    certs = client.CertificatesV1Api(kube.api())
    name = body["metadata"]["name"]
    if "Approved" not in conds or not decision.approve:
        obj = dict(body)
        obj["status"] = {
            **status,
            "conditions": [
                *(status.get("conditions") or []),
                _condition("Approved" if decision.approve else "Denied", decision),
            ],
        }
        body = kube.api().sanitize_for_serialization(
            certs.replace_certificate_signing_request_approval(name, obj)
        )
        log.info(
            "CSR %s %s: %s: %s",
            name,
            "approved" if decision.approve else "denied",
            decision.reason,
            decision.message,
        )
    if not decision.approve:
        return decision
    chain = sign(ca.load(), base64.b64decode(spec["request"]), decision.seconds)
    obj = dict(body)
    obj["status"] = {**(body.get("status") or {}), "certificate": base64.b64encode(chain).decode()}
    try:
        certs.replace_certificate_signing_request_status(name, obj)
    except client.ApiException as exc:
        if exc.status != 409:  # 409: an older event of a CSR we already signed
            raise
        return None
    return decision


class AgentCA:
    """The agent CA in one Secret of the operator's namespace: read, or created by the
    first replica that signs (a replica that loses the create race reads the winner's)."""

    def __init__(self, namespace: str, name: str = AGENT_CA_SECRET) -> None:
        self.namespace, self.name = namespace, name
        self._ca: pki.KeyPair | None = None

    def load(self) -> pki.KeyPair:
        if self._ca is not None:
            return self._ca
        from kubernetes import client

        from . import kube

        for _ in range(3):
            try:
                s = kube.core().read_namespaced_secret(self.name, self.namespace)
                data = {k: base64.b64decode(v) for k, v in (s.data or {}).items()}
                self._ca = pki.KeyPair(data["ca.crt"], data["ca.key"])
                return self._ca
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
            new = pki.make_ca("ferry-agent-ca")
            try:
                kube.core().create_namespaced_secret(
                    self.namespace,
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "type": "Opaque",
                        "metadata": {
                            "name": self.name,
                            "namespace": self.namespace,
                            "labels": {"app.kubernetes.io/component": "agent-ca"},
                        },
                        "data": {
                            "ca.crt": base64.b64encode(new.cert_pem).decode(),
                            "ca.key": base64.b64encode(new.key_pem).decode(),
                        },
                    },
                )
                log.info("agent CA created in Secret %s/%s", self.namespace, self.name)
                self._ca = new
                return new
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
        raise RuntimeError(f"Secret {self.namespace}/{self.name} could not be read or created")
