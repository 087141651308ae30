"""Peer identity, pure parts: what the signer approves, who is related to whom, how an
address names a pod. The attacks against real agents and a real apiserver are in
tests/e2e/agent/test_agent_peer_identity.py."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ferry_agent.errors import BadRequest
from ferry_agent.k8s.peerpolicy import groups, refusal, related
from ferry_agent.peerid import PodIdentity, TlsMaterial, new_key_and_csr
from ferry_agent.request import PullRequest, SourceAddress
from ferry_operator import pki, signer

NS, POD, UID = "team", "inference-0", "0b7c6f5e-1111-2222-3333-444455556666"


def csr_spec(
    request_pem: bytes,
    *,
    pod: str = POD,
    uid: str = UID,
    sa: str = "default",
    usages: list[str] | None = None,
) -> dict:
    return {
        "signerName": signer.SIGNER,
        "username": f"system:serviceaccount:{NS}:{sa}",
        "extra": {signer.POD_NAME: [pod], signer.POD_UID: [uid]},
        "usages": usages or ["digital signature", "client auth", "server auth"],
        "request": base64.b64encode(request_pem).decode(),
        "expirationSeconds": 3600,
    }


def pod_obj(name: str = POD, uid: str = UID, labels: dict | None = None) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid,
            "labels": {"ferry.dev/inject": "true", **(labels or {})},
        },
        "spec": {"serviceAccountName": "default"},
        "status": {"phase": "Running"},
    }


def forged_csr(subject_pod: str, uid: str, sans: list[x509.GeneralName]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, subject_pod),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, uid),
            ]
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_the_agents_own_request_is_approved_and_signed_for_that_pod() -> None:
    me = PodIdentity(NS, POD, UID)
    key, req = new_key_and_csr(me)
    d = signer.review(csr_spec(req), pod_obj())
    assert d.approve, d
    assert d.seconds == 3600
    ca = pki.make_ca("agent-ca")
    chain = signer.sign(ca, req, d.seconds)
    m = TlsMaterial.from_chain(key, chain)
    leaf = x509.load_pem_x509_certificate(m.cert_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [me.spiffe_id]
    assert san.get_values_for_type(x509.DNSName) == [me.dns_name]
    assert m.ca_pem == ca.cert_pem
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("another pod in the SANs", "NamesAnotherIdentity"),
        ("another pod as subject", "NamesAnotherIdentity"),
        ("an extra SAN", "NamesAnotherIdentity"),
        ("no SAN", "NamesAnotherIdentity"),
        ("a token not bound to a pod", "NotPodBound"),
        ("a pod re-created under the name", "PodMismatch"),
        ("another service account", "PodMismatch"),
        ("a pod Ferry does not serve", "NotFerryPod"),
        ("code signing usage", "BadUsages"),
        ("no such pod", "PodNotFound"),
    ],
)
def test_requests_naming_anything_but_the_requesting_pod_are_denied(case: str, reason: str) -> None:
    me, other = PodIdentity(NS, POD, UID), PodIdentity(NS, "trainer-0")
    _, own = new_key_and_csr(me)
    spec, pod = csr_spec(own), pod_obj()
    if case == "another pod in the SANs":
        spec = csr_spec(
            forged_csr(
                POD,
                UID,
                [x509.UniformResourceIdentifier(other.spiffe_id), x509.DNSName(other.dns_name)],
            )
        )
    elif case == "another pod as subject":
        spec = csr_spec(
            forged_csr(
                "trainer-0",
                UID,
                [x509.UniformResourceIdentifier(me.spiffe_id), x509.DNSName(me.dns_name)],
            )
        )
    elif case == "an extra SAN":
        spec = csr_spec(
            forged_csr(
                POD,
                UID,
                [
                    x509.UniformResourceIdentifier(me.spiffe_id),
                    x509.DNSName(me.dns_name),
                    x509.DNSName(other.dns_name),
                ],
            )
        )
    elif case == "no SAN":
        spec = csr_spec(forged_csr(POD, UID, []))
    elif case == "a token not bound to a pod":
        spec = {**spec, "extra": {}}
    elif case == "a pod re-created under the name":
        pod = pod_obj(uid="another-uid")
    elif case == "another service account":
        spec = {**spec, "username": f"system:serviceaccount:{NS}:builder"}
    elif case == "a pod Ferry does not serve":
        pod = {**pod, "metadata": {**pod["metadata"], "labels": {}}}
    elif case == "code signing usage":
        spec = {**spec, "usages": ["code signing"]}
    elif case == "no such pod":
        pod = None
    d = signer.review(spec, pod)
    assert not d.approve
    assert d.reason == reason, d


def test_related_pods_share_a_weightsource_or_its_jobs() -> None:
    ws = [
        {"metadata": {"name": "llama"}, "spec": {"selector": {"matchLabels": {"app": "trainer"}}}}
    ]
    jobs = [
        {
            "metadata": {"name": "r"},
            "spec": {
                "sourceRef": {"name": "llama"},
                "targets": {"matchLabels": {"app": "inference"}},
            },
        }
    ]
    g = groups(ws, jobs, [])
    trainer, inference, other = {"app": "trainer"}, {"app": "inference"}, {"app": "evil"}
    assert related(trainer, inference, g) == "WeightSource llama"
    assert related(inference, inference, g) == "WeightSource llama"  # tree / chain relays
    assert related(trainer, other, g) is None
    assert related(other, other, g) is None  # two outsiders share nothing
    assert related(trainer, inference, groups(ws, [], [])) is None  # no job: no target


def test_a_certificate_of_a_deleted_pod_is_refused() -> None:
    assert refusal(pod_obj(), PodIdentity(NS, POD, UID)) is None
    assert "uid" in (refusal(pod_obj(uid="new"), PodIdentity(NS, POD, UID)) or "")
    assert refusal(None, PodIdentity(NS, POD, UID)) == "no such pod"


def test_addresses_name_the_pod_they_must_be() -> None:
    a = SourceAddress.parse("trainer-0@10.0.0.5:7470/3")
    assert (a.pod, a.endpoint, a.rank) == ("trainer-0", "10.0.0.5:7470", 3)
    assert str(a) == "trainer-0@10.0.0.5:7470/3"
    assert SourceAddress.parse("10.0.0.5:7470").pod == ""
    with pytest.raises(BadRequest):
        SourceAddress.parse("Not_A_Pod@10.0.0.5:7470")


def test_a_control_socket_pull_is_bounded_like_any_request() -> None:
    r = PullRequest.from_dict({"sources": ["a@127.0.0.1:1"], "timeout_s": 5})
    assert r.sources == ("a@127.0.0.1:1",)
    with pytest.raises(BadRequest, match="unknown field"):
        PullRequest.from_dict({"sources": ["127.0.0.1:1"], "reshard": {"rank": 0}})
    with pytest.raises(BadRequest, match="timeout_s"):
        PullRequest.from_dict({"sources": ["127.0.0.1:1"], "timeout_s": 1e9})
    with pytest.raises(BadRequest, match="sources"):
        PullRequest.from_dict({"sources": [f"127.0.0.1:{i}" for i in range(1000)]})


def test_a_follow_assignment_names_the_pods_in_cluster_mode() -> None:
    from ferry_agent.k8s.following import spec_of

    a = {
        "job": "rl",
        "source": "trainer-0",
        "sourceEndpoint": "10.0.0.5:7470",
        "upstream": "inference-1",
        "upstreamEndpoint": "10.0.0.7:7470",
        "timeoutSeconds": 30,
    }
    assert spec_of(a, "inference-2").source == "10.0.0.5:7470"
    spec = spec_of(a, "inference-2", by_pod=True)
    assert (spec.source, spec.upstream) == ("trainer-0@10.0.0.5:7470", "inference-1@10.0.0.7:7470")
