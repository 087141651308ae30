"""This pod's certificate: a CertificateSigningRequest sent with the pod's own token.

The agent makes a key (it never leaves the process), sends a certificates.k8s.io/v1
CertificateSigningRequest for signer `ferry.dev/agent` naming its pod
(peerid.new_key_and_csr), and waits for the operator to approve and sign it. The
apiserver, not the agent, records who asked: `spec.username` (the service account)
and `spec.extra["authentication.kubernetes.io/pod-name"|"pod-uid"]`, present only
when the token is bound to a pod (the projected service-account token every pod
gets, or a TokenRequest with a boundObjectRef). The operator signs only a request
whose names are exactly that pod's (operator/ferry_operator/signer.py).

The certificate lives CERT_SECONDS (1 h); a new one is asked at two thirds of its
life, with a new key, so a stolen key is worth at most an hour. An agent that gets no
certificate at start does not start: there is no plaintext fallback in cluster mode.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time

from kubernetes import client

from ..peerid import SIGNER, PodIdentity, TlsMaterial, new_key_and_csr

log = logging.getLogger(__name__)

CERT_SECONDS = 3600  # asked for; the operator may shorten it (never below 600: the API minimum)
RENEW_AT = 2 / 3  # of the certificate's life
ISSUE_TIMEOUT_S = 60.0
USAGES = ["digital signature", "client auth", "server auth"]


class NotIssued(RuntimeError):
    """The operator denied the request, or did not sign it in time."""


def request_certificate(
    api: client.ApiClient,
    ident: PodIdentity,
    *,
    seconds: int = CERT_SECONDS,
    timeout: float = ISSUE_TIMEOUT_S,
    poll_s: float = 0.25,
) -> TlsMaterial:
    """One CSR, sent and waited for. It is left to the apiserver's cleaner (issued CSRs
    go after an hour): agents get no delete right on CSRs."""
    certs = client.CertificatesV1Api(api)
    key_pem, csr_pem = new_key_and_csr(ident)
    name = f"ferry-agent-{ident.namespace}-{ident.pod}"[:240] + f"-{secrets.token_hex(4)}"
    certs.create_certificate_signing_request(
        {
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"name": name, "labels": {"ferry.dev/agent-pod": ident.pod[:63]}},
            "spec": {
                "signerName": SIGNER,
                "request": base64.b64encode(csr_pem).decode(),
                "usages": USAGES,
                "expirationSeconds": seconds,
            },
        }
    )
    deadline = time.monotonic() + timeout
    while True:
        status = certs.read_certificate_signing_request(name).status
        for c in status.conditions or []:
            if c.type in ("Denied", "Failed") and c.status == "True":
                raise NotIssued(
                    f"certificate request {name} {c.type.lower()}: {c.reason}: {c.message}"
                )
        if status.certificate:
            return TlsMaterial.from_chain(key_pem, base64.b64decode(status.certificate))
        if time.monotonic() > deadline:
            raise NotIssued(
                f"certificate request {name} not signed within {timeout:.0f}s: "
                "is the Ferry operator running (signer ferry.dev/agent)?"
            )
        time.sleep(poll_s)


class PodCertificates:
    """The current certificate, renewed in the background; `material()` is what the
    gRPC server and clients read (auth.PeerTls)."""

    def __init__(self, api: client.ApiClient, ident: PodIdentity, seconds: int = CERT_SECONDS):
        self.api, self.ident, self.seconds = api, ident, seconds
        self._current = request_certificate(api, ident, seconds=seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ferry-podcert", daemon=True)

    def material(self) -> TlsMaterial:
        return self._current

    def start(self) -> PodCertificates:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            life = max(60.0, self._current.not_after - time.time())
            if self._stop.wait(life * RENEW_AT if life > 90 else 30.0):
                return
            try:
                self._current = request_certificate(self.api, self.ident, seconds=self.seconds)
                log.info(
                    "pod certificate renewed (valid until %s)", time.ctime(self._current.not_after)
                )
            except Exception as exc:  # the old one is still valid; try again soon
                log.warning("pod certificate not renewed: %s", exc)
                self._stop.wait(30.0)
