"""Peers authenticate each other per pod (cluster mode, mTLS), tried as attacks.

Real agents in cluster mode (their default: mTLS), each with its own pod's
service-account token (TokenRequest bound to the pod, as the kubelet projects it)
against the session's real apiserver; the session's real operator signs their
CertificateSigningRequests. The attacker holds what a compromised pod really holds:
the shared bearer token (it is still in every sidecar's Secret), its own pod's token,
and with it a genuine certificate for its own pod, which is not a WeightSource member.

    trainer    model=llama            WeightSource llama's member (the source)
    inference  role=target            a target of RefitJob refit on llama
    outsider   app=evil               a Ferry pod, certificate and all, but related to none
"""

from __future__ import annotations

import base64
import secrets
import shutil
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from agent_e2e_helpers import fill, mixed_specs, snapshot
from kubernetes import client as k8s_client

from ferry_agent.artifacts.errors import FetchFailed
from ferry_agent.artifacts.fetch import fetch
from ferry_agent.auth import PeerTls
from ferry_agent.client import EngineClient
from ferry_agent.errors import PeerRefused, PeerUnavailable, Unauthenticated
from ferry_agent.k8s.podcert import NotIssued, request_certificate
from ferry_agent.peer import AgentClient
from ferry_agent.peerid import PodIdentity, TlsMaterial, new_key_and_csr
from ferry_agent.request import PullRequest
from ferry_dev.controlplane import ControlPlane
from ferry_dev.procs import AgentProcess, spawn_agent
from ferry_operator import pki, rbac, signer
from tests.kube_helpers import pod_token

SPECS = mixed_specs(24, seed=18, scale=2000)
LABELS = {
    "trainer": {"model": "llama"},
    "inference": {"role": "target"},
    "outsider": {"app": "evil"},
}


def token_kubeconfig(cp: ControlPlane, token: str, path: Path) -> Path:
    assert cp.ca is not None
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "pod",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": cp.server,
                            "certificate-authority-data": base64.b64encode(cp.ca.cert_pem).decode(),
                        },
                    }
                ],
                "users": [{"name": "pod", "user": {"token": token}}],
                "contexts": [{"name": "pod", "context": {"cluster": "c", "user": "pod"}}],
            }
        )
    )
    path.chmod(0o600)
    return path


def token_client(kubeconfig: Path) -> k8s_client.ApiClient:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


def grant_agents(api: k8s_client.ApiClient, ns: str) -> None:
    """The agent table (ferry_operator.rbac.AGENT) for the namespace's default account:
    its namespaced rules in a Role, its cluster-scoped CSR rule in a ClusterRole."""
    rb = k8s_client.RbacAuthorizationV1Api(api)

    def role_rules(rules: set[tuple]) -> list[dict[str, Any]]:
        return [
            {
                "apiGroups": [g],
                "resources": [r],
                "verbs": [v],
                **({"resourceNames": [n]} if n else {}),
            }
            for g, r, v, n in sorted(rules)
        ]

    ns_rules = rbac.rules(rbac.AGENT)
    cluster_rules = rbac.rules(rbac.AGENT, frozenset({"cluster"})) - ns_rules
    subject = [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]
    rb.create_namespaced_role(
        ns, {"metadata": {"name": "ferry-agent"}, "rules": role_rules(ns_rules)}
    )
    rb.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "ferry-agent"},
            "subjects": subject,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "ferry-agent",
            },
        },
    )
    name = f"ferry-agent-certs-{ns}"
    rb.create_cluster_role({"metadata": {"name": name}, "rules": role_rules(cluster_rules)})
    rb.create_cluster_role_binding(
        {
            "metadata": {"name": name},
            "subjects": subject,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
        }
    )


@dataclass
class World:
    ns: str
    api: k8s_client.ApiClient
    agents: dict[str, AgentProcess]
    kubeconfigs: dict[str, Path]
    token: str  # the shared bearer token every sidecar still holds
    uids: dict[str, str]
    weights: dict[str, bytes]

    def engine(self, pod: str) -> EngineClient:
        return EngineClient(self.agents[pod].socket, timeout=30)

    def addr(self, pod: str, at: str | None = None) -> str:
        return f"{pod}@{at or self.agents[pod].endpoint}"

    def own_tls(self, pod: str) -> PeerTls:
        """What a compromised `pod` can make: a genuine certificate of its own pod (its
        own token, the operator signs), used without any scruples about whom it calls."""
        me = PodIdentity(self.ns, pod, self.uids[pod])
        material = request_certificate(token_client(self.kubeconfigs[pod]), me)
        return PeerTls(me, lambda: material, lambda _peer: None)


@pytest.fixture(scope="module")
def world(
    control_plane: ControlPlane,
    api_client: k8s_client.ApiClient,
    operator: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    ns = f"peer-identity-{secrets.token_hex(3)}"
    core = k8s_client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": ns}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": "default"}})
    grant_agents(api_client, ns)
    k8s_client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "ferry.dev",
        "v1alpha1",
        ns,
        "weightsources",
        {
            "apiVersion": "ferry.dev/v1alpha1",
            "kind": "WeightSource",
            "metadata": {"name": "llama"},
            "spec": {
                "model": {"name": "llama"},
                "selector": {"matchLabels": {"model": "llama"}},
                "memory": "host",
                "heartbeat": {"leaseDurationSeconds": 10, "renewIntervalSeconds": 2},
            },
        },
    )
    work = tmp_path_factory.mktemp("peer-identity")
    shared = work / "shared-token"
    shared.write_text(secrets.token_hex(16))
    agents: dict[str, AgentProcess] = {}
    kubeconfigs, uids = {}, {}
    try:
        for pod, labels in LABELS.items():
            core.create_namespaced_pod(
                ns,
                {
                    "metadata": {"name": pod, "labels": {**labels, "ferry.dev/inject": "true"}},
                    "spec": {
                        "containers": [{"name": "engine", "image": "example.invalid/engine:1"}]
                    },
                },
            )
            uids[pod] = core.read_namespaced_pod(pod, ns).metadata.uid
            kubeconfigs[pod] = token_kubeconfig(
                control_plane, pod_token(api_client, ns, pod), work / f"{pod}.kubeconfig"
            )
        for pod in LABELS:  # cluster mode by the kubeconfig; mTLS by default
            agents[pod] = spawn_agent(
                work,
                pod,
                shared,
                namespace=ns,
                timeout=90,
                args=["--slab-bytes", "4Mi", "--chunk-bytes", "1Mi", "--log-level", "INFO"],
                env={
                    "KUBECONFIG": str(kubeconfigs[pod]),
                    "FERRY_ARTIFACT_STORE": str(work / pod),
                    "FERRY_LEASE_SECONDS": "10",
                    "FERRY_RENEW_SECONDS": "2",
                },
            )
        w = World(ns, api_client, agents, kubeconfigs, shared.read_text(), uids, {})
        with w.engine("trainer") as src:
            src.declare(SPECS)
            with src.writing("v1"):
                w.weights = fill(src, seed=1)
        k8s_client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            "ferry.dev",
            "v1alpha1",
            ns,
            "refitjobs",
            {
                "apiVersion": "ferry.dev/v1alpha1",
                "kind": "RefitJob",
                "metadata": {"name": "refit"},
                "spec": {
                    "sourceRef": {"name": "llama"},
                    "targets": {"matchLabels": {"role": "target"}},
                    "timeoutSeconds": 120,
                },
            },
        )
        yield w
    finally:
        for p in agents.values():
            p.stop(timeout=10)
        for p in agents.values():
            for f in Path("/dev/shm").glob(f"ferry-{p.pod}_*"):
                f.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def test_a_refitjob_moves_the_weights_over_mtls(world: World) -> None:
    """The operator assigns, the target's job runner dials the source as pod `trainer`."""
    custom = k8s_client.CustomObjectsApi(world.api)
    deadline = time.monotonic() + 120
    while True:
        job = custom.get_namespaced_custom_object(
            "ferry.dev", "v1alpha1", world.ns, "refitjobs", "refit"
        )
        phase = (job.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert phase == "Succeeded", (job.get("status"), world.agents["inference"].log()[-3000:])
    with world.engine("inference") as dst:
        dst.attach()
        assert snapshot(dst) == world.weights


def test_a_target_pulls_on_its_control_socket_over_mtls(world: World) -> None:
    with world.engine("inference") as dst:
        reply = dst.pull([world.addr("trainer")], timeout_s=30)
        assert reply["version"] == "v1"
        dst.attach()
        assert snapshot(dst) == world.weights


def test_a_peer_without_a_pod_certificate_is_refused(world: World, tmp_path: Path) -> None:
    """Plaintext with the shared token, and TLS with a certificate of another CA that
    names a member: no handshake, so no Pull, manifest, digests or artifact fetch."""
    trainer = world.agents["trainer"].endpoint
    with AgentClient(trainer, world.token, timeout=3) as plain:
        for call in (
            lambda: plain.manifest(),
            lambda: plain.version(),
            lambda: plain.digests("v1"),
            lambda: plain.pull(PullRequest([world.addr("inference")], timeout_s=5)),
        ):
            with pytest.raises((PeerUnavailable, Unauthenticated)):
                call()
    with pytest.raises(FetchFailed):
        fetch(trainer, "any", world.token, tmp_path / "x", timeout=3)
    rogue_ca = pki.make_ca("rogue")
    me = PodIdentity(world.ns, "inference", world.uids["inference"])
    key, req = new_key_and_csr(me)
    real_ca = world.own_tls("inference").material().ca_pem  # the client trusts the real CA
    forged = TlsMaterial(key, signer.sign(rogue_ca, req, 600), real_ca)
    rogue = PeerTls(me, lambda: forged, lambda _p: None)
    with (
        AgentClient(trainer, "", timeout=3, tls=rogue, expect="trainer") as c,
        pytest.raises((PeerUnavailable, PeerRefused)),
    ):
        c.manifest()


def test_a_certificate_of_a_non_member_gets_no_metadata(world: World, tmp_path: Path) -> None:
    """The outsider's genuine certificate: the trainer refuses its manifest (NIXL
    metadata), version words, digests, follow and artifact fetch; Pull is refused to
    every peer, a member too."""
    trainer = world.agents["trainer"].endpoint
    outsider = world.own_tls("outsider")
    with AgentClient(trainer, "", timeout=5, tls=outsider, expect="trainer") as c:
        for call in (
            lambda: c.manifest(),
            lambda: c.version(),
            lambda: c.digests("v1"),
            lambda: c.health(),
            lambda: next(iter(c.follow("outsider"))),
        ):
            with pytest.raises(PeerRefused, match="not a member"):
                call()
    with pytest.raises(FetchFailed) as got:
        fetch(trainer, "any", "", tmp_path / "x", timeout=5, tls=outsider, pod="trainer")
    assert got.value.code == "PERMISSION_DENIED"
    member = world.own_tls("inference")
    with AgentClient(trainer, "", timeout=5, tls=member, expect="trainer") as c:
        assert c.manifest().version == "v1"  # a member gets it
        with pytest.raises(PeerRefused, match="not served to peers"):
            c.pull(PullRequest([world.addr("outsider")], timeout_s=5))


class Recorder(grpc.GenericRpcHandler):
    """A server that notes every call that reaches it (none must)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def service(self, details: Any) -> Any:
        self.calls.append(details.method)
        return None


def test_a_target_pointed_at_a_non_member_refuses_before_sending(world: World) -> None:
    """An assignment (or a member entry) pointing the target at the attacker: by the
    attacker's pod name it refuses before dialling; by a member's name at the attacker's
    endpoint, the handshake fails (the certificate names another pod): no call arrives
    and the target's weights are unchanged."""
    m = world.own_tls("outsider").material()
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[rec])
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(m.key_pem, m.cert_pem)], root_certificates=m.ca_pem, require_client_auth=True
        ),
    )
    server.start()
    try:
        with world.engine("inference") as dst:
            dst.attach()
            before = snapshot(dst)
            for lie, why in (
                (world.addr("outsider", f"127.0.0.1:{port}"), "not pulling from pod"),
                (world.addr("trainer", f"127.0.0.1:{port}"), "not the pod we dialled"),
            ):
                with pytest.raises(PeerRefused, match=why):
                    dst.pull([lie], timeout_s=5, retries=0)
            dst.attach()
            assert snapshot(dst) == before
        assert rec.calls == []
    finally:
        server.stop(0)


def test_a_csr_naming_another_pod_is_not_signed(world: World) -> None:
    """With its own pod-bound token the outsider asks for a certificate naming the
    trainer: the operator denies it, and no certificate is issued."""
    trainer = PodIdentity(world.ns, "trainer", world.uids["trainer"])
    api = token_client(world.kubeconfigs["outsider"])
    with pytest.raises(NotIssued, match="NamesAnotherIdentity"):
        request_certificate(api, trainer, timeout=30)
    certs = k8s_client.CertificatesV1Api(world.api)
    mine = [
        c
        for c in certs.list_certificate_signing_request().items
        if c.spec.username == f"system:serviceaccount:{world.ns}:default"
        and (c.spec.extra or {}).get("authentication.kubernetes.io/pod-name") == ["outsider"]
    ]
    asked_for_trainer = [
        c
        for c in mine
        if b"trainer" in base64.b64decode(c.spec.request)
        or any(x.reason == "NamesAnotherIdentity" for x in c.status.conditions or [])
    ]
    assert asked_for_trainer and all(not c.status.certificate for c in asked_for_trainer)


def test_an_agent_without_a_pod_certificate_does_not_start(
    world: World, control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Cluster mode never falls back to plaintext: an agent whose credentials are not
    bound to its pod (here: an admin kubeconfig) is denied its certificate and exits."""
    core = k8s_client.CoreV1Api(world.api)
    core.create_namespaced_pod(
        world.ns,
        {
            "metadata": {
                "name": "latecomer",
                "labels": {"model": "llama", "ferry.dev/inject": "true"},
            },
            "spec": {"containers": [{"name": "engine", "image": "example.invalid/engine:1"}]},
        },
    )
    token = tmp_path / "token"
    token.write_text(world.token)
    with pytest.raises(RuntimeError, match="NotPodBound"):
        spawn_agent(
            tmp_path,
            "latecomer",
            token,
            namespace=world.ns,
            timeout=90,
            args=["--slab-bytes", "4Mi", "--log-level", "INFO"],
            env={
                "KUBECONFIG": str(control_plane.kubeconfig),
                "FERRY_ARTIFACT_STORE": str(tmp_path / "store"),
            },
        )
